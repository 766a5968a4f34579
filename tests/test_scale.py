"""Scale: embedding shared among processes (accelerate, gloo on the CPU) gives what one process
gives, bit for bit; an index folder maps its embeddings, keeps its records as columns and keeps
its faiss inverted file, keyed to the embeddings."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from clibd import CLIBDConfig, CLIBDModel, CLIBDProcessor
from clibd.data import records_to_dataset
from clibd.index import RECORD_COLUMNS, ReferenceIndex, build_index
from clibd.index_store import RecordTable, ivf_path, map_embeddings
from clibd.retrieval import embed_records

ROOT = Path(__file__).resolve().parents[1]
BASES = "ACGT"
ODD_TEXT = ["", "tab\there", 'a "quote"', "line\nbreak", "NA", "null", "0042", " padded "]  # read back as written

# Run by `accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU): every rank saves what it got, rank 0 also
# what one process computes alone (the plain path) in the same environment.
WORKER = """
import sys, torch
from accelerate import PartialState
from clibd import CLIBDModel, CLIBDProcessor, index
from clibd.checked_embedding import embed_checked
from clibd.data import records_to_dataset
from clibd.evaluation.retrieval import EmbeddingCache
from clibd.retrieval import embed_records, embedding_processes
from pathlib import Path

out = Path(sys.argv[1]); records = torch.load(out / "records.pt")
state = PartialState(cpu=True)
model, processor = CLIBDModel.from_pretrained(out / "model").eval(), CLIBDProcessor.from_pretrained(out / "model")
dna = records_to_dataset(records["dna"])
got = {"world": state.num_processes,
       "plain": embed_records(model, processor, dna, "dna", batch_size=4),
       "shared": embed_records(model, processor, dna, "dna", batch_size=4, accelerator=state),
       "one_batch": embed_records(model, processor, records_to_dataset(records["dna"][:3]), "dna", 4, accelerator=state),
       "evaluation": EmbeddingCache(model, processor, 4, False, accelerator=state)("keys", dna, "dna")}
index.SHARD_SIZE = 10  # three shards of 10, 10 and 7 records
got["shards"], _ = index.embed_in_shards(model, processor, records["dna"], "dna", out / "work", 4, False,
                                         accelerator=state)
labelled = [{**r, "order": "O", "family": "F", "genus": f"g{i % 5 // 2}", "species": f"s{i % 5}"}
            for i, r in enumerate(records["dna"])]
built = index.build_index(out / "model", labelled, "dna", out / "built", batch_size=4, progress=False)
got["built"], got["built_meta"] = built.embeddings.clone(), built.meta  # `clibd index build` under accelerate
both = [{**labelled[i], "image": records["image"][i]["image"]} for i in range(5)]  # a library: photos and barcodes
library = index.build_index(out / "model", both, ["image", "dna"], out / "library", batch_size=2, progress=False)
got["library"] = {m: keys.embeddings.clone() for m, keys in library.key_sets.items()}
got["library_build"] = library.meta["build_id"]  # one writer: every rank reads the one build
with embedding_processes(state):  # a photo that cannot be read, in rank 1's part only
    got["photos"], got["photo_failures"] = embed_checked(model, processor, records["image"], "image", 2, skip=True)
    try:
        embed_checked(model, processor, records["image"], "image", 2)
    except ValueError as error:
        got["refused"] = str(error)
