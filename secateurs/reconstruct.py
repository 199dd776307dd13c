"""Least-squares reconstruction: before a cut, every layer that reads a removed channel is re-fitted
so that, on a few calibration images, it computes from the kept channels what it computed from all
of them in the unpruned model.

A short fine-tuning starts from wherever the cut leaves the network; a cut that dropped 50% of the
MACs leaves it far from where it was (channel pruning with reconstruction, He et al. 2017; ThiNet,
Luo et al. 2017). First every reader's removed inputs get zero weights (and the readers that are not
re-fitted the cut's own bias compensation), and a cut copy is made (where a LayerNorm or GroupNorm
normalises over the cut channels, zeroing them is not cutting them: the fits read the cut copy,
never the zeroed model). Then its layers are re-fitted in forward order, each on the inputs the
already re-fitted network gives it (earlier errors are corrected, not compounded) against the
outputs the unpruned model gives: all in one forward over the calibration images, each layer solved
in its pre-hook before it runs (a forward as far as each layer per layer took resnet50 3.5x as long:
docs/reconstruct_cost.csv), or that forward per layer when one over all images would not fit in
``ONE_PASS_BYTES``. An intercept absorbs the mean the removed channels carried (into the layer's
bias, or the running mean of the batch norm right after it); ridge regularisation toward the layer's
own weights (``ridge`` times the mean input energy, 0.1) keeps the fit near them: a near-exact fit
(1e-3) scored as well right after the cut but was a worse start for fine-tuning (100 steps left
ResNet-20/56 at 50% MACs 0.9-1.3 points below the plain cut: docs/reconstruct.csv at commit
848f5ea). Re-fitted: convolutions with one group (any kernel, stride, dilation, padding of zeros)
and linears with at most ``MAX_FEATURES`` kept inputs x taps; other readers are cut as usual. The
fitted weights go into the slots of the model the cut keeps, and one batch checks that cutting the
model as the pipeline will gives the re-fitted copy; where it does not, the model is left as it was,
with a warning.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ._hooks import until
from ._modes import in_mode
from ._state import copy_model
from .compensate import NormsAfter, compensation, has_candidates
from .data import ArrayDataset, Batches, pad_to_multiple
from .distributed import from_first_process, is_main_process
from .graph import DependencyGraph
from .surgery import PruningPlan, apply_plan, cut_inputs
from .testing import output_tensors
from ._validation import PruningError

__all__ = ["refit_readers", "refit_before_cut", "calibration"]

_STOCK = (nn.Conv2d.forward, nn.Linear.forward)
TARGET_BYTES = 1 << 30  # the unpruned outputs kept for all layers at once, above which each layer recomputes its own
MAX_FEATURES = 8192  # a dense solve of this size takes seconds; a wider layer (VGG's 25088-input linear) is cut as usual
UNFOLD_BYTES = 1 << 28  # receptive fields unfolded at once (a chunk of the batch)
ONE_PASS_BYTES = 1 << 32  # a forward over all calibration images at once, above which each layer runs its own


def calibration(data, images: int, device: torch.device, batch_size: int = 64) -> list[torch.Tensor]:
    """The first ``images`` inputs of a fixed class-balanced draw of ``data`` (an ArrayDataset, not
    augmented) or of its batches (any iterable of ``(x, y)`` or ``x``), on ``device``. Segmentation
    images are padded as evaluation pads them (``secateurs.train.predict_padded``): whole frames of
    any size, which a U-Net runs on only at a multiple of its downsampling."""
    seg = isinstance(data, ArrayDataset) and data.task == "segmentation"
    if isinstance(data, ArrayDataset):
        data = Batches(data.subset(images), batch_size, train=False)
    out, n = [], 0
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = pad_to_multiple(x) if seg else x
        out.append(x[:images - n].to(device))
        n += len(out[-1])
        if n >= images:
            break
    return out


def refit_before_cut(model: nn.Module, graph: DependencyGraph, plan: PruningPlan, data, images: int
                     ) -> tuple[dict[str, tuple[float, float]], int]:
    """:func:`refit_readers` on ``images`` inputs of ``data``, and how many it read; under torchrun made
    by the first process and sent to the others: one model everywhere, whatever the kernels' order of sums."""
    fits, n = {}, 0
    if is_main_process():
        batches = calibration(data, images, next(model.parameters()).device)
        fits, n = refit_readers(model, graph, plan, batches), sum(len(x) for x in batches)
    fits, n, state = from_first_process((fits, n, {k: t.cpu() for k, t in model.state_dict().items()}
                                         if fits and torch.distributed.is_initialized() else None))
    if state is not None and not is_main_process():
        model.load_state_dict(state)
    return fits, n


