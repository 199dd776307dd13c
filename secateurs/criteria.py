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
    by_tensor: dict[tuple[str, str], list[int]] = {}
    for i, b in enumerate(graph.bindings):
        if b.kind == "tensor" and b.name in modules[b.module]._parameters:
            by_tensor.setdefault((b.module, b.name), []).append(i)
    per_comp = torch.zeros(graph.n_components)
    for (mname, tname), idx in by_tensor.items():
        x = getattr(modules[mname], tname).detach().float()
        axes = sorted({graph.bindings[i].axis for i in idx})
        other = [d for d in range(x.dim()) if d not in axes]
        # one pass over the tensor: reduce everything but the bound axes, then sum per axis
        red = torch.linalg.vector_norm(x, ord=p, dim=other).pow(p) if other else x.abs().pow(p)
        for i in idx:
            k = axes.index(graph.bindings[i].axis)
            per_pos = red.sum(dim=[d for d in range(red.dim()) if d != k]) if red.dim() > 1 else red
            per_comp.index_add_(0, graph.binding_labels[i], per_pos.cpu())
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
