"""Channel-id rules for the functional layers (conv, linear, norms...), whichever module calls them.

A rule reads the *parameters* it is given (``F.conv2d(x, self.weight, ...)``), binds their axes
to channel ids through the module that owns them, and binds that module's size attributes
(``out_channels``, ``num_features``...) only when the attribute holds the size seen: surgery can
then update any module class. A layer whose weight is computed rather than a parameter (weight
standardisation, reparametrisation) keeps the channels it touches.

Also here: the combined lookup tables used by the capture and the MAC counters (the meta-tensor
shape shortcuts are in :mod:`secateurs._meta`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import _ids, _ops
from ._ids import Context, axis_ids, place, tie_columns, tie_rows, unknown, varying


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _aid(aids: tuple, kids: dict, i: int, name: str) -> Any:
    return aids[i] if len(aids) > i else (kids or {}).get(name)


def _vector(ctx: Context, t: Any, tid: Any, ids: torch.Tensor) -> None:
    """A per-channel vector (norm weight, bias, running stat) follows the channels it scales."""
    if not isinstance(t, torch.Tensor) or t.numel() <= 1:
        return
    if ctx.bind_param(t, 0, ids):
        return
    if tid is None:
        tid = ctx.ids_of(t)  # e.g. (gain * scale).view(-1): the parameter it was computed from
    if tid is not None:
        ctx.union(tid.reshape(-1), ids)
    else:
        ctx.freeze(ids)  # a fixed-size vector the rule cannot shrink


# -- convolution and linear --------------------------------------------------------------------
def conv(ctx: Context, node, args, kwargs, aids, kids, out) -> Any:
    x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    g = int(_arg(args, kwargs, 6, "groups", 1))
    transposed = "transpose" in _ids.op_name(node)
    xi = _aid(aids, kids, 0, "input")
    computed = None
    if ctx.owner(w) is None:
        w, computed = _weight_source(ctx, w, transposed)
        if w is None:
            return unknown(ctx, node, aids, kids, "its weight is computed, not a parameter")
    caxis = 1 if x.dim() == w.dim() else 0
    cin, cout = (w.shape[0], w.shape[1] * g) if transposed else (w.shape[1] * g, w.shape[0])
    a, bsz = cin // g, cout // g
    in_ids = axis_ids(ctx, xi, caxis, cin)
    out_ids = ctx.fresh(cout)
    w_in, w_out = (0, 1) if transposed else (1, 0)
    if g == 1:
        if in_ids is not None:
            ctx.bind_param(w, w_in, in_ids, role="in")
            ctx.bind_attr(w, "in_channels", cin, in_ids, role="in")
        ctx.bind_param(w, w_out, out_ids)
    elif a == 1 and in_ids is not None and ctx.bind_attr(w, "groups", g, in_ids, role="in"):
        # depthwise-like: each input channel owns its group; removing it removes the group
        ctx.union(in_ids.view(g, 1), out_ids.view(g, bsz))
        ctx.bind_param(w, 0, in_ids if transposed else out_ids, role="in" if transposed else "out")
        ctx.bind_attr(w, "in_channels", cin, in_ids, role="in")
    else:
        # keep the number of groups: a removal takes the same local index from every group
        if in_ids is not None:
            if a == 1:
                ctx.freeze(in_ids)  # depthwise with a literal `groups`: cannot follow
            rep = tie_columns(ctx, in_ids, g)
            ctx.bind_param(w, 0 if transposed else 1, in_ids if transposed else rep, role="in")
            ctx.bind_attr(w, "in_channels", cin, in_ids, role="in")
        rep = tie_columns(ctx, out_ids, g)
        ctx.bind_param(w, 1 if transposed else 0, rep if transposed else out_ids)
    if b is not None:
        _vector(ctx, b, _aid(aids, kids, 2, "bias"), out_ids)
    ctx.bind_attr(w, "out_channels", cout, out_ids)
    if computed is not None:
        _bind_computed(ctx, computed, w, _aid(aids, kids, 1, "weight"), out_ids, in_ids, 1 if transposed else 0)
    return place(out_ids, caxis, out.dim())


def _weight_source(ctx: Context, w: torch.Tensor, transposed: bool):
    """A weight computed from one parameter of the same shape (weight standardisation, scaled
    weights): that parameter is cut as the weight, the small ones that scale it with it."""
    src = ctx.source(w)
    if src is None or transposed or src[2] or tuple(src[0].shape) != tuple(w.shape):
        return None, None
    main, others = src[0], src[1]
    if any(sum(s > 1 for s in q.shape) > 1 for q in others):
        return None, None  # another full-size tensor mixes in: not a per-channel transform
    return main, (others, w)


def _bind_computed(ctx: Context, computed, main, w_ids, out_ids, in_ids, out_axis: int) -> None:
    others, w = computed
    if w_ids is not None:  # the parameter's own ids along the chain: each output row is one channel
        shape = [1] * w.dim()
        shape[out_axis] = -1
        ctx.union(_ids.expand(w_ids, w.shape), out_ids.view(shape))
    for q in others:
        size = [s for s in q.shape if s > 1]
        if not size:
            continue
        if _is_buffer(ctx, q):  # state mixed into the weight (spectral norm's power-iteration u, v: v runs over
            ctx.freeze(out_ids)  # the flattened inputs x taps, and sigma changes with any cut): both sides stay
            if in_ids is not None:
                ctx.freeze(in_ids)
        elif size[0] != len(out_ids) or not ctx.bind_param(q, [k for k, s in enumerate(q.shape) if s > 1][0], out_ids):
            ctx.freeze(out_ids)
    if in_ids is not None:
        ctx.mark_inexact(in_ids)  # standardised over the input axis: statistics change with it


def _is_buffer(ctx: Context, t: torch.Tensor) -> bool:
    own = ctx.owner(t)
    m = ctx.modules.get(own[0]) if own else None
    return m is not None and own[1] in m._buffers


def linear(ctx: Context, node, args, kwargs, aids, kids, out) -> Any:
    w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    xi = _aid(aids, kids, 0, "input")
    if ctx.owner(w) is None:
        return unknown(ctx, node, aids, kids, "its weight is computed, not a parameter")
    fin, fout = w.shape[1], w.shape[0]
    in_ids = axis_ids(ctx, xi, -1, fin)
    if in_ids is None and xi is not None:
        ctx.freeze(xi)  # channels on another axis: the output's last axis is fixed, theirs stay too
        return None
    if in_ids is not None:
        ctx.bind_param(w, 1, in_ids, role="in")
        ctx.bind_attr(w, "in_features", fin, in_ids, role="in")
    out_ids = ctx.fresh(fout)
    ctx.bind_param(w, 0, out_ids)
    if b is not None:
        _vector(ctx, b, _aid(aids, kids, 2, "bias"), out_ids)
    ctx.bind_attr(w, "out_features", fout, out_ids)
    return place(out_ids, -1, out.dim())


# -- normalisation -------------------------------------------------------------------------------
_BN_POS = {"batch_norm": (1, 2, 3, 4), "instance_norm": (1, 2, 3, 4)}  # running_mean, running_var, weight, bias


def batch_norm(ctx: Context, node, args, kwargs, aids, kids, out) -> Any:
    x, xi = args[0], aids[0]
    caxis = 1 if x.dim() > 1 else 0
    ids = axis_ids(ctx, xi, caxis, x.shape[caxis])
    if ids is None:
        ctx.freeze_all((aids, kids))  # fixed channels: whatever scales them keeps its size
        return xi
    if node.target is torch.batch_norm:  # (input, weight, bias, running_mean, running_var, ...)
        order = ((3, "running_mean"), (4, "running_var"), (1, "weight"), (2, "bias"))
    else:
        order = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
    tensors = [(_arg(args, kwargs, i, n), _aid(aids, kids, i, n)) for i, n in order]
    for t, tid in tensors:
        _vector(ctx, t, tid, ids)
    owner = next((t for t, _ in tensors[::-1] if ctx.owner(t) is not None), None)
    if owner is not None:
        ctx.bind_attr(owner, "num_features", len(ids), ids)
    return xi


def group_norm(ctx: Context, node, args, kwargs, aids, kids, out) -> Any:
    x, xi = args[0], aids[0]
    ng = int(_arg(args, kwargs, 1, "num_groups"))
    w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    ids = axis_ids(ctx, xi, 1, x.shape[1])
    if ids is None:
        return xi
    c = len(ids)
    per_group = c // ng
    owner = w if ctx.owner(w) is not None else b
    if ng == 1:
        ctx.mark_inexact(ids)
    else:
        if per_group > 1:
            tie_rows(ctx, ids, ng)  # drop whole groups: statistics of the others are untouched
        if not ctx.bind_attr(owner, "num_groups", ng, ids, divisor=per_group):
            ctx.freeze(ids)  # a literal group count cannot follow the channels
    for i, n, t in ((2, "weight", w), (3, "bias", b)):
        _vector(ctx, t, _aid(aids, kids, i, n), ids)
    ctx.bind_attr(owner, "num_channels", c, ids)
    return xi


def layer_norm(ctx: Context, node, args, kwargs, aids, kids, out) -> Any:
    """layer_norm / rms_norm over the trailing axes; channels-last norms (ConvNeXt, LayerNorm2d)."""
    x, xi = args[0], aids[0]
    shape = _arg(args, kwargs, 1, "normalized_shape")
    w = _arg(args, kwargs, 2, "weight")
    b = _arg(args, kwargs, 3, "bias") if _ids.op_name(node) != "rms_norm" else None
    k = len(shape)
    vary = [a for a in varying(xi) if a >= x.dim() - k]
    if not vary:
        return xi
    if len(vary) > 1:
        return unknown(ctx, node, aids, kids, "normalises over several channel axes")
    axis = vary[0]
    ids = axis_ids(ctx, xi, axis, x.shape[axis])
    pidx = axis - (x.dim() - k)
    owner = w if ctx.owner(w) is not None else b
    follows = _ids.is_derived(shape[pidx]) or ctx.bind_attr(owner, "normalized_shape", len(ids), ids, index=pidx)
    if not follows:
        return unknown(ctx, node, aids, kids, "normalized_shape is a literal")
    for t, i, n in ((w, 2, "weight"), (b, 3, "bias")):
        if isinstance(t, torch.Tensor) and not ctx.bind_param(t, pidx, ids):
            tid = _aid(aids, kids, i, n)
            if tid is not None:
                ctx.union(tid.reshape(-1), ids)
            else:
                ctx.freeze(ids)
    ctx.mark_inexact(ids)
    return xi


def prelu(ctx: Context, node, args, kwargs, aids, kids, out) -> Any:
    x, xi, w = args[0], aids[0], _arg(args, kwargs, 1, "weight")
    if w.numel() > 1:
        ids = axis_ids(ctx, xi, 1 if x.dim() > 1 else 0, w.numel())
        if ids is not None:
            _vector(ctx, w, _aid(aids, kids, 1, "weight"), ids)
            ctx.bind_attr(w, "num_parameters", len(ids), ids)
    return xi


def embedding(ctx: Context, node, args, kwargs, aids, kids, out) -> Any:
    w = _arg(args, kwargs, 1, "weight")
    if ctx.owner(w) is None:
        return unknown(ctx, node, aids, kids, "its weight is computed, not a parameter")
    out_ids = ctx.fresh(w.shape[1])
    ctx.bind_param(w, 1, out_ids)
    ctx.bind_attr(w, "embedding_dim", w.shape[1], out_ids)
    return place(out_ids, -1, out.dim())


def cross_channel(ctx: Context, node, args, kwargs, aids, kids, out) -> Any:
    ctx.mark_inexact(aids[0])  # e.g. local response norm: neighbours' values change, shapes do not
    return aids[0]


def channel_shuffle(ctx: Context, node, args, kwargs, aids, kids, out) -> Any:
    xi = aids[0]
    groups = int(_arg(args, kwargs, 1, "groups"))
    if xi is not None and 1 in varying(xi):
        tie_columns(ctx, _ids.axis_ids(ctx, xi, 1, args[0].shape[1]), groups)
    return _ops.movement(ctx, node, args, kwargs, aids, kids, out)


def attention(ctx: Context, node, args, kwargs, aids, kids, out) -> Any:
    ctx.freeze_all((aids, kids))  # heads and embedding are coupled in ways we do not cut yet
    return tuple(None for _ in out) if isinstance(out, tuple) else None


# -- real-tensor guards --------------------------------------------------------------------------
def _single_value_bn(args, kwargs):
    """Training-mode batch norm over one value per channel raises; the capture needs only a tensor
    of the right shape there (an auxiliary head at batch 1 after global pooling)."""
    x = args[0]
    training = _arg(args, kwargs, 5, "training", False)
    if training and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] * math.prod(x.shape[2:]) == 1:
        return x.clone()
    return None


# -- MAC counting (METHODS.md convention: conv, transposed conv per input position, linear) ---------
def _record(mode, node, w, x, y, macs: int) -> None:
    """One counted layer: (module, kind, MACs, own params, input shape, output shape, weight name)."""
    own = mode.owner(w)
    if own is None and not mode.named:
        mode.ctx.unnamed = True  # named after the calling module: capture.run_captured counts again with names
    name = own[0] if own else node.name
    m = mode.ctx.modules.get(name)
    mine = {id(p): p for p in m._parameters.values() if p is not None} if m is not None else {}  # parameters(recurse=False)
    params = sum(p.numel() for p in mine.values())
    kind = type(m).__name__ if m is not None else _ids.op_name(node)
    y = y[0] if isinstance(y, tuple) else y
    weight = own[1] if own else _computed_from(m, w)
    mode.costs.append((name, kind, int(macs), params, tuple(x.shape), tuple(y.shape), weight))


def _computed_from(module, w) -> str:
    """The parameter a computed weight scales with (weight norm's ``weight_v``, a parametrization's
    ``original``): the module's one parameter of the same shape, so a plan's cost shrinks with it."""
    same = [n for n, p in module.named_parameters()
            if tuple(p.shape) == tuple(w.shape)] if module is not None and isinstance(w, torch.Tensor) else []
    return same[0] if len(same) == 1 else "weight"


def _read_batch(mode, x, batched: bool, dim: int) -> None:
    """A layer that knows its batch dimension read a model input: that input's batch is exact."""
    if not mode.batch_read and id(x) in mode.batch_inputs:
        mode.batch, mode.batch_read = int(x.shape[dim]) if batched else 1, True


