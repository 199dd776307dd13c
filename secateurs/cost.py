"""Exact MACs and parameter counts under the convention of METHODS.md.

MACs count Conv (H_out*W_out*C_in*C_out*k/groups), ConvTranspose (the same per *input*
position) and Linear (in*out per token) layers, per sample; BN, activations, bias and pooling
are free. Params are all parameters of the model (BN affine included, running stats excluded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

__all__ = ["Cost", "LayerCost", "count"]


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    macs: int
    params: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int
    layers: list[LayerCost] = field(default_factory=list)

    def __str__(self) -> str:
        return f"MACs {self.macs / 1e6:,.2f} M, params {self.params / 1e6:,.3f} M"

    def table(self) -> str:
        rows = [f"{'layer':<40} {'kind':<16} {'MACs':>14} {'params':>12}  out shape"]
        for r in self.layers:
            rows.append(f"{r.name:<40} {r.kind:<16} {r.macs:>14,} {r.params:>12,}  {list(r.output_shape)}")
        rows.append(f"{'total':<40} {'':<16} {self.macs:>14,} {self.params:>12,}")
        return "\n".join(rows)


def _layer_macs(m: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> int:
    if isinstance(m, _ConvTransposeNd):
        return x.numel() // batch * (m.out_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, _ConvNd):
        return y.numel() // batch * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear):
        return x.numel() // batch * m.out_features
    if isinstance(m, nn.MultiheadAttention):  # its projections are Linear layers in all but name
        tokens = x.numel() // batch // m.embed_dim
        return tokens * (m.embed_dim * 3 * m.embed_dim + m.embed_dim * m.embed_dim)
    return 0


_COUNTED = (_ConvNd, nn.Linear, nn.MultiheadAttention)


def _batch_size(inputs: tuple) -> int:
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return 1


def count(model: nn.Module, example_inputs: Any) -> Cost:
    """MACs per sample and parameters of ``model``, with a per-layer breakdown.

    Runs one forward in eval mode under ``torch.no_grad()``; the model's mode is restored.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    batch = _batch_size(inputs)
    records: list[LayerCost] = []
    inside_mha: list[int] = [0]
    handles = []

    def hook(name):
        def fn(m, args, out):
            x = args[0] if args else None
            y = out[0] if isinstance(out, tuple) else out
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                return
            macs = _layer_macs(m, x, y, batch)
            own = sum(p.numel() for p in m.parameters(recurse=False))
            records.append(LayerCost(name, type(m).__name__, int(macs), own, tuple(x.shape), tuple(y.shape)))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, _COUNTED):
            handles.append(m.register_forward_hook(hook(name)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    # nn.MultiheadAttention.out_proj is not called as a module; its params belong to the MHA row
    params = sum(p.numel() for p in model.parameters())
    return Cost(sum(r.macs for r in records), params, records)
