"""Thresholds learned from right and wrong answers: the cut that best separates them, the lowest
cut whose answers bear out a stated precision, and the precision curve `identify` reads per answer.

`clibd.novelty` calibrates a library with them; they know nothing of embeddings or records.

Usage:
    best_threshold(right_similarities, wrong_similarities)                 # e.g. 0.87
    cut, method = precision_threshold(right_similarities, wrong_similarities, 0.98)
    precision_at(precision_curve(right_similarities, wrong_similarities), 0.91)
"""

from __future__ import annotations

import bisect
import math
from statistics import NormalDist

import torch

# Share of the one kind of answer a one-sided threshold gets wrong (`clibd.novelty`'s module doc).
ONE_SIDED_QUANTILE = 0.01
# One-sided confidence that a stated precision's answers are right at least that often on the
# calibration answers (`precision_threshold`): the observed precision alone (0.5) was 0.7 to 2
# points short on species held out of calibration (bench/README.md, chosen on validation species).
PRECISION_CONFIDENCE = 0.95


def best_threshold(known: list[float], novel: list[float]) -> float:
    """The cut that best separates `known` (>= cut) from `novel` (< cut), by balanced accuracy.

    Usage:
        best_threshold([0.9, 0.95], [0.6, 0.7])   # 0.8, midway between 0.7 and 0.9
    """
    return best_cut(known, novel)[0]


def best_cut(known: list[float], novel: list[float]) -> tuple[float, float]:
    """(cut, balanced accuracy sum) of `best_threshold`; the lowest cut of the best score wins.

    Usage:
        cut, score = best_cut(right_confidences, wrong_confidences)   # score 2.0: perfectly separated
    """
    if not known or not novel:
        return float("nan"), float("nan")
    known_t, novel_t = torch.tensor(sorted(known), dtype=torch.float64), torch.tensor(sorted(novel), dtype=torch.float64)
    candidates = torch.unique(torch.cat([known_t, novel_t]))  # sorted ascending
    known_above = 1 - torch.searchsorted(known_t, candidates).double() / len(known_t)  # share >= cut
    novel_below = torch.searchsorted(novel_t, candidates).double() / len(novel_t)  # share < cut
    scores = known_above + novel_below
    at = int(torch.argmax(scores))  # the first of equal scores: the lowest cut
    # Put the cut midway to the next lower value so that it is not fitted to one sample.
    cut = (candidates[at] + candidates[at - 1]) / 2 if at > 0 else candidates[at]
    return float(cut), float(scores[at])


def rank_threshold(right: list[float], wrong: list[float]) -> tuple[float, str]:
    """(threshold, method) for one rank from the similarities of its right and wrong answers: the
    best separating cut, or one-sided where only one kind exists (`ONE_SIDED_QUANTILE`).

    Usage:
        threshold, method = rank_threshold(right_similarities, wrong_similarities)   # method "separates"
    """
    if right and wrong:
        return best_threshold(right, wrong), "separates"
    if wrong:  # just above all but ONE_SIDED_QUANTILE of the wrong answers
        cut = torch.quantile(torch.tensor(wrong, dtype=torch.float64), 1 - ONE_SIDED_QUANTILE).item()
        return math.nextafter(cut, math.inf), "above wrong"
    if right:
        return torch.quantile(torch.tensor(right, dtype=torch.float64), ONE_SIDED_QUANTILE).item(), "below right"
    return float("nan"), "none"


