"""Channel-id propagation rules for generic tensor operations (layers are in :mod:`secateurs._layers`).

Each rule reads the id arrays of an operation's inputs (see :mod:`secateurs._ids`) and returns
those of its output, uniting and freezing ids as the operation couples them.

Rules are deliberately conservative: an operation we do not understand freezes the channels that
feed it (with a warning naming it), it never guesses.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ._ids import (FROZEN, Context, axis_ids, compress, expand, is_derived, leaves, map_aggregate, place,
                   size_markers, flat_ids, unknown, varying)


# -- elementwise -----------------------------------------------------------------------------
def elementwise(ctx: Context, node: Any, args, kwargs, aids, kids, out) -> Any:
    if not isinstance(out, torch.Tensor):
        return None
    nd, oshape = out.dim(), out.shape
    ops = []
    for v, i in zip(leaves((args, kwargs)), flat_ids((args, kwargs), (aids, kids))):
        if v.dim() > nd:
            return unknown(ctx, node, aids, kids, "broadcast to fewer dimensions")
        pad = (1,) * (nd - v.dim())
        vs = pad + tuple(v.shape)
        ops.append((vs, None if i is None or i.numel() <= 1 else i.reshape(pad + tuple(i.shape))))
    tracked = [i for _, i in ops if i is not None]
    if not tracked:
        return None
    axes = {k for i in tracked for k in varying(i)}
    conflict = False
    for vs, i in ops:
        full = [k for k in axes if vs[k] == oshape[k] and oshape[k] > 1]
        bcast = [k for k in axes if vs[k] == 1 and oshape[k] > 1]
        if i is None and full:
            conflict = True  # a fixed-size operand spans a channel axis
        elif i is not None and bcast and varying(i):
            conflict = True  # channels on one axis meet channels broadcast from another
    if conflict:
        for i in tracked:
            ctx.freeze(i)
    for i in tracked[1:]:
        ctx.union(tracked[0], i)
    return min(tracked, key=lambda t: t.numel())


# -- per-channel ops (pooling, resampling, activations) ----------------------------------------
def per_channel(ctx: Context, node: Any, args, kwargs, aids, kids, out) -> Any:
    x, xi = args[0], aids[0]
    if xi is None or not isinstance(out, torch.Tensor):
        return None
    if out.dim() != x.dim() or any(out.shape[k] != x.shape[k] for k in varying(xi)):
        return unknown(ctx, node, aids, kids, "changes the size of a channel axis")
    return xi


def softmax_like(ctx, node, args, kwargs, aids, kids, out) -> Any:
    xi = aids[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if xi is not None and isinstance(dim, int) and (dim % xi.dim()) in varying(xi):
        ctx.mark_inexact(xi)
    return xi


def normalize(ctx, node, args, kwargs, aids, kids, out) -> Any:
    """F.normalize: shape-preserving; dividing by a norm over channels shifts the others."""
    xi = aids[0]
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
    if xi is not None and (dim % xi.dim()) in varying(xi):
        ctx.mark_inexact(xi)
    return xi


def pad(ctx, node, args, kwargs, aids, kids, out) -> Any:
    xi = aids[0]
    if xi is None:
        return None
    p = kwargs.get("pad", args[1] if len(args) > 1 else ())
    nd = xi.dim()
    for j in range(len(p) // 2):
        axis = nd - 1 - j
        if axis in varying(xi) and (p[2 * j] != 0 or p[2 * j + 1] != 0):
            return unknown(ctx, node, aids, kids, "pads a channel axis")
    return xi


# -- reductions --------------------------------------------------------------------------------
def reduction(ctx, node, args, kwargs, aids, kids, out) -> Any:
    if len(args) > 1 and isinstance(args[1], torch.Tensor):  # torch.max(a, b) is elementwise
        return elementwise(ctx, node, args, kwargs, aids, kids, out)
    xi = aids[0]
    if xi is None:
        return None
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
    keep = kwargs.get("keepdim", False)
    if len(args) > 2 and isinstance(args[2], bool):
        keep = args[2]
    nd = xi.dim()
    dims = list(range(nd)) if dim is None else [d % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
    if any(d in varying(xi) for d in dims):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name not in ("sum", "sum_"):
            ctx.mark_inexact(xi)
    res = xi
    for d in sorted(dims, reverse=True):
        res = res.narrow(d, 0, 1) if keep else res.narrow(d, 0, 1).squeeze(d)
    res = compress(res) if res.dim() else None
    if isinstance(out, tuple):  # max/min with dim return (values, indices)
        return tuple(res for _ in out)
    return res


# -- data movement: run the op on the ids themselves ---------------------------------------------
def _to_id_args(values, ids):
    def conv(v, i):
        if isinstance(v, torch.Tensor):
            t = expand(i if isinstance(i, torch.Tensor) else None, v.shape)
            return t
        if isinstance(v, (list, tuple)):
            r = [conv(x, i[k] if isinstance(i, (list, tuple)) and k < len(i) else None) for k, x in enumerate(v)]
            return type(v)(r) if not hasattr(v, "_fields") else type(v)(*r)
        return v

    return conv(values, ids)


def _literal_axes(node: Any, out_dim: int) -> list[int]:
    """Output axes of view/reshape/expand whose size is a literal int (fixed after pruning)."""
    sizes = list(node.args[1:])
    if "size" in node.kwargs:
        sizes = [node.kwargs["size"]]
    if "shape" in node.kwargs:
        sizes = [node.kwargs["shape"]]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    if len(sizes) != out_dim:
        return []
    return [k for k, s in enumerate(sizes) if isinstance(s, int) and not is_derived(s) and s != -1]


def movement(ctx, node, args, kwargs, aids, kids, out, fn: Callable | None = None) -> Any:
    if not leaves((aids, kids)):
        return None
    id_args = _to_id_args(args, aids)
    id_kwargs = _to_id_args(kwargs, kids)
    if node.target in ("view", "view_as") and isinstance(id_args[0], torch.Tensor):
        id_args = (id_args[0].contiguous(), *id_args[1:])
    if fn is None:
        if node.op == "call_method":
            res = getattr(id_args[0], node.target)(*id_args[1:], **id_kwargs)
        else:
            res = node.target(*id_args, **id_kwargs)
    else:
        res = fn(*id_args, **id_kwargs)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    sizes = size_markers((args[1:], kwargs), (aids[1:], kids))
    if sizes:
        own = aids[0].reshape(-1) if isinstance(aids[0], torch.Tensor) else torch.zeros(0, dtype=torch.long)
        for s in sizes:
            if not bool(torch.isin(s, own).all()):
                # a size read from other channels shapes this tensor: both must stay as they are
                ctx.freeze(s)
                ctx.freeze(aids[0] if isinstance(aids[0], torch.Tensor) else None)
    if isinstance(res, torch.Tensor) and name in ("view", "reshape", "expand", "unflatten", "view_as"):
        for k in _literal_axes(node, res.dim()):
            if res.shape[k] > 1 and k in varying(compress(res)):
                ctx.union(res, res.narrow(k, 0, 1))
    return map_aggregate(res, lambda t: compress(t) if isinstance(t, torch.Tensor) else None)


def permute_like(ctx, node, args, kwargs, aids, kids, out) -> Any:
    """permute/transpose/unsqueeze/squeeze act on the compressed ids directly (same rank)."""
    xi = aids[0]
    if xi is None:
        return None
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name in ("squeeze", "squeeze_"):  # only axes of size 1 *in the tensor* go
        x = args[0]
        dims = args[1:] or ([kwargs["dim"]] if "dim" in kwargs else [k for k in range(x.dim()) if x.shape[k] == 1])
        dims = {d % x.dim() for dd in dims for d in (dd if isinstance(dd, (list, tuple)) else [dd])}
        keep = [k for k in range(x.dim()) if not (k in dims and x.shape[k] == 1)]
        return compress(xi.reshape([xi.shape[k] for k in keep]))
    if node.op == "call_method":
        return compress(getattr(xi, node.target)(*args[1:], **kwargs))
    return compress(node.target(xi, *args[1:], **kwargs))


def getitem(ctx, node, args, kwargs, aids, kids, out) -> Any:
    obj, idx = args[0], args[1]
    oid = aids[0]
    ctx.freeze_all(aids[1] if len(aids) > 1 else None)  # index tensors keep every position
    if not isinstance(obj, torch.Tensor):
        if oid is None:
            return None
        try:
            return oid[idx]
        except (IndexError, KeyError, TypeError):
            return None
    if oid is None:
        return None
    items = list(idx) if isinstance(idx, tuple) else [idx]
    consumed = sum(1 for e in items if e is not None and e is not Ellipsis)
    axes_entries: list[Any] = []
    for e in items:
        if e is Ellipsis:
            axes_entries.extend([slice(None)] * (obj.dim() - consumed))
        elif e is not None:
            axes_entries.append(e)
    vary = varying(oid)
    for k, e in enumerate(axes_entries):
        if k in vary and not (isinstance(e, slice) and e == slice(None)):
            full = isinstance(e, slice) and range(*e.indices(obj.shape[k])) == range(obj.shape[k])
            if not full:
                ctx.freeze(oid)
                return None
    return movement(ctx, node, args, kwargs, aids, kids, out)


def _tie_axes(ctx: Context, tensors, ids, skip: int | None) -> None:
    """Entries of cat/stack must keep equal sizes on every axis but the one they are joined on."""
    nd = tensors[0].dim()
    for k in range(nd):
        if k == skip:
            continue
        cols = [axis_ids(ctx, i, k, t.shape[k]) if i is not None else None for t, i in zip(tensors, ids)]
        live = [c for c in cols if c is not None]
        if not live:
            continue
        if len(live) < len(cols):  # one entry's size on this axis is fixed: all keep theirs
            for c in live:
                ctx.freeze(c)
            continue
        for c in live[1:]:
            ctx.union(live[0], c)


def stack(ctx, node, args, kwargs, aids, kids, out) -> Any:
    tensors = args[0] if args else kwargs["tensors"]
    ids = aids[0] if args else kids["tensors"]
    if not any(i is not None for i in ids):
        return None
    _tie_axes(ctx, list(tensors), list(ids), None)
    return movement(ctx, node, args, kwargs, aids, kids, out)


def cat(ctx, node, args, kwargs, aids, kids, out) -> Any:
    tensors = args[0] if args else kwargs["tensors"]
    if not any(i is not None for i in (aids[0] if args else kids["tensors"])):
        return None
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    ids = aids[0] if args else kids["tensors"]
    nd = out.dim()
    dim %= nd
    _tie_axes(ctx, [t for t in tensors if t.dim() == nd], [i for t, i in zip(tensors, ids) if t.dim() == nd], dim)
    # fast path: every input varies at most along the cat axis
    if all(i is None or varying(i) in ([], [dim]) for i in ids):
        parts = []
        for t, i in zip(tensors, ids):
            n = t.shape[dim]
            parts.append(torch.full((n,), FROZEN, dtype=torch.long) if i is None else i.reshape(-1).expand(n))
        return compress(place(torch.cat(parts), dim, nd))
    return movement(ctx, node, args, kwargs, aids, kids, out)


def split(ctx, node, args, kwargs, aids, kids, out) -> Any:
    """split/chunk/tensor_split/unbind: pieces along a channel axis must keep equal sizes."""
    x, xi = args[0], aids[0]
    if xi is None:
        return tuple(None for _ in out) if isinstance(out, (tuple, list)) else None
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name == "unbind":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    else:
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    dim %= x.dim()
    if dim in varying(xi):
        sizes = {p.shape[dim] for p in out}
        size_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections")
        fixed = name == "split" and not is_derived(size_arg)  # literal sizes never follow pruning
        if fixed and _split_by_attribute(ctx, node, xi, dim, size_arg, out):
            return movement(ctx, node, args, kwargs, aids, kids, out)
        if name == "unbind" or fixed or len(sizes) != 1 or len(out) < 2:
            ctx.freeze(xi)
            return tuple(None for _ in out)
        grid = xi.movedim(dim, 0)
        grid = grid.reshape(len(out), -1, *grid.shape[1:])
        ctx.union(grid, grid[:1])
    return movement(ctx, node, args, kwargs, aids, kids, out)


def _split_by_attribute(ctx, node, xi, dim: int, sizes, out) -> bool:
    """Split sizes read from a list attribute of the calling module (MixNet's ``self.splits``):
    each piece shrinks on its own and surgery rewrites that attribute's entries."""
    m = ctx.modules.get(node.name)
    if m is None or not isinstance(sizes, (list, tuple)) or len(sizes) < 2 or len(out) != len(sizes):
        return False
    attr = next((k for k, v in vars(m).items() if isinstance(v, (list, tuple)) and not isinstance(v, str)
                 and len(v) == len(sizes) and all(type(a) is int for a in v) and list(v) == list(sizes)), None)
    if attr is None:
        return False
    col = axis_ids(ctx, xi, dim, sum(sizes))
    if col is None:
        return False
    start = 0
    for k, n in enumerate(sizes):
        ctx.bind(node.name, attr, k, col[start:start + n], kind="attr")
        start += n
    return True


def like(ctx, node, args, kwargs, aids, kids, out) -> Any:
    return aids[0]


def nothing(ctx, node, args, kwargs, aids, kids, out) -> Any:
    return None


# -- matmul-like ---------------------------------------------------------------------------------
def freeze_op(ctx, node, args, kwargs, aids, kids, out) -> Any:
    """Known op whose channel coupling we do not model: keep its inputs, no warning."""
    ctx.freeze_all((aids, kids))
    return None


# -- tables ---------------------------------------------------------------------------------------
_ELEMENTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.neg, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
    operator.or_, operator.abs, operator.pos,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.pow, torch.relu, torch.relu_, torch.sigmoid,
    torch.tanh, torch.exp, torch.log, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.clamp,
    torch.clip, torch.sign, torch.erf, torch.reciprocal, torch.square, torch.lerp, torch.addcmul,
    torch.nan_to_num, torch.sin, torch.cos, torch.log1p, torch.expm1, torch.floor, torch.ceil,
    torch.round, torch.masked_fill, torch.clamp_min, torch.clamp_max,
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.elu,
    F.leaky_relu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, F.celu, F.selu, F.logsigmoid, F.softsign,
    F.tanhshrink, F.hardshrink, F.softshrink, F.threshold, F.rrelu,
]
_ELEMENTWISE_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "truediv", "relu", "relu_",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "pow", "pow_", "clamp", "clamp_",
    "clamp_min", "clamp_max", "neg", "abs", "sqrt", "rsqrt", "float", "half", "double", "bfloat16",
    "to", "type", "type_as", "clone", "detach", "masked_fill", "masked_fill_", "bernoulli_",
    "bernoulli", "div_", "addcmul", "lerp", "square", "sign", "erf", "reciprocal", "hardswish",
    "gelu", "silu", "floor", "ceil", "round", "maximum", "minimum", "where", "contiguous",
    "requires_grad_", "fill_", "zero_", "uniform_", "normal_", "nan_to_num",
]
_PER_CHANNEL_FUNCS = [
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, F.upsample_bilinear,
    F.upsample_nearest, F.lp_pool1d, F.lp_pool2d, torch.avg_pool1d, torch.max_pool1d,
    torch.max_pool2d, torch.max_pool3d, torch.adaptive_avg_pool1d, torch.roll, torch.flip,
]
_PER_CHANNEL_METHODS = ["roll", "flip"]
_MOVEMENT_FUNCS = [
    torch.flatten, torch.reshape, torch.narrow, torch.select, torch.movedim,
    torch.moveaxis, torch.swapaxes, torch.swapdims, torch.tile, torch.channel_shuffle,
    torch.native_channel_shuffle, torch.pixel_shuffle, torch.pixel_unshuffle, F.pixel_shuffle,
    F.pixel_unshuffle, torch.broadcast_to, torch.unflatten, torch.atleast_2d,
]
_MOVEMENT_METHODS = [
    "view", "reshape", "flatten", "unflatten", "expand", "expand_as", "repeat", "narrow", "select",
    "movedim", "moveaxis", "swapaxes", "view_as", "reshape_as", "tile", "t", "mT",
]
_PERMUTE_FUNCS = [torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze, torch.t]
_PERMUTE_METHODS = ["permute", "transpose", "unsqueeze", "squeeze", "squeeze_", "unsqueeze_"]
_REDUCTION_FUNCS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std,
                    torch.var, torch.norm, torch.logsumexp, torch.prod, torch.std_mean, torch.var_mean]
