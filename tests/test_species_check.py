"""The species check of a DNA index (`clibd.species_check`): alignment identity, the candidate
rule, the calibrated embedding threshold, and identify with and without it on the shared BOLD
barcodes (a small untrained k-mer-profile tower: its fixed k-mer sketch already places barcodes)."""

import dataclasses
import json
import math
import random
import shutil
import threading
import time

import pytest
import torch

from clibd import species_check
from clibd.data import read_records
from clibd.identify import Identifier, read_predictions_tsv, write_predictions_tsv
from clibd.index import ReferenceIndex, add_to_index, build_index, recalibrate_index
from clibd.species_check import (
    SpeciesCheck,
    choose_candidate,
    choose_candidates,
    identity,
    named_position,
    naming_threshold,
)

random.seed(0)
BARCODE = "".join(random.choice("ACGT") for _ in range(600))


def mutate(sequence: str, positions: range | list[int]) -> str:
    bases = list(sequence)
    for i in positions:
        bases[i] = {"A": "C", "C": "G", "G": "T", "T": "A"}[bases[i]]
    return "".join(bases)


def test_identity_counts_identical_bases_over_the_aligned_region():
    assert identity(BARCODE, BARCODE) == 1.0
    assert identity(BARCODE, mutate(BARCODE, range(0, 600, 100))) == pytest.approx(594 / 600)
    # a piece of the reference: the reference's overhang is an end gap, left out
    assert identity(BARCODE[100:400], BARCODE) == 1.0
    # gaps and case are normalised as everywhere in clibd
    assert identity(BARCODE.lower(), "-" + BARCODE) == 1.0


def test_identity_sets_unknown_bases_aside():
    # N padding at the ends is trimmed: a padded barcode is its known part
    padded = "N" * 10 + BARCODE[10:]
    assert identity(padded, BARCODE) == 1.0 and identity(BARCODE, padded) == 1.0
    # an N inside is neither identical nor compared: one substitution among 590 compared columns
    gapped = BARCODE[:300] + "N" * 10 + BARCODE[310:]
    assert identity(gapped, mutate(BARCODE, [100])) == pytest.approx(589 / 590)
    # a reference that is mostly N is not a species call on its few known bases
    assert identity(BARCODE, "N" * 520 + BARCODE[520:]) == 0.0
    assert identity(BARCODE[:90], BARCODE) == 0.0 and identity(BARCODE[:130], BARCODE) == 1.0
    # barcodes of shifted stretches: identity over their overlap
    assert identity(BARCODE[:400], BARCODE[150:]) == 1.0


def test_identity_names_a_bad_barcode():
    with pytest.raises(ValueError, match="candidate 2 of q7"):
        choose_candidate(BARCODE, [BARCODE[:300] + "T" * 5, "ACGT-XYZ"], cutoff=1.01, query_name="q7")


def test_first_candidate_clearing_the_cutoff_wins_and_stops_the_alignments(monkeypatch):
    calls = []
    real = species_check._identity
    monkeypatch.setattr(species_check, "_identity", lambda *a: calls.append(a) or real(*a))
    close, closer = mutate(BARCODE, range(0, 600, 50)), BARCODE  # 98 % and 100 %
    assert choose_candidate(BARCODE, [close, closer, closer], cutoff=0.97) == (0, pytest.approx(588 / 600))
    assert len(calls) == 1
    far = mutate(BARCODE, range(0, 600, 10))  # 90 %
    # none clears: the most identical one (its identity under the cut-off: nothing named)
    assert choose_candidate(BARCODE, [far, close, far], cutoff=0.99) == (1, pytest.approx(588 / 600))
    assert choose_candidate(BARCODE, [close, close], cutoff=0.99) == (0, pytest.approx(588 / 600))  # first of equals
    assert choose_candidate(BARCODE, [BARCODE[:90]], cutoff=0.97) == (-1, 0.0)  # too short to compare: no reference
    assert choose_candidate(BARCODE, [], cutoff=0.97) == (-1, 0.0)
    assert named_position((1, 0.98), 0.97) == 1 and named_position((1, 588 / 600), 0.99) is None
    assert named_position((-1, 0.0), 0.0) is None  # nothing compared names nothing, whatever the cut-off


