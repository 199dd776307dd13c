"""Human and machine reports of a pruning run: report.json, report.md and its plots.

The JSON is the record (every number the run measured); the Markdown is what a person reads, with
the plots a reviewer asks for first: where the widths went, and what each step cost in accuracy.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._io import atomic_write
from ._modes import in_mode
from ._state import copy_model
from .data import IGNORE_INDEX, ArrayDataset, Batches
from .latency import compare_dense_pruned, runtime_of
from .testing import main_output
from .train import predict_padded

__all__ = ["format_table", "write_report", "latency_guard", "collapse_guard", "guard_samples", "predictions",
           "GuardSamples", "plot_widths", "plot_schedule", "plot_block_scores"]

GUARD_SECONDS = 120.0  # the latency guard's bound: batch 8 is left out (and said so) past it


def latency_guard(dense: nn.Module, model: nn.Module, x: Any, report: dict, threads: int | None = None) -> None:
    """Dense and pruned timed interleaved at batch 1 and 8 (8 only if it fits in two minutes), both in the
    pruned model's layout and on its device (where fine-tuning left it; ``dense`` is copied there when
    it lives elsewhere): the report's latency rows, and a loud warning (stderr and the report) when
    the pruned one is measurably slower. ``threads``: the count a latency plan was made for."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if next((p.device for p in dense.parameters()), device) != device:
        dense = copy_model(dense).to(device)
    x = x.to(device) if isinstance(x, torch.Tensor) else tuple(t.to(device) for t in x)
    guard = compare_dense_pruned(dense, model, x, batches=(1, 8), repeats=30, max_seconds=GUARD_SECONDS,
                                 runtime=runtime_of(model), threads=threads)
    report["latency"] = {**guard, "device": str(device)}
    for r in guard["rows"]:
        report["before"][f"latency_b{r['batch']}_ms"] = r["dense_ms"]
        report["after"][f"latency_b{r['batch']}_ms"] = r["pruned_ms"]
    if guard["slower"]:
        rows = [r for r in guard["rows"] if r["batch"] in guard["slower"]]
        msg = ("WARNING: the pruned model is SLOWER than the dense one on this machine at batch "
               + ", ".join(f"{r['batch']} ({r['pruned_ms']:.2f} ms vs {r['dense_ms']:.2f} ms, "
                           f"{'in two timings' if r.get('timings') == 2 else 'one timing: a second would pass the time bound'})"
                           for r in rows)
               + "; widths on the hardware's steps (round_to='auto', --round-to auto) or a latency target "
               "(target={'latency': ...}, --latency) spend the cut where it buys time")
        report.setdefault("warnings", []).append(msg)
        print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GuardSamples:
    """The few samples the collapse guard runs both models on, drawn once per prune."""

    x: torch.Tensor
    y: torch.Tensor  # the labels that count (labelled pixels only, flattened)
    labelled: torch.Tensor
    segmentation: bool
    name: str


def guard_samples(data: Any) -> GuardSamples | None:
    """A few samples of ``data`` (4 images for segmentation, else 64, class-balanced where it can
    be; the same every call), or None for data the guard cannot read (not an :class:`ArrayDataset`,
    or of another task)."""
    if not isinstance(data, ArrayDataset) or len(data) == 0 or data.task not in ("classification", "segmentation"):
        return None
    seg = data.task == "segmentation"
    sub = data.subset(min(4 if seg else 64, len(data)))
    x, y = next(iter(Batches(sub, len(sub), train=False)))
    labelled = y != IGNORE_INDEX if seg else torch.ones_like(y, dtype=torch.bool)
    return GuardSamples(x, y[labelled], labelled, seg, data.name or "data")


def _class_scores(out: Any) -> torch.Tensor | None:
    """Per-class scores ([N, C, ...], C >= 2) from a model's output (its main tensor, as the
    criteria read it), or None for outputs that are not (a dict without "out", one logit per
    sample...): those models are not checked."""
    try:
        out = main_output(out)
    except (KeyError, IndexError, TypeError):
        return None
    return out if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[1] >= 2 else None


@torch.no_grad()
def predictions(model: nn.Module, samples: GuardSamples | None) -> torch.Tensor | None:
    """The class ``model`` predicts for each of ``samples`` (labelled pixels only, flattened), or
    None when there are none or the model's output holds no per-class scores. Every module's
    train/eval mode is left as it was."""
    if samples is None:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with in_mode(model, training=False):
        x = samples.x.to(device)
        out = _class_scores(predict_padded(model, x) if samples.segmentation else model(x))
    if out is None or out.shape[2:] != samples.labelled.shape[1:]:
        return None
    return out.argmax(1).cpu()[samples.labelled]


