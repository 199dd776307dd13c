"""What a user runs: score channels, allocate a budget across groups, cut, fine-tune, report.

A budget is a kept fraction of MACs, of params, or of measured latency, a channel ratio, or a
per-layer ratio dict. MACs/params budgets are met by searching the allocation against
:class:`~secateurs.cost.PlanCost` (the exact cost of a plan, without cutting), then re-adding the
best removed channels while they still fit, so the pruned model lands at or just under the target.
"""
from __future__ import annotations

import copy
import heapq
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ._validation import PruningError, check_ratio
from .cost import Cost, PlanCost, count, measure_latency
from .export import _atomic_write, load as load_model, save as save_model
from .graph import DependencyGraph, analyze
from .surgery import PruningPlan, apply_plan

__all__ = ["Budget", "Allocator", "prune", "plan_for_budget", "uniform_plan", "BUDGETS", "ALLOCATIONS"]

BUDGETS = ("macs", "params", "latency", "ratio", "layers")
ALLOCATIONS = ("global", "uniform")


@dataclass(frozen=True)
class Budget:
    """How much to keep. ``kind`` is one of :data:`BUDGETS`; ``value`` a kept fraction in (0, 1]
    (``ratio``: the fraction of channels *removed* per group, in [0, 1)), or for ``layers`` a dict
    {module name: removed fraction of its output channels}."""

    kind: str
    value: float | Mapping[str, float]

    def __post_init__(self) -> None:
        if self.kind not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.kind!r}")
        if self.kind == "layers":
            if not isinstance(self.value, Mapping) or not self.value:
                raise ValueError("a 'layers' budget needs a non-empty dict {module name: ratio}")
            for k, v in self.value.items():
                check_ratio(v, f"ratio of '{k}'")
        elif self.kind == "ratio":
            check_ratio(self.value, "ratio")
        else:
            v = self.value
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"a {self.kind} target is the kept fraction, in (0, 1]; got {v!r}")

    def at_step(self, k: int, n: int) -> "Budget":
        """Budget after step ``k`` of ``n``: geometric, so each step removes the same share."""
        if self.kind in ("ratio", "layers"):  # relative to the current model: (1 - r_k)^n = 1 - r
            step = lambda r: 1 - (1 - r) ** (1 / n)  # noqa: E731
            value = step(self.value) if self.kind == "ratio" else {m: step(r) for m, r in self.value.items()}
            return Budget(self.kind, value)
        return Budget(self.kind, self.value ** (k / n))


