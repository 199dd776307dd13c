"""Channel importance criteria, scored per coupled group.

A criterion is ``fn(model, graph, **kwargs) -> list[Tensor]``: one score per channel of every group,
higher meaning more important. A channel's score gathers every slice it owns across the group
(producers and consumers alike), so coupled layers are judged together. Criteria that need data
carry ``needs_data = True`` and receive ``data`` (a dataset or an iterable of ``(x, y)`` batches).
Register new ones with :func:`register_criterion`.
"""
from __future__ import annotations

import warnings
from itertools import islice
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from ._modes import in_mode
from ._registry import Registry
from ._threads import one_thread
from .data import ArrayDataset, Batches
from .graph import DependencyGraph
from .pls import block_features, vip
from .testing import main_output
from .metrics import task_loss
from .train import predict_padded

__all__ = ["register_criterion", "get_criterion", "list_criteria", "group_scores", "per_channel_sum"]

_CRITERIA: Registry[Callable] = Registry("criterion")
register_criterion = _CRITERIA.register
get_criterion = _CRITERIA.get
list_criteria = _CRITERIA.names


def _bound_tensors(model: nn.Module, graph: DependencyGraph,
                   modules: dict[str, nn.Module] | None = None) -> dict[tuple[str, str], list[int]]:
    modules = dict(model.named_modules()) if modules is None else modules
    out: dict[tuple[str, str], list[int]] = {}
    for i, b in enumerate(graph.bindings):
        if b.kind == "tensor" and b.name in modules[b.module]._parameters:
            out.setdefault((b.module, b.name), []).append(i)
    return out


@one_thread()  # tiny per-tensor ops; per-row norms and sums do not depend on the thread count
def per_channel_sum(model: nn.Module, graph: DependencyGraph,
                    values: Callable[[nn.Module, str, torch.Tensor], torch.Tensor | None] | None = None,
                    p: int | None = None) -> list[torch.Tensor]:
    """Sum ``values(module, name, param)`` (same shape as the parameter, or None to skip) over every
    slice each channel owns, in every parameter of its group; ``p`` instead sums ``|w|^p`` without
    materialising it (a norm over the unbound axes first)."""
    modules = dict(model.named_modules())
    # per-position values and their components, in binding order, added in one index_add_ at the end
    # (the same additions in the same order as one index_add_ per binding)
    parts: list = []
    labels: list[torch.Tensor] = []
    vectors: list[int] = []  # parts holding a raw 1-D parameter, raised to p in one op below
    for (mname, tname), idx in _bound_tensors(model, graph, modules).items():
        m = modules[mname]
        v = getattr(m, tname) if p is not None else values(m, tname, getattr(m, tname))
        if v is None:
            continue
        v = v.detach().float().cpu()
        if p is not None and v.dim() == 1:
            for i in idx:
                vectors.append(len(parts))
                parts.append(v)
                labels.append(graph.binding_labels[i])
            continue
        axes = sorted({graph.bindings[i].axis for i in idx})
        other = [d for d in range(v.dim()) if d not in axes]
        if p is not None:  # one pass over the tensor, then a sum per bound axis
            red = torch.linalg.vector_norm(v, ord=p, dim=other).pow(p) if other else _abs_pow(v, p)
        else:
            red = v.sum(dim=other) if other else v
        for i in idx:
            k = axes.index(graph.bindings[i].axis)
            parts.append(red.sum(dim=[d for d in range(red.dim()) if d != k]) if red.dim() > 1 else red)
            labels.append(graph.binding_labels[i])
    if vectors:
        raised = _abs_pow(torch.cat([parts[j] for j in vectors]), p).split([len(parts[j]) for j in vectors])
        for j, r in zip(vectors, raised):
            parts[j] = r
    per_comp = torch.zeros(graph.n_components)
    if parts:
        per_comp.index_add_(0, torch.cat(labels), torch.cat(parts))
    return [per_comp[g.components] for g in graph.groups]


def _abs_pow(v: torch.Tensor, p: int) -> torch.Tensor:
    """``|v|^p``; for p=2 one pass instead of two: torch computes ``pow(x, 2)`` as ``x * x`` and
    ``|x| * |x|`` rounds as ``x * x``, so the bits are the same (a classifier's weights are
    millions of elements)."""
    return v * v if p == 2 else v.abs().pow(p)


@register_criterion("l1")
def l1(model: nn.Module, graph: DependencyGraph) -> list[torch.Tensor]:
    """L1 norm of all weights of the channel across its coupled group (Li et al. 2017)."""
    return per_channel_sum(model, graph, p=1)


@register_criterion("l2")
def l2(model: nn.Module, graph: DependencyGraph) -> list[torch.Tensor]:
    """L2 norm of all weights of the channel across its coupled group."""
    sums = per_channel_sum(model, graph, p=2)
    with one_thread():  # sqrt is a VML kernel that goes parallel from ~1000 elements: a pool wake per group
        return [s.sqrt() for s in sums]


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


@register_criterion("bn_scale")
def bn_scale(model: nn.Module, graph: DependencyGraph) -> list[torch.Tensor]:
    """|gamma| of the normalisation layers of the channel (Network Slimming, Liu et al. 2017).

    Groups with no affine norm layer fall back to L1 of their weights (with a warning), so every
    group still gets a ranking; scores are only compared within a group or after normalisation.
    """
    gamma = per_channel_sum(model, graph, lambda m, n, w: w.abs() if isinstance(m, _NORMS) and n == "weight" else None)
    missing = [i for i, g in enumerate(graph.groups) if not any(
        isinstance(model.get_submodule(mod), _NORMS) and t == "weight" for mod, t, _, _ in g.members)]
    if missing:
        warnings.warn(f"bn_scale: {len(missing)} group(s) have no norm layer (first: {graph.groups[missing[0]].name}); "
                      "they are scored by L1", stacklevel=3)
        fallback = l1(model, graph)
        for i in missing:
            gamma[i] = fallback[i]
    return gamma