def precision_threshold(right: list[float], wrong: list[float], precision: float,
                        confidence_level: float = PRECISION_CONFIDENCE) -> tuple[float, str]:
    """(threshold, method): the lowest cut at which the answers with similarity >= cut are right
    at least `precision` of the time, at one-sided `confidence_level` (the Wilson score lower bound of
    their precision reaches `precision`; confidence_level 0.5: the observed precision does); infinite
    when no cut is ("precision unreachable": the rank answers nothing, as no answer was borne out;
    it takes at least `answers_needed` answers, all right), NaN when there are no answers.

    Usage:
        cut, method = precision_threshold(right_similarities, wrong_similarities, 0.98)
    """
    z = _z(confidence_level)
    scored = _scored(right, wrong)
    if not scored:
        return float("nan"), "none"
    cut, n_right = None, 0
    for n, (sim, ok) in enumerate(scored, start=1):
        n_right += ok
        at_boundary = n == len(scored) or scored[n][0] < sim  # cut between distinct values only
        if at_boundary and wilson_lower_bound(n_right, n, z) >= precision:
            cut = sim
    if cut is None:
        return math.inf, "precision unreachable"
    return cut, "precision"


def _scored(right: list[float], wrong: list[float]) -> list[tuple[float, int]]:
    """Every answer as (score, 1 right / 0 wrong), highest score first (a right one before a wrong
    one of equal score): what a cut from the top sweeps through."""
    return sorted([(s, 1) for s in right] + [(s, 0) for s in wrong], reverse=True)


def answers_needed(precision: float, confidence_level: float = PRECISION_CONFIDENCE) -> int:
    """The fewest calibration answers above a cut, all right, that bear out `precision` at
    `confidence_level` (`precision_threshold`): the Wilson lower bound of n of n is n / (n + z^2).

    Usage:
        answers_needed(0.98)   # 133
    """
    if not 0 < precision < 1:
        raise ValueError(f"precision must be between 0 and 1, got {precision}")
    z = _z(confidence_level)
    return max(1, math.ceil(z * z * precision / (1 - precision)))


def _z(confidence_level: float) -> float:
    """The standard normal quantile of a one-sided `confidence_level` in [0.5, 1)."""
    if not 0.5 <= confidence_level < 1:
        raise ValueError(f"a stated precision's confidence must be in [0.5, 1) (0.5: the observed precision), "
                         f"got {confidence_level}")
    return NormalDist().inv_cdf(confidence_level)


def wilson_lower_bound(successes: int, trials: int, z: float) -> float:
    """The Wilson score interval's lower end for a proportion of `successes` in `trials` at `z`
    standard deviations (z = 0: the observed proportion).

    Usage:
        wilson_lower_bound(98, 100, 1.645)   # 0.94...
    """
    p, z2 = successes / trials, z * z
    centre = p + z2 / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return (centre - spread) / (1 + z2 / trials)


def precision_curve(right: list[float], wrong: list[float], points: int = 128) -> list[tuple[float, float]]:
    """[(similarity, precision of the answers at or above it)] at up to `points` similarities
    (quantiles of the answers), highest first: what `precision_at` reads for one query.

    Usage:
        curve = precision_curve(right, wrong); precision_at(curve, 0.91)
    """
    scored = _scored(right, wrong)
    if not scored:
        return []
    keep = sorted({round(i * (len(scored) - 1) / max(points - 1, 1)) for i in range(points)})
    n_right, curve, wanted = 0, [], set(keep)
    for n, (sim, ok) in enumerate(scored):
        n_right += ok
        if n in wanted:
            curve.append((round(sim, 6), round(n_right / (n + 1), 4)))
    return curve


def precision_at(curve: list[tuple[float, float]], similarity: float) -> float:
    """The calibrated precision of an answer at `similarity`: that of the calibration answers at or
    above it, read at the curve point at or just above it (exact for a curve of every answer);
    above the curve, its highest point's; NaN without a curve. The observed precision, not the
    lower bound a stated precision's threshold is set on (`precision_threshold`).

    Usage:
        precision_at(precision_curve(right_similarities, wrong_similarities), 0.91)   # e.g. 0.97
    """
    if not curve:
        return float("nan")
    if math.isnan(similarity):  # at or above no point
        return curve[0][1]
    above = bisect.bisect_right(curve, -similarity, key=lambda point: -point[0])  # points at or above it
    return curve[above - 1][1] if above else curve[0][1]