torch.save(got, out / f"rank{state.process_index}.pt")
"""


def barcode(generator: torch.Generator, length: int) -> str:
    return "".join(BASES[i] for i in torch.randint(0, 4, (length,), generator=generator).tolist())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    config = CLIBDConfig.tiny(modalities=["image", "dna"])
    out = tmp_path_factory.mktemp("model") / "model"
    torch.manual_seed(0)
    CLIBDModel(config).save_pretrained(out)
    CLIBDProcessor.from_model_config(config).save_pretrained(out)
    return out


def test_two_gloo_processes_embed_what_one_process_does_bit_for_bit(tiny_model_dir, tmp_path):
    generator = torch.Generator().manual_seed(1)
    # 27 barcodes of uneven lengths in batches of 4: 7 batches, 4 on rank 0 and 3 on rank 1
    dna = [{"id": f"r{i}", "dna": barcode(generator, int(torch.randint(60, 140, (1,), generator=generator)))}
           for i in range(27)]
    photos = []
    for i in range(5):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        photos.append({"id": f"p{i}", "image": str(path)})
    photos.append({"id": "missing", "image": str(tmp_path / "missing.png")})  # position 5: rank 1's part
    (tmp_path / "model").symlink_to(tiny_model_dir)
    torch.save({"dna": dna, "image": photos}, tmp_path / "records.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # --multi_gpu runs torchrun: on a CPU machine, two gloo processes (--cpu would start just one)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run([*launch, str(tmp_path / "worker.py"), str(tmp_path)], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = ranks[0]["plain"]
    assert ranks[0]["world"] == 2 and one.shape == (27, 32)
    for got in ranks:
        assert torch.equal(got["shared"], one)  # same bits, same order
        assert torch.equal(got["one_batch"], one[:3])  # rank 1 had nothing to embed
        assert torch.equal(got["evaluation"], one)
        assert torch.equal(got["shards"], one.half())
        assert set(got["photo_failures"]) == {5} and "missing.png" in got["photo_failures"][5]
        assert torch.isfinite(got["photos"][:5]).all() and torch.isnan(got["photos"][5]).all()
        assert "missing.png" in got["refused"]  # every process raises the failing one's message
    # the index built by two processes (written once, by the main one) is the one-process index
    labelled = [{**r, "order": "O", "family": "F", "genus": f"g{i % 5 // 2}", "species": f"s{i % 5}"}
                for i, r in enumerate(dna)]
    plain = build_index(tiny_model_dir, labelled, "dna", tmp_path / "plain", batch_size=4, progress=False)
    for got in ranks:
        assert torch.allclose(got["built"].float(), plain.embeddings.float(), atol=1e-3)
        assert got["built_meta"]["thresholds"] == pytest.approx(plain.meta["thresholds"], abs=1e-3)
    assert not list(tmp_path.glob(".built*"))  # no temporary folder or partial shards left
    # a multi-modal library too: written once, by the main process, the one-process library
    both = [{**labelled[i], "image": photos[i]["image"]} for i in range(5)]
    plain_library = build_index(tiny_model_dir, both, ["image", "dna"], tmp_path / "plain_library", batch_size=2,
                                progress=False)
    for got in ranks:
        for modality in ("image", "dna"):
            assert torch.allclose(got["library"][modality].float(),
                                  plain_library.key_sets[modality].embeddings.float(), atol=1e-3)
    written = json.loads((tmp_path / "library" / "index.json").read_text())["build_id"]
    assert [got["library_build"] for got in ranks] == [written, written]
    assert not list(tmp_path.glob(".library*"))
    shards = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert shards == ["shard-000000.safetensors", "shard-000001.safetensors", "shard-000002.safetensors"]
    # the worker's one-process run is this process's, up to the thread count's rounding
    model = CLIBDModel.from_pretrained(tiny_model_dir).eval()
    here = embed_records(model, CLIBDProcessor.from_pretrained(tiny_model_dir), records_to_dataset(dna), "dna", 4)
    assert torch.allclose(here, one, atol=1e-6)


def test_one_process_takes_the_plain_path(tiny_model_dir):
    model = CLIBDModel.from_pretrained(tiny_model_dir).eval()
    processor = CLIBDProcessor.from_pretrained(tiny_model_dir)
    dataset = records_to_dataset([{"id": str(i), "dna": "ACGT" * (20 + i)} for i in range(9)])
    alone = SimpleNamespace(num_processes=1)  # gathers nothing: any collective would fail here
    assert torch.equal(embed_records(model, processor, dataset, "dna", 4, accelerator=alone),
                       embed_records(model, processor, dataset, "dna", 4))


def write_index(directory: Path, n: int = 3000, dim: int = 16, parts: list[dict] | None = None) -> torch.Tensor:
    """An index folder of `n` random unit keys with labels (no model: search only)."""
    generator = torch.Generator().manual_seed(n)
    keys = F.normalize(torch.randn(n, dim, generator=generator), dim=-1).half()
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"dna": keys}, directory / "embeddings.safetensors")
    rows = [{"id": f"ref{i}", "order": "Diptera", "family": f"F{i % 7}", "genus": f"G{i % 50}",
             "species": f"G{i % 50} s{i % 300}", "source": ODD_TEXT[i % len(ODD_TEXT)]} for i in range(n)]
    with open(directory / "records.tsv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RECORD_COLUMNS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    meta = {"modality": "dna", "dim": dim, "count": n, "model": "none", "model_hash": "none",
            "parts": parts or [{"name": "embedding", "dim": dim, "weight": 1.0, "trained": True,
                                "scores_novelty": True}]}
    (directory / "index.json").write_text(json.dumps(meta))
    return keys


def mapping_of(address: int) -> str:
    """The file (or "" for anonymous memory) that this process has mapped at `address` (Linux)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else ""
    return ""