@pytest.fixture(scope="module")
def real_batch(data_dir):
    """30 real BOLD queries, each with 5 candidates: random references with one of its own species
    at a varying position (or none), so some settle at the first candidate, some later, some never."""
    rows = [r for r in read_records(data_dir / "insect_bold_coi" / "insect_bold_coi_small.tsv") if r["dna"]]
    rng = random.Random(1)
    queries, candidates, names = [], [], []
    for i, query in enumerate(rng.sample(rows, 30)):
        same = [r for r in rows if r["species"] == query["species"] and r["id"] != query["id"]]
        near = rng.sample([r for r in rows if r["species"] != query["species"]], 5)
        if same and i % 6:
            near[i % 5] = same[0]
        queries.append(query)
        candidates.append([r["dna"] for r in near])
        names.append([r["id"] for r in near])
    return [q["dna"] for q in queries], candidates, [q["id"] for q in queries], names


def test_batch_equals_the_sequential_choice_on_real_barcodes(real_batch, monkeypatch):
    queries, candidates, query_ids, names = real_batch
    sequential = [choose_candidate(q, c, 0.97, n, cn) for q, c, n, cn in zip(*real_batch, strict=True)]
    named = {position for position, best in sequential if best >= 0.97}
    assert named >= {0, 1} and any(best < 0.97 for _, best in sequential)  # the batch covers every outcome
    monkeypatch.setattr(species_check, "CHUNK", 4)  # several chunks, so the pool shares them out
    assert choose_candidates(queries, candidates, 0.97, query_ids, names, threads=2) == sequential
    assert choose_candidates(queries, candidates, 0.97, query_ids, names, threads=1) == sequential


def test_batch_keeps_input_order_when_later_chunks_finish_first(monkeypatch):
    real, workers = species_check.choose_candidate, set()

    def slow_first(query, candidates, cutoff, query_name, candidate_names):
        workers.add(threading.get_ident())
        if query_name == "q0":
            time.sleep(0.2)  # the first chunk finishes last
        return real(query, candidates, cutoff, query_name, candidate_names)

    monkeypatch.setattr(species_check, "choose_candidate", slow_first)
    monkeypatch.setattr(species_check, "CHUNK", 2)
    far = mutate(BARCODE, range(0, 600, 10))
    batch = [BARCODE, far] * 4
    outcomes = choose_candidates(batch, [[far, BARCODE]] * 8, 0.97, [f"q{i}" for i in range(8)], threads=2)
    assert outcomes == [(1, 1.0), (0, 1.0)] * 4
    assert len(workers) == 2 and threading.get_ident() not in workers  # both threads of the pool aligned


def test_a_bad_barcode_fails_only_its_query_and_is_named():
    good = [BARCODE, mutate(BARCODE, range(0, 600, 50))]
    outcomes = choose_candidates([BARCODE, "ACGT-XYZ", BARCODE, BARCODE], [good, good, [BARCODE, "NOT A BARCODE"], good],
                                 1.01, ["q0", "q1", "q2", "q3"], [["r1", "r2"], ["r1", "r2"], ["r1", "r9"], ["r1", "r2"]],
                                 threads=2)
    assert outcomes[0] == outcomes[3] == (0, 1.0)  # cut-off 1.01: nothing named, the identical one nearest
    assert isinstance(outcomes[1], ValueError) and "q1" in str(outcomes[1])
    assert isinstance(outcomes[2], ValueError) and "reference r9" in str(outcomes[2])
    with pytest.raises(ValueError, match="3 candidate lists for 2 queries"):
        choose_candidates([BARCODE, BARCODE], [good] * 3)


