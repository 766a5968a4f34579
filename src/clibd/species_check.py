"""The species decision of a DNA index, settled by pairwise alignment where alignment can settle it.

The embedding search places a barcode well, also for species the library does not hold, but at
species level the alignment tools' rule is hard to beat for species the library does hold: a
reference at least 97 % identical over the aligned region is the same species (the cut-off of
barcoding practice, BOLD's and most VSEARCH / BLAST pipelines'). So, for a barcode query:

1. Align it (semi-global, end gaps free, `identity`) with the nearest reference of the embedding
   search; if that one is not `identity_cutoff` identical, with the next `candidates - 1` too.
2. The first candidate in search order that clears the cut-off names the species (and, being
   that close, the whole lineage); the query is not novel.
3. Otherwise the embedding decides, with a species threshold set on the library so that it
   names a species for at most `novel_named` of the calibration specimens of species held out of
   the library (`calibrate_species_check`). The specimens of held species that reach this step
   are the divergent ones (a conspecific reference 89 % identical): alignment cannot name them,
   the embedding, trained on their species, often can. What the threshold is compared with is
   the novelty similarity plus `margin_weight` times the species margin (how much nearer the
   nearest reference is than the nearest of another species: `clibd.novelty.taxon_margin`): a
   divergent specimen of a held species still sits clear of other species, a specimen of an
   absent one tends to sit between its relatives.

How the defaults were chosen (on validation species; bench/README, "clibd vs alignment tools"):
five candidates against twenty (`--candidates 5 20`); the first candidate in search order that
clears the cut-off rather than the one of highest identity (species that share a haplotype: a
prototype's choice, no figure kept); `margin_weight` 1 with `novel_named` 0.02 (python
bench/species_check.py --novel-named 0.0025 0.005 0.01 0.02 --margin-weights 0 1 2 4, mean of
three splits) leaves 0.95 % of known-species queries without a species and names a held species
for 4.15 % of novel-species ones, where the novelty similarity alone left 0.97 % and named 5.05 %
at its best setting (0.005); alignment alone: 1.23 % and 2.93 %. Naming fewer novel species costs
flagging more known ones: choose with `clibd index build --novel-named` and `--species-margin-weight`.

Usage:
    identity(query_barcode, reference_barcode)                         # e.g. 0.9848
    check = calibrate_species_check(embeddings, novelty_embeddings, records)
    outcome = choose_candidate(query_barcode, [r["dna"] for r in hit_records], check.identity_cutoff)
    at = named_position(outcome, check.identity_cutoff)   # the candidate that names the species, or None
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .novelty import (
    MARGIN_DEPTH,
    answer_confidence,
    calibration_sample,
    confidences,
    label_ids,
    nearest_held_out,
    taxon_margins,
)
from .processing.barcodes import normalise_barcode
from .towers.parts import EmbeddingPart, select_parts

IDENTITY_CUTOFF = 0.97
CANDIDATES = 5
NOVEL_NAMED = 0.02
SPECIES_MARGIN_WEIGHT = 1.0  # chosen with NOVEL_NAMED on validation species (module doc)
CALIBRATION_QUERIES = 1000
# Scores of VSEARCH's defaults (match 2, mismatch -4, gap open 20, extend 2); N and the other
# ambiguity codes score 0 and are not compared (VSEARCH counts N as a match: a reference padded
# with N looks identical to everything).
_MATCH, _MISMATCH, _GAP_OPEN, _GAP_EXTEND = 2, -4, 20, 2
_ALPHABET = "ACGTN"
# identity over fewer compared columns is not a species call (a reference that is mostly N);
# no coverage rule: BOLD holds barcodes of shifted stretches of COI whose overlap is a fair call
MIN_COLUMNS = 100  # mini-barcodes (~130 bp) still called; a few dozen known bases are not
# queries per task of `choose_candidates`' pool: a known species costs one alignment (~0.4 ms),
# so one query per task would spend about as long in the executor as in parasail
CHUNK = 16
_MATRIX = None
_MATRIX_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


def _matrix():
    """The scoring matrix, made once and only read afterwards (parasail's alignments never write
    it, so threads share it); the lock keeps threads that start together from each making one."""
    global _MATRIX
    if _MATRIX is None:
        with _MATRIX_LOCK:
            if _MATRIX is None:
                import parasail  # a C library: imported on first use, not at `import clibd`

                matrix = parasail.matrix_create(_ALPHABET, _MATCH, _MISMATCH)
                for i in range(len(_ALPHABET)):
                    matrix.set_value(i, 4, 0)
                    matrix.set_value(4, i, 0)
                _MATRIX = matrix  # published only once complete
    return _MATRIX


def identity(query: str, reference: str, query_name: str = "query", reference_name: str = "reference") -> float:
    """Identical bases / compared columns of the best semi-global alignment of two barcodes
    (VSEARCH's default definition: end gaps left out), with unknown bases set aside: N padding at
    the ends is trimmed first, and a column with an N (or another IUPAC code) inside is neither
    identical nor compared. 1.0 for a query that is an exact piece of the reference. Over fewer
    than `MIN_COLUMNS` compared columns, 0.0: too little to call a species on. A bad barcode is a
    `ValueError` naming it.

    Usage:
        identity(barcode, reference_barcode)   # e.g. 0.9848 for 10 differences over 658 compared columns
    """
    return _identity(normalise_barcode(query, query_name).strip("N"),
                     normalise_barcode(reference, reference_name).strip("N"))


def _identity(query: str, reference: str) -> float:
    """`identity` of barcodes already normalised and trimmed of end Ns."""
    if "N" in query or "N" in reference:
        matches, columns = _counts_with_unknowns(query, reference)
    else:
        matches, columns = _counts(query, reference)
    return matches / columns if columns >= MIN_COLUMNS else 0.0


def _counts(query: str, reference: str) -> tuple[int, int]:
    """(identical, aligned) columns, end gaps left out: parasail's statistics, no traceback."""
    import parasail  # a C library: imported on first use, not at `import clibd`

    result = parasail.sg_stats_scan_16(query, reference, _GAP_OPEN, _GAP_EXTEND, _matrix())
    if result.saturated:  # scores past 16 bits: a barcode of tens of thousands of bases
        result = parasail.sg_stats_scan_sat(query, reference, _GAP_OPEN, _GAP_EXTEND, _matrix())
    return result.matches, result.length


def _counts_with_unknowns(query: str, reference: str) -> tuple[int, int]:
    """(identical, compared) columns from the traceback: end gaps and columns with an N left out."""
    import parasail

    trace = parasail.sg_trace_scan_sat(query, reference, _GAP_OPEN, _GAP_EXTEND, _matrix()).traceback
    pairs = list(zip(trace.query, trace.ref, strict=True))
    start = next((i for i, (q, r) in enumerate(pairs) if q != "-" and r != "-"), len(pairs))
    end = len(pairs) - next((i for i, (q, r) in enumerate(reversed(pairs)) if q != "-" and r != "-"), len(pairs))
    compared = [(q, r) for q, r in pairs[start:end] if q != "N" and r != "N"]
    return sum(q == r for q, r in compared), len(compared)


def choose_candidate(query: str, candidates: Sequence[str], cutoff: float = IDENTITY_CUTOFF,
                     query_name: str = "query", candidate_names: Sequence[str] | None = None) -> tuple[int, float]:
    """(position, identity) of the first candidate (search order) at least `cutoff` identical to
    `query`, which names the species; where none is, of the most identical one (the first of
    equals): the identity is then under `cutoff`, nothing is named; (-1, 0.0) where no candidate
    could be compared (none given, or none over `MIN_COLUMNS` compared columns).
    Stops aligning at the first that clears the cut-off, so a known species usually costs one
    alignment. A bad barcode is a `ValueError` naming it (`query_name`, `candidate_names`: the
    references' ids).

    Usage:
        position, best = choose_candidate(barcode, [r["dna"] for r in hit_records], 0.97, "q1",
                                          [r["id"] for r in hit_records])
        named_position((position, best), 0.97)   # position where it names the species, else None
    """
    best, nearest = 0.0, -1
    names = candidate_names or [f"candidate {i + 1} of {query_name}" for i in range(len(candidates))]
    query = normalise_barcode(query, query_name).strip("N")  # once, not per candidate
    for position, (candidate, name) in enumerate(zip(candidates, names, strict=True)):
        value = _identity(query, normalise_barcode(candidate, f"reference {name}").strip("N"))
        if value >= cutoff:
            return position, value
        if value > best:
            best, nearest = value, position
    return nearest, best


def named_position(outcome: tuple[int, float], cutoff: float = IDENTITY_CUTOFF) -> int | None:
    """The position of the candidate that names the species in a `choose_candidate` outcome
    (position, identity): the one given where its identity clears `cutoff`, else None.

    Usage:
        at = named_position(choose_candidate(barcode, candidates, 0.97), 0.97)   # None: nothing named
    """
    position, identity = outcome
    return position if position >= 0 and identity >= cutoff else None


def choose_candidates(queries: Sequence[str], candidates: Sequence[Sequence[str]], cutoff: float = IDENTITY_CUTOFF,
                      query_names: Sequence[str] | None = None,
                      candidate_names: Sequence[Sequence[str]] | None = None,
                      threads: int | None = None) -> list[tuple[int, float] | ValueError]:
    """`choose_candidate` for many queries (`candidates[i]`: the i-th query's references, search
    order), on a pool of `threads` threads, in chunks of `CHUNK` queries: parasail's C releases
    the GIL, so the alignments use every core. In input order, each the (position, identity)
    `choose_candidate` gives, or, for a query with a bad barcode (its own or a candidate's), the
    `ValueError` naming it, returned rather than raised so the caller can fail that query alone.
    `query_names`, `candidate_names`: as `choose_candidate`'s, per query. `threads`: default the
    threads torch may use (`torch.get_num_threads()`, which `OMP_NUM_THREADS` and
    `torch.set_num_threads` set); 1 runs here, without a pool.

    Usage:
        outcomes = choose_candidates(barcodes, [[r["dna"] for r in hits] for hits in hit_records], 0.97,
                                     query_ids, [[r["id"] for r in hits] for hits in hit_records])
        for outcome in outcomes:
            if isinstance(outcome, ValueError): ...   # raise it, or fail this query
            position, best = outcome
    """
    if len(candidates) != len(queries):
        raise ValueError(f"{len(candidates)} candidate lists for {len(queries)} queries")
    names = list(query_names) if query_names is not None else [f"query #{i}" for i in range(len(queries))]
    references = list(candidate_names) if candidate_names is not None else [None] * len(queries)
    if not len(names) == len(references) == len(queries):
        raise ValueError(f"{len(names)} query names and {len(references)} candidate name lists "
                         f"for {len(queries)} queries")
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")

    def chunk(start: int) -> list[tuple[int, float] | ValueError]:
        out: list[tuple[int, float] | ValueError] = []
        for i in range(start, min(start + CHUNK, len(queries))):
            try:
                out.append(choose_candidate(queries[i], candidates[i], cutoff, names[i], references[i]))
            except ValueError as error:  # a bad barcode fails its query, not the batch
                out.append(error)
        return out

    starts = range(0, len(queries), CHUNK)
    if threads == 1 or len(starts) < 2:  # nothing to share out: no pool to start
        return [outcome for start in starts for outcome in chunk(start)]
    with ThreadPoolExecutor(min(threads, len(starts)), thread_name_prefix="clibd-align") as pool:
        return [outcome for part in pool.map(chunk, starts) for outcome in part]


@dataclass
class SpeciesCheck:
    """The species rule of a DNA index (module doc) and what its calibration measured.

    `embedding_threshold`: the species threshold (on the novelty similarity plus `margin_weight`
    times the species margin: `confidence`) for queries that no candidate settles, set so that it
    names a species for at most `novel_named` of the calibration specimens of held-out species
    that alignment left unsettled (0 weight: an index from before the margin); `precision`: how
    often a species named by alignment was right on the calibration specimens; `known_named`:
    share of the calibration specimens of held species the rule names a species for;
    `novel_aligned`: share of those of held-out species that alignment (wrongly) named, a sign
    of sister species under 3 % apart in the library; `specimens`: calibration specimens (each
    matched as a held and as a held-out species); `settled`: how many of them alignment settled,
    held and held-out. `precision` mixes the two halves equally: a library whose queries are
    mostly of held species sees a higher one.

    Usage:
        check = SpeciesCheck.from_dict(json.loads(Path("refs/index.json").read_text())["species_check"])
    """

    embedding_threshold: float
    identity_cutoff: float = IDENTITY_CUTOFF
    candidates: int = CANDIDATES
    novel_named: float = NOVEL_NAMED
    precision: float = float("nan")
    known_named: float = float("nan")
    novel_aligned: float = float("nan")
    specimens: int = 0
    settled: tuple[int, int] = (0, 0)
    margin_weight: float = 0.0

    def confidence(self, novelty_similarity: float, similarities: Sequence[float], species: Sequence[str]) -> float:
        """What `embedding_threshold` is compared with for one query: its novelty similarity plus
        `margin_weight` times the species margin of its nearest references (`similarities` and
        their `species`, nearest first; the deeper, the truer: `clibd.novelty.MARGIN_DEPTH`).

        Usage:
            check.confidence(0.86, [0.91, 0.90, 0.84], ["A b", "A b", "A c"])   # 0.86 + margin_weight * 0.07
        """
        return self.confidences(torch.tensor([novelty_similarity], dtype=torch.float64),
                                torch.tensor([list(similarities)], dtype=torch.float64), label_ids(species)[None])[0]

    def confidences(self, novelty_similarities: torch.Tensor, similarities: torch.Tensor,
                    species: torch.Tensor) -> list[float]:
        """`confidence` of many queries: [Q] novelty similarities, [Q, K] similarities of their
        nearest references and those references' [Q, K] integer species (`clibd.novelty.label_ids`).

        Usage:
            check.confidences(novelty, sims[:, :MARGIN_DEPTH], species_ids[rows[:, :MARGIN_DEPTH]])
        """
        novelty = novelty_similarities.double().tolist()
        if not self.margin_weight:
            return novelty
        return [answer_confidence(similarity, margin, self.margin_weight)
                for similarity, margin in zip(novelty, taxon_margins(similarities, species).tolist(), strict=True)]

    def to_dict(self) -> dict:
        """As index.json stores it: inf and NaN as null."""
        out = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict) -> SpeciesCheck:
        """Read back `to_dict` (JSON has no inf or NaN: an embedding threshold stored as null is inf,
        i.e. the embedding never names a species; other nulls are NaN)."""
        values = {k: (float("nan") if v is None else v) for k, v in data.items() if k in cls.__dataclass_fields__}
        if data.get("embedding_threshold") is None:
            values["embedding_threshold"] = math.inf
        values["settled"] = tuple(values.get("settled", (0, 0)))
        return cls(**values)