def collapse_guard(model: nn.Module, samples: GuardSamples | None, report: dict, before: torch.Tensor | None,
                   trained: bool = True) -> None:
    """A loud warning (stderr and the report) when the pruned model predicts one class for every
    one of ``samples`` (images, or labelled pixels), where the unpruned model (its
    :func:`predictions` before the cut, ``before``) clearly beat that constant answer: a layer
    narrowed until all its units died (a ReLU with no norm after it, cut to a channel or two)
    leaves a constant model, which a MACs target, unlike a tolerance, never notices. An untrained
    model, no better than a constant to begin with, is not blamed on the cut. ``trained=False`` (no
    fine-tuning after the cut; a training method such as HFP trains before it) advises fine-tuning
    first: a deep one-shot cut often answers one class until then, and fine-tuning recovers it."""
    if samples is None or before is None:
        return
    after = predictions(model, samples)
    if after is None or len(after) == 0 or len(after.unique()) != 1:
        return
    wrong_before, wrong_after = (before != samples.y).float().mean().item(), (after != samples.y).float().mean().item()
    if wrong_after == 0 or wrong_before > 0.75 * wrong_after:  # the constant was right, or as good
        return
    what, n = "labelled pixel" if samples.segmentation else "image", len(samples.x)
    cause = ("a layer was probably cut too narrow for its units to survive (see the report's widths); keep more "
             "of each layer (min_width, --min-width), prune less, or prune with a tolerance on held-out data")
    if not trained:  # what a fine-tuning recovers is not yet a verdict on the cut
        cause = ("nothing was trained after the cut, and a deep one-shot cut often does this until it is fine-tuned "
                 f"(finetune=..., --finetune-epochs); if it stays collapsed after that, {cause}")
    msg = (f"WARNING: the pruned model has COLLAPSED: it predicts class {int(after[0])} for every {what} of {n} "
           f"{samples.name} images ({100 * (1 - wrong_after):.1f}% right; the unpruned model "
           f"{100 * (1 - wrong_before):.1f}%): {cause}")
    report["collapsed"] = {"predicted_class": int(after[0]), "images": n, "accuracy_before": 1 - wrong_before,
                           "accuracy_after": 1 - wrong_after, "trained_after_cut": trained}
    report.setdefault("warnings", []).append(msg)
    print(msg, file=sys.stderr, flush=True)


def _num(v: Any, scale: float = 1.0, fmt: str = "{:,.3f}") -> str:
    return "-" if v is None else fmt.format(v / scale)


def format_table(report: dict) -> str:
    """The before/after table printed at the end of a run."""
    b, a = report["before"], report["after"]
    rows = [("MACs (M)", b["macs"], a["macs"], 1e6, "{:,.2f}"), ("params (M)", b["params"], a["params"], 1e6, "{:,.3f}")]
    for key, label in (("latency_b1_ms", "latency b1 (ms)"), ("latency_b8_ms", "latency b8 (ms)")):
        if b.get(key) is not None:
            rows.append((label, b[key], a.get(key), 1.0, "{:,.2f}"))
    lines = [f"{'':18} {'before':>12} {'after':>12} {'after/before':>13}"]
    for label, x, y, scale, fmt in rows:
        ratio = f"{y / x:>12.1%}" if x and y is not None else f"{'-':>12}"
        lines.append(f"{label:18} {_num(x, scale, fmt):>12} {_num(y, scale, fmt):>12} {ratio:>13}")
    if b.get("metric") is not None:
        name = report.get("metric_name") or "metric"
        drop = a["metric"] - b["metric"]
        lines.append(f"{name:18} {b['metric']:>12.2f} {a['metric']:>12.2f} {drop:>+12.2f} pts")
    test = report.get("test")
    if test and b.get("metric") is not None:  # --holdout: the metric above is the held-out one
        name = report.get("metric_name") or "metric"
        tb, ta = test["before"][name], test["after"][name]
        lines.append(f"{'test ' + name:18} {tb:>12.2f} {ta:>12.2f} {ta - tb:>+12.2f} pts")
    lat = report.get("latency")
    if lat:
        lines.append(f"latency: dense and pruned timed interleaved, median of {lat['repeats']}, {lat.get('threads')} "
                     f"threads, {lat['runtime']}")
        lines += [f"latency b{s['batch']} not timed: about {s['estimated_s']:g} s, past the guard's bound"
                  for s in lat.get("skipped", [])]
    lines += report.get("warnings", [])
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    _pyplot().close(fig)
    return path


def plot_widths(report: dict, path: Path) -> Path:
    """Per-layer output width before and after, in network order."""
    plt = _pyplot()
    layers = report["layers"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(layers) + 2), 3.6))
    xs = range(len(layers))
    ax.bar(xs, [l["width_before"] for l in layers], color="#c8d3e0", label="before", width=0.9)
    ax.bar(xs, [l["width_after"] or 0 for l in layers], color="#2a6fb0", label="after", width=0.9)
    ax.legend()
    return _finish(fig, ax, "layer (network order)", "output channels", f"Widths: {report['kept']['macs']:.1%} of MACs kept", path)