def test_one_thread_aligns_here_without_a_pool(monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("threads=1 must not start a pool")

    monkeypatch.setattr(species_check, "ThreadPoolExecutor", no_pool)
    monkeypatch.setattr(species_check, "CHUNK", 1)
    close = mutate(BARCODE, range(0, 600, 50))
    expected = [choose_candidate(BARCODE, [close]), choose_candidate(close, [BARCODE[:300]])]
    assert choose_candidates([BARCODE, close], [[close], [BARCODE[:300]]], threads=1) == expected
    # the default is the threads torch may use
    monkeypatch.setattr(species_check.torch, "get_num_threads", lambda: 1)
    assert choose_candidates([BARCODE, close], [[close], [BARCODE[:300]]]) == expected
    with pytest.raises(ValueError, match="threads must be at least 1"):
        choose_candidates([BARCODE], [[close]], threads=0)


def test_threads_starting_together_make_one_matrix(monkeypatch):
    import parasail

    made, real = [], parasail.matrix_create

    def slow_create(*args):
        made.append(args)
        time.sleep(0.05)  # long enough for every thread to find no matrix yet without the lock
        return real(*args)

    monkeypatch.setattr(species_check, "_MATRIX", None)
    monkeypatch.setattr(parasail, "matrix_create", slow_create)
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(species_check._matrix())) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(made) == 1 and len({id(m) for m in seen}) == 1


def test_naming_threshold_names_at_most_the_asked_share():
    sims = [i / 1000 for i in range(1000)]
    for share in (0.0025, 0.01, 0.1):
        threshold = naming_threshold(sims, share)
        assert sum(s >= threshold for s in sims) <= share * len(sims)
        assert sum(s >= threshold for s in sims) >= share * len(sims) - 1
    assert naming_threshold([], 0.01) == math.inf


def test_check_round_trips_through_json_with_an_infinite_threshold():
    check = SpeciesCheck(math.inf, precision=0.95, known_named=0.99, novel_aligned=0.02, specimens=10, settled=(9, 1))
    assert SpeciesCheck.from_dict(json.loads(json.dumps(check.to_dict()))) == check


@pytest.fixture(scope="module")
def libraries(dna_model, records, tmp_path_factory):
    folder = tmp_path_factory.mktemp("species_check")
    with_check = build_index(dna_model, records["many_each"], "dna", folder / "checked", progress=False)
    without = build_index(dna_model, records["many_each"], "dna", folder / "plain", progress=False,
                          species_check=False)
    return with_check, without


def species_rates(index: ReferenceIndex, model, queries):
    predictions = Identifier.load(index.directory, model_dir=model).identify(queries)
    right = sum(p.answer["species"] == q["species"] for p, q in zip(predictions, queries, strict=True))
    return right / len(queries), predictions


def test_alignment_names_held_species_the_embedding_alone_misses(libraries, dna_model, records):
    checked, plain = libraries
    assert checked.species_check is not None and plain.species_check is None
    assert (checked.directory / "barcodes.tsv").exists()
    # partial barcodes (250 bases of a held species' barcode): fewer k-mers, a lower embedding
    # similarity than the full barcodes the threshold was calibrated on; alignment is unmoved
    partial = [{**q, "dna": q["dna"][100:350]} for q in records["held"]]
    with_rate, predictions = species_rates(checked, dna_model, partial)
    without_rate, _ = species_rates(plain, dna_model, partial)
    assert with_rate > without_rate + 0.1
    settled = [p for p in predictions if p.identity >= checked.species_check.identity_cutoff]
    assert settled and all(not p.novel and p.answer["species"] for p in settled)
    # the reference the identity is to: for a settled query, one of the species it names
    species_of = dict(zip(checked.labels("id"), checked.labels("species"), strict=True))
    assert all(species_of[p.identity_reference] == p.answer["species"] for p in settled)
    unsettled = [p for p in predictions if p.identity < checked.species_check.identity_cutoff]
    assert unsettled and all(p.identity_reference in {hit.id for hit in p.hits} for p in unsettled)
    assert all(p.precision["species"] == pytest.approx(checked.species_check.precision) for p in settled)


def test_absent_species_are_named_only_by_alignment_or_above_the_checks_threshold(libraries, dna_model, records):
    checked, _ = libraries
    _, predictions = species_rates(checked, dna_model, records["absent"])
    named = [p for p in predictions if p.answer["species"]]
    # a species is named only by a >= 97 % identical reference or above the check's embedding threshold
    check = checked.species_check
    assert all(p.identity >= check.identity_cutoff or p.novelty_similarity >= check.embedding_threshold for p in named)
    assert sum(p.novel for p in predictions) >= 0.8 * len(predictions)


