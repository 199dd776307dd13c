"""The meta shortcuts give what the real meta kernels give (shape, dtype, strides, the input object
for in-place ops), and give way (None) wherever they would not know."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from secateurs._meta import META_SHAPES


def meta(*shape, dtype=torch.float32, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.to(memory_format=torch.channels_last) if channels_last else t


def _real(target, args, kwargs):
    if isinstance(target, str):
        return getattr(args[0], target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


X = meta(2, 8, 5, 6)
CASES = [
    (F.adaptive_avg_pool2d, (X, 1), {}), (F.adaptive_avg_pool2d, (X, (3, None)), {}),
    (F.adaptive_avg_pool2d, (meta(8, 5, 6), 2), {}), (F.adaptive_avg_pool1d, (meta(2, 8, 7), 3), {}),
    (F.adaptive_avg_pool3d, (meta(1, 4, 3, 5, 6), (1, 2, 3)), {}),
    (torch.sigmoid, (X,), {}), ("sigmoid", (X,), {}), (torch.tanh, (X,), {}), ("tanh", (X,), {}),
    (F.dropout, (X,), {"p": 0.2, "training": True, "inplace": False}),
    (F.hardtanh, (X,), {"min_val": 0.0, "max_val": 6.0, "inplace": False}),
    (operator.mul, (X, meta(2, 8, 1, 1)), {}), (operator.mul, (meta(8, 1, 1), X), {}),
    (operator.add, (X, 1.5), {}), (operator.sub, (X, 2), {}), (operator.truediv, (X, meta(6)), {}),
    (torch.add, (X, X), {"alpha": 2}), ("mul", (X, meta(1, 8, 1, 1)), {}), ("div", (X, 3.0), {}),
    (torch.mul, (meta(1, 8, 1, 1, dtype=torch.float16), meta(2, 8, 5, 6, dtype=torch.float16)), {}),
    (torch.sub, (meta(), X), {}),
]


@pytest.mark.parametrize("target,args,kwargs", CASES, ids=lambda v: getattr(v, "__name__", None))
def test_shortcut_matches_the_meta_kernel(target, args, kwargs):
    got = META_SHAPES[target](args, kwargs)
    want = _real(target, args, kwargs)
    assert got is not None
    assert (got.shape, got.dtype, got.stride(), got.device) == (want.shape, want.dtype, want.stride(), want.device)


@pytest.mark.parametrize("target", [operator.iadd, operator.imul, operator.isub, operator.itruediv,
                                    "add_", "mul_", "sub_", "div_"])
def test_inplace_returns_its_input(target):
    x = meta(2, 8, 5, 6)
    for other in (meta(1, 8, 1, 1), 2.0, meta(2, 8, 5, 6)):
        assert META_SHAPES[target]((x, other), {}) is x
    assert META_SHAPES[target]((meta(1, 8, 1, 1), x), {}) is None  # would grow its input: the kernel raises


def test_integer_counter_step():
    counter = meta(dtype=torch.long)  # batch norm's num_batches_tracked
    for target in ("add_", operator.iadd, "mul_"):
        assert META_SHAPES[target]((counter, 1), {}) is counter
    for target, other in (("div_", 2), ("add_", 1.5), (operator.itruediv, 2)):
        assert META_SHAPES[target]((counter, other), {}) is None  # the kernel raises (float into long)


@pytest.mark.parametrize("fn", [F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.dropout, F.hardtanh])
def test_inplace_activation_returns_its_input(fn):
    x = meta(2, 8, 5, 6)
    assert META_SHAPES[fn]((x,), {"inplace": True}) is x


@pytest.mark.parametrize("target,args,kwargs", [
    (operator.mul, (X, meta(2, 8, 5, 6, dtype=torch.float16)), {}),  # type promotion: the kernel decides
    (operator.mul, (meta(2, 3, dtype=torch.long), 2), {}),  # integers
    (operator.truediv, (meta(2, 3, dtype=torch.long), 2), {}),  # integer division makes floats
    (operator.mul, (X, meta(3, 1, 1)), {}),  # not broadcastable: the kernel's own error
    (operator.mul, (X, 1j), {}),  # complex scalar
    (torch.div, (X, 2.0), {"rounding_mode": "floor"}),
    (operator.mul, (meta(2, 8, 5, 6, channels_last=True), meta(1, 8, 1, 1)), {}),  # strides follow the input
    (F.adaptive_avg_pool2d, (meta(2, 8, 5, 6, channels_last=True), 2), {}),
    (F.adaptive_avg_pool2d, (meta(2, 8, 5, 6, dtype=torch.long), 2), {}),
    (F.adaptive_avg_pool2d, (meta(5, 6), 2), {}),
    (torch.sigmoid, (meta(2, 3, dtype=torch.long),), {}),
    (F.dropout, (X,), {"p": 1.5, "training": True, "inplace": False}),
    (F.hardtanh, (X,), {"min_val": 2.0, "max_val": 1.0, "inplace": False}),
    (F.conv2d, (X, meta(4, 8, 3, 3)), {"stride": 2, "padding": "same"}),  # PyTorch refuses a strided "same"
    (F.conv2d, (X, meta(4, 8, 3, 3)), {"padding": "full"}),
])
def test_gives_way_to_the_kernel(target, args, kwargs):
    assert META_SHAPES[target](args, kwargs) is None
