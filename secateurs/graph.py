"""Trace a model once and find the channel groups: the sets of tensor slices that must shrink together.

The analysis never changes the model. It traces with :mod:`torch.fx` (modules whose code cannot be
traced become opaque leaves, their channels kept), runs the graph once on *meta* tensors (shapes
without arithmetic, so analysis costs milliseconds even for large inputs), propagates integer channel
ids through every node (see :mod:`secateurs._ops`), unites the ids that are coupled, and groups the
resulting components by the parameters they touch.
"""
from __future__ import annotations

import itertools
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch.fx.node import Node, map_aggregate

from . import _layers, _ops
from ._ops import Binding, Context
from ._validation import PruningError

__all__ = ["ChannelGroup", "DependencyGraph", "analyze"]

_MAX_LEAF_RETRIES = 32
_MAX_ELEMENTWISE = 1 << 18  # larger multi-axis tensors used directly in the graph are kept whole


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
        self.opaque_modules: list[str] = leaves
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


# -- tracing ---------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.stack: list[str] = []
        self.failed_in: str | None = None
        self._names: dict[int, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves or _layers.handler_for(m) is not None:
            return True
        if any(cls in _layers.MODULES for cls in type(m).__mro__):
            return False  # a subclass with its own forward: look inside
        return super().is_leaf_module(m, qualname)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # fx scans all named parameters on every access; a dict built once is O(1)
        if isinstance(attr_val, torch.Tensor):
            if self._names is None:
                self._names = {id(t): n for n, t in itertools.chain(self.root.named_parameters(), self.root.named_buffers())}
            n = self._names.get(id(attr_val))
            if n is not None:
                if n not in parameter_proxy_cache:
                    parameter_proxy_cache[n] = self.create_proxy("get_attr", n, (), {})
                return parameter_proxy_cache[n]
        return attr_val

    def call_module(self, m, forward, args, kwargs):
        qual = self.path_of_module(m)
        self.stack.append(qual)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = qual
            raise
        finally:
            self.stack.pop()


def _trace(model: nn.Module) -> tuple[fx.Graph, list[str]]:
    """Trace in training mode (so training-only branches such as auxiliary heads are seen);
    modules that fx cannot trace become opaque leaves."""
    leaves: set[str] = set()
    modes = {m: m.training for m in model.modules()}
    try:
        model.train()
        for _ in range(_MAX_LEAF_RETRIES):
            tracer = _Tracer(leaves)
            try:
                return tracer.trace(model), sorted(leaves)
            except Exception as err:  # fx raises many types; we retry with the culprit opaque
                culprit = tracer.failed_in
                if culprit is None or culprit == "" or culprit in leaves:
                    raise PruningError(
                        f"torch.fx cannot trace {type(model).__name__}.forward itself: {type(err).__name__}: {err}. "
                        "Make the data-dependent part a submodule, or wrap it with torch.fx.wrap."
                    ) from err
                leaves.add(culprit)
        raise PruningError(f"gave up tracing {type(model).__name__}: too many untraceable submodules")
    finally:
        for m, t in modes.items():
            m.training = t


# -- propagation -----------------------------------------------------------------------------------
_SAME_SHAPE = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.PReLU) + _layers.ELEMENTWISE_MODULES
_DTYPE_METHODS = {"float", "half", "double", "bfloat16", "to", "type", "type_as"}
_COMPARISONS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_}


def _elementwise_meta(args, kwargs):
    """Output of an elementwise op on meta tensors without running its (slow) meta kernel."""
    tensors = [t for t in _ops._leaves((args, kwargs))]
    if not tensors:
        return None
    first = tensors[0]
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    if shape == first.shape:
        return first
    return torch.empty(shape, dtype=first.dtype, device="meta")


