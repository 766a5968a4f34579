"""Choose how a rank's answer is judged, on validation species (issue 17, item 3).

    python bench/rank_confidence.py                       # splits 42, 1, 2 of configs/bold_dna.yaml
    python bench/rank_confidence.py --precision 0.98 0.95 --splits 42
    python bench/rank_confidence.py --precision 0.98 --precision-confidence 0.5 0.9 0.95 0.99

For each species split: the validation stage of the novel-species split (references: seen keys +
test-unseen keys; queries: the validation-unseen species, which no reference holds), the index
built once, then calibrated again in memory per setting and the queries identified: thresholds that
best separate right from wrong answers (the default) or set for a stated precision (borne out at
each `--precision-confidence`: 0.5, the observed precision reaches it; 0.95, the default, its
one-sided Wilson lower bound does; `clibd.thresholds.precision_threshold`), each compared
with the similarity alone (`margin_weights=(0.0,)`) or with the confidence
`clibd.novelty.rank_confidence` (similarity + a weight chosen at calibration times the taxon
margin), holding out any of the library's species at calibration or only those the model did not
train on (`clibd.novelty.calibration_sample`; here the test-unseen species). Prints, per setting
and rank, the mean over the splits of: coverage (answered, of all novel queries, and of those whose
taxon at that rank the references hold), precision of the answers and strict accuracy (right
answers, of the queries whose taxon the references hold), each split's family and genus precision,
and the weights each split's calibration chose. Test species are never looked at.

Each stated precision also gets a "ceiling" row: the cut (and margin weight) chosen on the
validation queries themselves, the most any threshold on the confidence could answer at that
precision (observed), and so what no calibration can exceed; its "strict" is at most the top
hit's, given as "top hit right".
"""

from __future__ import annotations

from species_check import over_val_splits, split_parser

from clibd.evaluation.novel_species import reference_taxa
from clibd.evaluation.tool_comparison import PLACED, answer_rates, prediction_answer
from clibd.identify import Identifier
from clibd.novelty import (
    MARGIN_DEPTH,
    MARGIN_WEIGHTS,
    answers_at,
    calibrate,
    choose_margin_weight,
    confidences,
)
from clibd.thresholds import PRECISION_CONFIDENCE, precision_threshold
from clibd.towers.parts import select_parts


def scores(identifier: Identifier, embeddings, novel: list[dict], key_taxa: dict) -> dict[str, dict[str, float]]:
    predictions = identifier.identify_embeddings(embeddings, [q["id"] for q in novel])
    answers = [prediction_answer(p) for p in predictions]
    strict, precision, coverage = answer_rates(novel, answers, key_taxa)
    held = {rank: sum(q[rank] in key_taxa[rank] for q in novel) for rank in PLACED}
    answered = {rank: sum(bool(a.answer[rank]) for a in answers) for rank in PLACED}
    return {rank: {"coverage": coverage[rank], "coverage of held taxa": answered[rank] / held[rank],
                   "precision": precision[rank], "strict": strict[rank]} for rank in PLACED}


def ceiling(identifier: Identifier, embeddings, novel: list[dict], key_taxa: dict,
            precision: float) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """`scores`' figures, and the weights, of the best cut for `precision` on these queries' own
    answers (the top hit's label at each rank, its confidence as calibration reads it)."""
    index = identifier.index
    sims, rows = (embeddings.float() @ index.embeddings.float().T).topk(MARGIN_DEPTH, dim=1)
    out, weights = {}, {}
    for rank in PLACED:
        found = answers_at(novel, rank, list(range(len(novel))), set(), (sims, rows, sims, rows),
                           key_records=index.records)
        weights[rank] = choose_margin_weight(found, precision, MARGIN_WEIGHTS, confidence_level=0.5)
        right, wrong = confidences(found.held_right, weights[rank]), confidences(found.held_wrong, weights[rank])
        cut, _ = precision_threshold(right, wrong, precision, confidence_level=0.5)
        n_right, n_wrong = sum(c >= cut for c in right), sum(c >= cut for c in wrong)
        held = sum(q[rank] in key_taxa[rank] for q in novel)
        answered = n_right + n_wrong
        out[rank] = {"coverage": answered / len(novel), "coverage of held taxa": answered / held,
                     "precision": n_right / answered if answered else float("nan"), "strict": n_right / held,
                     "top hit right": len(right) / held}
    return out, weights


