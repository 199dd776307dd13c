"""Budgets and how scores become kept widths that meet one.

A budget is a kept fraction of MACs, of params, or of measured latency, a channel ratio, or a
per-layer ratio dict. MACs/params budgets are met by searching the allocation against
:class:`~secateurs.cost.PlanCost` (the exact cost of a plan, without cutting), then re-adding the
best removed channels while they still fit, so the pruned model lands at or just under the target.

This module sits between the engine (graph, cost, surgery) and the methods: every method that
needs a budget, a width allocation or a search uses these, and nothing here knows of methods.
"""
from __future__ import annotations

import heapq
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ._state import copy_model
from ._validation import PruningError, check_choice, check_ratio, check_scalar
from .cost import Cost, PlanCost
from .graph import DependencyGraph
from .latency import latency_ratio, runtime_of
from .latency_table import LatencyModel
from .surgery import PruningPlan, apply_plan

__all__ = ["Budget", "Allocator", "plan_for_budget", "uniform_plan", "as_budget", "measure", "bisect", "fill",
           "threshold_search", "latency_plan", "latency_weights", "BUDGETS", "ALLOCATIONS", "COSTS"]

BUDGETS = ("macs", "params", "latency", "ratio", "layers")
ALLOCATIONS = ("global", "uniform", "latency")
COSTS = ("macs", "params")  # the budgets a plan's cost is counted in


def measure(cost: Cost | tuple[float, float], kind: str) -> float:
    """The ``kind`` ("macs" or "params") of a :class:`Cost` or of a ``(macs, params)`` pair."""
    macs, params = (cost.macs, cost.params) if isinstance(cost, Cost) else cost
    return macs if check_choice(kind, "kind", COSTS) == "macs" else params


@dataclass(frozen=True)
class Budget:
    """How much to keep. ``kind`` is one of :data:`BUDGETS`; ``value`` a kept fraction in (0, 1]
    (``ratio``: the fraction of channels *removed* per group, in [0, 1)), or for ``layers`` a dict
    {module name: removed fraction of its output channels}."""

    kind: str
    value: float | Mapping[str, float]

    def __post_init__(self) -> None:
        check_choice(self.kind, "budget", BUDGETS)
        if self.kind == "layers":
            if not isinstance(self.value, Mapping) or not self.value:
                raise ValueError("a 'layers' budget needs a non-empty dict {module name: ratio}")
            for k, v in self.value.items():
                check_ratio(v, f"ratio of '{k}'")
        elif self.kind == "ratio":
            check_ratio(self.value, "ratio")
        else:
            v = self.value
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v <= 1:
                raise ValueError(f"a {self.kind} target is the kept fraction, in (0, 1]; got {v!r}")

    def at_step(self, k: int, n: int) -> "Budget":
        """Budget after step ``k`` of ``n``: geometric, so each step removes the same share. MACs and
        params are fractions of the unpruned model; ratios, layers and latency (which is timed
        against the model as the step finds it) of the current one."""
        if self.kind in ("ratio", "layers"):  # relative to the current model: (1 - r_k)^n = 1 - r
            step = lambda r: 1 - (1 - r) ** (1 / n)  # noqa: E731
            value = step(self.value) if self.kind == "ratio" else {m: step(r) for m, r in self.value.items()}
            return Budget(self.kind, value)
        if self.kind == "latency":  # each step's measured ratio multiplies: v^(1/n) per step gives v
            return Budget(self.kind, self.value ** (1 / n))
        return Budget(self.kind, self.value ** (k / n))

    def limit(self, reference: Cost) -> float:
        """The largest MACs/params count this budget allows, as a fraction of ``reference``."""
        return self.value * measure(reference, self.kind)

    def met(self, current: Cost, reference: Cost) -> bool:
        """Whether ``current`` already fits the MACs/params limit set by ``reference``."""
        return measure(current, self.kind) <= self.limit(reference)


def as_budget(target: Any, default_kind: str = "macs") -> Budget:
    """One form for every budget: a :class:`Budget`; a fraction (kept ``default_kind``); a dict
    with one budget kind as its key ({"macs": 0.5}, {"ratio": 0.3}, {"layers": {...}}); or a dict
    {module name: removed ratio} (a per-layer budget)."""
    if isinstance(target, Budget):
        return target
    if isinstance(target, Mapping):
        if len(target) == 1 and next(iter(target)) in BUDGETS:
            (kind, value), = target.items()
            return Budget(kind, dict(value) if isinstance(value, Mapping) else value)
        kinds = [k for k in target if k in BUDGETS]
        if kinds:
            raise ValueError(f"a `target` dict takes one budget kind ({', '.join(BUDGETS)}), got {sorted(target)}")
        return Budget("layers", dict(target))
    return Budget(default_kind, target)