def _nearest(embeddings: torch.Tensor, novelty: torch.Tensor, species: list[str], rows: list[int],
             k: int) -> tuple[tuple[list[list[int]], list[float], list[float]], ...]:
    """For the specimens of held species (only themselves left out) and of held-out ones (their
    species left out): each row's `k` nearest references by `embeddings`, its best `novelty`
    similarity and its species margin among its `MARGIN_DEPTH` nearest (`clibd.novelty.nearest_held_out`)."""
    loo_sims, loo_rows, out_sims, out_rows = nearest_held_out(embeddings, species, rows, k=max(k, 2, MARGIN_DEPTH))
    loo_deep, out_deep = (loo_sims[:, :MARGIN_DEPTH], loo_rows[:, :MARGIN_DEPTH]), (out_sims[:, :MARGIN_DEPTH],
                                                                                    out_rows[:, :MARGIN_DEPTH])
    loo_best, _, out_best, _ = nearest_held_out(novelty, species, rows)

    def kept(sims: torch.Tensor, near: torch.Tensor) -> list[list[int]]:
        return [[j for j, s in zip(js[:k], ss[:k], strict=True) if s > -2.0]
                for js, ss in zip(near.tolist(), sims.tolist(), strict=True)]

    ids = label_ids(species)

    def margins(sims: torch.Tensor, near: torch.Tensor) -> list[float]:
        return taxon_margins(sims, ids[near]).tolist()

    return ((kept(loo_sims, loo_rows), loo_best.tolist(), margins(*loo_deep)),
            (kept(out_sims, out_rows), out_best.tolist(), margins(*out_deep)))


