"""The simplest front door: one call that analyses, scores and cuts."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from ._validation import check_ratio
from .criteria import group_scores
from .graph import DependencyGraph, analyze
from .surgery import PruningPlan, apply_plan

__all__ = ["prune", "uniform_plan"]


def uniform_plan(graph: DependencyGraph, scores: list[torch.Tensor], ratio: float, round_to: int = 1) -> PruningPlan:
    """Remove the lowest-scoring ``ratio`` of every group (at least one channel is kept)."""
    plan = PruningPlan()
    for g, s in zip(graph.groups, scores):
        keep = max(1, g.size - math.floor(g.size * ratio))
        if round_to > 1 and g.size >= round_to:
            keep = max(round_to, int(round(keep / round_to)) * round_to)
        n_remove = g.size - min(keep, g.size)
        if n_remove > 0:
            plan.remove[g.index] = torch.argsort(s, stable=True)[:n_remove].sort().values.tolist()
    return plan


def prune(model: nn.Module, example_inputs: Any, ratio: float = 0.5, ignore: Iterable[str | nn.Module] | None = None,
          criterion: str | Callable = "l2", round_to: int = 1) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable group, lowest ``criterion`` first.

    The model is changed in place and returned. Its outputs keep their shape; modules listed in
    ``ignore`` keep their output channels.
    """
    ratio = check_ratio(ratio)
    graph = analyze(model, example_inputs, ignore=ignore)
    scores = group_scores(model, graph, criterion)
    return apply_plan(model, graph, uniform_plan(graph, scores, ratio, round_to))