def _run_module(m: nn.Module, args, kwargs, meta: bool):
    if not meta:
        return m(*args, **kwargs)
    x = args[0] if args else None
    if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d) and _layers.handler_for(m) is not None:
        nd = len(m.kernel_size)
        if not isinstance(m.padding, str) and isinstance(x, torch.Tensor) and x.dim() == nd + 2 and x.shape[1] == m.in_channels:
            sp = [(x.shape[2 + i] + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1
                  for i in range(nd)]
            return torch.empty((x.shape[0], m.out_channels, *sp), dtype=x.dtype, device="meta")
        w = m.weight.to("meta")
        return m._conv_forward(x, w, None if m.bias is None else m.bias.to("meta"))
    if isinstance(m, nn.Linear) and _layers.handler_for(m) is not None:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == m.in_features:
            return torch.empty((*x.shape[:-1], m.out_features), dtype=x.dtype, device="meta")
        return torch.nn.functional.linear(x, m.weight.to("meta"), None if m.bias is None else m.bias.to("meta"))
    if isinstance(m, _SAME_SHAPE) and _layers.handler_for(m) is not None:
        return args[0]
    state = {k: v.to("meta") for k, v in itertools.chain(m.named_parameters(), m.named_buffers())}
    if not state:
        return m(*args, **kwargs)
    return torch.func.functional_call(m, state, args, kwargs)


def _fetch(model: nn.Module, target: str):
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _load(tree, env: dict, ids: dict):
    """Values and ids of a node's arguments (flat tuples of nodes and constants are the fast path)."""
    if type(tree) is tuple and all(type(a) is Node or type(a) in (int, float, bool, str, type(None)) for a in tree):
        return (tuple(env[a] if type(a) is Node else a for a in tree),
                tuple(ids[a] if type(a) is Node else None for a in tree))
    return (map_aggregate(tree, lambda a: env[a] if isinstance(a, Node) else a),
            map_aggregate(tree, lambda a: ids[a] if isinstance(a, Node) else None))


def _propagate(graph: fx.Graph, model: nn.Module, inputs: Sequence[Any], ctx: Context, meta: bool) -> None:
    modules = dict(model.named_modules())
    env: dict[Node, Any] = {}
    ids: dict[Node, Any] = {}
    last_use: dict[Node, Node] = {}
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            last_use[inp] = node
    users_done: dict[Node, list[Node]] = {}
    for n, u in last_use.items():
        users_done.setdefault(u, []).append(n)
    it = iter(inputs)
    for node in graph.nodes:
        args, aids = _load(node.args, env, ids)
        kwargs, kids = _load(node.kwargs, env, ids) if node.kwargs else ({}, {})
        op = node.op
        try:
            if op == "placeholder":
                try:
                    val = next(it)
                except StopIteration:
                    raise PruningError(f"example_inputs has too few tensors for input '{node.name}'") from None
                if meta and isinstance(val, torch.Tensor):
                    val = val.to("meta")
                out_ids = None
            elif op == "get_attr":
                val = _fetch(model, node.target)
                out_ids = _attr_ids(ctx, model, modules, node.target, val)
                if meta and isinstance(val, torch.Tensor):
                    val = val.to("meta")
            elif op == "call_function":
                h = _ops.FUNCTIONS.get(node.target)
                val = None
                if meta and h is _ops.elementwise and node.target not in _COMPARISONS:
                    val = _elementwise_meta(args, kwargs)
                if val is None:
                    val = node.target(*args, **kwargs)
                if isinstance(node.target, type) and issubclass(node.target, tuple):
                    out_ids = aids  # a namedtuple of outputs: ids mirror its fields
                elif h is _ops.f_layer_norm:
                    out_ids = h(ctx, node, args, kwargs, aids, kids, val, modules=modules)
                elif h is not None:
                    out_ids = h(ctx, node, args, kwargs, aids, kids, val)
                else:
                    out_ids = _ops._unknown(ctx, node, aids, kids)
            elif op == "call_method":
                h = _ops.METHODS.get(node.target)
                val = None
                if meta and h is _ops.elementwise and isinstance(args[0], torch.Tensor) and node.target not in _DTYPE_METHODS:
                    val = _elementwise_meta(args, kwargs)
                if val is None:
                    val = getattr(args[0], node.target)(*args[1:], **kwargs)
                out_ids = h(ctx, node, args, kwargs, aids, kids, val) if h else _ops._unknown(ctx, node, aids, kids)
            elif op == "call_module":
                m = modules[node.target]
                val = _run_module(m, args, kwargs, meta)
                h = _layers.handler_for(m)
                if h is None:
                    out_ids = _layers.unknown(ctx, node.target, m, args, _ops._leaves(aids) + _ops._leaves(kids), val)
                else:
                    out_ids = h(ctx, node.target, m, args, aids, val)
            else:  # output: the model's outputs never change shape
                ctx.freeze_all(aids)
                return
        except PruningError:
            raise
        except Exception as err:
            raise _NodeError(node, err) from err
        env[node] = val
        ids[node] = out_ids
        for done in users_done.get(node, ()):
            env.pop(done, None)


class _NodeError(Exception):
    def __init__(self, node: Node, err: Exception) -> None:
        super().__init__(f"node '{node.name}' ({node.op} {node.target}): {type(err).__name__}: {err}")
        self.node, self.err = node, err


def _attr_ids(ctx: Context, model: nn.Module, modules: dict, target: str, val: Any):
    if not isinstance(val, torch.Tensor) or val.numel() <= 1:
        return None
    if val.numel() > _MAX_ELEMENTWISE and sum(s > 1 for s in val.shape) > 1:
        return None  # a weight handed to a functional op: fixed size, coupled by its own rule
    path, _, name = target.rpartition(".")
    owner = modules.get(path)
    ids = ctx.fresh(val.numel()).view(val.shape)
    if owner is not None and (name in owner._parameters or name in owner._buffers):
        ctx.bind(path, name, None, ids, kind="elementwise")
    else:
        ctx.freeze(ids)  # a constant baked into the traced code: its size cannot change
    return _ops.compress(ids)


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


def _group(ctx: Context, shapes: dict) -> DependencyGraph:
    ncomp, labels = _components(ctx)
    frozen = torch.zeros(ncomp, dtype=torch.bool)
    frozen[labels[torch.cat(ctx.frozen)]] = True
    inexact = torch.zeros(ncomp, dtype=torch.bool)
    if ctx.inexact:
        inexact[labels[torch.cat(ctx.inexact)]] = True

    bindings: list[Binding] = []
    for b in ctx.bindings:
        if b.kind == "elementwise":
            res = _resolve_elementwise(b, labels[b.ids])
            if res is None:
                frozen[labels[b.ids].reshape(-1)] = True
                continue
            b = Binding(b.module, b.name, res[0], res[1])
        bindings.append(b)
    blabels = [labels[b.ids] for b in bindings]

    tensor_idx = [i for i, b in enumerate(bindings) if b.kind == "tensor"]
    if not tensor_idx:
        return DependencyGraph([], bindings, blabels, ncomp, ctx.warnings, [], shapes)
    # many bindings share one ids tensor (a conv's outputs: weight, bias, BN stats, attributes);
    # work per distinct ids tensor ("source") and map back to bindings at the end
    src_of_obj: dict[int, int] = {}
    src_of = []
    for b in bindings:
        src_of.append(src_of_obj.setdefault(id(b.ids), len(src_of_obj)))
    ns = len(src_of_obj)
    src_lab: list[torch.Tensor] = [None] * ns  # type: ignore[list-item]
    src_tensor = torch.zeros(ns, dtype=torch.bool)
    src_first = [len(bindings)] * ns  # first tensor binding of each source, in graph order
    for i, (b, si) in enumerate(zip(bindings, src_of)):
        src_lab[si] = blabels[i]
        if b.kind == "tensor":
            src_tensor[si] = True
            src_first[si] = min(src_first[si], i)
    lens = torch.tensor([len(lab) for lab in src_lab])
    comp_all = torch.cat(src_lab)
    sid_all = torch.repeat_interleave(torch.arange(ns), lens)
    pos_all = torch.arange(len(comp_all)) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    gen = torch.Generator().manual_seed(0)
    salt = torch.randint(-(2**62), 2**62, (ns,), generator=gen) * src_tensor  # attributes follow, they do not define
    # a component's signature sums the salts of every position it holds: components with equal
    # signatures touch the same tensors (the same number of times) and form one group
    sig = torch.zeros(ncomp, dtype=torch.long).index_add_(0, comp_all, salt[sid_all])
    touched = torch.zeros(ncomp, dtype=torch.bool)
    touched[comp_all[src_tensor[sid_all]]] = True
    tmask = src_tensor[sid_all]
    order_key = torch.tensor(src_first)[sid_all[tmask]] * (1 << 32) + pos_all[tmask]
    first = torch.full((ncomp,), torch.iinfo(torch.long).max).scatter_reduce_(
        0, comp_all[tmask], order_key, reduce="amin")

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
    keep = g_all >= 0
    pairs = _unique_keys(g_all[keep] * ns + sid_all[keep], len(first_pos) * ns).tolist()
    bindings_of_src: dict[int, list[int]] = {}
    for i, si in enumerate(src_of):
        bindings_of_src.setdefault(si, []).append(i)
    members_of: dict[int, list[int]] = {}
    attr_of: dict[int, list[int]] = {}
    for p in pairs:
        g, si = divmod(p, ns)
        for bi in bindings_of_src[si]:
            (members_of if bindings[bi].kind == "tensor" else attr_of).setdefault(g, []).append(bi)

    groups = []
    for g in range(len(first_pos)):
        comps = comps_sorted[starts[g]: starts[g] + counts[g]]
        bids = sorted(members_of.get(g, []))
        members = tuple((bindings[i].module, bindings[i].name, bindings[i].axis, bindings[i].role) for i in bids)
        outs = [m for m in members if m[3] == "out"] or list(members)
        groups.append(ChannelGroup(
            index=g, size=int(counts[g]), name=outs[0][0], members=members,
            exact=not bool(inexact[comps].any()), components=comps,
            binding_ids=tuple(bids + sorted(attr_of.get(g, []))),
        ))
    return DependencyGraph(groups, bindings, blabels, ncomp, ctx.warnings, [], shapes)


# -- front door ------------------------------------------------------------------------------------
def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TypeError(f"`example_inputs` must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _names(model: nn.Module, items: Iterable[str | nn.Module] | None, what: str) -> list[str]:
    names = []
    known = dict(model.named_modules())
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
        Left exactly as it is (modes, parameters, gradients).
    example_inputs : Tensor or tuple of Tensor
        One forward's positional inputs; shapes matter, values do not.
    ignore : iterable of module or str, optional
        Modules whose *outputs* must keep their size (their inputs may still shrink). The
        model's own outputs always keep theirs.

    Returns
    -------
    DependencyGraph
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    ignored = _names(model, ignore, "ignore")
    graph, leaves = _trace(model)
    shapes = {name: (tuple(t.shape)) for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    modes = {m: m.training for m in model.modules()}
    ctx = None
    try:
        model.eval()
        with torch.no_grad():
            for meta in (True, False):
                ctx = Context()
                try:
                    _propagate(graph, model, inputs, ctx, meta)
                    break
                except _NodeError as err:
                    if not meta:
                        raise PruningError(f"running {type(model).__name__} on example_inputs failed at {err}") from err.err
    finally:
        for m, t in modes.items():
            m.training = t
    for name in ignored:
        if name in ctx.module_out:
            ctx.freeze(ctx.module_out[name])
    for leaf in leaves:
        ctx.warn(f"module '{leaf}' could not be traced by torch.fx; it is kept as it is")
    result = _group(ctx, shapes)
    result.opaque_modules = leaves
    for w in ctx.warnings:
        warnings.warn(w, stacklevel=2)
    return result