def _settle(records: Sequence[dict], rows: list[int], neighbours: list[list[int]], cutoff: float
            ) -> list[tuple[bool, bool]]:
    """(settled by alignment, the species it named is right) for each calibration specimen; the
    first bad barcode (in `rows` order) is raised: a library to calibrate on must be sound."""
    outcomes = choose_candidates([records[row]["dna"] for row in rows],
                                 [[records[j]["dna"] for j in near] for near in neighbours], cutoff,
                                 [records[row].get("id", f"record #{row}") for row in rows],
                                 [[records[j].get("id", f"record #{j}") for j in near] for near in neighbours])
    out = []
    for row, near, outcome in zip(rows, neighbours, outcomes, strict=True):
        if isinstance(outcome, ValueError):
            raise outcome
        at = named_position(outcome, cutoff)
        out.append((at is not None, at is not None and records[near[at]]["species"] == records[row]["species"]))
    return out


def naming_threshold(unsettled_novel: list[float], novel_named: float) -> float:
    """The embedding threshold that names a species for at most `novel_named` of the calibration
    specimens of held-out species that alignment left unsettled (`unsettled_novel`: their novelty
    similarities): a quantile just above them; inf when there are none to learn from.

    Usage:
        naming_threshold([0.61, 0.72, 0.80, 0.83], novel_named=0.25)   # just above 0.80
    """
    if not unsettled_novel:
        return math.inf
    ordered = sorted(unsettled_novel)
    keep_below = math.ceil((1 - novel_named) * len(ordered) - 1e-9)  # specimens left without a species
    return math.nextafter(ordered[keep_below - 1], math.inf) if keep_below > 0 else ordered[0]