def test_embeddings_are_mapped_from_the_file_not_copied(tmp_path):
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs Linux's /proc/self/maps")
    keys = write_index(tmp_path / "refs")
    index = ReferenceIndex.load(tmp_path / "refs")
    assert index.embeddings.dtype == torch.float16 and torch.equal(index.embeddings, keys)
    assert mapping_of(index.embeddings.data_ptr()) == str(tmp_path / "refs" / "embeddings.safetensors")
    assert mapping_of(keys.data_ptr()) != mapping_of(index.embeddings.data_ptr())  # it tells a copy in memory
    index.embeddings[0] = 0  # copy-on-write: this process only, never the file
    assert torch.equal(map_embeddings(tmp_path / "refs" / "embeddings.safetensors", "dna"), keys)


def test_records_as_columns_read_like_a_list_of_dicts(tmp_path):
    write_index(tmp_path / "refs", n=120)
    with open(tmp_path / "refs" / "records.tsv", newline="") as f:
        expected = list(csv.DictReader(f, delimiter="\t"))
    table = RecordTable.read(tmp_path / "refs" / "records.tsv")
    assert table == expected and list(table) == expected and len(table) == 120
    assert [r["source"] for r in table[:8]] == ODD_TEXT and table[-1] == expected[-1] and table[3:5] == expected[3:5]
    assert table + [{"id": "x"}] == [*expected, {"id": "x"}] and [{"id": "x"}] + table == [{"id": "x"}, *expected]
    assert table.column("genus") == [r["genus"] for r in expected]
    with pytest.raises(IndexError):
        table[120]
    index = ReferenceIndex.load(tmp_path / "refs")
    assert isinstance(index.records, RecordTable) and index.labels("genus") == [r["genus"] for r in expected]


def test_the_faiss_ivf_index_is_persisted_keyed_and_memory_mapped(tmp_path, monkeypatch):
    faiss = pytest.importorskip("faiss")
    import clibd.index_store as store

    keys = write_index(tmp_path / "refs")
    noise = 0.01 * torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    queries = F.normalize(keys[:64].float() + noise, dim=-1)
    built = ReferenceIndex.load(tmp_path / "refs").search(queries, 5, "faiss-ivf")
    path = ivf_path(tmp_path / "refs", "embeddings")
    assert json.loads(path.with_name(path.name + ".json").read_text())["keys"] == "embeddings"
    assert (built[1][:, 0] == torch.arange(64)).float().mean() > 0.9  # each query finds its own key

    def no_build(_keys):
        raise AssertionError("rebuilt although the persisted index matches the embeddings")

    read_flags = []
    read_index = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda *args: read_flags.append(args[1:]) or read_index(*args))
    monkeypatch.setattr(store, "approximate_faiss_index", no_build)
    again = ReferenceIndex.load(tmp_path / "refs")
    assert torch.equal(again.search(queries, 5, "faiss-ivf")[1], built[1])
    assert read_flags == [(getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP),)]  # mapped, not read
    assert mapping_of(int(faiss.extract_index_ivf(again._faiss[("embeddings", "faiss-ivf")]).invlists.get_codes(0))) \
        == str(path)
    assert faiss.extract_index_ivf(again._faiss[("embeddings", "faiss-ivf")]).nprobe == 16
    # a copied folder (new file times, same bytes) is rehashed, not rebuilt
    os.utime(tmp_path / "refs" / "embeddings.safetensors", ns=(1, 1))
    assert torch.equal(ReferenceIndex.load(tmp_path / "refs").search(queries, 5, "faiss-ivf")[1], built[1])
    # other embeddings: the stale file is rebuilt
    monkeypatch.undo()
    write_index(tmp_path / "refs", n=2000)
    assert ReferenceIndex.load(tmp_path / "refs").search(queries, 5, "faiss-ivf")[1].max() < 2000
    assert faiss.read_index(str(path)).ntotal == 2000


