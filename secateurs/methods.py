"""Pruning methods: how each step of the pipeline decides which channels go.

The pipeline (:func:`secateurs.prune`) owns everything around a step: analysis, surgery,
fine-tuning, tolerance, checkpoints and the report. A :class:`Method` only answers "given this
model now, what is the plan?", or ``None`` when it has nothing left to remove (the schedule stops).

- :class:`CriterionMethod`: a criterion (``l1``, ``taylor``...) plus a budget; the baselines.
- :class:`HeuristicMethod`: METHODS.md method 1, a per-layer estimator picks the filters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ._registry import Registry
from .cost import Cost, PlanCost
from .criteria import get_criterion, group_scores
from .graph import DependencyGraph
from .pipeline import Allocator, Budget, _latency_plan, plan_for_budget
from .surgery import PruningPlan

__all__ = ["Method", "StepContext", "CriterionMethod", "HeuristicMethod", "get_method", "register_method",
           "list_methods", "register_estimator", "list_estimators"]


@dataclass
class StepContext:
    """What a method may look at to plan one step."""

    model: nn.Module
    graph: DependencyGraph
    example_inputs: Any
    step: int
    steps: int
    budget: Budget | None
    base: Cost  # the original model
    current: Cost  # the model entering this step
    allocation: str
    round_to: int
    min_width: int | float
    data: Any = None
    original_widths: Mapping[str, int] = field(default_factory=dict)
    latency_threads: int | None = None
    log: Callable[..., None] = print


class Method:
    """One way of deciding what to cut; subclasses implement :meth:`plan`."""

    name = "method"
    needs_data = False
    needs_budget = True

    def plan(self, ctx: StepContext) -> tuple[PruningPlan | None, dict]:
        raise NotImplementedError


_METHODS: Registry[type] = Registry("method")
register_method = _METHODS.register


def list_methods() -> list[str]:
    """Registered methods; every criterion name is a method too (criterion + budget)."""
    from .criteria import list_criteria

    return sorted(set(_METHODS.names()) | set(list_criteria()))


class CriterionMethod(Method):
    """Score channels with a criterion, allocate the step's share of the budget."""

    needs_budget = True

    def __init__(self, criterion: str | Callable = "l2", **criterion_kwargs: Any) -> None:
        self.fn = get_criterion(criterion)
        self.name = criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom")
        self.needs_data = bool(getattr(self.fn, "needs_data", False))
        self.kwargs = criterion_kwargs

    def plan(self, ctx: StepContext) -> tuple[PruningPlan | None, dict]:
        scores = group_scores(ctx.model, ctx.graph, self.fn, data=ctx.data, **self.kwargs)
        budget = ctx.budget.at_step(ctx.step, ctx.steps)
        if budget.kind == "latency":
            return _latency_plan(ctx.model, ctx.graph, ctx.example_inputs, scores, budget, ctx.allocation, ctx.round_to,
                                 ctx.min_width, ctx.current, ctx.latency_threads, ctx.log)
        plan, _ = plan_for_budget(ctx.model, ctx.graph, ctx.example_inputs, scores, budget, ctx.allocation,
                                  ctx.round_to, ctx.min_width, base=ctx.current, reference=ctx.base)
        return plan, {}


# -- method 1: heuristic automatic filter pruning -------------------------------------------------
_ESTIMATORS: Registry[Callable] = Registry("estimator")
register_estimator = _ESTIMATORS.register
list_estimators = _ESTIMATORS.names


@register_estimator("mean_minus_std")
def mean_minus_std(scores: torch.Tensor, kappa: float = 0.5, **_: Any) -> float:
    """gamma = mean - kappa * std of the layer's scores (METHODS.md default, kappa = 0.5)."""
    return float(scores.mean() - kappa * scores.std(unbiased=False))


@register_estimator("ratio_of_mean")
def ratio_of_mean(scores: torch.Tensor, rho: float = 0.5, **_: Any) -> float:
    """gamma = rho * mean of the layer's scores."""
    return float(rho * scores.mean())


