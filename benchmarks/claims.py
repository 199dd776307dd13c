"""The papers' headline claims beside what we measured, every figure read from a results file.

Each row names the file it comes from; a claim whose file is missing says so instead of a number
(the first release hand-wrote this table and it drifted from the files).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks._protocol import read_rows

DOCS = Path(__file__).resolve().parents[1] / "docs"

PAPERS = {
    "1. heuristic": "VGG16/ImageNet MACs -77.47%, about 5x speed-up; ResNet34 MACs -41.94%",
    "2. layer pruning": "ResNet-56/CIFAR-10: layers alone MACs -30.0%, params -69%, -0.98 top-1; "
                        "cascade after 6 iterations MACs -62.69%, -0.91",
    "3. HFP": "exact MACs/params targets reached by gradient descent during training",
    "4. importance weights": "U-Net/TernausNet (Inria, AIRS): MACs -85% for a 0.32% accuracy drop",
}


def _missing(name: str) -> str:
    return f"no results file yet ({name})"


def heuristic(docs: Path) -> str:
    rows = read_rows(docs / "heuristic.csv")
    if not rows:
        return _missing("docs/heuristic.csv")
    parts = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = next((r for r in rows if r["setting"] == setting and r["method"].startswith("heuristic")), None)
        l1 = next((r for r in rows if r["setting"] == setting and r["method"].startswith("L1")), None)
        if mine is None:
            continue
        line = (f"{setting}: MACs -{float(mine['macs_reduction']):.1%}, top-1 {float(mine['top1_after']):.2f} "
                f"({float(mine['top1_after']) - float(mine['top1_before']):+.2f}; {mine['stop']}, "
                f"{mine['finetune_epochs']} fine-tuning epochs)")
        if l1 is not None:
            line += f", L1 uniform at the same MACs {float(l1['top1_after']):.2f}"
        parts.append(line)
    return "docs/heuristic.csv: " + "; ".join(parts)


def layer_pruning(docs: Path) -> str:
    rows = read_rows(docs / "layer_pruning.csv")
    if not rows:
        return _missing("docs/layer_pruning.csv")
    parts = []
    for r in rows:
        if r["method"] in ("dlp", "dlp+filters"):
            l1 = next((q for q in rows if q["model"] == r["model"] and q["method"].startswith("L1")
                       and f"as {r['method']})" in q["method"]), None)
            parts.append(f"{r['model']} {r['method']}: MACs -{float(r['macs_reduction']):.1%}, params "
                         f"-{float(r['params_reduction']):.1%}, top-1 {float(r['top1_after']) - float(r['top1_before']):+.2f}"
                         + (f" (L1 uniform at the same MACs {float(l1['top1_after']) - float(l1['top1_before']):+.2f})"
                            if l1 else ""))
    return "docs/layer_pruning.csv: " + "; ".join(parts)


def hfp(docs: Path) -> str:
    rows = read_rows(docs / "hfp.csv")
    mine = [r for r in rows if r["method"] == "HFP"]
    if not mine:
        return _missing("docs/hfp.csv")
    parts = []
    for r in mine:
        l1 = [q for q in rows if q["model"] == r["model"] and q["method"].startswith("L1")]
        best = max(l1, key=lambda q: float(q["top1_after"]), default=None)
        parts.append(f"{r['model']}: MACs kept {float(r['macs_kept']):.2%} ({r['note']}), top-1 "
                     f"{float(r['top1_after']):.2f}" + (f", best L1 at the same MACs {float(best['top1_after']):.2f}"
                                                        if best else ""))
    return "docs/hfp.csv: " + "; ".join(parts)


def importance(docs: Path, target: float = 0.2) -> str:
    return "; ".join(p for p in (_importance_fixed(docs), _importance_curves(docs, target)) if p)


def _importance_fixed(docs: Path) -> str:
    """The paper's own check: importance weights to -85% MACs, IoU drop over seeds (segmentation.json),
    and again with every cut re-fitted (segmentation_reconstruct/segmentation.json) when that run is there."""
    import json

    from benchmarks.segmentation_report import claim_line

    parts = []
    for rel, label in (("segmentation.json", ""), ("segmentation_reconstruct/segmentation.json", "re-fitted ")):
        path = docs / rel
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        if any("runs" not in r for r in saved["results"].values()):
            continue  # the earlier one-seed layout had no fixed-MACs run
        line = claim_line(saved["results"], saved["args"]["fixed"]).replace("**", "").rstrip(".")
        parts.append(f"docs/{rel}: " + line.replace("importance weights' drops", f"{label}importance weights' drops"))
    return "; ".join(parts) + ("." if parts else "")


def _importance_curves(docs: Path, target: float) -> str:
    rows = [r for r in read_rows(docs / "compare_segmentation.csv") if r["iou"] and abs(float(r["target"]) - target) < 1e-9]
    if not rows:
        return _missing("docs/compare_segmentation.csv")
    parts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        means = {}
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
            means[method] = statistics.fmean(float(r["iou"]) for r in rows if r["model"] == model and r["method"] == method)
        if "importance-weights" not in means:
            continue
        before = float(next(r["iou_before"] for r in rows if r["model"] == model))
        best = max(means, key=means.get)
        rank = sorted(means, key=means.get, reverse=True).index("importance-weights") + 1
        parts.append(f"{model} at {target:.0%} of the MACs: IoU {means['importance-weights']:.2f} "
                     f"({means['importance-weights'] - before:+.2f} from unpruned), rank {rank} of {len(means)}"
                     + (f", best `{best}` {means[best]:.2f}" if best != "importance-weights" else ""))
    return "docs/compare_segmentation.csv: " + "; ".join(parts)


def claims(docs: Path = DOCS) -> list[tuple[str, str, str]]:
    """(method, the paper's claim, what the results files say) rows."""
    measured = {"1. heuristic": heuristic, "2. layer pruning": layer_pruning, "3. HFP": hfp,
                "4. importance weights": importance}
    return [(name, PAPERS[name], fn(docs)) for name, fn in measured.items()]
