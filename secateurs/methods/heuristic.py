"""METHODS.md method 1, heuristic automatic filter pruning (Choudhary et al. 2022): a per-layer
estimator gamma decides which filters go, so no rate is set by hand."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from .._registry import Registry
from ..budget import Budget, bisect, measure
from ..cost import PlanCost
from ..criteria import get_criterion, group_scores
from ..graph import DependencyGraph
from ..surgery import PruningPlan
from .base import Decision, Method, Option, StepContext, check_stop_rule, register_method

__all__ = ["HeuristicMethod", "register_estimator", "list_estimators", "mean_minus_std", "ratio_of_mean"]

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

    name = "heuristic"
    summary = "METHODS.md 1; a budget is optional, a stop rule"
    needs_budget = False
    options = (
        Option("estimator", "mean_minus_std", "mean_minus_std (gamma = mean - kappa std) or ratio_of_mean",
               kind=object, flag="--estimator"),
        Option("kappa", 0.5, "gamma = mean - kappa * std", flag="--kappa"),
        Option("rho", 0.5, "gamma = rho * mean (ratio_of_mean)", flag="--rho"),
        Option("min_keep", 0.1, "never keep less than this fraction of a layer's width "
               "(heuristic 0.1, importance-weights 0.05)", low=0, high=1, open_low=True, flag="--min-keep"),
        Option("scope", "layer", "layer (estimator per layer) or global (pooled, mean-normalised)",
               kind=str, choices=("layer", "global"), flag="--scope"),
        Option("criterion", "l1", "the score the estimator thresholds", kind=object),
    )

    def setup(self) -> None:
        est = self.estimator
        self.estimator_name = est if isinstance(est, str) else getattr(est, "__name__", "custom")
        self.estimator = _ESTIMATORS.get(est)
        self.criterion = get_criterion(self.criterion)


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

    def check(self, budget: Budget | None) -> None:
        check_stop_rule("heuristic", budget)

    def steps_for(self, budget: Budget | None, tolerance: float | None) -> int:
        """Rounds, prune then fine-tune (METHODS.md iterates them): up to 10 while a target or a
        tolerance can stop the schedule; one without either, since every round cuts each layer's
        filters under gamma and nothing else would stop them short of ``min_keep``."""
        return 10 if budget is not None or tolerance is not None else 1

    def plan(self, ctx: StepContext) -> Decision:
        met = ctx.budget_met()
        if met:
            return Decision.halt(met)
        scores = group_scores(ctx.model, ctx.graph, self.criterion, data=ctx.data)
        cands = self.candidates(ctx.graph, scores, ctx.original_widths, ctx.round_to)
        if not cands:
            return Decision.halt("no filter falls under the estimator")
        if ctx.budget is not None:
            cands = self._trim_to_budget(ctx, scores, cands, ctx.round_to)
        return Decision(channels=PruningPlan({gi: idx.sort().values.tolist() for gi, idx in cands.items()}))

    def _trim_to_budget(self, ctx: StepContext, scores: list[torch.Tensor],
                        cands: dict[int, torch.Tensor], round_to: int = 1) -> dict[int, torch.Tensor]:
        """Remove only as many candidates (lowest normalised score first) as the budget needs, each
        group's kept width still a multiple of ``round_to`` (rounded up: a later round takes the rest)."""
        pc = PlanCost(ctx.model, ctx.graph, ctx.example_inputs, base=ctx.current)
        groups = ctx.graph.groups
        limit = ctx.budget.limit(ctx.base)

        def cost(chosen: dict[int, torch.Tensor]) -> int:
            mask = torch.zeros(ctx.graph.n_components, dtype=torch.bool)
            for gi, idx in chosen.items():
                mask[groups[gi].components[idx]] = True
            return measure(pc(mask), ctx.budget.kind)

        if cost(cands) > limit:
            return cands  # even all candidates do not reach it: take them all, the next round goes on
        flat = sorted(((float(scores[gi][c] / scores[gi].mean().clamp_min(1e-12)), gi, int(c))
                       for gi, idx in cands.items() for c in idx))

        def first(n: int) -> dict[int, torch.Tensor]:
            chosen: dict[int, list[int]] = {}
            for _, gi, c in flat[:n]:
                chosen.setdefault(gi, []).append(c)
            out = {}
            for gi, v in chosen.items():  # lowest first: keep the lowest of them a multiple allows
                size = groups[gi].size
                take = size - min(size, -(-(size - len(v)) // round_to) * round_to)
                if take:
                    out[gi] = torch.tensor(v[:take])
            return out

        return first(bisect(1, len(flat), lambda n: cost(first(n)) <= limit))