def bisect(lo: int, hi: int, ok: Callable[[int], bool], *, largest: bool = False,
           max_probes: int | None = None) -> int:
    """The one monotone integer search of the package.

    ``largest=False``: the smallest ``n`` in ``[lo, hi)`` with ``ok(n)`` (``ok`` turns true as n
    grows), or ``hi`` if none. ``largest=True``: the largest ``n`` in ``(lo, hi]`` with ``ok(n)``
    (``ok`` turns false as n grows), or ``lo`` if none. ``max_probes`` bounds the calls of ``ok``
    when each is expensive (then the best bound found so far is returned).
    """
    probes = 0
    while lo < hi and (max_probes is None or probes < max_probes):
        probes += 1
        if largest:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        else:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
    return lo


class Allocator:
    """Turns per-channel scores into kept widths under the user's constraints.

    ``global`` ranks all channels together after dividing each group's scores by their mean (so
    groups with large weights are not favoured); ``uniform`` removes the same fraction everywhere;
    ``latency`` ranks like ``global`` after :meth:`reweight` divides each group's scores by how
    much latency its channels buy per MAC on this machine.
    Widths are at least ``min_width`` (channels, or a fraction of the group's ``original`` width,
    {group name: width} before the first step of a schedule, if a float < 1) and, with ``round_to``,
    multiples of it (rounded up). Exactly tied normalised scores (an untrained network's BN scales,
    all 1) are broken by rank within the group, so a tie is cut evenly rather than group by group.
    """

    def __init__(self, graph: DependencyGraph, scores: list[torch.Tensor], allocation: str = "global",
                 round_to: int = 1, min_width: int | float = 1, normalize: bool = True,
                 original: Mapping[str, int] | None = None) -> None:
        self.check_arguments(allocation, round_to, min_width)
        self.graph, self.allocation, self.round_to = graph, allocation, round_to
        self.order, self.sorted_norm, self.min_keep = [], [], []
        # round_to and an int min_width count channels; a grouped conv's unit is one channel per conv
        # group (``mult`` channels), so its widths are multiples of round_to / gcd(round_to, mult) units
        mults = [_channels_per_unit(graph, g) for g in graph.groups]
        self.step = [round_to // math.gcd(round_to, m) for m in mults]
        for g, s, mult in zip(graph.groups, scores, mults):
            s = s.float()
            if not normalize:  # scores already comparable across groups (e.g. one joint PLS)
                norm = s
            else:
                norm = s / s.mean().clamp_min(1e-12) if s.abs().sum() > 0 else torch.ones_like(s)
            order = torch.argsort(norm, descending=True, stable=True)
            self.order.append(order)
            ranked = norm[order]
            if normalize and len(ranked):  # mean 1: a step far below any real score difference
                ranked = ranked - 1e-6 * torch.arange(len(ranked), dtype=ranked.dtype) / len(ranked)
            self.sorted_norm.append(ranked)
            width = (original or {}).get(g.name, g.size)
            lo = (min(g.size, math.ceil(min_width * width - 1e-9)) if isinstance(min_width, float)
                  else min(-(-int(min_width) // mult), g.size))
            self.min_keep.append(self.round_width(g.index, max(1, lo)))

    @staticmethod
    def check_arguments(allocation: str, round_to: int, min_width: int | float) -> None:
        """Refuse bad allocation arguments before any work (and before any graph exists)."""
        check_choice(allocation, "allocation", ALLOCATIONS)
        check_scalar(round_to, "round_to", int, min_val=1)
        if isinstance(min_width, float):
            check_scalar(min_width, "min_width", float, min_val=0, max_val=1, include_min=False)
        else:
            check_scalar(min_width, "min_width", int, min_val=1)

    def round_width(self, i: int, n: int) -> int:
        """``n`` units of group ``i`` rounded up to a multiple of ``round_to`` channels, at most its size."""
        step, size = self.step[i], self.graph.groups[i].size
        return min(size, -(-n // step) * step) if step > 1 else n

    def raise_floor(self, i: int, n: int) -> None:
        """Keep at least ``n`` channels (rounded up) of group ``i``, e.g. a share of its original width."""
        size = self.graph.groups[i].size
        self.min_keep[i] = min(size, max(self.min_keep[i], self.round_width(i, n)))

    def clamp(self, i: int, n: int) -> int:
        return min(self.graph.groups[i].size, max(self.min_keep[i], self.round_width(i, n)))

    def keep_for_threshold(self, t: float) -> list[int]:
        """Widths keeping every channel whose normalised score is >= ``t``."""
        return [self.clamp(i, int((s >= t).sum())) for i, s in enumerate(self.sorted_norm)]

    def keep_for_ratio(self, r: float) -> list[int]:
        return [self.clamp(i, g.size - math.floor(g.size * r + 1e-9)) for i, g in enumerate(self.graph.groups)]

    def keep_removing(self, n: int) -> list[int]:
        """Widths after removing the ``n`` lowest-scoring removable channels, over all groups."""
        groups = self.graph.groups
        flat = sorted((float(self.sorted_norm[i][k]), i) for i, g in enumerate(groups)
                      for k in range(self.min_keep[i], g.size))
        cut = [0] * len(groups)
        for _, i in flat[:n]:
            cut[i] += 1
        return [self.clamp(i, g.size - c) for i, (g, c) in enumerate(zip(groups, cut))]

    def removable(self) -> int:
        """How many channels may go in all, above the minimum widths."""
        return sum(g.size - k for g, k in zip(self.graph.groups, self.min_keep))

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

    def reweight(self, weights: list[float]) -> None:
        """Divide group ``i``'s normalised scores by ``weights[i]`` (the order within a group stays)."""
        self.sorted_norm = [s / max(w, 1e-6) for s, w in zip(self.sorted_norm, weights)]

    def thresholds(self) -> torch.Tensor:
        return torch.unique(torch.cat(self.sorted_norm)) if self.sorted_norm else torch.zeros(0)


def _channels_per_unit(graph: DependencyGraph, g: Any) -> int:
    """Channels one unit of group ``g`` stands for in its producing layers (a grouped conv: one per
    conv group), read off the analysed shapes; 1 when no producer is known."""
    for module, tensor, axis, role in g.members:
        shape = graph._shapes.get(f"{module}.{tensor}" if module else tensor) if role == "out" else None
        if shape is not None and g.size and shape[axis] % g.size == 0:
            return max(1, shape[axis] // g.size)
    return 1


def uniform_plan(graph: DependencyGraph, scores: list[torch.Tensor], ratio: float, round_to: int = 1) -> PruningPlan:
    """Remove the lowest-scoring ``ratio`` of every group (at least one channel is kept)."""
    alloc = Allocator(graph, scores, "uniform", round_to)
    return alloc.plan(alloc.keep_for_ratio(check_ratio(ratio)))


def fill(alloc: Allocator, keep: list[int], cost: Callable[[list[int]], float], limit: float,
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
        trial[i] = alloc.clamp(i, keep[i] + alloc.step[i])
        evals += 1
        c = cost(trial)
        if c <= limit:
            keep, current = trial, c
            if keep[i] < alloc.graph.groups[i].size:
                heapq.heappush(heap, (-float(alloc.sorted_norm[i][keep[i]]), i))
    return keep


def latency_weights(alloc: Allocator, lm: Any, pc: "PlanCost") -> list[float]:
    """Per group: the share of the latency that removing half its channels saves, over the share of
    the MACs it saves (from the per-layer tables), relative to the mean over groups. On a model whose depthwise
    convs, norms and activations cost more time than MACs (MobileNets), an expansion channel saves
    more time per MAC than a residual one: ``allocation="latency"`` removes those first."""
    full_lat, full_macs = lm.full(), pc.base.macs
    sizes = [g.size for g in alloc.graph.groups]
    out = []
    for i, size in enumerate(sizes):
        keep = list(sizes)
        keep[i] = alloc.clamp(i, size // 2)
        removed = alloc.removed(keep)
        d_macs = (full_macs - pc(removed)[0]) / max(full_macs, 1)
        d_lat = (full_lat - lm(removed)) / max(full_lat, 1e-12)
        out.append(max(d_lat, 0.0) / d_macs if d_macs > 0 else 1.0)
    mean = sum(out) / len(out) if out else 1.0
    return [w / mean if mean > 0 else 1.0 for w in out]


LATENCY_FLOOR = 0.75  # allocation="latency" keeps at least this share of each group's global width


def _favour_latency(alloc: Allocator, glob: Allocator, pc: "PlanCost", limit: float, kind: str, lm: Any) -> None:
    """Reweight ``alloc`` by :func:`latency_weights`, with each group kept at no less than
    ``LATENCY_FLOOR`` of the width the importance-only (global) plan gives it at the same budget:
    without a floor, a group whose channels score alike (a ResNet stage) drops below any threshold
    at once and is cut to one channel, buying speed with the network's accuracy. Measured on the
    zoo ResNet-20 at 50% MACs (batch 8, 150 fine-tuning steps, 2,000 test images, one seed): global
    82.8% top-1 at 0.96-1.01 of the dense latency; floors 0.75 / 0.5 / 0.25: 81.7 / 79.7 / 78.4% at
    0.84 / 0.81 / 0.79; without a floor the first stage kept 1 channel."""
    cost = lambda keep: measure(pc(glob.removed(keep)), kind)  # noqa: E731
    widths = fill(glob, threshold_search(glob, cost, limit), cost, limit)
    alloc.reweight(latency_weights(alloc, lm, pc))
    for i, w in enumerate(widths):
        alloc.raise_floor(i, math.ceil(LATENCY_FLOOR * w))


def threshold_search(alloc: Allocator, cost: Callable[[list[int]], float], limit: float) -> list[int]:
    """Widths at the lowest global score threshold whose cost fits ``limit`` (cost falls as it rises)."""
    ts = alloc.thresholds()
    lo = bisect(0, len(ts), lambda i: cost(alloc.keep_for_threshold(float(ts[i]))) <= limit)
    return alloc.keep_for_threshold(float(ts[lo]) if lo < len(ts) else math.inf)


_RATIO_STEPS = 2 ** 40  # the grid of the uniform-ratio search: exact dyadic fractions


def _uniform_search(alloc: Allocator, cost: Callable[[list[int]], float], limit: float) -> list[int]:
    """Widths at the smallest uniform ratio whose cost fits ``limit``."""
    n = bisect(1, _RATIO_STEPS, lambda n: cost(alloc.keep_for_ratio(n / _RATIO_STEPS)) <= limit)
    keep = alloc.keep_for_ratio(n / _RATIO_STEPS)
    if cost(keep) > limit:  # min widths bind: fall back to the global order for the rest
        keep = alloc.keep_for_threshold(math.inf)
    return keep


def _layer_widths(model: nn.Module, graph: DependencyGraph, alloc: Allocator, ratios: Mapping[str, float]) -> list[int]:
    keep = [g.size for g in graph.groups]
    modules = dict(model.named_modules())
    for name, r in ratios.items():
        if name not in modules:
            raise PruningError(f"budget names module '{name}', which the model does not have (a dict of module "
                               f"ratios; a budget kind is one of {', '.join(k for k in BUDGETS if k != 'layers')})")
        groups = graph.groups_of(name)
        if not groups:
            raise PruningError(f"module '{name}' has no prunable output channels (ignored, frozen or an output)")
        for g in groups:
            keep[g.index] = alloc.clamp(g.index, g.size - math.floor(g.size * r + 1e-9))
    return keep


def _ratio_widths(alloc: Allocator, ratio: float) -> list[int]:
    if alloc.allocation == "uniform":
        return alloc.keep_for_ratio(ratio)
    everything = torch.sort(torch.cat(alloc.sorted_norm)).values
    k = math.floor(len(everything) * ratio + 1e-9)
    return alloc.keep_for_threshold(float(everything[k]) if k < len(everything) else math.inf)


def plan_for_budget(model: nn.Module, graph: DependencyGraph, example_inputs: Any, scores: list[torch.Tensor],
                    budget: Budget, allocation: str = "global", round_to: int = 1, min_width: int | float = 1,
                    base: Cost | None = None, reference: Cost | None = None,
                    normalize: bool = True, threads: int | None = None,
                    original: Mapping[str, int] | None = None) -> tuple[PruningPlan, dict]:
    """The plan that meets ``budget`` on ``model``; ``reference`` is the cost the fractions refer to
    and ``original`` the widths a fractional ``min_width`` refers to (the original model's, in an
    iterative schedule). Returns the plan and the predicted cost.
    ``allocation="latency"`` times this machine's layers (``threads``; cached tables)."""
    alloc = Allocator(graph, scores, allocation, round_to, min_width, normalize, original)
    if budget.kind == "layers":
        return alloc.plan(_layer_widths(model, graph, alloc, budget.value)), {}
    if budget.kind == "ratio":
        return alloc.plan(_ratio_widths(alloc, budget.value)), {}
    if budget.kind == "latency":
        raise ValueError("latency budgets are searched by `latency_plan`, which measures the pruned model")
    pc = PlanCost(model, graph, example_inputs, base=base)
    ref = reference or pc.base
    limit = budget.limit(ref)
    if allocation == "latency":
        lm = LatencyModel(model, graph, example_inputs, threads=threads, runtime=runtime_of(model), step=round_to)
        _favour_latency(alloc, Allocator(graph, scores, "global", round_to, min_width, normalize, original), pc, limit,
                        budget.kind, lm)
    cost = lambda keep: measure(pc(alloc.removed(keep)), budget.kind)  # noqa: E731
    smallest = cost(alloc.keep_for_threshold(math.inf))
    if smallest > limit:
        raise PruningError(f"a {budget.kind} target of {budget.value:.4g} cannot be reached: with min_width={min_width}, "
                           f"round_to={round_to} and the ignored/frozen layers, the smallest model keeps "
                           f"{smallest / measure(ref, budget.kind):.4g}")
    search = _uniform_search if allocation == "uniform" else threshold_search
    keep = fill(alloc, search(alloc, cost, limit), cost, limit)
    macs, params = pc(alloc.removed(keep))
    return alloc.plan(keep), {"macs": macs, "params": params}


def latency_plan(model: nn.Module, graph: DependencyGraph, x: Any, scores: list[torch.Tensor], budget: Budget,
                 allocation: str, round_to: int, min_width: int | float, threads: int | None,
                 log: Callable[..., None], *, tolerance: float = 0.05, tries: int = 6,
                 original: Mapping[str, int] | None = None) -> tuple[PruningPlan, dict]:
    """Widths that meet a measured latency target.

    The allocation spends a latency budget read off per-layer tables of this machine
    (:class:`~secateurs.latency_table.LatencyModel`: each channel's saving depends on the widths
    around it), then one interleaved timing of the dense and the pruned model confirms it; the first
    timing, if it runs slower than predicted, calibrates the share of the rest of the model that stays
    whatever the widths (per-op cost, :meth:`~secateurs.latency_table.LatencyModel.calibrate`). A miss by
    more than ``tolerance`` (relative) aims the table again: scaled by what was measured until one
    aim lands below the target and one above, then interpolated inside that bracket (the
    measured latency is not proportional to the table's, e.g. a VGG's classifier weights are read
    from memory whatever the widths, so plain scaling swings across the target).

    A plan that lands within ``tolerance`` but below the target gets one more try, aimed up by
    target / measured: where the latency is flat in the widths (per-layer overheads at batch 1), a
    plan that keeps many more channels can time the same. Of the plans within ``tolerance`` and at
    or below the target, the one that keeps the most MACs is returned; else the closest to it.
    """
    runtime = runtime_of(model)  # the layout the model runs in, for the tables and the timing alike
    lm = LatencyModel(model, graph, x, threads=threads, runtime=runtime, step=round_to, log=log)
    alloc, pc = Allocator(graph, scores, allocation, round_to, min_width, original=original), PlanCost(model, graph, x)
    cost = lambda keep: lm(alloc.removed(keep))  # noqa: E731
    search = _uniform_search if allocation == "uniform" else threshold_search
    target, aim, full = budget.value, budget.value, lm.full()
    smallest = cost(alloc.keep_for_threshold(math.inf)) / full
    tried: list[dict] = []
    met: list[tuple[PruningPlan, float, int]] = []  # (plan, measured ratio, MACs) of each plan that meets the target
    stretch, last = False, None
    for _ in range(tries):
        limit = max(aim, smallest) * full
        keep = fill(alloc, search(alloc, cost, limit), cost, limit)
        if stretch and keep == last:  # the aim up gives the same widths: nothing more to keep
            break
        plan, last, macs = alloc.plan(keep), keep, pc(alloc.removed(keep))[0]
        ratio = latency_ratio(model, apply_plan(copy_model(model), graph, plan), x, threads=threads, runtime=runtime)
        predicted = cost(keep) / full
        tried.append({"aim": aim, "predicted_ratio": predicted, "latency_ratio": ratio, "macs": macs})
        log(f"latency: table predicts {predicted:.3f}, measured {ratio:.3f} (target {target:.3f})")
        if len(tried) == 1 and ratio > predicted and lm.calibrate(alloc.removed(keep), ratio) > 0:
            # the rest of the model kept more time than its activations: the first try in the calibrated tables
            tried[0].update(fixed_share=lm.fixed, uncalibrated_ratio=predicted, predicted_ratio=cost(keep) / full)
            aim = tried[0]["aim"] = tried[0]["predicted_ratio"]
            smallest = cost(alloc.keep_for_threshold(math.inf)) / full
        if ratio <= target * (1 + tolerance):
            met.append((plan, ratio, macs))
        landed = abs(ratio - target) <= tolerance * target
        if landed and ratio < target and not stretch and len(tried) < tries:
            stretch, aim = True, aim * target / ratio
            continue
        if landed or stretch or (aim <= smallest and ratio > target):
            break
        aim = _next_aim(tried, target)
    band = [m for m in met if abs(m[1] - target) <= tolerance * target]
    under = [m for m in band if m[1] <= target]  # within tolerance and not slower than asked: the most MACs kept
    best = max(under, key=lambda m: m[2]) if under else min(band or met, key=lambda m: abs(m[1] - target), default=None)
    if best is None:
        raise PruningError(f"no plan met a latency target of {target:.3g} in {len(tried)} timings: the closest measured {min(t['latency_ratio'] for t in tried):.3g} "
                           f"of the dense model (the smallest model the constraints allow is predicted at {smallest:.3g}). "
                           "Narrower channels do not remove a layer's fixed cost, which dominates small inputs: remove "
                           "whole blocks first (method='dlp' with a block count), then prune channels to the target")
    if abs(best[1] - target) > tolerance * target:  # met, but with more cut than asked: say so
        warnings.warn(f"a latency target of {target:.3g} (of the model as this step found it) was met at "
                      f"{best[1]:.3g}, more than {tolerance:.0%} below it after {len(tried)} tries (the tables' steps "
                      "or timing noise hid the target): the model lost more channels than the target needs",
                      RuntimeWarning, stacklevel=2)
    return best[0], {"latency_base_s": lm.measured_s, "latency_search": tried, "latency_ratio": best[1],
                     "latency_table": str(lm.path), "latency_runtime": runtime}


def _next_aim(tried: list[dict], target: float) -> float:
    """The next table aim: inside the bracket of the closest aims measured below and above the target
    (linear in the measured ratio; the midpoint when that lands outside or repeats the last plan),
    else the last aim scaled by target / measured. The bracket is taken in aim, which the measured
    ratio grows with: taken in measured ratio, two aims that give one plan tie and the next aim
    repeats forever (seen: 0.729 four times while the tables' steps hid the target)."""
    below = [t for t in tried if t["latency_ratio"] <= target]
    above = [t for t in tried if t["latency_ratio"] > target]
    last = tried[-1]
    if not below or not above:
        return last["aim"] * target / last["latency_ratio"]
    lo, hi = max(below, key=lambda t: t["aim"]), min(above, key=lambda t: t["aim"])
    if lo["aim"] >= hi["aim"]:  # timing noise broke the order: the closest measured on either side
        lo, hi = max(below, key=lambda t: t["latency_ratio"]), min(above, key=lambda t: t["latency_ratio"])
    span = hi["latency_ratio"] - lo["latency_ratio"]
    frac = (target - lo["latency_ratio"]) / span if span > 0 else 0.5
    aim, mid = lo["aim"] + frac * (hi["aim"] - lo["aim"]), (lo["aim"] + hi["aim"]) / 2
    stuck = len(tried) > 1 and tried[-2].get("predicted_ratio", -1) == last.get("predicted_ratio")
    return aim if min(lo["aim"], hi["aim"]) < aim < max(lo["aim"], hi["aim"]) and not stuck else mid


def deprecated_budget(target: Any, budget: str | None, ratio: float | None) -> Any:
    """Fold the old ``budget=``/``ratio=`` keywords of :func:`secateurs.prune` into ``target``,
    with a DeprecationWarning (they go in the next release)."""
    if budget is None and ratio is None:
        return target
    warnings.warn("prune(..., budget=KIND, ratio=R) is deprecated: pass target={KIND: fraction}, "
                  "target={'ratio': R} or a Budget", DeprecationWarning, stacklevel=3)
    if ratio is not None:
        if target is not None:
            raise ValueError("give either `target` or `ratio`, not both")
        return Budget("ratio", ratio)
    if target is None or isinstance(target, (Budget, Mapping)):
        return target
    return Budget(budget, target)
