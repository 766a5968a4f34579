"""Reports in the paper's layout, rendered from the metrics `evaluate_retrieval` and `evaluate_is_du`
return (or from the `metrics.json` a report folder holds, so a user can re-render them):

- Tables 1 and 5: top-1 macro (1) and micro (5) accuracy, one row per rank, DNA-to-DNA,
  image-to-image and image-to-DNA seen / unseen / H.M., with the "aligned embeddings" columns;
- every query -> key pair at top-1/3/5, micro and macro (`format_table`);
- Tables 3 and 10: IS+DU vs image-to-DNA, micro and macro top-1, seen / unseen / H.M. per rank;
- Table 9: seen-vs-unseen binary accuracy of the IS+DU routing.

Usage:
    print(render_report(json.load(open("runs/demo/eval/metrics.json")), modalities=["image", "dna", "text"]))
    render_folder("runs/demo/eval")   # rewrites runs/demo/eval/metrics.md from its JSON files
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_write_text
from ..constants import MODALITIES, RANKS
from .pairs import FEATURE_NAMES

SPLITS = ("seen", "unseen", "hm")
TABLE1_PAIRS = (("dna", "dna", "DNA-to-DNA"), ("image", "image", "Image-to-Image"), ("image", "dna", "Image-to-DNA"))
IS_DU_ROWS = (("NN", "DNA"), ("NN", "IS+DU"), ("Linear", "IS+DU"))


def _pct(value: float | None) -> str:
    return "—" if value is None or value != value else f"{100 * value:.1f}"


def _pair_entries(metrics: dict):
    for query, by_key in metrics.items():
        for key, entry in by_key.items():
            if key != "is_du":
                yield query, key, entry


def format_table(metrics: dict, metric: str = "micro_top1") -> str:
    """A markdown table: one row per query -> key pair, seen / unseen / H.M. per rank, of `metric`.

    Usage:
        print(format_table(evaluate_retrieval(...), "macro_top5"))
    """
    header = "| query -> key | " + " | ".join(f"{rank} seen | {rank} unseen | {rank} H.M." for rank in RANKS) + " |"
    lines = [header, "|---|" + "---:|" * (3 * len(RANKS))]
    for query, key, entry in _pair_entries(metrics):
        cells = [_pct(entry[s][rank][metric]) for rank in RANKS for s in SPLITS]
        lines.append(f"| {FEATURE_NAMES.get(query, query)} -> {FEATURE_NAMES.get(key, key)} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def paper_table(metrics: dict, metric: str = "macro_top1", modalities: Sequence[str] = (),
                aligned: bool = True) -> str:
    """Table 1 (`macro_top1`) / Table 5 (`micro_top1`): per rank, the aligned towers (all "x" for
    the unaligned baseline) and DNA-to-DNA, image-to-image, image-to-DNA seen / unseen / H.M.

    Usage:
        print(paper_table(metrics, "micro_top1", ["image", "dna", "text"]))
    """
    marks = ["✓" if aligned and m in modalities else "x" for m in MODALITIES]
    header = "| Taxa | Img | DNA | Txt | " + " | ".join(f"{name} seen | unseen | H.M." for _, _, name in TABLE1_PAIRS)
    lines = [header + " |", "|---|:-:|:-:|:-:|" + "---:|" * (3 * len(TABLE1_PAIRS))]
    for rank in RANKS:
        cells = [_pct(metrics.get(q, {}).get(k, {}).get(s, {}).get(rank, {}).get(metric))
                 for q, k, _ in TABLE1_PAIRS for s in SPLITS]
        lines.append(f"| {rank.capitalize()} | " + " | ".join(marks + cells) + " |")
    return "\n".join(lines)


def is_du_table(metrics: dict) -> str:
    """Tables 3 and 10: image queries; NN with DNA keys (the image -> DNA pair) vs IS+DU with the
    NN and the linear classifier; micro and macro top-1, seen / unseen / H.M., every rank.

    Usage:
        print(is_du_table(json.load(open("runs/demo/eval/metrics.json"))))
    """
    is_du = metrics.get("image", {}).get("is_du", {})
    sources = {("NN", "DNA"): metrics.get("image", {}).get("dna"), ("NN", "IS+DU"): is_du.get("nn"),
               ("Linear", "IS+DU"): is_du.get("linear")}
    lines = ["| Taxa | Method | Strategy | micro seen | micro unseen | micro H.M. | macro seen | macro unseen | "
             "macro H.M. |", "|---|---|---|" + "---:|" * 6]
    for rank in RANKS:
        for method, strategy in IS_DU_ROWS:
            entry = sources[(method, strategy)]
            if entry is None:
                continue
            cells = [_pct(entry[s][rank][f"{kind}_top1"]) for kind in ("micro", "macro") for s in SPLITS]
            lines.append(f"| {rank.capitalize()} | {method} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seen_unseen_table(metrics: dict, k: int = 1) -> str:
    """Table 9: the share of image queries put on the right side (seen / unseen species) by the
    nearest DNA key of the whole pool (an oracle), and by IS+DU with the NN and linear classifiers.

    Usage:
        print(seen_unseen_table(metrics, k=1))
    """
    is_du = metrics.get("image", {}).get("is_du", {})
    rows = (("NN (oracle)", "DNA", is_du.get("dna_oracle")), ("NN", "IS+DU", is_du.get("nn")),
            ("Linear", "IS+DU", is_du.get("linear")))
    lines = ["| Method | Strategy | Seen | Unseen | H.M. |", "|---|---|---:|---:|---:|"]
    for method, strategy, entry in rows:
        if entry is not None:
            binary = entry["seen_vs_unseen"]
            lines.append(f"| {method} | {strategy} | " + " | ".join(_pct(binary[s][f"top{k}"]) for s in SPLITS) + " |")
    return "\n".join(lines)


def render_report(metrics: dict, modalities: Sequence[str] | None = None, aligned: bool = True,
                  title: str = "Retrieval accuracy", stage: str = "test", compat: bool = False) -> str:
    """The whole metrics.md for one stage's metrics: Tables 1 and 5, every pair at top-1/3/5,
    and with IS+DU Tables 3/10 and 9. `modalities`: the model's towers (default: those the
    metrics mention).

    Usage:
        Path("metrics.md").write_text(render_report(metrics, ["image", "dna", "text"], stage="test"))
    """
    if modalities is None:
        modalities = [m for m in MODALITIES if m in metrics or any(m in by_key for by_key in metrics.values())]
    state = "aligned" if aligned else "unaligned (pretrained towers, no contrastive training)"
    counting = ("the authors' (not_classified is a class, one text key per key record)" if compat
                else "clibd's (queries without a label left out, one text key per taxonomy)")
    lines = [f"# {title}", "", f"Split: {stage}; model: {state}, towers {', '.join(modalities)}; counting: "
             f"{counting}.", "",
             "## Table 1: top-1 macro accuracy (%)", "", paper_table(metrics, "macro_top1", modalities, aligned), "",
             "## Table 5: top-1 micro accuracy (%)", "", paper_table(metrics, "micro_top1", modalities, aligned), ""]
    for k in (1, 3, 5):
        for kind in ("micro", "macro"):
            lines += [f"## Every pair, {kind} top-{k} (%)", "", format_table(metrics, f"{kind}_top{k}"), ""]
    is_du = metrics.get("image", {}).get("is_du", {})
    if is_du:
        thresholds = ", ".join(f"{name} {is_du[name]['threshold']:.3f}" for name in ("nn", "linear") if name in is_du)
        lines += ["## Tables 3 and 10: IS+DU, top-1 accuracy (%)", "", f"Thresholds (chosen on val): {thresholds}.",
                  "", is_du_table(metrics), "", "## Table 9: seen vs unseen, binary accuracy (%)", "",
                  seen_unseen_table(metrics), ""]
    return "\n".join(lines)


def render_folder(folder: str | os.PathLike) -> str:
    """Rewrite `folder`/metrics.md from its metrics.json (test), metrics_val.json (val) and
    evaluation.json (the model's towers, aligned or not); returns the text.

    Usage:
        render_folder("runs/demo/eval")
    """
    folder = Path(folder)
    about = json.loads((folder / "evaluation.json").read_text()) if (folder / "evaluation.json").exists() else {}
    parts = []
    for name, stage in (("metrics.json", "test"), ("metrics_val.json", "val")):
        if (folder / name).exists():
            parts.append(render_report(json.loads((folder / name).read_text()), about.get("modalities"),
                                       about.get("aligned", True), f"Retrieval accuracy of {about.get('model', folder)}"
                                       f" ({stage})", stage, about.get("compat", False)))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no metrics.json to render")
    text = "\n".join(parts)
    atomic_write_text(folder / "metrics.md", text)
    return text
