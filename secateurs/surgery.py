"""Physical removal of channels: the only code that changes a model's tensors and layer sizes.

A :class:`PruningPlan` says which channels of which groups go. :func:`apply_plan` checks the whole
plan against the model first and only then replaces tensors, so an invalid plan leaves the model
exactly as it was.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from .compensate import compensation, has_candidates
from .cost import count
from .graph import ChannelGroup, DependencyGraph
from ._layout import channels_last_only
from ._threads import one_thread
from ._validation import PruningError, check_model

__all__ = ["PruningPlan", "apply_plan", "zero_channels", "cut_inputs"]


@dataclass
class PruningPlan:
    """Channels to remove, per group index of one :class:`DependencyGraph`."""

    remove: dict[int, list[int]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"remove": {str(k): list(map(int, v)) for k, v in self.remove.items()}})

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        data = json.loads(text)
        return cls({int(k): list(v) for k, v in data["remove"].items()})

    @classmethod
    def coerce(cls, plan: "PruningPlan | Mapping[int, Iterable[int]]") -> "PruningPlan":
        if isinstance(plan, PruningPlan):
            return plan
        if isinstance(plan, Mapping):
            return cls({_group_index(k): _channels(k, v) for k, v in plan.items()})
        raise TypeError(f"`plan` must be a PruningPlan or a dict {{group index: channel indices}}, got {type(plan).__name__}")


def _group_index(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, str)) or (isinstance(k, str) and not k.strip().isdigit()):
        raise TypeError(f"`plan` keys must be group indices (ints), got {type(k).__name__} {k!r}")
    return int(k)


def _channels(k: object, v: object) -> list[int]:
    """Channel indices as ints: integers (Python or tensor), never floats or bools."""
    if isinstance(v, torch.Tensor):
        if v.is_floating_point() or v.dtype == torch.bool:
            raise PruningError(f"`plan` group {k}: channel indices must be integers, got a {v.dtype} tensor")
        return v.flatten().tolist()
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Iterable):
        raise TypeError(f"`plan` group {k}: channel indices must be a list of ints, got {type(v).__name__} {v!r}")
    out = list(v)
    bad = [c for c in out if isinstance(c, bool) or not isinstance(c, (numbers.Integral, torch.Tensor))
           or (isinstance(c, torch.Tensor) and (c.numel() != 1 or c.is_floating_point()))]
    if bad:
        raise PruningError(f"`plan` group {k}: channel indices must be integers, got {bad[:5]!r}")
    return [int(c) for c in out]


def _removed_components(graph: DependencyGraph, plan: PruningPlan) -> tuple[torch.Tensor, set[int]]:
    """The components a plan removes and the bindings it touches; a bad plan raises, naming the group."""
    fast = _removed_at_once(graph, plan)
    return fast if fast is not None else _removed_per_group(graph, plan)


def _removed_at_once(graph: DependencyGraph, plan: PruningPlan) -> tuple[torch.Tensor, set[int]] | None:
    """The same for a plan of Python ints that passes every check, in a few ops over all groups at
    once (an allocator's plan); None for anything else, which the per-group loop checks and names."""
    n = len(graph.groups)
    if not all(type(gi) is int and 0 <= gi < n and type(idx) is list and all(type(c) is int for c in idx)
               for gi, idx in plan.remove.items()):
        return None
    items = [(gi, idx) for gi, idx in plan.remove.items() if idx]
    removed = torch.zeros(graph.n_components, dtype=torch.bool)
    if not items:
        return removed, set()
    groups = [graph.groups[gi] for gi, _ in items]
    sizes = torch.tensor([g.size for g in groups])
    seg = torch.repeat_interleave(torch.arange(len(items)), torch.tensor([len(idx) for _, idx in items]))
    flat = torch.tensor([c for _, idx in items for c in idx], dtype=torch.long)
    if bool(((flat < 0) | (flat >= sizes[seg])).any()):
        return None
    width = int(sizes.max())
    distinct = torch.bincount(torch.unique(seg * width + flat) // width, minlength=len(items))
    if bool((distinct >= sizes).any()):  # a group would lose every channel
        return None
    removed[torch.cat([g.components for g in groups])[(torch.cumsum(sizes, 0) - sizes)[seg] + flat]] = True
    touched: set[int] = set()
    for g in groups:
        touched.update(g.binding_ids)
    return removed, touched


def _removed_per_group(graph: DependencyGraph, plan: PruningPlan) -> tuple[torch.Tensor, set[int]]:
    removed = torch.zeros(graph.n_components, dtype=torch.bool)
    touched: set[int] = set()
    for gi, idx in plan.remove.items():
        if not 0 <= gi < len(graph.groups):
            raise PruningError(f"plan names group {gi}, but the graph has groups 0..{len(graph.groups) - 1}")
        group = graph.groups[gi]
        try:
            t = torch.as_tensor(list(idx), dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as err:
            raise PruningError(f"group {gi} ({group.name}): channel indices must be integers, got {idx!r}") from err
        if t.numel() == 0:
            continue
        bad = t[(t < 0) | (t >= group.size)]
        if bad.numel():
            raise PruningError(f"group {gi} ({group.name}) has channels 0..{group.size - 1}; plan asks for {bad.tolist()}")
        if torch.unique(t).numel() >= group.size:
            raise PruningError(f"group {gi} ({group.name}): the plan removes all {group.size} channels; keep at least one")
        removed[group.components[t]] = True
        touched.update(group.binding_ids)
    return removed, touched


def apply_plan(model: nn.Module, graph: DependencyGraph, plan: PruningPlan | Mapping[int, Iterable[int]],
               check: bool = True, compensate: bool = True) -> nn.Module:
    """Remove the planned channels from ``model`` in place and return it.

    Raises :class:`PruningError` (model untouched) for unknown groups or channels, a plan that
    empties a group, or a model whose shapes no longer match ``graph`` (analyse again after
    every cut). With ``check`` (the default) the cut model runs once on the analysed inputs (on
    meta tensors when it can): if it no longer runs, the cut is undone and the error says so.
    With ``compensate`` (the default) removed channels that carried a constant (norm scale ~0,
    shift not) have it folded into the next layer's bias (:mod:`secateurs.compensate`).
    """
    check_model(model)
    if not isinstance(graph, DependencyGraph):
        raise TypeError(f"`graph` must be the DependencyGraph of secateurs.analyze(model, ...), got {type(graph).__name__}")
    plan = PruningPlan.coerce(plan)
    undo = _cut(model, graph, plan, compensate)
    if undo is not None and check and graph.example_inputs:
        try:
            count(model, graph.example_inputs)  # the report's count right after reuses this one
        except PruningError as err:
            undo()
            raise PruningError(f"the cut model no longer runs, so the cut was undone (the model is as it was): {err}. "
                               "Please report this model: a rule let through a coupling it should have kept.") from err
    return model


@one_thread()
def _cut(model: nn.Module, graph: DependencyGraph, plan: PruningPlan, compensate: bool = True
         ) -> Callable[[], None] | None:
    """Check the plan against the model, then swap in the cut tensors and sizes; returns the undo
    (None when the plan removes nothing). Copies and integer bookkeeping only: one thread."""
    removed, touched = _removed_components(graph, plan)
    if not touched:
        return None
    modules = dict(model.named_modules())
    bids = sorted(touched)
    n_gone, kept, parts = _kept(graph, bids, removed)
    keeps: dict[tuple[str, str], dict[int, list]] = {}
    attrs: list[tuple[nn.Module, str, int | None, int, str]] = []
    shared = None
    for bi, part, idx, n_rm in zip(bids, parts, kept, n_gone):
        b = graph.bindings[bi]
        if b.module not in modules:
            raise PruningError(f"module '{b.module}' is gone from the model; analyse it again")
        if b.kind == "attr":
            n = part.shape[0] - n_rm
            if n % b.divisor:
                raise PruningError(f"module '{b.module}': {b.name} would become {n}/{b.divisor}, not an integer")
            shared = _sharing(model) if shared is None else shared
            for m in (modules[b.module], *shared.get(b.module, ())):  # a tied weight's other owners too
                attrs.append((m, b.name, b.axis, n // b.divisor, b.module))
        elif n_rm:
            keeps.setdefault((b.module, b.name), {}).setdefault(b.axis, []).append((part, idx))
    folded = _compensation(model, graph, modules, bids, parts) if compensate else {}
    new_tensors = []
    for (mname, tname), axes in keeps.items():
        m = modules[mname]
        t = getattr(m, tname, None)
        if not isinstance(t, torch.Tensor):
            raise PruningError(f"module '{mname}' has no tensor '{tname}'; analyse the model again")
        expected = graph._shapes.get(f"{mname}.{tname}" if mname else tname)
        if expected is not None and tuple(t.shape) != expected:
            raise PruningError(f"'{mname}.{tname}' has shape {tuple(t.shape)} but was {expected} when analysed; "
                               "analyse the model again after every cut")
        index = {axis: _axis_kept(entries) for axis, entries in axes.items()}
        for axis, idx in index.items():
            if not idx.numel():
                raise PruningError(f"module '{mname}': {tname} would lose every slice along axis {axis}")
        new_tensors.append((m, tname, _select(folded.pop((mname, tname), t).detach(), index)))
    new_tensors += [(modules[mname], tname, t) for (mname, tname), t in folded.items()]  # not cut, only shifted
    return _commit(new_tensors, attrs)


def _sharing(model: nn.Module) -> dict[str, list[nn.Module]]:
    """{module name: the other modules of its class holding one of its parameters} (a tied weight:
    the graph binds sizes such as ``out_channels`` to one owner, and every owner must say the same)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, m))
    out: dict[str, dict[int, nn.Module]] = {}  # keyed by id: two shared parameters name one owner once
    for group in owners.values():
        for name, m in group:
            for _, other in group:
                if other is not m and type(other) is type(m):
                    out.setdefault(name, {})[id(other)] = other
    return {name: list(others.values()) for name, others in out.items()}


def _compensation(model: nn.Module, graph: DependencyGraph, modules: dict, bids: list[int], parts: tuple) -> dict:
    """The biases / running means that absorb the constants of removed channels (nothing is changed
    here), measured only when some removed channel has a near-zero norm scale."""
    outs, readers = _outs_and_readers(graph, bids, parts)
    readers = {n: gone for n, (axis, gone) in readers.items() if axis == 1}  # a transposed conv's axis 0: no fold
    if not readers or not graph.example_inputs or not has_candidates(modules, outs):
        return {}
    return compensation(model, graph.example_inputs, readers)


def cut_inputs(graph: DependencyGraph, plan: PruningPlan | Mapping[int, Iterable[int]]
               ) -> tuple[list, dict[str, tuple[int, torch.Tensor]]]:
    """What a cut removes: the producers ((module, tensor, removed mask)) and, for every layer whose
    weight reads a removed channel, {module: (that weight axis, removed mask over it)} (what
    :mod:`secateurs.reconstruct` re-fits before the cut)."""
    removed, touched = _removed_components(graph, PruningPlan.coerce(plan))
    if not touched:
        return [], {}
    bids = sorted(touched)
    return _outs_and_readers(graph, bids, _kept(graph, bids, removed)[2])


def _outs_and_readers(graph: DependencyGraph, bids: list[int], parts: tuple
                      ) -> tuple[list, dict[str, tuple[int, torch.Tensor]]]:
    outs, readers = [], {}
    for bi, part in zip(bids, parts):
        b = graph.bindings[bi]
        if b.kind != "tensor" or not part.any():
            continue
        if b.role == "out":
            outs.append((b.module, b.name, part))
        elif b.name == "weight":
            prev = readers.get(b.module)
            readers[b.module] = (b.axis, part if prev is None or len(prev[1]) != len(part) else prev[1] | part)
    return outs, readers


def _same_layout(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` stored like ``old``: a channels-last model stays channels-last (a half-converted one
    runs every layer through layout conversions, and its latency is neither layout's)."""
    if channels_last_only(old):
        return new.contiguous(memory_format=torch.channels_last)
    return new.contiguous()


def _commit(new_tensors: list, attrs: list) -> Callable[[], None]:
    """Swap in the new tensors and sizes (nothing here can fail); returns the undo."""
    old_tensors, old_attrs = [], []
    with torch.no_grad():
        for m, tname, new in new_tensors:
            if tname in m._parameters:
                p = m._parameters[tname]
                old_tensors.append((m, tname, p.data, p.grad))
                p.data = _same_layout(new, p.data)
                p.grad = None
            else:
                old_tensors.append((m, tname, m._buffers[tname], None))
                m._buffers[tname] = _same_layout(new, m._buffers[tname])
        for m, name, axis, value, _ in attrs:
            old_attrs.append((m, name, getattr(m, name)))
            if axis is None:
                setattr(m, name, value)
            else:
                cur = list(getattr(m, name))
                cur[axis] = value
                setattr(m, name, tuple(cur))

    def undo() -> None:
        with torch.no_grad():
            for m, tname, data, grad in old_tensors:
                if tname in m._parameters:
                    m._parameters[tname].data = data
                    m._parameters[tname].grad = grad
                else:
                    m._buffers[tname] = data
            for m, name, value in reversed(old_attrs):
                setattr(m, name, value)

    return undo


def _kept(graph: DependencyGraph, bids: list[int], removed: torch.Tensor) -> tuple[list[int], tuple, tuple]:
    """For every touched binding, in one pass: how many positions go, the indices that stay, and
    the removed mask. Bindings that share their labels (a conv's weight and bias, a BN's four
    tensors) share one result."""
    first: dict[int, int] = {}
    labs: list[torch.Tensor] = []
    which = []
    for bi in bids:
        lab = graph.binding_labels[bi]
        j = first.setdefault(id(lab), len(labs))
        if j == len(labs):
            labs.append(lab)
        which.append(j)
    lens = torch.tensor([lab.shape[0] for lab in labs])
    gone = removed[torch.cat(labs)]  # one lookup for every distinct labels tensor
    cum = torch.cat([torch.zeros(1, dtype=torch.long), gone.long().cumsum(0)])
    ends = lens.cumsum(0)
    n_gone = cum[ends] - cum[ends - lens]
    n_kept = lens - n_gone
    kept = (~gone).nonzero().flatten()
    kept -= (ends - lens).repeat_interleave(n_kept)  # positions within each binding
    n_gone, kept, gone = n_gone.tolist(), kept.split(n_kept.tolist()), gone.split(lens.tolist())
    return [n_gone[j] for j in which], tuple(kept[j] for j in which), tuple(gone[j] for j in which)


def _axis_kept(entries: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Indices kept along one axis: its binding's, or those no binding on it removes."""
    if len(entries) == 1:
        return entries[0][1]
    keep = ~entries[0][0]
    for part, _ in entries[1:]:
        keep &= ~part
    return keep.nonzero().flatten()


def _select(t: torch.Tensor, axes: dict[int, torch.Tensor]) -> torch.Tensor:
    """Keep the given indices along each axis (one index_select per axis, the first axis first:
    three times faster than one advanced-indexing gather on a conv weight)."""
    for axis in sorted(axes):
        t = t.index_select(axis, axes[axis].to(t.device))
    return t


def zero_channels(model: nn.Module, graph: DependencyGraph, group: ChannelGroup | int, channels: Iterable[int]) -> None:
    """Zero every producer slice of the given channels, so that they carry exact zeros.

    Used to check surgery: removing channels that were zeroed this way must not change the
    outputs (for groups whose ``exact`` flag is set).
    """
    g = graph.groups[group] if isinstance(group, int) else group
    comps = g.components[torch.as_tensor(list(channels), dtype=torch.long)]
    removed = torch.zeros(graph.n_components, dtype=torch.bool)
    removed[comps] = True
    modules = dict(model.named_modules())
    with torch.no_grad():
        for bi in g.binding_ids:
            b = graph.bindings[bi]
            if b.kind != "tensor" or b.role != "out":
                continue
            t = getattr(modules[b.module], b.name)
            if b.name in ("running_mean", "running_var") or not t.is_floating_point():
                continue
            pos = removed[graph.binding_labels[bi]].nonzero().flatten()
            t.index_fill_(b.axis, pos.to(t.device), 0.0)