def test_identity_columns_round_trip_and_old_files_read_without_them(libraries, dna_model, records, tmp_path):
    checked, _ = libraries
    predictions = Identifier.load(checked.directory, model_dir=dna_model).identify(records["held"][:5])
    with open(tmp_path / "p.tsv", "w") as f:
        write_predictions_tsv(predictions, f, top_k=5)
    back = read_predictions_tsv(tmp_path / "p.tsv")
    assert [p.identity for p in back] == pytest.approx([round(p.identity, 4) for p in predictions])
    assert [p.identity_reference for p in back] == [p.identity_reference for p in predictions]
    assert all(p.identity_reference for p in back)
    lines = (tmp_path / "p.tsv").read_text().splitlines()
    columns = {lines[0].split("\t").index(name) for name in ("identity", "identity_reference")}
    old = ["\t".join(c for i, c in enumerate(line.split("\t")) if i not in columns) for line in lines]
    (tmp_path / "old.tsv").write_text("\n".join(old) + "\n")
    assert all(math.isnan(p.identity) and p.identity_reference == "" for p in read_predictions_tsv(tmp_path / "old.tsv"))


def test_identify_command_sums_up_what_it_identified(libraries, dna_model, records, tmp_path, capsys):
    from clibd.cli import main as cli

    checked, _ = libraries
    queries = records["held"][:12] + records["absent"][:12]
    fasta = tmp_path / "q.fasta"
    fasta.write_text("".join(f">{q['id']}\n{q['dna']}\n" for q in queries) + ">broken\nACGTXXXX\n")
    out, cutoff = tmp_path / "preds.tsv", checked.species_check.identity_cutoff
    command = ["identify", "--index", str(checked.directory), "--model", str(dna_model), "--out", str(out)]
    (tmp_path / "first.fasta").write_text("".join(f">{q['id']}\n{q['dna']}\n" for q in queries[:5]))
    assert cli([*command, "--fasta", str(tmp_path / "first.fasta")]) == 0  # then resumed with the rest
    capsys.readouterr()
    assert cli([*command, "--fasta", str(fasta)]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    # this run: the 19 barcodes not written before and the broken one; identify in memory (identity unrounded)
    expected = Identifier.load(checked.directory, model_dir=dna_model).identify(queries[5:])
    named = [p for p in expected if p.answer["species"]]
    by_alignment = sum(p.identity >= cutoff for p in named)
    assert 0 < by_alignment <= len(named) and sum(p.novel for p in expected) > 0
    ranks = ", ".join(f"{rank} {[p.deepest_rank or 'none' for p in expected].count(rank)}"
                      for rank in ("species", "genus", "family", "order", "none"))
    assert summary == (
        f"clibd identify: {out}: this run, 20 queries: a species for {len(named)} ({by_alignment} by an alignment "
        f"at least 97% identical), {sum(p.novel for p in expected)} flagged novel; deepest rank answered: {ranks}; "
        "1 could not be identified")
    assert len(read_predictions_tsv(out)) == 25
    assert cli([*command[:-1], str(tmp_path), "--fasta", str(fasta)]) == 2  # a folder (or a pipe) is no file


def test_tally_counts_the_unrounded_identity():
    from clibd.prediction import Hit, predict
    from clibd.predictions_tsv import PredictionTally

    hit = Hit("r1", 0.99, {"order": "O", "family": "F", "genus": "G", "species": "G s"})
    named = predict("q1", [hit], {"species": 0.5})  # named by the embedding
    tally = PredictionTally(0.97)
    tally.add([dataclasses.replace(named, identity=646 / 666), dataclasses.replace(named, identity=0.97)])
    assert f"{646 / 666:.4f}" == "0.9700"  # what the TSV would hold
    assert "a species for 2 (1 by an alignment at least 97% identical)" in tally.line()
    assert "at least 97.5% identical" in PredictionTally(0.975).line()


def test_add_and_recalibrate_keep_the_barcodes_and_the_check(dna_model, records, tmp_path):
    half = len(records["many_each"]) // 2
    build_index(dna_model, records["many_each"][:half], "dna", tmp_path / "refs", progress=False)
    grown = add_to_index(tmp_path / "refs", records["many_each"][half:], progress=False)
    assert grown.barcodes == [r["dna"] for r in records["many_each"]]
    assert grown.species_check is not None
    # --replace: the replaced records' barcodes go with them, in the records' order
    replaced = [{**r, "dna": r["dna"][50:]} for r in records["many_each"][:3]]
    after = add_to_index(tmp_path / "refs", replaced, replace=True, progress=False)
    by_id = dict(zip(after.labels("id"), after.barcodes, strict=True))
    assert [by_id[r["id"]] for r in replaced] == [r["dna"] for r in replaced]
    assert len(after.barcodes) == len(grown.barcodes) and after.species_check is not None
    grown = after
    meta = json.loads((tmp_path / "refs" / "index.json").read_text())
    del meta["species_check"]  # as an index of an older clibd
    (tmp_path / "refs" / "index.json").write_text(json.dumps(meta))
    assert ReferenceIndex.load(tmp_path / "refs").species_check is None
    assert recalibrate_index(tmp_path / "refs").species_check == grown.species_check


def test_index_build_options_reach_the_stored_check(dna_model, records, tmp_path):
    from clibd.cli import main as cli

    with open(tmp_path / "refs.tsv", "w") as f:
        f.write("id\torder\tfamily\tgenus\tspecies\tdna\n")
        f.writelines("\t".join(r[c] for c in ("id", "order", "family", "genus", "species", "dna")) + "\n"
                     for r in records["many_each"])
    common = ["index", "build", "--model", str(dna_model), "--records", str(tmp_path / "refs.tsv")]
    assert cli([*common, "--out", str(tmp_path / "a"), "--identity-cutoff", "0.98", "--novel-named", "0.05",
                "--species-margin-weight", "0"]) == 0
    check = ReferenceIndex.load(tmp_path / "a").species_check
    assert (check.identity_cutoff, check.novel_named, check.margin_weight) == (0.98, 0.05, 0.0)
    assert cli([*common, "--out", str(tmp_path / "b"), "--no-species-check"]) == 0
    assert ReferenceIndex.load(tmp_path / "b").species_check is None
    with pytest.raises(ValueError, match="novel_named must be between 0 and 1"):
        build_index(dna_model, records["many_each"], "dna", tmp_path / "c", species_check={"novel_named": 2})
    with pytest.raises(ValueError, match="margin_weight must be 0 or more"):
        build_index(dna_model, records["many_each"], "dna", tmp_path / "c", species_check={"margin_weight": -1})


def test_a_reference_barcode_that_cannot_be_aligned_is_named(libraries, dna_model, records, tmp_path):
    checked, _ = libraries
    shutil.copytree(checked.directory, tmp_path / "refs")
    lines = (tmp_path / "refs" / "barcodes.tsv").read_text().splitlines()
    query = records["held"][0]
    target = Identifier.load(tmp_path / "refs", model_dir=dna_model).identify([query])[0].hits[0].id
    lines = [f"{target}\tNOT-A-BARCODE" if line.split("\t")[0] == target else line for line in lines]
    (tmp_path / "refs" / "barcodes.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"reference {target}"):
        Identifier.load(tmp_path / "refs", model_dir=dna_model).identify([query])
    skipped = Identifier.load(tmp_path / "refs", model_dir=dna_model, on_bad_input="skip").identify([query])[0]
    assert skipped.error.startswith("species check") and target in skipped.error


def test_a_stated_precision_still_bounds_the_embeddings_species(dna_model, records, tmp_path):
    index = build_index(dna_model, records["many_each"], "dna", tmp_path / "refs", progress=False, precision=0.99)
    identifier = Identifier.load(index.directory, model_dir=dna_model)
    check = index.species_check
    floor, thresholds, curves = identifier._checked_thresholds(index.thresholds, index.precision_curves, check)
    assert floor == index.thresholds["species"] and thresholds["species"] == check.embedding_threshold
    assert "species" not in curves  # the stored curve was not learnt on the queries alignment leaves
    # the embedding names a species only where the novelty similarity clears the floor too, whatever
    # the check's confidence says (here: a check that would name every query alignment leaves)
    identifier.index.species_check = dataclasses.replace(check, embedding_threshold=-2.0)  # below any cosine
    queries = records["held"] + records["absent"]
    loose = identifier._checked_thresholds
    identifier._checked_thresholds = lambda *args: (-math.inf, *loose(*args)[1:])  # no floor
    unbounded = [p for p in identifier.identify(queries) if not p.novel and not p.identity >= 0.97]
    floor = sorted(p.novelty_similarity for p in unbounded)[len(unbounded) // 2]
    identifier._checked_thresholds = lambda *args: (floor, *loose(*args)[1:])
    by_embedding = [p for p in identifier.identify(queries) if not p.novel and not p.identity >= 0.97]
    assert by_embedding and all(p.novelty_similarity >= floor for p in by_embedding)
    assert len(unbounded) > len(by_embedding)  # the floor did hold some back


def test_the_embeddings_species_is_judged_with_the_species_margin(libraries, dna_model, records):
    checked, _ = libraries
    check = checked.species_check
    assert check.margin_weight == species_check.SPECIES_MARGIN_WEIGHT  # calibrated with it, stored
    old = {k: v for k, v in check.to_dict().items() if k != "margin_weight"}
    assert SpeciesCheck.from_dict(old).margin_weight == 0.0  # an index from before: the novelty similarity alone
    assert check.confidence(0.8, [0.9, 0.85, 0.7], ["A b", "A b", "A c"]) == pytest.approx(0.8 + check.margin_weight * 0.2)
    assert dataclasses.replace(check, margin_weight=0.0).confidence(0.8, [0.9, 0.7], ["A b", "A c"]) == 0.8

    identifier = Identifier.load(checked.directory, model_dir=dna_model)
    queries = records["held"] + records["absent"]
    embeddings = identifier.embed(queries)
    ids, barcodes = [q["id"] for q in queries], [q["dna"] for q in queries]
    unsettled = [p for p in identifier.identify_embeddings(embeddings, ids, barcodes=barcodes)
                 if not p.identity >= check.identity_cutoff]
    # a threshold between the queries' novelty similarities: with a heavy species margin more clear it
    cut = sorted(p.novelty_similarity for p in unsettled)[len(unsettled) // 2]
    named = {}
    for weight in (0.0, 4.0):
        identifier.index.species_check = dataclasses.replace(check, embedding_threshold=cut, margin_weight=weight)
        predictions = identifier.identify_embeddings(embeddings, ids, barcodes=barcodes)
        named[weight] = {p.query_id for p in predictions if not p.novel and not p.identity >= check.identity_cutoff}
    assert named[0.0] == {p.query_id for p in unsettled if p.novelty_similarity >= cut}
    assert named[0.0] < named[4.0]  # the margin only adds to the novelty similarity


def test_species_check_confidences_of_a_batch_are_each_querys_confidence():
    check = SpeciesCheck(0.9, margin_weight=2.0)
    sims = torch.tensor([[0.91, 0.90, 0.84], [0.95, 0.80, 0.70], [0.88, 0.87, 0.86]])
    species = torch.tensor([[0, 0, 1], [2, 3, 3], [4, 4, 4]])
    novelty = torch.tensor([0.86, 0.93, 0.80])
    batch = check.confidences(novelty, sims, species)
    # by hand: the nearest of another species is at position 2, 1 and (none: the last) 2
    nov = novelty.tolist()
    assert batch == [nov[0] + 2.0 * (sims[0, 0].item() - sims[0, 2].item()),
                     nov[1] + 2.0 * (sims[1, 0].item() - sims[1, 1].item()),
                     nov[2] + 2.0 * (sims[2, 0].item() - sims[2, 2].item())]
    names = [[f"s{i}" for i in row] for row in species.tolist()]
    assert batch == [check.confidence(value, row, labels)
                     for value, row, labels in zip(novelty.tolist(), sims.tolist(), names, strict=True)]
    assert batch[0] == pytest.approx(0.86 + 2 * 0.07) and batch[2] == pytest.approx(0.80 + 2 * 0.02)
    assert SpeciesCheck(0.9).confidences(novelty, sims, species) == novelty.double().tolist()  # weight 0: novelty
