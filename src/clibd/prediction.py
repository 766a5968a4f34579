"""What identify answers for one query: `Hit`, `Prediction`, the decision from hits and
thresholds (`predict`) and the row of a query that could not be identified (`failed`).

Usage:
    prediction = predict("q1", hits, index.thresholds)
    prediction.answer["genus"], prediction.novel, prediction.deepest_rank
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .constants import RANKS
from .thresholds import precision_at

COMMENT = "# "  # provenance lines of a predictions TSV


@dataclass(frozen=True)
class Hit:
    """A reference among a query's nearest: its id, cosine similarity and taxonomy (rank -> label;
    read back from a TSV, the species only).

    Usage:
        Hit("BIOUG001-22", 0.93, {"species": "Aedes vexans"}, modality="dna")
    """

    id: str
    similarity: float
    taxonomy: dict[str, str]
    modality: str = ""  # the key's modality (image, dna, text) in a multi-modal library; "" read from a TSV


@dataclass(frozen=True)
class Prediction:
    """The identification of one query.

    `answer`: rank -> label, "" below the deepest confident rank; `similarity`: best cosine
    (places the query); `novelty_similarity`: best cosine on the parts that score novelty;
    `novel`: the library probably does not hold the species; `support`: rank -> fraction of the
    top-k hits agreeing with the nearest one at that rank; `hits`: nearest first; `error`: why
    the query could not be identified (`on_bad_input="skip"`: then no answer, no hits, NaN
    similarities), "" otherwise; `precision`: rank -> how often the index's calibration answers
    at this confidence (`clibd.novelty.rank_confidence`) were right at that rank, for the ranks answered (where the index has a curve);
    `route`: the key modality the answer came from (is-du: "image" for a species judged seen,
    "dna" for unseen; stacked keys: the nearest key's), "" where not known (older TSVs, error rows);
    `identity`: the alignment identity of the reference that named the species
    (`clibd.species_check`; it may not be `hits[0]`, whose support and precision the other ranks
    keep), else the best among the nearest references aligned; NaN where the index has no species
    check; `identity_reference`: the id of that reference ("" where none could be compared).

    Usage:
        prediction.answer["genus"], prediction.novel, prediction.hits[0].id
    """

    query_id: str
    answer: dict[str, str]
    similarity: float
    novelty_similarity: float
    novel: bool
    support: dict[str, float]
    hits: list[Hit]
    error: str = ""
    precision: dict[str, float] = field(default_factory=dict)
    route: str = ""
    identity: float = math.nan
    identity_reference: str = ""

    @property
    def deepest_rank(self) -> str | None:
        """The deepest rank the answer gives (e.g. "genus"), None when it gives none.

        Usage:
            prediction.deepest_rank   # "genus"
        """
        filled = [rank for rank in RANKS if self.answer.get(rank)]
        return filled[-1] if filled else None


def predict(query_id: str, hits: Sequence[Hit], thresholds: Mapping[str, float],
            novelty_similarity: float | None = None,
            curves: Mapping[str, list[tuple[float, float]]] | None = None,
            confidence: Mapping[str, float] | None = None) -> Prediction:
    """The decision for one query from its hits (nearest first), the index's per-rank thresholds
    and its novelty similarity (the best similarity when None). The answer is filled from order
    down and stops at the first rank whose threshold is not cleared, each by its `confidence`
    where given (`clibd.novelty.rank_confidence`; for species, `SpeciesCheck.confidence`), else
    by the novelty similarity for species and the best similarity above it. A rank whose
    threshold could not be calibrated (NaN) stops it too: no answer is better than an unchecked
    one; an absent threshold (an index built with `calibrate=False`) does not stop it.

    Usage:
        predict("q1", [Hit("k1", 0.95, {"order": "Diptera", ...}), ...], index.thresholds)
    """
    best = hits[0]
    novelty = best.similarity if novelty_similarity is None else novelty_similarity
    scores = {**{rank: best.similarity for rank in RANKS}, "species": novelty, **(confidence or {})}
    answer, support, confident = {}, {}, True
    for rank in RANKS:
        threshold = thresholds.get(rank, -math.inf)
        score = scores[rank]
        confident = confident and score >= threshold  # False for a NaN threshold
        label = best.taxonomy.get(rank, "")
        answer[rank] = label if confident else ""
        support[rank] = sum(hit.taxonomy.get(rank, "") == label for hit in hits) / len(hits)
    novel = not scores["species"] >= thresholds.get("species", -math.inf)
    curves = curves or {}
    precision = {rank: precision_at(curves.get(rank, []), scores[rank]) for rank in RANKS if answer[rank]}
    precision = {rank: value for rank, value in precision.items() if not math.isnan(value)}
    return Prediction(query_id, answer, best.similarity, novelty, novel, support, list(hits), precision=precision)


def failed(query_id: str, reason: str) -> Prediction:
    """The row of a query that could not be identified: no answer, no hits, and why.

    Usage:
        failed("photo_17.jpg", "unreadable or truncated image")
    """
    return Prediction(query_id, dict.fromkeys(RANKS, ""), math.nan, math.nan, False, dict.fromkeys(RANKS, 0.0), [],
                      reason)