class Allocator:
    """Turns per-channel scores into kept widths under the user's constraints.

    ``global`` ranks all channels together after dividing each group's scores by their mean (so
    groups with large weights are not favoured); ``uniform`` removes the same fraction everywhere.
    Widths are at least ``min_width`` (channels, or a fraction of the group if a float < 1) and,
    with ``round_to``, multiples of it (rounded up).
    """

    def __init__(self, graph: DependencyGraph, scores: list[torch.Tensor], allocation: str = "global",
                 round_to: int = 1, min_width: int | float = 1, normalize: bool = True) -> None:
        if allocation not in ALLOCATIONS:
            raise ValueError(f"`allocation` must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"`round_to` must be a positive int, got {round_to!r}")
        if isinstance(min_width, bool) or not isinstance(min_width, (int, float)) or min_width <= 0 or (
                isinstance(min_width, float) and min_width > 1):
            raise ValueError(f"`min_width` must be a positive int (channels) or a fraction in (0, 1], got {min_width!r}")
        self.graph, self.allocation, self.round_to = graph, allocation, round_to
        self.order, self.sorted_norm, self.min_keep = [], [], []
        for g, s in zip(graph.groups, scores):
            s = s.float()
            if not normalize:  # scores already comparable across groups (e.g. one joint PLS)
                norm = s
            else:
                norm = s / s.mean().clamp_min(1e-12) if s.abs().sum() > 0 else torch.ones_like(s)
            order = torch.argsort(norm, descending=True, stable=True)
            self.order.append(order)
            self.sorted_norm.append(norm[order])
            lo = math.ceil(min_width * g.size) if isinstance(min_width, float) else min(int(min_width), g.size)
            self.min_keep.append(self._round(max(1, lo), g.size))

    def _round(self, n: int, size: int) -> int:
        if self.round_to > 1:
            n = min(size, -(-n // self.round_to) * self.round_to)
        return n

    def clamp(self, i: int, n: int) -> int:
        return min(self.graph.groups[i].size, max(self.min_keep[i], self._round(n, self.graph.groups[i].size)))

    def keep_for_threshold(self, t: float) -> list[int]:
        """Widths keeping every channel whose normalised score is >= ``t``."""
        return [self.clamp(i, int((s >= t).sum())) for i, s in enumerate(self.sorted_norm)]

    def keep_for_ratio(self, r: float) -> list[int]:
        return [self.clamp(i, g.size - math.floor(g.size * r + 1e-9)) for i, g in enumerate(self.graph.groups)]

    def removed(self, keep: list[int]) -> torch.Tensor:
        """Components removed by widths ``keep``, for :class:`PlanCost`."""
        mask = torch.zeros(self.graph.n_components, dtype=torch.bool)
        for g, order, k in zip(self.graph.groups, self.order, keep):
            if k < g.size:
                mask[g.components[order[k:]]] = True
        return mask

    def plan(self, keep: list[int]) -> PruningPlan:
        return PruningPlan({g.index: order[k:].sort().values.tolist()
                            for g, order, k in zip(self.graph.groups, self.order, keep) if k < g.size})

    def thresholds(self) -> torch.Tensor:
        return torch.unique(torch.cat(self.sorted_norm)) if self.sorted_norm else torch.zeros(0)


def uniform_plan(graph: DependencyGraph, scores: list[torch.Tensor], ratio: float, round_to: int = 1) -> PruningPlan:
    """Remove the lowest-scoring ``ratio`` of every group (at least one channel is kept)."""
    alloc = Allocator(graph, scores, "uniform", round_to)
    return alloc.plan(alloc.keep_for_ratio(check_ratio(ratio)))


def _fill(alloc: Allocator, keep: list[int], cost: Callable[[list[int]], float], limit: float,
          max_evals: int = 600) -> list[int]:
    """Re-add the best removed channels (a ``round_to`` block at a time) while the cost fits."""
    keep = list(keep)
    heap = []
    for i, k in enumerate(keep):
        if k < alloc.graph.groups[i].size:
            heapq.heappush(heap, (-float(alloc.sorted_norm[i][k]), i))
    current = cost(keep)
    evals = 0
    while heap and evals < max_evals and limit - current > 1e-4 * limit:
        _, i = heapq.heappop(heap)
        trial = list(keep)
        trial[i] = alloc.clamp(i, keep[i] + alloc.round_to)
        evals += 1
        c = cost(trial)
        if c <= limit:
            keep, current = trial, c
            if keep[i] < alloc.graph.groups[i].size:
                heapq.heappush(heap, (-float(alloc.sorted_norm[i][keep[i]]), i))
    return keep


def _threshold_search(alloc: Allocator, cost: Callable[[list[int]], float], limit: float) -> list[int]:
    """Widths at the lowest global score threshold whose cost fits ``limit`` (cost falls as it rises)."""
    ts = alloc.thresholds()
    lo, hi = 0, len(ts)
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(alloc.keep_for_threshold(float(ts[mid]))) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return alloc.keep_for_threshold(float(ts[lo]) if lo < len(ts) else math.inf)


def plan_for_budget(model: nn.Module, graph: DependencyGraph, example_inputs: Any, scores: list[torch.Tensor],
                    budget: Budget, allocation: str = "global", round_to: int = 1, min_width: int | float = 1,
                    base: Cost | None = None, reference: Cost | None = None,
                    normalize: bool = True) -> tuple[PruningPlan, dict]:
    """The plan that meets ``budget`` on ``model``; ``reference`` is the cost the fractions refer to
    (the original model in an iterative schedule). Returns the plan and the predicted cost."""
    alloc = Allocator(graph, scores, allocation, round_to, min_width, normalize)
    if budget.kind == "layers":
        keep = [g.size for g in graph.groups]
        modules = dict(model.named_modules())
        for name, r in budget.value.items():
            if name not in modules:
                raise PruningError(f"budget names module '{name}', which the model does not have")
            groups = graph.groups_of(name)
            if not groups:
                raise PruningError(f"module '{name}' has no prunable output channels (ignored, frozen or an output)")
            for g in groups:
                keep[g.index] = alloc.clamp(g.index, g.size - math.floor(g.size * r + 1e-9))
        return alloc.plan(keep), {}
    if budget.kind == "ratio":
        if allocation == "uniform":
            keep = alloc.keep_for_ratio(budget.value)
        else:
            everything = torch.sort(torch.cat(alloc.sorted_norm)).values
            k = math.floor(len(everything) * budget.value + 1e-9)
            keep = alloc.keep_for_threshold(float(everything[k])) if k < len(everything) else alloc.keep_for_threshold(math.inf)
        return alloc.plan(keep), {}
    if budget.kind == "latency":
        raise ValueError("latency budgets are searched by `prune`, which measures the pruned model")
    pc = PlanCost(model, graph, example_inputs, base=base)
    ref = reference or pc.base
    which = 0 if budget.kind == "macs" else 1
    limit = budget.value * (ref.macs if which == 0 else ref.params)
    cost = lambda keep: pc(alloc.removed(keep))[which]  # noqa: E731
    smallest = cost(alloc.keep_for_threshold(math.inf))
    if smallest > limit:
        raise PruningError(f"a {budget.kind} target of {budget.value:.4g} cannot be reached: with min_width={min_width}, "
                           f"round_to={round_to} and the ignored/frozen layers, the smallest model keeps "
                           f"{smallest / (ref.macs if which == 0 else ref.params):.4g}")
    if allocation == "global":
        keep = _threshold_search(alloc, cost, limit)
    else:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if cost(alloc.keep_for_ratio(mid)) <= limit:
                hi = mid
            else:
                lo = mid
        keep = alloc.keep_for_ratio(hi)
        if cost(keep) > limit:  # min widths bind: fall back to the global order for the rest
            keep = alloc.keep_for_threshold(math.inf)
    keep = _fill(alloc, keep, cost, limit)
    macs, params = pc(alloc.removed(keep))
    return alloc.plan(keep), {"macs": macs, "params": params}


def _as_budget(target: Any, budget: str, ratio: float | None) -> Budget:
    if ratio is not None and target is not None:
        raise ValueError("give either `target` or `ratio`, not both")
    if ratio is not None:
        return Budget("ratio", ratio)
    if target is None:
        raise ValueError("give a `target` (kept fraction of MACs/params/latency, or {module: ratio}) or a `ratio`")
    if isinstance(target, Budget):
        return target
    if isinstance(target, Mapping):
        return Budget("layers", dict(target))
    return Budget(budget, target)


def _widths(cost: Cost) -> dict[str, int]:
    """Output width of every counted layer (channels for convs, features for linears)."""
    out = {}
    for layer in cost.layers:
        shape = layer.output_shape
        out[layer.name] = int(shape[-1] if layer.kind in ("Linear", "MultiheadAttention") or len(shape) < 2 else shape[1])
    return out


def _restore(model: nn.Module, snapshot: nn.Module) -> None:
    """Put ``snapshot``'s whole state (architecture included) back into the user's object."""
    model.__dict__.clear()
    model.__dict__.update(snapshot.__dict__)


def _latency_plan(model, graph, x, scores, budget, allocation, round_to, min_width, base, threads, log):
    """Search the MACs fraction whose pruned model meets the measured latency target."""
    lat0 = measure_latency(model, x, threads=threads)
    target = budget.value
    lo, hi, frac = None, 1.0, target  # lo: largest feasible MACs fraction so far; hi: smallest infeasible
    tried = []
    for _ in range(6):
        plan, _ = plan_for_budget(model, graph, x, scores, Budget("macs", frac), allocation, round_to, min_width, base)
        trial = apply_plan(copy.deepcopy(model), graph, plan)
        ratio = measure_latency(trial, x, threads=threads) / lat0
        tried.append({"macs_fraction": frac, "latency_ratio": ratio})
        log(f"latency search: MACs {frac:.3f} -> latency {ratio:.3f} (target {target:.3f})")
        if ratio <= target:
            if lo is None or frac > lo[0]:
                lo = (frac, plan)
            if ratio >= target - 0.02:
                break
        else:
            hi = min(hi, frac)
        aim = target - 0.01  # a little under, for timing noise
        if len(tried) >= 2 and tried[-1]["macs_fraction"] != tried[-2]["macs_fraction"]:
            (f0, r0), (f1, r1) = ((t["macs_fraction"], t["latency_ratio"]) for t in tried[-2:])
            slope = (r1 - r0) / (f1 - f0)
            guess = f1 + (aim - r1) / slope if slope > 0 else f1 * aim / max(r1, 1e-6)
        else:
            guess = frac * aim / max(ratio, 1e-6)
        low = lo[0] if lo else 0.0
        frac = guess if low < guess < hi else (low + hi) / 2
    if lo is None:
        fractions = ", ".join(f"{t['macs_fraction']:.3g}" for t in tried)
        raise PruningError(f"no plan met a latency target of {target:.3g} (tried MACs fractions {fractions}); "
                           "measured latency does not shrink with MACs on this machine for this model")
    return lo[1], {"latency_base_s": lat0, "latency_search": tried}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, default=str)))