def _conv_cost(mode, node, args, kwargs, out) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    _read_batch(mode, x, x.dim() == w.dim(), 0)  # conv inputs are [N, C, *] or unbatched [C, *]
    per = w.shape[1] * math.prod(w.shape[2:])  # (in or out channels per group) x kernel
    positions = (x if "transpose" in _ids.op_name(node) else out).numel() // max(mode.batch, 1)
    _record(mode, node, w, x, out, positions * per)


def _linear_cost(mode, node, args, kwargs, out) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    _record(mode, node, w, x, out, x.numel() // max(mode.batch, 1) * w.shape[0])


def _mha_cost(mode, node, args, kwargs, out) -> None:
    """The four projections: queries and the output by ``E x E``, keys and values from their own
    lengths and widths (``kdim``, ``vdim``: cross-attention) to ``E``."""
    q, k, v, e = args[0], args[1], args[2], int(args[3])
    _read_batch(mode, q, q.dim() == 3, 1)  # the functional form is sequence-first: [L, N, E] or [L, E]
    w = _arg(args, kwargs, 5, "in_proj_weight")
    if w is None:
        w = kwargs.get("q_proj_weight")
    # fixed in a plan's cost: `attention` keeps every channel it touches, so no per-weight positions
    _record(mode, node, w, q, out, (2 * q.numel() + k.numel() + v.numel()) * e // max(mode.batch, 1))


# -- tables -----------------------------------------------------------------------------------------
_CONVS = [F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d]
_BNS = [F.batch_norm, F.instance_norm, torch.batch_norm, torch.instance_norm]
_LAYERS: dict[Any, Callable] = {
    **dict.fromkeys(_CONVS, conv), F.linear: linear, **dict.fromkeys(_BNS, batch_norm),
    F.group_norm: group_norm, F.layer_norm: layer_norm, F.prelu: prelu, torch.prelu: prelu,
    F.embedding: embedding,
}
if hasattr(F, "rms_norm"):
    _LAYERS[F.rms_norm] = layer_norm
LAYER_RULES = frozenset(_LAYERS.values())

FUNCTIONS: dict[Any, Callable] = {**_ops.FUNCTIONS, **_LAYERS}
FUNCTIONS.update({F.local_response_norm: cross_channel, F.multi_head_attention_forward: attention,
                  F.channel_shuffle: channel_shuffle, torch.channel_shuffle: channel_shuffle,
                  torch.native_channel_shuffle: channel_shuffle})
METHODS: dict[str, Callable] = dict(_ops.METHODS)
# functions reached through a wrapper (F.max_pool2d's boolean dispatch...) arrive as their inner name
FUNCTIONS_BY_NAME: dict[tuple[str, str], Callable] = {
    (getattr(f, "__module__", None), getattr(f, "__name__", None)): r for f, r in FUNCTIONS.items()
    if callable(f) and getattr(f, "__module__", None) == "torch.nn.functional"
}
for _n in ("_max_pool1d", "_max_pool2d", "_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
           "max_pool3d_with_indices", "_adaptive_max_pool1d", "_adaptive_max_pool2d", "_adaptive_max_pool3d",
           "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
           "adaptive_max_pool3d_with_indices", "_fractional_max_pool2d", "fractional_max_pool2d_with_indices"):
    FUNCTIONS_BY_NAME[("torch.nn.functional", _n)] = _ops.per_channel

REAL_GUARDS: dict[Any, Callable] = {F.batch_norm: _single_value_bn}
COSTS: dict[Any, Callable] = {**dict.fromkeys(_CONVS, _conv_cost), F.linear: _linear_cost,
                              F.multi_head_attention_forward: _mha_cost}
