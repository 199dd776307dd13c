"""Bias compensation: the constant a removed channel carried is added back downstream.

A channel whose norm scale is (near) zero outputs (near) the same value everywhere: its shift
``beta`` through the activation. That is the channel HFP, BN-scale and network slimming remove,
and cutting it drops that constant from every layer reading it. :func:`compensation` measures the
value at each reading layer's input (one forward on the analysed inputs and one on a seeded
random copy: a constant channel does not depend on the input) and folds ``W @ value`` into that
layer's bias, or, when it has none, into the running mean of the batch norm right after it.

Exact for linears, 1x1 and unpadded convs, grouped ones included (a constant input reaches only
its own group's outputs); for padded convs exact except at border pixels, where the removed taps
read padding zeros rather than the constant. Transposed convs get no fold: with a stride each
output pixel sums a different subset of the kernel taps, so a constant input does not add a
constant. Only channels whose norm scale is small are candidates, so cuts of ordinary channels pay
nothing.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ._modes import in_mode

__all__ = ["compensation", "has_candidates", "NormsAfter", "SCALE_TOL", "STD_TOL"]

SCALE_TOL = 0.05  # |gamma| below this fraction of the norm's mean |gamma|: a candidate
STD_TOL = 0.02  # spread below this fraction of the layer input's median channel spread: constant
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# a reader's fold is W @ value with its stored weight: only layers that compute with that weight as
# stored (a subclass's forward may scale or standardise it; a parametrization recomputes it)
_STOCK = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward)


def has_candidates(modules: dict[str, nn.Module], outs: Iterable[tuple[str, str, torch.Tensor]]) -> bool:
    """Whether any removed channel has a near-zero norm scale (``outs``: producer bindings as
    (module, tensor name, removed mask)). Every cut asks, so all norms are tested in a few fused
    ops rather than five per norm."""
    scales, gones = [], []
    for mname, tname, gone in outs:
        m = modules[mname]
        if tname != "weight" or not isinstance(m, _NORMS):
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and len(gone) == len(w) and w.is_floating_point():
            scales.append(w.detach().float().cpu().abs())
            gones.append(gone.cpu())
    if not scales:
        return False
    a, gone = torch.cat(scales), torch.cat(gones)
    sizes = torch.tensor([len(s) for s in scales])
    means = torch.zeros(len(scales)).index_add_(0, torch.repeat_interleave(torch.arange(len(scales)), sizes), a) / sizes
    return bool(((a <= SCALE_TOL * torch.repeat_interleave(means, sizes)) & gone).any())


def _reader_axis(m: nn.Module) -> int | None:
    """The input axis whose channels a layer's weight axis 1 reads, for the layers we can fold into."""
    if type(m).forward not in _STOCK or parametrize.is_parametrized(m):
        return None
    if isinstance(m, _CONVS):
        return 1
    if isinstance(m, nn.Linear):
        return -1
    return None


