"""Find the channel groups: the sets of tensor slices that must shrink together.

The analysis never changes the model. :mod:`secateurs.capture` runs the model's own forward once
(on meta tensors when it can: shapes without arithmetic) and propagates integer channel ids through
every operation (rules in :mod:`secateurs._ops` and :mod:`secateurs._layers`); this module unites the
ids that are coupled and groups the resulting components by the parameters they touch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ._ids import Binding, Context
from ._stateless import named_tensors
from ._validation import PruningError, check_example_inputs, check_model
from .capture import capture, one_thread
from .cost import Cost, count, remember

__all__ = ["ChannelGroup", "DependencyGraph", "analyze", "analyze_and_count"]



@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together, wherever they appear.

    Attributes
    ----------
    index : int
        Position in :attr:`DependencyGraph.groups`; the key used by pruning plans.
    size : int
        Number of channels. Removing channel ``i`` removes every slice listed in ``members``
        that belongs to it (several slices per member for grouped convs, flatten, concat...).
    name : str
        The first module that produces these channels, for messages and reports.
    members : tuple of (module, tensor, axis, role)
        Every parameter/buffer axis that shrinks; ``role`` is ``"out"`` for producers.
    exact : bool
        False when removing a channel changes other channels' values even if it was zero
        (normalisation over channels, softmax or mean across channels).
    """

    index: int
    size: int
    name: str
    members: tuple[tuple[str, str, int, str], ...]
    exact: bool
    components: torch.Tensor = field(repr=False, compare=False)
    binding_ids: tuple[int, ...] = field(repr=False, compare=False)

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(m for m, *_ in self.members))


class DependencyGraph:
    """Result of :func:`analyze`: channel groups plus what surgery needs to cut them.

    It describes the model as it was when analysed; once channels are removed, analyse again.
    """

    def __init__(self, groups, bindings, labels, n_components, warnings_, leaves, shapes) -> None:
        self.groups: list[ChannelGroup] = groups
        self.bindings: list[Binding] = bindings
        self.binding_labels: list[torch.Tensor] = labels
        self.n_components = n_components
        self.warnings: list[str] = warnings_
        self.opaque_modules: list[str] = leaves  # kept for compatibility: the capture has none
        self.capture_mode = ""  # which pass captured the model, e.g. "train/meta"
        self.example_inputs: tuple = ()  # what surgery runs once to check the cut model
        self._shapes = shapes

    def __repr__(self) -> str:
        n = sum(g.size for g in self.groups)
        return f"DependencyGraph({len(self.groups)} prunable groups, {n} channels, {len(self.warnings)} warnings)"

    def groups_of(self, module: str | nn.Module, model: nn.Module | None = None) -> list[ChannelGroup]:
        """Groups whose channels are produced by ``module`` (a qualified name)."""
        if isinstance(module, nn.Module):
            if model is None:
                raise TypeError("pass `model` to look a module up by object")
            module = _module_name(model, module)
        return [g for g in self.groups if any(m == module and r == "out" for m, _, _, r in g.members)]

    def describe(self) -> str:
        lines = [f"{'group':>5}  {'size':>5}  exact  name (modules)"]
        for g in self.groups:
            mods = g.modules
            more = f" +{len(mods) - 3}" if len(mods) > 3 else ""
            lines.append(f"{g.index:>5}  {g.size:>5}  {'yes' if g.exact else 'no ':>5}  {g.name} ({', '.join(mods[:3])}{more})")
        return "\n".join(lines)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise PruningError(f"module {type(module).__name__} is not part of the model")


# -- grouping --------------------------------------------------------------------------------------
def _components(ctx: Context) -> tuple[int, torch.Tensor]:
    n = ctx.next_id
    if ctx.edges:
        a = torch.cat([e[0] for e in ctx.edges]).numpy()
        b = torch.cat([e[1] for e in ctx.edges]).numpy()
    else:
        a = b = np.zeros(0, dtype=np.int64)
    adj = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    ncomp, labels = connected_components(adj, directed=False)
    return ncomp, torch.from_numpy(labels.astype(np.int64))