def test_novelty_keys_get_their_own_persisted_index(tmp_path):
    pytest.importorskip("faiss")
    parts = [{"name": "novelty", "dim": 10, "weight": 1.0, "trained": True, "scores_novelty": True},
             {"name": "placement", "dim": 6, "weight": 1.0, "trained": True, "scores_novelty": False}]
    keys = write_index(tmp_path / "refs", parts=parts)
    queries = keys[:32].float()
    exact = ReferenceIndex.load(tmp_path / "refs").novelty_similarity(queries)
    approximate = ReferenceIndex.load(tmp_path / "refs").novelty_similarity(queries, "faiss-ivf")
    assert ivf_path(tmp_path / "refs", "novelty").exists()
    assert torch.allclose(approximate, exact, atol=0.02)
    assert torch.allclose(ReferenceIndex.load(tmp_path / "refs").novelty_similarity(queries, "faiss-ivf"), approximate)


def test_a_folder_that_cannot_be_written_keeps_the_index_in_memory(tmp_path, monkeypatch, caplog):
    faiss = pytest.importorskip("faiss")

    def refuse(index, path):
        raise RuntimeError(f"could not open {path} for writing: Read-only file system")

    keys = write_index(tmp_path / "refs")
    monkeypatch.setattr(faiss, "write_index", refuse)
    found = ReferenceIndex.load(tmp_path / "refs").search(keys[:8].float(), 1, "faiss-ivf")[1][:, 0]
    assert torch.equal(found, torch.arange(8)) and "kept in memory only" in caplog.text
    assert not ivf_path(tmp_path / "refs", "embeddings").exists() and len(list((tmp_path / "refs").iterdir())) == 3


def test_an_index_made_in_memory_searches_without_a_folder(tmp_path):
    pytest.importorskip("faiss")
    keys = write_index(tmp_path / "refs")
    loaded = ReferenceIndex.load(tmp_path / "refs")
    in_memory = ReferenceIndex(tmp_path / "nowhere", loaded.meta, keys.clone(), list(loaded.records))
    assert torch.equal(in_memory.search(keys[:8].float(), 1, "faiss-ivf")[1][:, 0], torch.arange(8))
    assert not (tmp_path / "nowhere").exists()


def test_a_process_that_loaded_an_older_build_neither_reads_nor_leaves_a_wrong_ivf(tmp_path):
    """An index loaded before `index add` replaced its folder searches its own keys; the folder's
    next reader gets an inverted file of the folder's own keys, not the old process's."""
    pytest.importorskip("faiss")
    from clibd.index import _write_index

    def write(n: int) -> torch.Tensor:
        keys = F.normalize(torch.randn(n, 16, generator=torch.Generator().manual_seed(n)), dim=-1)
        records = [{"id": f"ref{i}", "order": "O", "species": f"s{i}"} for i in range(n)]
        _write_index(tmp_path / "refs", {"modality": "dna", "dim": 16, "model": "none", "model_hash": "none"},
                     keys, records)
        return keys

    old_keys = write(3000)
    old = ReferenceIndex.load(tmp_path / "refs")
    new_keys = write(2000)  # what `index add` / a rebuild does while `old` is open
    rows = old.search(old_keys[:8].float(), 1, "faiss-ivf")[1][:, 0]
    assert torch.equal(rows, torch.arange(8))  # the old process answers from its own library
    new = ReferenceIndex.load(tmp_path / "refs")
    assert new.meta["build_id"] != old.meta["build_id"]
    rows = new.search(new_keys[:8].float(), 1, "faiss-ivf")[1][:, 0]
    assert torch.equal(rows, torch.arange(8)) and new._faiss[("embeddings", "faiss-ivf")].ntotal == 2000