def _fits(m: nn.Module, axis: int, gone: torch.Tensor) -> bool:
    if type(m).forward not in _STOCK or parametrize.is_parametrized(m) or axis != 1:
        return False
    if isinstance(m, nn.Conv2d) and not (m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple)):
        return False
    return int((~gone).sum()) * m.weight[0, 0].numel() <= MAX_FEATURES


@torch.no_grad()
def refit_readers(model: nn.Module, graph: DependencyGraph, plan: PruningPlan, batches: Iterable[torch.Tensor], *,
                  positions: int = 32, ridge: float = 0.1, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Re-fit, in place, the layers of ``model`` that read a channel ``plan`` removes, on the input
    ``batches`` (in a cut copy, the result carried into the slots the cut keeps); the removed inputs'
    weights become zero, so the cut that follows changes nothing further. ``positions``: output
    pixels sampled per image and layer. Returns {layer: (squared error of the plain cut, after the
    fit), each relative to the kept outputs' squared norm} on the calibration rows; {} when nothing
    was re-fitted (the model is then as it was)."""
    batches = list(batches)
    modules = dict(model.named_modules())
    outs, readers = cut_inputs(graph, plan)
    masks = {n: g for n, (axis, g) in readers.items() if _fits(modules[n], axis, g)}
    if not masks or not batches:
        return {}
    try:
        order, after, shapes = _call_order(model, batches[0], list(masks))
    except Exception as err:  # noqa: BLE001 - named for the user: nothing was changed yet
        raise PruningError(f"reconstruct: the model does not run on the calibration images ({type(err).__name__}: "
                           f"{err}); they are the first input of `data`'s batches") from err
    original = copy_model(model)
    done: dict[str, tuple[float, float]] = {}
    with in_mode(model, training=False), in_mode(original, training=False):
        at = ["the unpruned outputs"]  # what is being done, for the error
        try:
            _as_cut(model, modules, graph, outs, readers, set(order))
            cut = apply_plan(copy_model(model), graph, plan, compensate=False)
            kept = {n: ~g for n, t, g in outs if t == "weight" and n in masks}  # a re-fitted layer's own outputs cut
            targets = _targets(original, order, shapes, batches, positions, seed, kept)
            bns = {n: cut.get_submodule(b) for n, b in after.items()}
            if targets is not None and _one_pass(batches, shapes, order, _largest_output(cut, batches[0])):
                _refit_in_one_pass(cut, order, bns, batches, targets, ridge, done, at)
            else:
                for i, name in enumerate(order):
                    at.append(name)
                    done[name] = _refit_one(cut, original, name, bns.get(name), batches,
                                            targets[name] if targets is not None else None, i, positions, ridge, seed,
                                            kept.get(name))
            at.append("the re-fitted weights, carried into the model")
            _carry(model, cut, order, after, outs, masks)
            if not _cuts_to(model, graph, plan, cut, batches[0]):
                model.load_state_dict(original.state_dict())
                return {}
        except BaseException as err:  # a failed re-fit leaves the model as it was
            model.load_state_dict(original.state_dict())
            if isinstance(err, Exception):
                raise PruningError(f"reconstruct: re-fitting {at[-1]!r} failed ({type(err).__name__}: {err}); "
                                   "the model is as it was") from err
            raise
    return done


def _as_cut(model: nn.Module, modules: dict, graph: DependencyGraph, outs: list, readers: dict, fitted: set) -> None:
    """Every reader's removed inputs' weights zeroed, and for those not re-fitted the constants the
    cut folds back in (:mod:`secateurs.compensate`) folded now: the cut after it folds nothing more."""
    others = {n: g for n, (axis, g) in readers.items() if n not in fitted and axis == 1}
    if others and graph.example_inputs and has_candidates(modules, outs):
        for (mname, tname), t in compensation(model, graph.example_inputs, others).items():
            getattr(modules[mname], tname).copy_(t)
    for n, (axis, gone) in readers.items():
        w = modules[n].weight
        w.index_fill_(axis, torch.nonzero(gone.to(w.device)).flatten(), 0)


def _carry(model: nn.Module, cut: nn.Module, names: list[str], after: dict[str, str], outs: list, masks: dict) -> None:
    """The re-fitted weights, biases and batch-norm means of ``cut`` into the slots of ``model`` the
    cut keeps (the removed inputs' weights are zero already)."""
    gone = {(n, t): g for n, t, g in outs}

    def rows(name: str, tensor: str, size: int, device: torch.device) -> torch.Tensor:
        g = gone.get((name, tensor))
        return (torch.arange(size) if g is None else (~g).nonzero().flatten()).to(device)

    for n in names:
        m, c = model.get_submodule(n), cut.get_submodule(n)
        dev = m.weight.device
        m.weight[rows(n, "weight", m.weight.shape[0], dev)[:, None], (~masks[n]).nonzero().flatten().to(dev)] = c.weight
        if m.bias is not None:
            m.bias[rows(n, "bias", len(m.bias), dev)] = c.bias
        if n in after:
            bn, fitted = model.get_submodule(after[n]), cut.get_submodule(after[n])
            bn.running_mean[rows(after[n], "running_mean", len(bn.running_mean), dev)] = fitted.running_mean


def _cuts_to(model: nn.Module, graph: DependencyGraph, plan: PruningPlan, fitted: nn.Module, x: torch.Tensor) -> bool:
    """Whether cutting ``model`` as the pipeline will gives the re-fitted cut copy on ``x``; warns if not."""
    cut = apply_plan(copy_model(model), graph, plan)
    a = [t for t in output_tensors(fitted(x)) if t.is_floating_point()]
    b = [t for t in output_tensors(cut(x)) if t.is_floating_point()]
    same = len(a) == len(b) and all(s.shape == t.shape and bool(((s - t).abs().max() <= 1e-4 * (1 + s.abs().max())))
                                    for s, t in zip(a, b))
    if not same:
        warnings.warn("reconstruct: the re-fitted weights, carried into the model, do not cut to the re-fitted copy "
                      "(a layer the cut changes in a way the re-fit did not foresee): this cut is not re-fitted",
                      stacklevel=3)
    return same


def _call_order(model: nn.Module, x: torch.Tensor, names: list[str]) -> tuple[list[str], dict[str, str], dict]:
    """The layers in the order a forward calls them (a layer called twice is left out: its inputs
    mix two places), for each the batch norm its output goes straight into, if it is the only one
    and tracks running statistics, and its output shape (a linear's as [batch, features, outputs
    per sample])."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    norms = NormsAfter(modules)

    def called(name):
        def hook(m, args, out):
            calls[name] = calls.get(name, 0) + 1
            rows = out.numel() // out.shape[-1] // out.shape[0]  # a linear's outputs per sample (tokens)
            shapes[name] = tuple(out.shape) if isinstance(m, nn.Conv2d) else (out.shape[0], out.shape[-1], rows)
            norms.produced(name, out)
        return hook

    handles = [modules[n].register_forward_hook(called(n)) for n in names]
    try:
        with in_mode(model, training=False):
            model(x)
    finally:
        for h in handles:
            h.remove()
        norms.close()
    after = {n: next(iter(bns)) for n, bns in norms.after.items()
             if len(bns) == 1 and modules[next(iter(bns))].running_mean is not None}
    return [n for n in calls if calls[n] == 1], after, shapes


def _largest_output(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes per image of the largest output of any module of ``model`` on ``x``."""
    largest = [0]

    def measured(m, args, out):
        largest[0] = max([largest[0]] + [t.numel() * t.element_size() // len(x) for t in output_tensors(out)])

    handles = [m.register_forward_hook(measured) for m in model.modules()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return largest[0]


def _one_pass(batches: list, shapes: dict, order: list[str], largest: int) -> bool:
    """Whether one forward over all the batches at once can re-fit every layer: the batches stack
    (one image size), every re-fitted layer's output has the batch first, and a few of the largest
    activation for every image fit in ``ONE_PASS_BYTES``."""
    x = batches[0]
    return (all(b.shape[1:] == x.shape[1:] and b.dtype == x.dtype for b in batches)
            and all(shapes[n][0] == len(x) for n in order)
            and 4 * largest * sum(len(b) for b in batches) <= ONE_PASS_BYTES)


def _pick(m: nn.Module, y: torch.Tensor, positions: int, seed: int) -> torch.Tensor:
    """The output positions a layer is fitted at in one batch: per image for a conv ([B, n]), rows
    of the flattened output for a linear (all when few); the same for the same ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(m, nn.Linear):
        rows = y.numel() // y.shape[-1]
        return torch.randperm(rows, generator=gen)[:positions * y.shape[0]] if rows > positions * y.shape[0] else \
            torch.arange(rows)
    n = min(positions, y[0, 0].numel())
    return torch.rand(y.shape[0], y[0, 0].numel(), generator=gen).argsort(1)[:, :n]


def _draw(seed: int, batch: int, layer: int) -> int:
    """The positions' seed for one layer in one batch: the kept targets and a recomputation agree."""
    return seed + 7919 * batch + layer


def _gather(m: nn.Module, t: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """Rows [n, features] of a layer's output (or unfolded input) ``t`` at ``pick``."""
    if isinstance(m, nn.Linear):
        return t.reshape(-1, t.shape[-1])[pick.to(t.device)]
    t = t.flatten(2)
    pick = pick.to(t.device)
    return t.gather(2, pick[:, None].expand(-1, t.shape[1], -1)).transpose(1, 2).reshape(-1, t.shape[1])


def _inputs(m: nn.Module, x: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The kept inputs each sampled output reads (a conv's receptive fields, unfolded a chunk of
    the batch at a time: all of a large map's would not fit in memory)."""
    if isinstance(m, nn.Linear):
        return _gather(m, x, pick)
    per_image = x[0].numel() * m.weight[0, 0].numel() * x.element_size()  # stride 1's size
    step = max(1, UNFOLD_BYTES // max(1, per_image))
    return torch.cat([_gather(m, F.unfold(x[i:i + step], m.kernel_size, m.dilation, m.padding, m.stride),
                              pick[i:i + step]) for i in range(0, len(x), step)])


def _targets(original: nn.Module, order: list[str], shapes: dict, batches: list, positions: int, seed: int,
             kept: dict[str, torch.Tensor]) -> dict[str, list] | None:
    """{layer: [(pick, unpruned output rows) per batch]}, every layer from one forward per batch, only
    the outputs the cut keeps; None when they would take more than ``TARGET_BYTES`` (each layer then
    runs the unpruned model itself)."""
    per_image = sum(min(positions, max(1, math.prod(shapes[n][2:]))) * shapes[n][1] * 4 for n in order)
    if per_image * sum(len(x) for x in batches) > TARGET_BYTES:
        return None
    out: dict[str, list] = {n: [] for n in order}

    def grab(name, i):
        def hook(m, args, y):
            pick = _pick(m, y, positions, _draw(seed, i, order.index(name)))
            ys = _gather(m, y.detach(), pick).float()
            out[name].append((pick, ys[:, kept[name].to(ys.device)] if name in kept else ys))
        return hook

    for i, x in enumerate(batches):
        handles = [original.get_submodule(n).register_forward_hook(grab(n, i)) for n in order]
        try:
            original(x)
        finally:
            for h in handles:
                h.remove()
    return out


class _Fit:
    """One layer's normal equations, summed over the calibration batches, and their solution (a layer
    of the cut copy: every input it reads is kept)."""

    def __init__(self, m: nn.Module, bn: nn.Module | None) -> None:
        self.m, self.bn = m, bn
        self.intercept = m.bias is not None or bn is not None
        dim = m.weight[0].numel() + self.intercept
        self.a = torch.zeros(dim, dim, dtype=torch.float64)
        self.b = torch.zeros(dim, m.weight.shape[0], dtype=torch.float64)
        self.yy = torch.zeros((), dtype=torch.float64)

    def add(self, x: torch.Tensor, pick: torch.Tensor, ys: torch.Tensor) -> None:
        """One batch: the layer's input ``x``, the output positions ``pick`` and the unpruned outputs there."""
        xs = _inputs(self.m, x, pick)
        if self.intercept:
            xs = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype, device=xs.device)], 1)
        xs, ys = xs.double().cpu(), ys.double().cpu()
        self.a += xs.T @ xs
        self.b += xs.T @ ys
        self.yy += (ys * ys).sum()

    def solve(self, ridge: float) -> tuple[float, float]:
        """Set the layer's weights (and intercept) to the ridge solution, if it fits the rows better
        than the plain cut; (relative error of the plain cut, after)."""
        m, a, b = self.m, self.a, self.b
        w = m.weight.detach()
        w0 = w.reshape(w.shape[0], -1).double().cpu().T  # [features, out]: the plain cut's weights
        if self.intercept:
            bias0 = m.bias.detach().double().cpu() if m.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            w0 = torch.cat([w0, bias0[None]], 0)
        lam = ridge * a.diagonal().mean().clamp_min(1e-12)
        lhs, rhs = a + lam * torch.eye(len(a), dtype=torch.float64), b + lam * w0
        try:
            sol = torch.linalg.solve(lhs, rhs)
        except RuntimeError:  # singular (ridge 0 and a dead input, or fewer rows than weights): the least-norm fit
            sol = torch.linalg.pinv(lhs, hermitian=True) @ rhs

        def err(v: torch.Tensor) -> float:
            return float((self.yy - 2 * (v * b).sum() + (v * (a @ v)).sum()) / self.yy.clamp_min(1e-30))
        before, fitted = err(w0), err(sol)
        if not fitted < before:  # never worse than the plain cut on the rows it was fitted to
            return before, before
        shift = sol[-1] if self.intercept else None
        sol = sol[:-1] if self.intercept else sol
        m.weight.copy_(sol.T.reshape(w.shape))
        if shift is not None and m.bias is not None:
            m.bias.copy_(shift.to(m.bias))
        elif shift is not None:
            self.bn.running_mean.sub_(shift.to(self.bn.running_mean))
        return before, fitted


def _refit_one(model: nn.Module, original: nn.Module, name: str, bn: nn.Module | None,
               batches: list, targets: list | None, index: int, positions: int, ridge: float, seed: int,
               kept: torch.Tensor | None = None) -> tuple[float, float]:
    """One layer, its input from a forward of the re-fitted model per batch as far as the layer (and
    its target from one of the unpruned model, its ``kept`` outputs, when not kept)."""
    m, m0 = model.get_submodule(name), original.get_submodule(name)
    fit = _Fit(m, bn)
    for i, x in enumerate(batches):
        if targets is not None:
            pick, ys = targets[i]
        else:
            y = until(m0, lambda: original(x), "out")
            pick = _pick(m, y, positions, _draw(seed, i, index))
            ys = _gather(m, y, pick)
            ys = ys[:, kept.to(ys.device)] if kept is not None else ys
        fit.add(until(m, lambda: model(x)), pick, ys)
    return fit.solve(ridge)


def _refit_in_one_pass(model: nn.Module, order: list[str], after: dict, batches: list, targets: dict,
                       ridge: float, done: dict, at: list) -> None:
    """Every layer in one forward over all the batches at once: each is re-fitted in its pre-hook, on
    the input the layers before it (re-fitted already) give it, then runs with its new weights. The
    same fits as :func:`_refit_one`'s, without a forward as far as each layer per layer."""
    sizes = [len(x) for x in batches]

    def refit_here(name):
        def hook(m, args):
            at.append(name)
            fit = _Fit(m, after.get(name))
            for x, (pick, ys) in zip(args[0].split(sizes), targets[name]):
                fit.add(x, pick, ys)
            done[name] = fit.solve(ridge)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(refit_here(n)) for n in order]
    try:
        model(torch.cat(batches))
    finally:
        for h in handles:
            h.remove()