def _resolve_elementwise(b: Binding, lab: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """A parameter used directly in the graph is prunable along one axis if its components
    depend on that axis alone."""
    for k in range(lab.dim()):
        if lab.shape[k] <= 1:
            continue
        idx = [0] * lab.dim()
        idx[k] = slice(None)
        line = lab[tuple(idx)]
        shape = [1] * lab.dim()
        shape[k] = -1
        if bool((lab == line.view(shape)).all()):
            return k, b.ids[tuple(idx)]
    return None


def _unique_keys(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """Sorted distinct values of ``keys`` in [0, bound): a bitmap when small, else a sort."""
    if bound <= 1 << 24:
        seen = torch.zeros(bound, dtype=torch.bool)
        seen[keys] = True
        return seen.nonzero().flatten()
    return torch.unique(keys)


def _bindings(ctx: Context, labels: torch.Tensor, frozen: torch.Tensor) -> list[Binding]:
    """Every binding with its axis known: parameters used elementwise get the one axis their
    channels depend on, or freeze them."""
    bindings: list[Binding] = []
    for b in ctx.bindings:
        if b.kind == "elementwise":
            res = _resolve_elementwise(b, labels[b.ids])
            if res is None:
                frozen[labels[b.ids].reshape(-1)] = True
                continue
            b = Binding(b.module, b.name, res[0], res[1])
        bindings.append(b)
    return bindings


def _labels_of(bindings: list[Binding], labels: torch.Tensor) -> tuple[list[torch.Tensor], list[int], torch.Tensor, list[int]]:
    """Component labels of every binding, looked up once per distinct ids tensor ("source": a conv's
    weight, bias, BN statistics and size attributes share one) in one gather.

    Returns the labels per binding, each binding's source, and every source's labels end to end
    (in order of first use) with their lengths."""
    src_of_obj: dict[int, int] = {}
    sources: list[torch.Tensor] = []
    src_of = []
    for b in bindings:
        si = src_of_obj.setdefault(id(b.ids), len(sources))
        if si == len(sources):
            sources.append(b.ids)
        src_of.append(si)
    lens = [t.shape[0] for t in sources]
    if any(t.dim() != 1 for t in sources):  # not produced by the rules; kept general all the same
        src_lab = [labels[t] for t in sources]
        flat = torch.cat([lab.reshape(-1) for lab in src_lab]) if src_lab else torch.zeros(0, dtype=torch.long)
    else:
        flat = labels[torch.cat(sources)] if sources else torch.zeros(0, dtype=torch.long)
        src_lab = list(flat.split(lens))
    return [src_lab[si] for si in src_of], src_of, flat, lens


def _group(ctx: Context, shapes: dict) -> DependencyGraph:
    ncomp, labels = _components(ctx)
    frozen = torch.zeros(ncomp, dtype=torch.bool)
    frozen[labels[torch.cat(ctx.frozen)]] = True
    inexact = torch.zeros(ncomp, dtype=torch.bool)
    if ctx.inexact:
        inexact[labels[torch.cat(ctx.inexact)]] = True
    bindings = _bindings(ctx, labels, frozen)
    # many bindings share one ids tensor (a conv's outputs: weight, bias, BN stats, attributes);
    # work per distinct ids tensor ("source") and map back to bindings at the end
    blabels, src_of, comp_all, src_lens = _labels_of(bindings, labels)

    tensor_idx = [i for i, b in enumerate(bindings) if b.kind == "tensor"]
    if not tensor_idx:
        return DependencyGraph([], bindings, blabels, ncomp, ctx.warnings, [], shapes)
    ns = len(src_lens)
    is_tensor = [False] * ns
    src_first = [len(bindings)] * ns  # first tensor binding of each source, in graph order
    for i, (b, si) in enumerate(zip(bindings, src_of)):
        if b.kind == "tensor":
            is_tensor[si] = True
            src_first[si] = min(src_first[si], i)
    src_tensor = torch.tensor(is_tensor, dtype=torch.bool)
    lens = torch.tensor(src_lens)
    sid_all = torch.repeat_interleave(torch.arange(ns), lens)
    pos_all = torch.arange(len(comp_all)) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    gen = torch.Generator().manual_seed(0)
    salt = torch.randint(-(2**62), 2**62, (ns,), generator=gen) * src_tensor  # attributes follow, they do not define
    # a component's signature sums the salts of every position it holds: components with equal
    # signatures touch the same tensors (the same number of times) and form one group
    sig = torch.zeros(ncomp, dtype=torch.long).index_add_(0, comp_all, salt[sid_all])
    never = torch.iinfo(torch.long).max  # first tensor position of each component; never: untouched
    order_key = torch.where(src_tensor[sid_all], (torch.tensor(src_first) * (1 << 32))[sid_all] + pos_all, never)
    first = torch.full((ncomp,), never).scatter_reduce_(0, comp_all, order_key, reduce="amin")
    touched = first < never

    prunable = (touched & ~frozen).nonzero().flatten()
    # a group of one channel can never lose it: not a prunable group
    _, sig_inv, sig_counts = torch.unique(sig[prunable], return_inverse=True, return_counts=True)
    prunable = prunable[sig_counts[sig_inv] > 1]
    ordered = prunable[torch.argsort(first[prunable])]
    _, inv = torch.unique(sig[ordered], return_inverse=True)
    # number groups by first appearance in the graph
    first_pos = torch.full((int(inv.max()) + 1 if len(inv) else 0,), len(inv)).scatter_reduce_(
        0, inv, torch.arange(len(inv)), reduce="amin")
    rank = torch.empty_like(first_pos)
    rank[torch.argsort(first_pos)] = torch.arange(len(first_pos))
    gid = rank[inv]
    perm = torch.argsort(gid, stable=True)
    comps_sorted, gid_sorted = ordered[perm], gid[perm]
    counts = torch.bincount(gid_sorted, minlength=len(first_pos))
    starts = torch.cumsum(counts, 0) - counts
    comp_group = torch.full((ncomp,), -1)
    comp_group[comps_sorted] = gid_sorted

    g_all = comp_group[comp_all]
    outside = len(first_pos) * ns  # the key of positions in no group, dropped below
    pairs = _unique_keys(torch.where(g_all >= 0, g_all * ns + sid_all, outside), outside + 1).tolist()
    pairs = pairs[:-1] if pairs and pairs[-1] == outside else pairs
    bindings_of_src: dict[int, list[int]] = {}
    for i, si in enumerate(src_of):
        bindings_of_src.setdefault(si, []).append(i)
    members_of: dict[int, list[int]] = {}
    attr_of: dict[int, list[int]] = {}
    for p in pairs:
        g, si = divmod(p, ns)
        for bi in bindings_of_src[si]:
            (members_of if bindings[bi].kind == "tensor" else attr_of).setdefault(g, []).append(bi)

    bounds = (starts + counts).tolist()
    groups = [_make_group(g, comps_sorted[start: bounds[g]], bindings, members_of.get(g, []),
                          attr_of.get(g, []), inexact) for g, start in enumerate(starts.tolist())]
    return DependencyGraph(groups, bindings, blabels, ncomp, ctx.warnings, [], shapes)


def _make_group(g: int, comps: torch.Tensor, bindings: list[Binding], member_ids: list[int], attr_ids: list[int],
                inexact: torch.Tensor) -> ChannelGroup:
    bids = sorted(member_ids)
    members = tuple((bindings[i].module, bindings[i].name, bindings[i].axis, bindings[i].role) for i in bids)
    outs = [m for m in members if m[3] == "out"] or list(members)
    return ChannelGroup(index=g, size=comps.shape[0], name=outs[0][0], members=members,
                        exact=not bool(inexact[comps].any()), components=comps,
                        binding_ids=tuple(bids + sorted(attr_ids)))


# -- front door ------------------------------------------------------------------------------------
def _names(model: nn.Module, items: Iterable[str | nn.Module] | None, what: str) -> list[str]:
    names: list[str] = []
    if not items:
        return names
    known = dict(model.named_modules())
    if isinstance(items, (str, nn.Module)):  # one name, not its characters
        items = [items]
    elif items is not None and not isinstance(items, Iterable):
        raise TypeError(f"`{what}` takes a list of modules or qualified names, got {type(items).__name__} {items!r}")
    for it in items or ():
        if isinstance(it, nn.Module):
            names.append(_module_name(model, it))
        elif isinstance(it, str):
            if it not in known:
                raise PruningError(f"`{what}` names module '{it}', which is not in {type(model).__name__}")
            names.append(it)
        else:
            raise TypeError(f"`{what}` takes modules or qualified names, got {type(it).__name__}")
    return names


def analyze(model: nn.Module, example_inputs: Any, ignore: Iterable[str | nn.Module] | None = None) -> DependencyGraph:
    """Find every group of channels that can be removed from ``model`` without breaking it.

    Parameters
    ----------
    model : nn.Module
        Left exactly as it is (modes, parameters, buffers, attributes).
    example_inputs : Tensor or tuple of Tensor
        One forward's positional inputs; shapes matter, values only where the model's Python
        branches on them. Control flow is specialised on this input.
    ignore : iterable of module or str, optional
        Modules whose *outputs* must keep their size (their inputs may still shrink). The
        model's own outputs always keep theirs.

    Returns
    -------
    DependencyGraph
    """
    result, ctx = _analyze(model, example_inputs, ignore)
    for w in ctx.warnings:
        warnings.warn(w, stacklevel=2)
    return result


def analyze_and_count(model: nn.Module, example_inputs: Any,
                      ignore: Iterable[str | nn.Module] | None = None) -> tuple[DependencyGraph, Cost]:
    """``(analyze(model, x, ignore), count(model, x))``, from one run of the model when its training
    forward calls the eval forward's layers (``capture(count=True)``), else from two."""
    result, ctx = _analyze(model, example_inputs, ignore, counted=True)
    for w in ctx.warnings:
        warnings.warn(w, stacklevel=2)
    if ctx.eval_costs is None:
        return result, count(model, example_inputs)
    return result, remember(model, result.example_inputs, ctx.eval_costs)


def _analyze(model: nn.Module, example_inputs: Any, ignore: Iterable[str | nn.Module] | None,
             counted: bool = False) -> tuple[DependencyGraph, Context]:
    check_model(model)
    inputs = check_example_inputs(example_inputs)
    ignored = _names(model, ignore, "ignore")
    shapes = {name: tuple(t.shape) for name, t in named_tensors(model).items()}
    ctx, how = capture(model, inputs, set(ignored), count=counted)
    with one_thread():
        result = _group(ctx, shapes)
    result.capture_mode = how
    result.example_inputs = inputs
    return result, ctx