@torch.no_grad()
def compensation(model: nn.Module, example_inputs: tuple, readers: dict[str, torch.Tensor]
                 ) -> dict[tuple[str, str], torch.Tensor]:
    """New full-size tensors ``{(module, "bias" or "running_mean"): tensor}`` that fold the constant
    removed inputs of ``readers`` ({module name: removed mask over its input channels}) back in.
    The model is not changed; layers whose removed inputs vary, or with nowhere to fold, are skipped.
    """
    modules = dict(model.named_modules())
    readers = {n: _input_mask(modules[n], g) for n, g in readers.items() if g.any() and _reader_axis(modules[n]) is not None}
    if not readers:
        return {}
    seen: dict[str, tuple] = {}
    bad: set[str] = set()  # readers called on inputs of different widths
    norms = NormsAfter(modules)

    def grab(name):
        def hook(m, args, out):
            x = args[0]
            axis = _reader_axis(m)
            x = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1).float()
            stats = (x.amin(1), x.amax(1), x.sum(1), x.shape[1])
            prev = seen.get(name)
            if prev is not None and prev[0].shape == stats[0].shape:  # per channel: min, max, sum, count
                stats = (torch.minimum(prev[0], stats[0]), torch.maximum(prev[1], stats[1]), prev[2] + stats[2],
                         prev[3] + stats[3])
            elif prev is not None:
                bad.add(name)
            seen[name] = stats
            norms.produced(name, out)
        return hook

    handles = [modules[n].register_forward_hook(grab(n)) for n in readers]
    gen = torch.Generator().manual_seed(0)
    other = tuple(torch.randn(x.shape, generator=gen).to(x) * x.std().clamp_min(1e-3) + x.mean()
                  if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 1 else x
                  for x in example_inputs)
    try:
        with in_mode(model, training=False):
            for inputs in (example_inputs, other):
                model(*inputs)
    except Exception:  # noqa: BLE001 - compensation is a refinement: it never stops a cut (the check forward decides)
        return {}
    finally:
        for h in handles:
            h.remove()
        norms.close()
    after = norms.after
    out: dict[tuple[str, str], torch.Tensor] = {}
    for name, gone in readers.items():
        if name in bad or name not in seen:
            continue
        delta = _delta(modules[name], seen[name], gone)
        if delta is None:
            continue
        m = modules[name]
        if m.bias is not None:
            out[(name, "bias")] = m.bias.detach() + delta.to(m.bias)
        elif len(after.get(name, ())) == 1:
            bn = modules[next(iter(after[name]))]
            key = (next(iter(after[name])), "running_mean")
            if bn.running_mean is not None:
                out[key] = out.get(key, bn.running_mean) - delta.to(bn.running_mean)
    return out


class NormsAfter:
    """Which batch norms each watched layer's output goes straight into during a forward: the
    output itself, unchanged (an in-place op in between, e.g. ReLU(inplace=True), returns the same
    tensor, after which the norm's running mean is no place for a fold). The watched layers' hooks
    call :meth:`produced`; :meth:`close` removes the norms' hooks."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.after: dict[str, set[str]] = {}
        self._made: dict[int, tuple[str, torch.Tensor, int]] = {}  # id(output) -> layer, output (kept alive), version
        self._handles = [m.register_forward_pre_hook(self._follow(n)) for n, m in modules.items()
                         if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def produced(self, name: str, out: torch.Tensor) -> None:
        self._made[id(out)] = (name, out, out._version)

    def _follow(self, norm: str):
        def hook(m, args):
            hit = self._made.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
            if hit is not None and hit[1] is args[0] and args[0]._version == hit[2]:
                self.after.setdefault(hit[0], set()).add(norm)
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._made.clear()


def _input_mask(m: nn.Module, gone: torch.Tensor) -> torch.Tensor:
    """Removed input channels from a mask over the weight's axis 1: in a grouped conv that axis is
    the position within a group, and cutting a position cuts it from every group."""
    groups = getattr(m, "groups", 1)
    return gone.repeat(groups) if groups > 1 and len(gone) * groups == m.in_channels else gone


def _delta(m: nn.Module, stats: tuple, gone: torch.Tensor) -> torch.Tensor | None:
    """``W[:, c] @ value_c`` summed over the removed inputs ``c`` that are constant, or None."""
    lo, hi, total, n = stats
    if len(lo) != len(gone):
        return None
    gone = gone.to(lo.device)
    spread = hi - lo
    typical = spread[~gone].median() if (~gone).any() else spread.median()
    const = gone & (spread <= STD_TOL * typical.clamp_min(1e-12))
    if not const.any():
        return None
    w = m.weight.detach().float()
    w = w.flatten(2).sum(2) if w.dim() > 2 else w  # every kernel tap reads the same constant: [out, in / groups]
    value = torch.where(const, total / n, torch.zeros_like(total)).to(w.device)  # per input channel, 0 if kept
    groups = getattr(m, "groups", 1)
    out_per, in_per = w.shape[0] // groups, w.shape[1]
    # output o of group g reads inputs g * in_per ... (g + 1) * in_per - 1 through w[o]
    return (w.view(groups, out_per, in_per) * value.view(groups, 1, in_per)).sum(2).flatten()