def settings_for_split(identifier: Identifier, novel: list[dict], key_taxa: dict, precisions: list[float | None],
                       confidences: list[float]) -> dict[str, tuple[dict, dict]]:
    index = identifier.index
    embeddings = identifier.embed(novel)
    new_only = index.meta.get("trained_species")
    if new_only is None:  # the "new species" rows would repeat the "all species" ones
        raise SystemExit(f"{identifier.model_dir}: the model does not record its training species (trained before "
                         "CLIBDConfig.trained_species): train it again, or set them in its config.json")
    out = {}
    settings = (("similarity alone, all species held out", (0.0,), None),
                ("similarity + margin, all species held out", MARGIN_WEIGHTS, None),
                ("similarity + margin, new species held out", MARGIN_WEIGHTS, new_only))
    for precision in precisions:
        for confidence in [None] if precision is None else confidences:
            for name, weights, trained in settings:
                calibration = calibrate(index.embeddings, index.records, precision=precision, margin_weights=weights,
                                        novelty_embeddings=select_parts(index.embeddings, index.parts, "scores_novelty"),
                                        trained_species=trained,
                                        confidence_level=PRECISION_CONFIDENCE if confidence is None else confidence)
                index.meta.update(thresholds=calibration.thresholds, precision_curves=calibration.curves,
                                  margin_weights=calibration.margin_weights)  # this setting's, in memory
                stated = "balanced" if precision is None else f"precision {precision} at confidence {confidence}"
                out[f"{stated}, {name}"] = (scores(identifier, embeddings, novel, key_taxa), calibration.margin_weights)
        if precision is not None:
            out[f"precision {precision}, ceiling: the best cut on these queries"] = ceiling(
                identifier, embeddings, novel, key_taxa, precision)
    return out


def main() -> None:
    parser = split_parser(__doc__)
    parser.add_argument("--precision", type=float, nargs="*", default=[0.98, 0.95],
                        help="stated precisions to calibrate for, besides the balanced default")
    parser.add_argument("--precision-confidence", type=float, nargs="+", default=[0.5, PRECISION_CONFIDENCE],
                        help="how sure each stated precision must be borne out (0.5: the observed precision)")
    args = parser.parse_args()
    per_split = over_val_splits(args, lambda identifier, references, novel, _: settings_for_split(
        identifier, novel, reference_taxa(references), [None, *args.precision], args.precision_confidence),
        species_check=False)
    print(f"\nvalidation-unseen species, mean over splits {' '.join(map(str, args.splits))} (%); "
          "o / f / g = order / family / genus\n")
    columns = list(per_split[0][next(iter(per_split[0]))][0]["genus"]) + ["top hit right"]
    print("| setting | " + " | ".join(f"{c} o / f / g" for c in columns)
          + " | precision f / g, per split | weights chosen o / f / g, per split |")
    print("|---|" + "---|" * (len(columns) + 2))
    for setting in per_split[0]:
        cells = [" / ".join(f"{100 * sum(s[setting][0][rank][c] for s in per_split) / len(per_split):.1f}"
                            for rank in PLACED) if c in per_split[0][setting][0]["genus"] else "" for c in columns]
        weights = "; ".join(" / ".join(f"{s[setting][1][rank]:g}" for rank in PLACED) for s in per_split)
        each = "; ".join(" / ".join(f"{100 * s[setting][0][rank]['precision']:.1f}" for rank in ("family", "genus"))
                         for s in per_split)
        print(f"| {setting} | " + " | ".join(cells) + f" | {each} | {weights} |")


if __name__ == "__main__":
    main()