@register_criterion("random")
def random(model: nn.Module, graph: DependencyGraph, seed: int = 0) -> list[torch.Tensor]:
    """Uniform random scores: the baseline every criterion must beat."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(g.size, generator=gen) for g in graph.groups]


def _batches(data: Any, batch_size: int) -> Iterable:
    if isinstance(data, ArrayDataset):
        return Batches(data, batch_size, train=False)
    return data


@register_criterion("taylor")
def taylor(model: nn.Module, graph: DependencyGraph, data: Any = None, n_batches: int = 8, batch_size: int = 64,
           loss_fn: Callable | None = None) -> list[torch.Tensor]:
    """First-order Taylor estimate of the loss change when a channel goes (Molchanov et al. 2019):
    ``(sum over the channel's weights of w * dL/dw)^2``, accumulated over ``n_batches`` batches."""
    if data is None:
        raise ValueError("criterion 'taylor' needs data: pass `data` (a dataset or an iterable of (x, y) batches)")
    loss_fn = loss_fn or task_loss  # masks: their unlabelled pixels skipped, as in training
    dense = getattr(data, "task", None) == "segmentation"
    if dense:  # whole images of any size (HeLa is 700x1100): few at a time, padded as evaluation pads them
        batch_size = min(batch_size, 4)
    device = next(model.parameters()).device
    params = [p for p in model.parameters()]
    saved = [(p.requires_grad, p.grad) for p in params]
    total = [torch.zeros(g.size) for g in graph.groups]
    seen = 0
    with in_mode(model, training=False):  # BN statistics stay as trained; gradients still flow
        try:
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            for x, y in islice(iter(_batches(data, batch_size)), n_batches):
                model.zero_grad(set_to_none=True)
                out = predict_padded(model, x.to(device)) if dense else main_output(model(x.to(device)))
                loss_fn(out, y.to(device)).backward()
                scores = per_channel_sum(model, graph, lambda m, n, w: None if w.grad is None else w * w.grad)
                for t, s in zip(total, scores):
                    t += s.square()
                seen += 1
        finally:
            for p, (rg, g) in zip(params, saved):
                p.requires_grad_(rg)
                p.grad = g
    if seen == 0:
        raise ValueError("criterion 'taylor': `data` yielded no batches")
    return [t / seen for t in total]


taylor.needs_data = True


def group_scores(model: nn.Module, graph: DependencyGraph, criterion: str | Callable = "l2", data: Any = None,
                 **kwargs: Any) -> list[torch.Tensor]:
    """Scores of every channel of every group of ``graph`` by ``criterion`` (a name or a callable)."""
    fn = get_criterion(criterion)
    if getattr(fn, "needs_data", False):
        kwargs["data"] = data
    scores = fn(model, graph, **kwargs)
    if len(scores) != len(graph.groups) or any(len(s) != g.size for s, g in zip(scores, graph.groups)):
        raise ValueError(f"criterion {criterion!r} must return one score per channel of every group")
    return [torch.as_tensor(s, dtype=torch.float32).flatten() for s in scores]


@register_criterion("vip")
def vip_filters(model: nn.Module, graph: DependencyGraph, data: Any = None, per_class: int = 50,
                n_components: int = 2) -> list[torch.Tensor]:
    """PLS-VIP of every filter (Jordao et al. 2020, the cascade's filter step): each producing
    conv's output is max-pooled to one feature per filter, one PLS over all filters on one-hot
    labels, and a channel scores the largest VIP among the filters that produce it. VIPs come from
    one joint fit, so they compare across layers as they are."""
    if data is None:
        raise ValueError("criterion 'vip' needs data: pass `data` (a labelled dataset or (x, y) batches)")
    modules = dict(model.named_modules())
    where: dict[str, list[tuple[int, torch.Tensor]]] = {}  # producer -> (group, channel per output position)
    comp_group = torch.full((graph.n_components,), -1, dtype=torch.long)
    comp_chan = torch.zeros(graph.n_components, dtype=torch.long)
    for g in graph.groups:
        comp_group[g.components] = g.index
        comp_chan[g.components] = torch.arange(g.size)
    for i, b in enumerate(graph.bindings):
        m = modules.get(b.module)
        if (b.kind == "tensor" and b.role == "out" and b.name == "weight" and b.axis == 0
                and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))):
            where.setdefault(b.module, []).append(i)
    if not where:
        raise ValueError("criterion 'vip': no prunable conv/linear filters found")
    names = list(where)
    feats, y = block_features(model, names, data, per_class=per_class, pool="max")
    v = torch.from_numpy(vip(np.concatenate([feats[n] for n in names], axis=1), y, n_components)).float()
    offsets = torch.tensor([0] + [g.size for g in graph.groups]).cumsum(0)
    flat = torch.zeros(int(offsets[-1]))
    start = 0
    for n in names:
        width = feats[n].shape[1]
        for bi in where[n]:
            lab = graph.binding_labels[bi][:width]
            gi = comp_group[lab]
            ok = gi >= 0
            slot = offsets[gi[ok]] + comp_chan[lab][ok]
            flat.scatter_reduce_(0, slot, v[start:start + len(lab)][ok], reduce="amax")
        start += width
    return list(flat.split([g.size for g in graph.groups]))


vip_filters.needs_data = True
