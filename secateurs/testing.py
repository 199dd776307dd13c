"""Checks that a cut kept the model's function: use them on your own models too.

The property: zero every producer slice of some channels (so they carry exact zeros), remove
them, and the outputs must not change. It holds for groups whose ``exact`` flag is set.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from ._state import copy_model
from .graph import analyze
from .surgery import apply_plan, zero_channels

__all__ = ["check_equivalence", "main_output", "output_tensors", "randomize_norms"]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a zeroed conv does not give a zero channel by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
    return model


def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor of a nested output (tuples, lists, dicts), in order: what a check compares."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in output_tensors(o)]
    return []


def main_output(out):
    """The tensor to compare: itself, ``out["out"]`` (segmentation) or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["out"]
    return out[0]


def check_equivalence(model: nn.Module, x, fraction: float = 0.5, seed: int = 0, tol: float = 1e-5):
    """Zero a random ``fraction`` of every exact group of a copy of ``model``, cut them, compare.

    Every output tensor is compared. Returns ``(pruned copy, worst relative max error, number of
    groups cut)``; raises AssertionError when an error exceeds ``tol`` or an output shape changed.
    """
    model = copy_model(model).eval()
    graph = analyze(model, x)
    gen = torch.Generator().manual_seed(seed)
    plan = {}
    for g in graph.groups:
        n = int(g.size * fraction)
        if g.exact and 0 < n < g.size:
            plan[g.index] = torch.randperm(g.size, generator=gen)[:n].tolist()
            zero_channels(model, graph, g, plan[g.index])
    inputs = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        refs = output_tensors(model(*inputs))
    apply_plan(model, graph, plan)
    with torch.no_grad():
        outs = output_tensors(model(*inputs))
    if [t.shape for t in outs] != [t.shape for t in refs]:
        raise AssertionError(f"output shapes changed from {[tuple(t.shape) for t in refs]} to {[tuple(t.shape) for t in outs]}")
    err = 0.0
    for out, ref in zip(outs, refs):
        if ref.numel() and ref.is_floating_point():
            err = max(err, ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item())
    if err > tol:
        raise AssertionError(f"removing zeroed channels changed outputs by {err:.2e} (> {tol:g})")
    return model, err, len(plan)