def calibrate_species_check(embeddings: torch.Tensor, novelty_embeddings: torch.Tensor, records: Sequence[dict],
                            identity_cutoff: float = IDENTITY_CUTOFF, candidates: int = CANDIDATES,
                            novel_named: float = NOVEL_NAMED, max_queries: int = CALIBRATION_QUERIES,
                            seed: int = 0, margin_weight: float = SPECIES_MARGIN_WEIGHT,
                            trained_species: Sequence[str] | None = None) -> SpeciesCheck | None:
    """Calibrate the species rule on a labelled DNA library (unit-vector embeddings, one per
    record): specimens of species with two or more references are matched once with only
    themselves left out (a held species) and once with their whole species left out (a novel
    one). None where the library has no species with two references (nothing to learn from).
    `trained_species`: sample only the species the model did not train on, where there are
    enough (`clibd.novelty.calibration_sample`); index builds pass none: tried on validation, it
    flagged fewer novel species (bench/README.md).

    Usage:
        check = calibrate_species_check(index.embeddings.float(), novelty_embeddings, index.records)
    """
    species = [r.get("species", "") for r in records]
    sample = calibration_sample(species, max_queries, seed, trained_species)
    rows = sample.rows if sample.shared else []  # only specimens with a second reference of their species
    if not rows:
        return None
    (known_near, known_sims, known_margins), (novel_near, novel_sims, novel_margins) = _nearest(
        embeddings, novelty_embeddings, species, rows, candidates)
    known = _settle(records, rows, known_near, identity_cutoff)
    novel = _settle(records, rows, novel_near, identity_cutoff)
    known_scores = confidences(list(zip(known_sims, known_margins, strict=True)), margin_weight)
    novel_scores = confidences(list(zip(novel_sims, novel_margins, strict=True)), margin_weight)
    threshold = naming_threshold([score for (settled, _), score in zip(novel, novel_scores, strict=True)
                                  if not settled], novel_named)
    named = [right for settled, right in known + novel if settled]
    known_named = sum(settled or score >= threshold for (settled, _), score in zip(known, known_scores, strict=True))
    settled = (sum(s for s, _ in known), sum(s for s, _ in novel))
    return SpeciesCheck(threshold, identity_cutoff, candidates, novel_named,
                        sum(named) / len(named) if named else float("nan"), known_named / len(rows),
                        settled[1] / len(rows), len(rows), settled, margin_weight)