_METRICS = {"classification": ("top1", "top5"), "segmentation": ("pixel_acc", "iou", "dice", "miou")}


def _metric_key(ds: Any, metric: str | None) -> str:
    if metric:
        known = _METRICS.get(getattr(ds, "task", "classification"), ())
        if ds is not None and metric not in known:
            raise ValueError(f"`metric` must be one of {', '.join(known)} for {ds.task} data, got {metric!r}")
        return metric
    return "iou" if getattr(ds, "task", "classification") == "segmentation" else "top1"


def prune(model: nn.Module, example_inputs: Any, method: str | Callable = "l2", target: Any = None, *,
          budget: str = "macs", ratio: float | None = None, allocation: str | None = None,
          ignore: Iterable[str | nn.Module] | None = None, round_to: int = 1, min_width: int | float = 1,
          data: Any = None, val_data: Any = None, finetune: Any = None, steps: int | None = None,
          tolerance: float | None = None, metric: str | None = None, latency_threads: int | None = None,
          method_options: Mapping[str, Any] | None = None, out_dir: str | Path | None = None,
          resume: bool = False, quiet: bool = True) -> tuple[nn.Module, dict]:
    """Prune ``model`` in place to a budget and return ``(model, report)``.

    Parameters
    ----------
    method : str, callable or Method, default="l2"
        A criterion name (``secateurs.list_criteria()``) or ``fn(model, graph, **kw) -> scores``,
        pruned to the budget; or a method (``secateurs.list_methods()``, e.g. "heuristic") that
        decides by itself, configured by ``method_options``.
    target : float, dict or Budget
        Kept fraction of ``budget`` ("macs", "params" or "latency"), or {module name: removed ratio}.
        Optional for methods that pick their own widths (then it is a stop rule).
    ratio : float, optional
        Instead of ``target``: remove this fraction of the channels of every group.
    allocation : {"global", "uniform"}, default="global" for MACs/params/latency, else "uniform"
    round_to, min_width : widths become multiples of ``round_to`` and at least ``min_width``.
    data, val_data : datasets for data-driven criteria / fine-tuning, and for the metric.
    finetune : TrainConfig or dict of its fields; fine-tunes after every step when given.
    steps : one-shot (1) or at most that many prune -> fine-tune rounds (a criterion's budget is
        shared out geometrically; a method may stop earlier when it has nothing left to remove).
        Default: the method's own (1, or e.g. 100 for "importance-weights", which the tolerance stops).
    tolerance : stop (and undo the last step) once the validation metric drops by more than this.
    out_dir, resume : every finished step (and every fine-tuning epoch) is checkpointed there;
        ``resume=True`` with the same arguments continues a killed run where it stopped.

    Every argument is checked before the model is touched; MACs/params budgets are met to within
    the cost of one channel block (typically << 1%), never exceeded.
    """
    from .methods import StepContext, get_method
    from .train import TrainConfig, evaluate, fit, is_main_process

    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    how = get_method(method, **dict(method_options or {}))
    the_budget = _as_budget(target, budget, ratio) if how.needs_budget or target is not None or ratio is not None else None
    kind = the_budget.kind if the_budget is not None else None
    how.check(the_budget)
    allocation = allocation or ("global" if kind in ("macs", "params", "latency") else "uniform")
    Allocator(DependencyGraph([], [], [], 0, [], [], {}), [], allocation, round_to, min_width)  # checks the arguments
    if steps is None:
        steps = how.default_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}")
    if how.needs_data and data is None:
        raise ValueError(f"method {how.name!r} needs data: pass `data`")
    if finetune is not None:
        if data is None:
            raise ValueError("`finetune` needs `data` (the training set)")
        if isinstance(finetune, Mapping):
            finetune = TrainConfig(**finetune)
        if not isinstance(finetune, TrainConfig):
            raise TypeError(f"`finetune` must be a TrainConfig or a dict of its fields, got {type(finetune).__name__}")
    if tolerance is not None:
        if val_data is None:
            raise ValueError("`tolerance` needs `val_data` to measure the metric")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
            raise ValueError(f"`tolerance` must be a non-negative number (metric points), got {tolerance!r}")
    key = _metric_key(val_data, metric)
    if kind == "latency":
        dev = next(model.parameters()).device
        if dev.type != "cpu" and not (dev.type == "cuda" and torch.cuda.is_available()):
            raise PruningError(f"a latency target needs the model to run here; it is on {dev}")
    timings: dict[str, float] = {"analyze_s": 0.0, "plan_s": 0.0, "surgery_s": 0.0, "finetune_s": 0.0}
    t_all = time.perf_counter()
    base = count(model, example_inputs)
    metric0 = evaluate(model, val_data)[key] if val_data is not None else None
    report: dict[str, Any] = {
        "method": how.name, "method_options": dict(method_options or {}),
        "budget": {"kind": kind, "target": the_budget.value if the_budget else None}, "allocation": allocation,
        "round_to": round_to, "min_width": min_width, "steps_requested": steps, "tolerance": tolerance,
        "metric_name": key if val_data is not None else None,
        "before": {"macs": base.macs, "params": base.params, "metric": metric0},
        "steps": [{"step": 0, "macs": base.macs, "params": base.params, "metric": metric0}],
    }
    if hasattr(model, "secateurs_spec"):
        report["model"] = model.secateurs_spec
    extra: dict[str, Any] = {}
    out = Path(out_dir) if out_dir is not None else None
    start = 1
    can_save = out is not None and hasattr(model, "secateurs_spec")
    if out is not None and not can_save:
        warnings.warn("the model has no `secateurs_spec` (build it with secateurs.models.create_model): "
                      "steps are not checkpointed, so the run cannot resume", stacklevel=2)
    request = {k: report[k] for k in ("method", "method_options", "budget", "allocation", "round_to", "min_width",
                                      "steps_requested")}
    state_path = out / "state.json" if out is not None else None
    if can_save and not resume:  # a fresh run must not pick up the checkpoints of an earlier one
        if is_main_process():
            for stale in (out / "steps", out / "importance"):
                if stale.exists():
                    shutil.rmtree(stale)
            if state_path.exists():
                state_path.unlink()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    current = base  # the cost of the model as it stands, kept up to date instead of recounted
    if resume and can_save and state_path.exists():
        state = json.loads(state_path.read_text())
        if state["request"] != json.loads(json.dumps(request, default=str)):
            raise ValueError(f"{state_path} was written by a different request {state['request']}; "
                             "use another out_dir or the same arguments")
        done = state["completed_steps"]
        if done:
            _restore(model, load_model(out / "steps" / f"step{done}"))
            current = count(model, example_inputs)
            report["steps"] = state["steps"]
            extra = state.get("extra", {})
            log(f"resuming after step {done}/{steps}")
        start = done + 1
    for k in range(start, steps + 1):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = analyze(model, example_inputs, ignore=ignore)
        if "original_widths" not in extra:  # min-kept guards refer to the original widths, across resumes too
            extra["original_widths"] = {g.name: g.size for g in graph.groups}
        t1 = time.perf_counter()
        ctx = StepContext(model, graph, example_inputs, k, steps, the_budget, base, current, allocation, round_to,
                          min_width, data, extra["original_widths"], latency_threads, log, finetune, val_data,
                          tolerance, key if val_data is not None else None, metric0, out if can_save else None,
                          extra.setdefault("_state", {}))
        plan, info = how.plan(ctx)
        t3 = time.perf_counter()
        timings["analyze_s"] += t1 - t0
        timings["plan_s"] += t3 - t1
        if plan is None or not plan.remove:
            report["stopped"] = info.get("stop", "nothing left to remove")
            log(f"step {k}: {report['stopped']}; stopping")
            break
        extra.update({k2: v for k2, v in info.items() if k2 != "stop"})
        snapshot = copy.deepcopy(model) if tolerance is not None else None
        if isinstance(plan, PruningPlan):
            removed = {graph.groups[gi].name: len(idx) for gi, idx in plan.remove.items()}
            apply_plan(model, graph, plan)
        else:  # a depth plan: whole blocks go
            removed = plan.summary()
            plan.apply(model, example_inputs)
        t4 = time.perf_counter()
        timings["surgery_s"] += t4 - t3
        if finetune is not None:
            cfg = finetune if out is None else replace(finetune, out_dir=str(out / "steps" / f"step{k}" / "train"), resume=True)
            fit(model, data, None, cfg)
            timings["finetune_s"] += time.perf_counter() - t4
        after = count(model, example_inputs)
        row = {"step": k, "macs": after.macs, "params": after.params,
               "metric": evaluate(model, val_data)[key] if val_data is not None else None, "removed": removed}
        log(f"step {k}/{steps}: MACs {after.macs / base.macs:.1%}, params {after.params / base.params:.1%}"
            + (f", {key} {row['metric']:.2f}" if row["metric"] is not None else ""))
        if tolerance is not None and metric0 - row["metric"] > tolerance:
            _restore(model, snapshot)
            row["reverted"] = True
            report["steps"].append(row)
            why = f"{key} fell by {metric0 - row['metric']:.2f} > tolerance {tolerance} at step {k}; step undone"
            if getattr(how, "refine", None) is not None and how.refine(ctx):  # e.g. try a smaller step
                log(why + "; trying a smaller step")
                report["stopped"] = why + f"; no step left to try a smaller one ({steps} at most)"
                continue
            report["stopped"] = why
            log(why)
            break
        report["steps"].append(row)
        report.pop("stopped", None)
        current = after
        if can_save and is_main_process():  # under torchrun every process prunes alike; one writes
            save_model(model, out / "steps" / f"step{k}", example_inputs)
            _write_json(state_path, {"request": request, "completed_steps": k, "steps": report["steps"], "extra": extra})
    final = current  # an undone step restored the model whose cost `current` still holds
    kept = [r for r in report["steps"] if not r.get("reverted")]
    report["after"] = {"macs": final.macs, "params": final.params, "metric": kept[-1]["metric"]}
    report["kept"] = {"macs": final.macs / base.macs, "params": final.params / base.params}
    w0, w1 = _widths(base), _widths(final)
    report["layers"] = [{"name": l.name, "kind": l.kind, "width_before": w0[l.name], "width_after": w1.get(l.name),
                         "macs_before": l.macs, "macs_after": next((r.macs for r in final.layers if r.name == l.name), 0)}
                        for l in base.layers]
    report["timings"] = dict(timings, total_s=time.perf_counter() - t_all)
    report.update({k: v for k, v in extra.items() if k != "_state"})
    return model, report
