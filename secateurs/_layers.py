"""Channel-id rules for leaf modules: which of their tensors and attributes shrink with which ids."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ._ops import Context, _tie_columns, _tie_rows, axis_ids, movement, place, varying


def _bind_all(ctx: Context, name: str, m: nn.Module, tensors: tuple[str, ...], ids: torch.Tensor, axis: int = 0, role: str = "out") -> None:
    for t in tensors:
        if getattr(m, t, None) is not None:
            ctx.bind(name, t, axis, ids, role=role)


def conv(ctx: Context, name: str, m: _ConvNd, args, aids, out) -> Any:
    x, xi = args[0], aids[0]
    transposed = isinstance(m, _ConvTransposeNd)
    g, cin, cout = m.groups, m.in_channels, m.out_channels
    a, b = cin // g, cout // g
    caxis = 1 if x.dim() == len(m.kernel_size) + 2 else 0
    in_ids = axis_ids(ctx, xi, caxis, cin)
    out_ids = ctx.fresh(cout)
    w_in, w_out = (0, 1) if transposed else (1, 0)
    if g == 1:
        if in_ids is not None:
            ctx.bind(name, "weight", w_in, in_ids, role="in")
            ctx.bind(name, "in_channels", None, in_ids, kind="attr", role="in")
        ctx.bind(name, "weight", w_out, out_ids)
    elif a == 1 and in_ids is not None:
        # depthwise-like: each input channel owns its group; removing it removes the group
        ctx.union(in_ids.view(g, 1), out_ids.view(g, b))
        ctx.bind(name, "weight", 0, in_ids if transposed else out_ids, role="in" if transposed else "out")
        ctx.bind(name, "in_channels", None, in_ids, kind="attr", role="in")
        ctx.bind(name, "groups", None, in_ids, kind="attr", role="in")
    else:
        # keep the number of groups: a removal takes the same local index from every group
        if in_ids is not None:
            rep = _tie_columns(ctx, in_ids, g)
            ctx.bind(name, "weight", 0 if transposed else 1, in_ids if transposed else rep, role="in")
            ctx.bind(name, "in_channels", None, in_ids, kind="attr", role="in")
        rep = _tie_columns(ctx, out_ids, g)
        ctx.bind(name, "weight", 1 if transposed else 0, rep if transposed else out_ids)
    if m.bias is not None:
        ctx.bind(name, "bias", 0, out_ids)
    ctx.bind(name, "out_channels", None, out_ids, kind="attr")
    ctx.module_out[name] = out_ids
    return place(out_ids, caxis, out.dim())


def linear(ctx: Context, name: str, m: nn.Linear, args, aids, out) -> Any:
    xi = aids[0]
    in_ids = axis_ids(ctx, xi, -1, m.in_features)
    if in_ids is None and xi is not None:
        return xi  # channels live on another axis and pass through; out_features stay fixed
    if in_ids is not None:
        ctx.bind(name, "weight", 1, in_ids, role="in")
        ctx.bind(name, "in_features", None, in_ids, kind="attr", role="in")
    out_ids = ctx.fresh(m.out_features)
    _bind_all(ctx, name, m, ("weight", "bias"), out_ids)
    ctx.bind(name, "out_features", None, out_ids, kind="attr")
    ctx.module_out[name] = out_ids
    return place(out_ids, -1, out.dim())


def batchnorm(ctx: Context, name: str, m: nn.Module, args, aids, out) -> Any:
    x, xi = args[0], aids[0]
    caxis = 1 if x.dim() > 1 else 0
    ids = axis_ids(ctx, xi, caxis, x.shape[caxis])
    if ids is not None:
        _bind_all(ctx, name, m, ("weight", "bias", "running_mean", "running_var"), ids)
        ctx.bind(name, "num_features", None, ids, kind="attr")
        ctx.module_out[name] = ids
    return xi


def groupnorm(ctx: Context, name: str, m: nn.GroupNorm, args, aids, out) -> Any:
    xi = aids[0]
    ids = axis_ids(ctx, xi, 1, m.num_channels)
    if ids is None:
        return xi
    per_group = m.num_channels // m.num_groups
    if m.num_groups > 1 and per_group > 1:
        _tie_rows(ctx, ids, m.num_groups)  # drop whole groups: statistics of the others are untouched
        ctx.bind(name, "num_groups", None, ids, kind="attr", divisor=per_group)
    elif m.num_groups == 1:
        ctx.mark_inexact(ids)
    _bind_all(ctx, name, m, ("weight", "bias"), ids)
    ctx.bind(name, "num_channels", None, ids, kind="attr")
    ctx.module_out[name] = ids
    return xi


def layernorm(ctx: Context, name: str, m: nn.LayerNorm, args, aids, out) -> Any:
    x, xi = args[0], aids[0]
    k = len(m.normalized_shape)
    vary = [a for a in varying(xi) if a >= x.dim() - k]
    if not vary:
        return xi
    if len(vary) > 1:
        ctx.freeze(xi)
        ctx.warn(f"LayerNorm '{name}' normalises over several channel axes; its channels are kept")
        return xi
    axis = vary[0]
    ids = axis_ids(ctx, xi, axis, x.shape[axis])
    pidx = axis - (x.dim() - k)
    _bind_all(ctx, name, m, ("weight", "bias"), ids, axis=pidx)
    ctx.bind(name, "normalized_shape", pidx, ids, kind="attr")
    ctx.mark_inexact(ids)
    ctx.module_out[name] = ids
    return xi


def prelu(ctx: Context, name: str, m: nn.PReLU, args, aids, out) -> Any:
    x, xi = args[0], aids[0]
    if m.num_parameters > 1:
        ids = axis_ids(ctx, xi, 1 if x.dim() > 1 else 0, m.num_parameters)
        if ids is not None:
            ctx.bind(name, "weight", 0, ids)
            ctx.bind(name, "num_parameters", None, ids, kind="attr")
    return xi


def embedding(ctx: Context, name: str, m: nn.Embedding, args, aids, out) -> Any:
    out_ids = ctx.fresh(m.embedding_dim)
    ctx.bind(name, "weight", 1, out_ids)
    ctx.bind(name, "embedding_dim", None, out_ids, kind="attr")
    ctx.module_out[name] = out_ids
    return place(out_ids, -1, out.dim())


def per_channel(ctx: Context, name: str, m: nn.Module, args, aids, out) -> Any:
    x, xi = args[0], aids[0]
    if xi is None or not isinstance(out, torch.Tensor):
        return None
    if out.dim() != x.dim() or any(out.shape[k] != x.shape[k] for k in varying(xi)):
        return unknown(ctx, name, m, args, aids, out, "changes the size of a channel axis")
    return xi


def softmax(ctx: Context, name: str, m: nn.Module, args, aids, out) -> Any:
    xi = aids[0]
    if xi is not None and m.dim is not None and (m.dim % xi.dim()) in varying(xi):
        ctx.mark_inexact(xi)
    return xi


def cross_channel(ctx: Context, name: str, m: nn.Module, args, aids, out) -> Any:
    ctx.mark_inexact(aids[0])  # e.g. LocalResponseNorm: neighbours' values change, shapes do not
    return aids[0]


def move(ctx: Context, name: str, m: nn.Module, args, aids, out) -> Any:
    node = _FakeNode(name)
    if isinstance(m, nn.ChannelShuffle) and aids[0] is not None and 1 in varying(aids[0]):
        _tie_columns(ctx, aids[0].reshape(-1), m.groups)
    res = movement(ctx, node, args, {}, aids, {}, out, fn=m)
    if isinstance(m, nn.Unflatten) and res is not None:
        for k in range(m.dim, m.dim + len(m.unflattened_size)):
            if res.shape[k] > 1:
                ctx.freeze(res)
    return res


class _FakeNode:
    op = "call_module"

    def __init__(self, name: str) -> None:
        self.target = self.name = name
        self.args, self.kwargs = (), {}


def attention(ctx: Context, name: str, m: nn.Module, args, aids, out) -> Any:
    ctx.freeze_all(aids)  # heads and embedding are coupled in ways we do not cut yet
    return tuple(None for _ in out) if isinstance(out, tuple) else None


def unknown(ctx: Context, name: str, m: nn.Module, args, aids, out, why: str = "") -> Any:
    tracked = [i for i in aids if isinstance(i, torch.Tensor)]
    if tracked:
        ctx.freeze_all(aids)
        ctx.warn(f"unsupported module '{name}' ({type(m).__name__}){': ' + why if why else ''}; "
                 "the channels feeding it are kept")
    return None


# shape-preserving, value-by-value: on meta tensors their output is their input
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.RReLU,
)
_PER_CHANNEL = ELEMENTWISE_MODULES + (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)

MODULES: dict[type, Callable] = {t: per_channel for t in _PER_CHANNEL}
MODULES.update({
    nn.Conv1d: conv, nn.Conv2d: conv, nn.Conv3d: conv,
    nn.ConvTranspose1d: conv, nn.ConvTranspose2d: conv, nn.ConvTranspose3d: conv,
    nn.Linear: linear,
    nn.BatchNorm1d: batchnorm, nn.BatchNorm2d: batchnorm, nn.BatchNorm3d: batchnorm,
    nn.SyncBatchNorm: batchnorm, nn.InstanceNorm1d: batchnorm, nn.InstanceNorm2d: batchnorm,
    nn.InstanceNorm3d: batchnorm, nn.GroupNorm: groupnorm, nn.LayerNorm: layernorm,
    nn.PReLU: prelu, nn.Embedding: embedding, nn.Softmax: softmax, nn.LogSoftmax: softmax,
    nn.Softmin: softmax, nn.Softmax2d: cross_channel, nn.LocalResponseNorm: cross_channel,
    nn.Flatten: move, nn.Unflatten: move, nn.ChannelShuffle: move, nn.PixelShuffle: move,
    nn.PixelUnshuffle: move, nn.MultiheadAttention: attention,
})


def handler_for(m: nn.Module) -> Callable | None:
    """The rule for a module, but only when its forward is the stock one we modelled."""
    for cls in type(m).__mro__:
        if cls in MODULES:
            return MODULES[cls] if type(m).forward is cls.forward else None
    return None
