"""Shared checks: the equivalence property every cut must satisfy."""
from __future__ import annotations

import copy

import torch

from secateurs import analyze, apply_plan, zero_channels


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics, so a zeroed conv does not give a zero channel by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
    return model


def main_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["out"]
    return out[0]


def check_equivalence(model: torch.nn.Module, x, fraction: float = 0.5, seed: int = 0, tol: float = 1e-5):
    """Zero a random ``fraction`` of every exact group, cut those channels, compare outputs.

    Returns (pruned copy, relative max error, number of groups cut).
    """
    model = copy.deepcopy(model).eval()
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
        ref = main_output(model(*inputs))
    apply_plan(model, graph, plan)
    with torch.no_grad():
        out = main_output(model(*inputs))
    assert out.shape == ref.shape
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    assert err <= tol, f"removing zeroed channels changed outputs by {err:.2e}"
    return model, err, len(plan)
