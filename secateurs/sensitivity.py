"""Per-group sensitivity analysis: how much the metric falls when one channel group alone is cut.

A global budget hides which layers are fragile; cutting each group by itself, at a few ratios,
shows where channels are cheap to remove and where they are not, before choosing a
per-layer (``layers``) budget, ``ignore``-ing a layer, or trusting a global allocation.
Channels are chosen exactly as :func:`~secateurs.prune` with ``allocation="uniform"`` would
(lowest scores first, at least one kept), and the MACs saved are exact (:class:`PlanCost`).
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ._state import copy_model
from ._validation import check_scalar
from .budget import Allocator
from .cost import PlanCost, count
from .criteria import get_criterion, group_scores
from .graph import DependencyGraph, analyze
from .surgery import apply_plan
from .train import evaluate, metric_key

__all__ = ["sensitivity", "plot_sensitivity"]


def _check_ratios(ratios: Any) -> list[float]:
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise TypeError(f"`ratios` must be a sequence of fractions in (0, 1), got {type(ratios).__name__}")
    out = []
    for r in ratios:  # the fraction of a group's channels removed
        out.append(float(check_scalar(r, "ratios", numbers.Real, min_val=0, max_val=1, include_min=False,
                                      include_max=False)))
    if not out:
        raise ValueError("`ratios` is empty; give at least one fraction in (0, 1)")
    return out


def _select_groups(graph: DependencyGraph, groups: Any) -> list[int]:
    """Group indices from indices, producing-module names or group names (order kept, no repeats)."""
    if groups is None:
        return [g.index for g in graph.groups]
    if isinstance(groups, (str, int)):
        groups = [groups]
    chosen: list[int] = []
    n = len(graph.groups)
    for item in groups:
        if isinstance(item, bool):
            raise TypeError(f"`groups` must hold group indices or module names, got {item!r}")
        if isinstance(item, numbers.Integral):
            if not 0 <= item < n:
                raise ValueError(f"`groups`: no group {item}; the model has groups 0..{n - 1}")
            found = [int(item)]
        elif isinstance(item, str):
            found = [g.index for g in graph.groups_of(item)] or [g.index for g in graph.groups if g.name == item]
            if not found:
                names = ", ".join(g.name for g in graph.groups[:20]) + (", ..." if n > 20 else "")
                raise ValueError(f"`groups`: no prunable group is produced by module {item!r}; groups are: {names}")
        else:
            raise TypeError(f"`groups` must hold group indices or module names, got {type(item).__name__} {item!r}")
        chosen += [i for i in found if i not in chosen]
    if not chosen:
        raise ValueError("`groups` is empty; pass None for every group")
    return chosen


def sensitivity(model: nn.Module, example_inputs: Any, val_data: Any, ratios: Sequence[float] = (0.25, 0.5, 0.75),
                method: str | Callable = "l1", metric: str | None = None,
                groups: Iterable[int | str] | int | str | None = None,
                ignore: Iterable[str | nn.Module] | None = None, progress: bool = True) -> dict:
    """Metric drop and MACs saved when each channel group alone loses each fraction of its channels.

    Parameters
    ----------
    model : nn.Module
        Never modified: everything happens on copies.
    val_data : ArrayDataset
        What the metric is measured on; data-driven criteria (``taylor``) are scored on it too.
    ratios : fractions in (0, 1) of each group's channels to remove (rounded down, one kept).
    method : criterion name or callable, scored once on the unpruned model.
    metric : a key of :func:`secateurs.train.evaluate`; default ``top1`` or ``iou`` (segmentation).
    groups : group indices and/or names of the modules producing them; default all groups.
    ignore : as for :func:`~secateurs.analyze`: modules whose outputs keep their width.

    Returns
    -------
    dict, JSON-serialisable: ``{"metric", "baseline", "ratios", "macs", "groups": [{"index", "name",
    "size", "removed", "drops", "macs_saved"}]}``. ``drops[j]`` is baseline minus the metric with
    ``ratios[j]`` of that group cut (positive = worse); ``macs_saved[j]`` a fraction of the model's
    MACs; ``removed[j]`` the number of channels cut (0 for a ratio too small for a tiny group, whose
    drop is then 0 without evaluating).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    ratios_ = _check_ratios(ratios)
    try:
        fn = get_criterion(method)
    except (ValueError, TypeError) as err:
        raise ValueError(f"`method`: {err}") from None
    if val_data is None or not hasattr(val_data, "__len__"):
        raise ValueError(f"`val_data` must be a dataset (load_dataset(name, 'test')), got {type(val_data).__name__}")
    if len(val_data) == 0:
        raise ValueError("`val_data` is empty: the metric cannot be measured on no samples")
    key = metric_key(val_data, metric)

    work = copy_model(model)  # scores, analysis and baseline on a copy: the user's object is never touched
    graph = analyze(work, example_inputs, ignore=ignore)
    selected = _select_groups(graph, groups)
    device = next(work.parameters(), torch.empty(0)).device
    base_metrics = evaluate(work, val_data, device=device)
    if key not in base_metrics:
        raise ValueError(f"`metric` {key!r} is not measured on this data; choose one of {', '.join(base_metrics)}")
    baseline = float(base_metrics[key])
    scores = group_scores(work, graph, fn, data=val_data if getattr(fn, "needs_data", False) else None)
    alloc = Allocator(graph, scores, "uniform")
    base = count(work, example_inputs)
    plan_cost = PlanCost(work, graph, example_inputs, base=base)
    full = [g.size for g in graph.groups]

    from tqdm import tqdm

    rows = []
    with tqdm(total=len(selected) * len(ratios_), desc="sensitivity", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for gi in selected:
            g = graph.groups[gi]
            bar.set_postfix_str(g.name or "<input>")
            row = {"index": g.index, "name": g.name, "size": g.size, "removed": [], "drops": [], "macs_saved": []}
            for r in ratios_:
                keep = list(full)
                keep[gi] = alloc.clamp(gi, g.size - math.floor(g.size * r + 1e-9))
                n_removed = g.size - keep[gi]
                if n_removed:
                    pruned = apply_plan(copy_model(work), graph, alloc.plan(keep))
                    drop = baseline - float(evaluate(pruned, val_data, device=device)[key])
                    del pruned
                    macs = plan_cost(alloc.removed(keep))[0]
                else:
                    drop, macs = 0.0, base.macs
                row["removed"].append(int(n_removed))
                row["drops"].append(float(drop))
                row["macs_saved"].append(float(1 - macs / base.macs) if base.macs else 0.0)
                bar.update(1)
            rows.append(row)
    return {"metric": key, "baseline": baseline, "ratios": ratios_, "macs": int(base.macs), "groups": rows}


def plot_sensitivity(result: dict, path: str | Path, title: str | None = None) -> Path:
    """Metric drop against ratio, one line per group, as a PNG: the fragile layers stand out.

    Drawn on a bare Agg figure, so it neither needs a display nor changes pyplot's backend.
    The legend is left out above 12 groups, where it would hide the lines.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    try:
        ratios, rows, name = list(result["ratios"]), list(result["groups"]), result["metric"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"`result` must be what sensitivity() returns (missing {err})") from None
    path = Path(path)
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for row in rows:
        ax.plot([0.0] + ratios, [0.0] + list(row["drops"]), marker="o", markersize=3, linewidth=1.2,
                label=f"{row['index']}: {row['name'] or '<input>'} ({row['size']})")
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.set_xlabel("fraction of the group's channels removed")
    ax.set_ylabel(f"drop in {name} (baseline {float(result.get('baseline', float('nan'))):.2f})")
    ax.set_title(title or f"Sensitivity of {len(rows)} channel group(s), each pruned alone")
    ax.grid(True, alpha=0.3)
    if 0 < len(rows) <= 12:
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
