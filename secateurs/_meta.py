"""Meta-tensor shortcuts: output shapes by hand for the operations whose meta kernels are slow.

On meta tensors PyTorch computes most output shapes through its Python decompositions (prims,
``torch._refs``): a broadcasting ``mul`` or an ``adaptive_avg_pool2d`` costs 0.3-0.6 ms there, more
than the channel rule that follows. Each shortcut returns what the real meta kernel would (shape,
dtype, strides of a contiguous result, the input object itself for an in-place op) or None, and
then the real kernel runs, so every case it does not know, and every error, stays PyTorch's.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _empty(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


# -- layers -----------------------------------------------------------------------------------------
def conv_shape(args, kwargs):
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    nd = w.dim() - 2
    if x.dim() != nd + 2 or x.shape[1] != w.shape[1] * int(_arg(args, kwargs, 6, "groups", 1)):
        return None  # let the real kernel raise its own message
    pad = _arg(args, kwargs, 4, "padding", 0)
    stride, dil = _tuple(_arg(args, kwargs, 3, "stride", 1), nd), _tuple(_arg(args, kwargs, 5, "dilation", 1), nd)
    if isinstance(pad, str):
        if pad not in ("same", "valid") or (pad == "same" and any(s != 1 for s in stride)):
            return None  # PyTorch refuses a strided "same" (and unknown strings): let it say so
        if pad == "same":
            sp = list(x.shape[2:])
        else:
            sp = [(x.shape[2 + i] - dil[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    else:
        p = _tuple(pad, nd)
        sp = [(x.shape[2 + i] + 2 * p[i] - dil[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    if any(s <= 0 for s in sp):
        return None
    return _empty((x.shape[0], w.shape[0], *sp), x.dtype)


def linear_shape(args, kwargs):
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    if x.dim() < 1 or x.shape[-1] != w.shape[-1]:
        return None
    return _empty((*x.shape[:-1], w.shape[0]), x.dtype)


def same_shape(args, kwargs):
    """Norms, activations, dropout: the input's shape; ``inplace=True`` returns the input itself."""
    x = args[0]
    if not isinstance(x, torch.Tensor) or "out" in kwargs:
        return None
    return x if kwargs.get("inplace") else _empty(x.shape, x.dtype)


def _dropout_shape(args, kwargs):
    p = _arg(args, kwargs, 1, "p", 0.5)
    return same_shape(args, kwargs) if isinstance(p, (int, float)) and 0.0 <= p <= 1.0 else None


def _hardtanh_shape(args, kwargs):
    lo, hi = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
    return same_shape(args, kwargs) if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= hi else None


def _unary_shape(args, kwargs):
    """``torch.sigmoid(x)``, ``x.tanh()``: floating input only (integers are promoted)."""
    x = args[0]
    if len(args) != 1 or kwargs or not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    return _empty(x.shape, x.dtype) if x.is_contiguous() else None


def _adaptive_avg(nd: int) -> Callable:
    def shape(args, kwargs):
        x, size = args[0], _arg(args, kwargs, 1, "output_size")
        if (len(args) + len(kwargs) != 2 or not isinstance(x, torch.Tensor) or x.dim() not in (nd + 1, nd + 2)
                or not x.is_floating_point() or not x.is_contiguous() or 0 in x.shape):
            return None
        size = _tuple(size, nd)
        if len(size) != nd or not all(s is None or (isinstance(s, int) and s >= 0) for s in size):
            return None
        return _empty((*x.shape[:-nd], *(x.shape[x.dim() - nd + i] if s is None else int(s) for i, s in enumerate(size))),
                      x.dtype)
    return shape


# -- binary arithmetic --------------------------------------------------------------------------------
def _broadcast(a: tuple, b: tuple) -> tuple | None:
    if a == b:
        return tuple(a)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(out)


def _operands(args, kwargs) -> tuple | None:
    """(dtype, broadcast shape) of ``a op b`` when the result is plainly ``a``'s floating dtype:
    meta tensors of one floating dtype, contiguous, or Python numbers."""
    if len(args) != 2 or (kwargs and set(kwargs) != {"alpha"}):
        return None
    dtype, shapes = None, []
    for v in args:
        if isinstance(v, torch.Tensor):
            if not v.is_meta or not v.is_floating_point() or not v.is_contiguous() or (dtype not in (None, v.dtype)):
                return None
            dtype = v.dtype
            shapes.append(v.shape)
        elif not isinstance(v, (int, float)):
            return None
    if dtype is None:
        return None
    shape = shapes[0] if len(shapes) == 1 else _broadcast(shapes[0], shapes[1])
    return None if shape is None else (dtype, shape)


def _binary_shape(args, kwargs):
    found = _operands(args, kwargs)
    return None if found is None else _empty(found[1], found[0])


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _inplace(integers: bool) -> Callable:
    """``x += y``, ``x.mul_(y)``: the input itself, when ``y`` broadcasts into it unchanged; with
    ``integers``, also ``counter += 1`` on an integer tensor (batch norm's ``num_batches_tracked``)."""
    def shape(args, kwargs):
        x = args[0]
        if not isinstance(x, torch.Tensor):
            return None
        found = _operands(args, kwargs)
        if found is not None:
            return x if tuple(found[1]) == tuple(x.shape) else None
        if (integers and len(args) == 2 and not kwargs and type(args[1]) is int and x.is_meta
                and x.dtype in _INTEGERS):
            return x
        return None
    return shape


_SAME = [F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm, F.relu, F.silu, F.gelu, F.hardswish,
         F.hardsigmoid, F.relu6]
META_SHAPES: dict[Any, Callable] = {
    F.conv1d: conv_shape, F.conv2d: conv_shape, F.conv3d: conv_shape, F.linear: linear_shape,
    **dict.fromkeys(_SAME, same_shape), F.dropout: _dropout_shape, F.hardtanh: _hardtanh_shape,
    **dict.fromkeys([torch.sigmoid, "sigmoid", torch.tanh, "tanh"], _unary_shape),
    F.adaptive_avg_pool1d: _adaptive_avg(1), F.adaptive_avg_pool2d: _adaptive_avg(2), F.adaptive_avg_pool3d: _adaptive_avg(3),
    **dict.fromkeys([operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                     torch.div, "add", "sub", "mul", "div"], _binary_shape),
    **dict.fromkeys([operator.iadd, operator.isub, operator.imul, "add_", "sub_", "mul_"], _inplace(True)),
    **dict.fromkeys([operator.itruediv, "div_"], _inplace(False)),
}