def species_check_options(species_check: bool | dict) -> dict | bool:
    """What index.json keeps of the asked species check before it is calibrated (False: none).

    Usage:
        species_check_options({"novel_named": 0.01})   # checked: unknown names and values out of (0, 1) raise
    """
    if species_check is False:
        return False
    options = {} if species_check is True else dict(species_check)
    unknown = set(options) - {"identity_cutoff", "candidates", "novel_named", "margin_weight"}
    if unknown:
        raise ValueError(f"unknown species check options {sorted(unknown)}: use identity_cutoff, candidates, "
                         "novel_named, margin_weight")
    for name in ("identity_cutoff", "novel_named"):
        if name in options and not 0 < options[name] < 1:
            raise ValueError(f"species check {name} must be between 0 and 1, got {options[name]}")
    if options.get("margin_weight", 0) < 0:
        raise ValueError(f"species check margin_weight must be 0 or more, got {options['margin_weight']}")
    return options


def calibrated_options(embeddings: torch.Tensor, records: list[dict], parts: list[EmbeddingPart],
                       directory: Path, asked: dict | bool) -> dict | bool:
    """The calibrated species rule as an index stores it in index.json, with the
    options `asked` (False: none asked for, kept as is); only the options (with a warning) where
    the library cannot calibrate it (no barcodes, no species with two references), so a later `add`
    or `recalibrate` can.

    Usage:
        meta["species_check"] = calibrated_options(embeddings, records, parts, Path("refs"), {})
    """
    if asked is False:
        return False
    asked = asked if isinstance(asked, dict) else {}
    options = {k: asked[k] for k in ("identity_cutoff", "candidates", "novel_named", "margin_weight") if k in asked}
    missing = sum(not r.get("dna") for r in records)
    if missing:
        logger.warning("%s: no species check: %d of %d references have no barcode kept (added to an index or "
                       "library built by an older clibd, which kept none): rebuild it with `clibd index build` to "
                       "have the check", directory, missing, len(records))
        return options
    check = calibrate_species_check(embeddings, select_parts(embeddings, parts, "scores_novelty"), records,
                                    **options)  # chunks are made float32 as they are used
    if check is None:
        logger.warning("%s: no species check: no species has two references to calibrate it on", directory)
    return check.to_dict() if check else options