def plot_schedule(report: dict, path: Path) -> Path:
    """Metric against kept MACs after every step of the schedule."""
    plt = _pyplot()
    steps = [s for s in report["steps"] if s.get("metric") is not None]
    base = report["before"]["macs"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([s["macs"] / base for s in steps], [s["metric"] for s in steps], "o-", color="#2a6fb0")
    for s in steps:
        ax.annotate(f"{s['step']}" + (" (undone)" if s.get("reverted") else ""), (s["macs"] / base, s["metric"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.invert_xaxis()
    return _finish(fig, ax, "kept MACs (fraction of the original)", report.get("metric_name") or "metric",
                   "Metric along the schedule", path)


def _block_scores(report: dict) -> dict | None:
    """Layer pruning's block scores, under the method's output (top level in older reports)."""
    return report.get("method_output", report).get("block_scores")


def plot_block_scores(report: dict, path: Path) -> Path:
    """Score of every scored block in network order; removed ones in a darker colour."""
    plt = _pyplot()
    scores = _block_scores(report)
    gone = {n for st in report["steps"] for n in (st.get("removed") or {}) if n in scores}
    names = list(scores)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), [scores[n] for n in names], color=["#b03a2e" if n in gone else "#2a6fb0" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    return _finish(fig, ax, "", "mean VIP", "Block scores (red: removed)", path)


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and the plots into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "widths": out / "widths.png"}
    _atomic_text(paths["json"], json.dumps(report, indent=2, default=str))
    plot_widths(report, paths["widths"])
    has_metric = any(s.get("metric") is not None for s in report["steps"])
    if has_metric:
        paths["schedule"] = plot_schedule(report, out / "schedule.png")
    if _block_scores(report):
        paths["blocks"] = plot_block_scores(report, out / "blocks.png")
    t = report.get("timings", {})
    lines = [f"# Pruning report: {report.get('model', {}).get('name', 'model')}", ""]
    if report.get("protocol"):
        lines += [f"Protocol: {report['protocol']}", ""]
    budget = report["budget"]
    what = f"{budget['kind']} budget {budget['target']}" if budget["kind"] else "no budget"
    lines += [f"Method `{report['method']}`, {what}, {report['allocation']} allocation, "
              f"round_to {report['round_to']}, {len(report['steps']) - 1} step(s)"
              + (f", each cut after a least-squares re-fit on {report['reconstruct']} images" if report.get("reconstruct")
                 else "") + ".", ""]
    if report.get("stopped"):
        lines += [f"Stopped early: {report['stopped']}", ""]
    lines += ["```", format_table(report), "```", ""]
    if t:
        lines += ["Timings (s): " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in t.items() if isinstance(v, (int, float))), ""]
    if report.get("onnx"):
        o = report["onnx"]
        lines += [f"ONNX: `{Path(o['path']).name}`, onnxruntime vs PyTorch max relative difference {o['max_rel_diff']:.2e}.", ""]
    base_macs, base_params = report["before"]["macs"], report["before"]["params"]
    lines += ["| step | MACs kept | params kept | metric | filters removed per group |", "|---:|---:|---:|---:|---|"]
    for st in report["steps"]:
        removed = st.get("removed") or {}
        shown = ", ".join(f"{k}: {v}" for k, v in list(removed.items())[:12]) + (" ..." if len(removed) > 12 else "")
        metric = "-" if st.get("metric") is None else f"{st['metric']:.2f}"
        lines.append(f"| {st['step']}{' (undone)' if st.get('reverted') else ''} | {st['macs'] / base_macs:.1%} | "
                     f"{st['params'] / base_params:.1%} | {metric} | {shown or '-'} |")
    lines += ["", "![widths](widths.png)", ""]
    if has_metric:
        lines += ["![schedule](schedule.png)", ""]
    if _block_scores(report):
        lines += ["![block scores](blocks.png)", "", "| block | score (mean VIP) |", "|---|---:|"]
        lines += [f"| {n} | {v:.4f} |" for n, v in _block_scores(report).items()] + [""]
    lines += ["| layer | kind | width before | width after | MACs before | MACs after |", "|---|---|---:|---:|---:|---:|"]
    for l in report["layers"]:
        lines.append(f"| {l['name']} | {l['kind']} | {l['width_before']} | {l['width_after'] if l['width_after'] is not None else 'removed'} "
                     f"| {l['macs_before']:,} | {l['macs_after']:,} |")
    _atomic_text(paths["md"], "\n".join(lines) + "\n")
    return paths