_REDUCTION_METHODS = ["mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod"]
_SOFTMAX = [F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.softmin]
_LIKE_FUNCS = [torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
               torch.randn_like]
_NOTHING_FUNCS = [torch._assert, torch.zeros, torch.ones, torch.empty, torch.full,
                  torch.arange, torch.randn, torch.rand, torch.tensor, torch.linspace, len, int, float,
                  torch.meshgrid]
_NOTHING_METHODS = ["dim", "numel", "new_zeros", "new_ones", "new_empty", "new_full",
                    "new_tensor", "item", "tolist", "ndimension", "get_device", "is_contiguous"]
_FREEZE_FUNCS = [torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm, torch.addmm,
                 torch.addbmm, operator.matmul, F.scaled_dot_product_attention, torch.index_select,
                 torch.gather, torch.take_along_dim]
_FREEZE_METHODS = ["matmul", "bmm", "mm", "index_select", "gather"]


def _build_tables():
    funcs: dict[Any, Callable] = {}
    methods: dict[str, Callable] = {}
    for rule, fns, names in (
        (elementwise, _ELEMENTWISE_FUNCS, _ELEMENTWISE_METHODS),
        (per_channel, _PER_CHANNEL_FUNCS, _PER_CHANNEL_METHODS),
        (movement, _MOVEMENT_FUNCS, _MOVEMENT_METHODS),
        (permute_like, _PERMUTE_FUNCS, _PERMUTE_METHODS),
        (reduction, _REDUCTION_FUNCS, _REDUCTION_METHODS),
        (softmax_like, _SOFTMAX, ["softmax", "log_softmax"]),
        (like, _LIKE_FUNCS, []),
        (nothing, _NOTHING_FUNCS, _NOTHING_METHODS),
        (freeze_op, _FREEZE_FUNCS, _FREEZE_METHODS),
        (split, [torch.split, torch.chunk, torch.tensor_split, torch.unbind], ["split", "chunk", "tensor_split", "unbind"]),
        (cat, [torch.cat, torch.concat, torch.concatenate], []),
        (stack, [torch.stack], []),
    ):
        funcs.update(dict.fromkeys(fns, rule))
        methods.update(dict.fromkeys(names, rule))
    funcs.update({operator.getitem: getitem, F.pad: pad, F.normalize: normalize})
    return funcs, methods


FUNCTIONS, METHODS = _build_tables()
