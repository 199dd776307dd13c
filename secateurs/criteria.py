"""Channel importance criteria, scored per coupled group.

A criterion is ``fn(model, graph) -> list[Tensor]``: one score per channel of every group,
higher meaning more important. Register new ones with :func:`register_criterion`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ._registry import Registry
from .graph import DependencyGraph

__all__ = ["register_criterion", "get_criterion", "list_criteria", "group_scores"]

_CRITERIA: Registry[Callable] = Registry("criterion")
register_criterion = _CRITERIA.register
get_criterion = _CRITERIA.get
list_criteria = _CRITERIA.names


def _magnitude(model: nn.Module, graph: DependencyGraph, p: int) -> list[torch.Tensor]:
    """Sum |w|^p over every parameter slice of a channel (producers and consumers alike)."""
    modules = dict(model.named_modules())
    per_comp = torch.zeros(graph.n_components)
    powered: dict[int, torch.Tensor] = {}  # each tensor raised to p once, summed along each axis
    for b, lab in zip(graph.bindings, graph.binding_labels):
        if b.kind != "tensor" or b.name not in modules[b.module]._parameters:
            continue
        t = getattr(modules[b.module], b.name)
        if id(t) not in powered:
            x = t.detach().float()
            powered[id(t)] = x.abs() if p == 1 else x.square()
        x = powered[id(t)]
        dims = [d for d in range(x.dim()) if d != b.axis]
        per_comp.index_add_(0, lab, (x.sum(dim=dims) if dims else x).cpu())
    scores = [per_comp[g.components] for g in graph.groups]
    return scores if p == 1 else [s.sqrt() for s in scores]


@register_criterion("l1")
def l1(model: nn.Module, graph: DependencyGraph) -> list[torch.Tensor]:
    """L1 norm of all weights of the channel across its coupled group (Li et al. 2017)."""
    return _magnitude(model, graph, 1)


@register_criterion("l2")
def l2(model: nn.Module, graph: DependencyGraph) -> list[torch.Tensor]:
    """L2 norm of all weights of the channel across its coupled group."""
    return _magnitude(model, graph, 2)


def group_scores(model: nn.Module, graph: DependencyGraph, criterion: str | Callable = "l2") -> list[torch.Tensor]:
    fn = get_criterion(criterion)
    scores = fn(model, graph)
    if len(scores) != len(graph.groups) or any(len(s) != g.size for s, g in zip(scores, graph.groups)):
        raise ValueError(f"criterion {criterion!r} must return one score per channel of every group")
    return scores
