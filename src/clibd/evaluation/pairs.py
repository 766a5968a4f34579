"""Which query/key features are compared, and the best-checkpoint score: the authors' rule
(`bioscanclip/util/util.py` `inference_and_print_result`, `scripts/train_cl.py` `compute_overall_acc`).

Features of a record: each tower's embedding (`image`, `dna`, `text`), `image_dna` (the
normalised mean of the image and DNA embeddings, the authors' "averaged" feature) and
`image_dna_concat` (the two concatenated, "concatenated"); keys also `all` (the image, DNA and
text keys stacked, only for a model with all three towers). Every query feature is compared with
every key feature of the same width.

Usage:
    evaluation_pairs(["image", "dna", "text"])   # 21 pairs
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..constants import MODALITIES, RANKS

AVERAGED, CONCATENATED, ALL = "image_dna", "image_dna_concat", "all"
QUERY_FEATURES = (*MODALITIES, AVERAGED, CONCATENATED)  # the authors' All_TYPE_OF_FEATURES_OF_QUERY
KEY_FEATURES = (*QUERY_FEATURES, ALL)  # ... and All_TYPE_OF_FEATURES_OF_KEY
FEATURE_NAMES = {"image": "image", "dna": "DNA", "text": "text", AVERAGED: "image+DNA (avg)",
                 CONCATENATED: "image+DNA (concat)", ALL: "all"}


def feature_widths(modalities: Sequence[str], dims: Mapping[str, int] | None = None) -> dict[str, int]:
    """The width of every feature a model with `modalities` has: `dims` per tower (default all
    equal, the shared projection width), averaged = the image width, concatenated = the sum,
    `all` = the shared width (only when all three towers are there and equally wide).

    Usage:
        feature_widths(["image", "dna"], {"image": 512, "dna": 512})   # {..., "image_dna_concat": 1024}
    """
    dims = dict(dims or {m: 1 for m in modalities})
    widths = {m: dims[m] for m in MODALITIES if m in modalities}
    if "image" in widths and "dna" in widths:
        if widths["image"] == widths["dna"]:
            widths[AVERAGED] = widths["image"]
        widths[CONCATENATED] = widths["image"] + widths["dna"]
    if all(m in widths for m in MODALITIES) and len({widths[m] for m in MODALITIES}) == 1:
        widths[ALL] = widths["image"]
    return widths


def evaluation_pairs(modalities: Sequence[str], dims: Mapping[str, int] | None = None) -> list[tuple[str, str]]:
    """(query, key) feature pairs of the authors' evaluation: queries image, DNA, text, averaged,
    concatenated x keys the same and `all`, wherever the widths match (`dims`: each tower's
    embedding width, default all equal). I+D+T: 4 x 5 + concatenated x concatenated = 21.

    Usage:
        pairs = evaluation_pairs(model.config.modalities)
    """
    widths = feature_widths(modalities, dims)
    return [(q, k) for q in QUERY_FEATURES if q in widths for k in KEY_FEATURES
            if k in widths and widths[k] == widths[q]]


def selection_score(metrics: dict) -> float:
    """The authors' rule for the best checkpoint (`compute_overall_acc`): the mean of top-1 micro
    and macro accuracy over every query/key pair evaluated, seen and unseen, and all four ranks
    (NaN figures, splits without a labelled query, left out).

    Usage:
        score = selection_score(evaluate_retrieval(model, processor, splits, "val", evaluation_pairs(mods)))
    """
    values = [ranks[rank][m] for by_key in metrics.values() for key, entry in by_key.items() if key != "is_du"
              for split, ranks in entry.items() if split in ("seen", "unseen")
              for rank in RANKS for m in ("micro_top1", "macro_top1") if ranks[rank][m] == ranks[rank][m]]
    return sum(values) / len(values) if values else 0.0