@register_method("heuristic")
class HeuristicMethod(Method):
    """Choudhary et al. 2022 as specified in METHODS.md: per layer (coupled group), the filters
    whose L1 score falls under the estimator gamma go, never below ``min_keep`` of the original
    width. No rate is set by hand; the schedule stops when no filter falls under gamma.

    ``scope="layer"`` applies the estimator to each group's scores. ``scope="global"`` (our
    choice) divides each group's scores by their mean, so they are comparable across layers, and
    applies the estimator once to all of them: layers whose filters are unusually uneven lose more.
    (Per-layer z-scores would make the global threshold equal to the layer-wise one.)
    With a MACs/params ``budget``, the last round removes only the lowest-scoring candidates needed
    to meet it, and no round starts once it is met.
    """

    needs_budget = False

    def __init__(self, estimator: str | Callable = "mean_minus_std", kappa: float = 0.5, rho: float = 0.5,
                 min_keep: float = 0.1, scope: str = "layer", criterion: str | Callable = "l1") -> None:
        self.estimator = _ESTIMATORS.get(estimator)
        self.estimator_name = estimator if isinstance(estimator, str) else getattr(estimator, "__name__", "custom")
        if scope not in ("layer", "global"):
            raise ValueError(f"`scope` must be 'layer' or 'global', got {scope!r}")
        if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or not 0 < min_keep <= 1:
            raise ValueError(f"`min_keep` must be a fraction in (0, 1], got {min_keep!r}")
        for name, v in (("kappa", kappa), ("rho", rho)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"`{name}` must be a finite number, got {v!r}")
        self.kappa, self.rho, self.min_keep, self.scope = float(kappa), float(rho), float(min_keep), scope
        self.criterion = get_criterion(criterion)
        self.name = "heuristic"

    def _gamma(self, s: torch.Tensor) -> float:
        return float(self.estimator(s, kappa=self.kappa, rho=self.rho))

    def candidates(self, graph: DependencyGraph, scores: list[torch.Tensor],
                   original_widths: Mapping[str, int], round_to: int = 1) -> dict[int, torch.Tensor]:
        """Channels under the estimator, per group, lowest first, after the min-kept guard."""
        if self.scope == "global":
            normed = [s / s.mean().clamp_min(1e-12) for s in scores]
            pooled = torch.cat(normed) if normed else torch.zeros(0)
            gammas = [self._gamma(pooled)] * len(scores)
            scores = normed
        else:
            gammas = [self._gamma(s) for s in scores]
        out = {}
        for g, s, gamma in zip(graph.groups, scores, gammas):
            below = (s < gamma).nonzero().flatten()
            floor = max(1, math.ceil(self.min_keep * original_widths.get(g.name, g.size)))
            n = min(len(below), max(0, g.size - floor))
            if round_to > 1 and n:
                keep = -(-(g.size - n) // round_to) * round_to  # kept width rounded up
                n = max(0, g.size - min(g.size, keep))
            if n:
                order = below[torch.argsort(s[below], stable=True)]
                out[g.index] = order[:n]
        return out

    def plan(self, ctx: StepContext) -> tuple[PruningPlan | None, dict]:
        limit = None
        if ctx.budget is not None:
            if ctx.budget.kind not in ("macs", "params"):
                raise ValueError(f"method 'heuristic' takes a macs or params target as a stop rule, not {ctx.budget.kind!r}")
            which = 0 if ctx.budget.kind == "macs" else 1
            limit = ctx.budget.value * (ctx.base.macs, ctx.base.params)[which]
            if (ctx.current.macs, ctx.current.params)[which] <= limit:
                return None, {"stop": f"{ctx.budget.kind} target {ctx.budget.value} met"}
        scores = group_scores(ctx.model, ctx.graph, self.criterion, data=ctx.data)
        cands = self.candidates(ctx.graph, scores, ctx.original_widths, ctx.round_to)
        if not cands:
            return None, {"stop": "no filter falls under the estimator"}
        if limit is not None:
            cands = self._trim_to_budget(ctx, scores, cands, limit, which)
        return PruningPlan({gi: idx.sort().values.tolist() for gi, idx in cands.items()}), {}

    def _trim_to_budget(self, ctx, scores, cands, limit, which):
        """Remove only as many candidates (lowest normalised score first) as the budget needs."""
        pc = PlanCost(ctx.model, ctx.graph, ctx.example_inputs, base=ctx.current)
        groups = ctx.graph.groups

        def cost(chosen: dict[int, torch.Tensor]) -> int:
            mask = torch.zeros(ctx.graph.n_components, dtype=torch.bool)
            for gi, idx in chosen.items():
                mask[groups[gi].components[idx]] = True
            return pc(mask)[which]

        if cost(cands) > limit:
            return cands  # even all candidates do not reach it: take them all, the next round goes on
        flat = sorted(((float(scores[gi][c] / scores[gi].mean().clamp_min(1e-12)), gi, int(c))
                       for gi, idx in cands.items() for c in idx))

        def first(n: int) -> dict[int, torch.Tensor]:
            chosen: dict[int, list[int]] = {}
            for _, gi, c in flat[:n]:
                chosen.setdefault(gi, []).append(c)
            return {gi: torch.tensor(v) for gi, v in chosen.items()}

        lo, hi = 1, len(flat)
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(first(mid)) <= limit:
                hi = mid
            else:
                lo = mid + 1
        return first(lo)


def get_method(method: str | Callable | Method, **options: Any) -> Method:
    """A :class:`Method` from a registered method name, a criterion name or callable, or itself."""
    if isinstance(method, Method):
        if options:
            raise ValueError("pass options to the Method's constructor, not with an instance")
        return method
    if isinstance(method, str) and method in _METHODS.names():
        try:
            return _METHODS.get(method)(**options)
        except TypeError as err:
            raise ValueError(f"method {method!r}: {err}") from None
    try:
        return CriterionMethod(method, **options)
    except (ValueError, TypeError) as err:
        raise ValueError(f"`method`: {err}; methods: {', '.join(_METHODS.names())}") from None
