"""PLS-VIP statistics: how discriminative a layer's output is for the labels (METHODS.md section 2,
Jordao et al. 2020).

VIP_j = sqrt(p * sum_a SS_a (w_ja/||w_a||)^2 / sum_a SS_a), SS_a = (t_a't_a)(q_a'q_a), from a PLS
regression of pooled features on one-hot labels. Used to score residual blocks (layer pruning)
and filters (the cascade's ``vip`` criterion); the block structure itself is :mod:`secateurs.depth`.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._modes import in_mode
from ._validation import PruningError
from .data import IGNORE_INDEX, ArrayDataset, Batches
from .depth import Block, block_names

__all__ = ["vip", "vip_from_pls", "block_features", "block_scores"]


def _one_hot(Y: np.ndarray) -> np.ndarray:
    if Y.ndim == 2:
        if Y.shape[1] < 2:
            raise ValueError("`Y` has a single class; VIP needs at least two")
        return Y.astype(np.float64)
    if Y.ndim != 1:
        raise ValueError(f"`Y` must be labels [n] or a one-hot matrix [n, classes], got shape {Y.shape}")
    classes = np.unique(Y)
    if len(classes) < 2:
        raise ValueError("`Y` has a single class; VIP needs at least two")
    return (Y[:, None] == classes[None, :]).astype(np.float64)


def vip_from_pls(pls) -> np.ndarray:
    """VIP of every feature from a fitted ``PLSRegression`` (METHODS.md section 2)."""
    W, T, Q = pls.x_weights_, pls.x_scores_, pls.y_loadings_
    ss = (T ** 2).sum(0) * (Q ** 2).sum(0)
    if not ss.sum() > 0:
        return np.zeros(W.shape[0])  # no component explains Y: no feature discriminates
    wn = W / np.linalg.norm(W, axis=0, keepdims=True)
    return np.sqrt(W.shape[0] * ((wn ** 2) @ ss) / ss.sum())


def vip(X: Any, Y: Any, n_components: int = 4) -> np.ndarray:
    """VIP scores [n_features] of a PLS regression of ``X`` on one-hot ``Y`` (labels or one-hot).

    scikit-learn's ``PLSRegression`` (centred and scaled, as in the paper's code) fits; the VIP
    formula is ours, so it does not depend on a library version exposing one. The squares of the
    scores sum to the number of features, so "VIP > 1" marks an above-average feature.
    """
    from sklearn.cross_decomposition import PLSRegression

    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"`X` must be [n_samples, n_features], got shape {X.shape}")
    Y = _one_hot(np.asarray(Y))
    if len(Y) != len(X):
        raise ValueError(f"`X` has {len(X)} samples but `Y` has {len(Y)}")
    pls = PLSRegression(n_components=n_components, scale=True).fit(X, Y)
    return vip_from_pls(pls)


def _pool(out: torch.Tensor, pool: int | str) -> torch.Tensor:
    """Average-pool with window ``pool`` (stride ``pool``), or globally if the map is smaller;
    ``pool="max"``: one global maximum per channel (the filter features of the cascade)."""
    if pool == "max":
        return out.flatten(2).amax(2) if out.dim() > 2 else out
    if out.dim() > 2:
        spatial = out.shape[2:]
        if all(s >= pool for s in spatial) and out.dim() <= 5:
            fn = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}[out.dim()]
            out = fn(out, pool)
        else:
            out = out.flatten(2).mean(2)
    return out.flatten(1)


def _classes_in(y: torch.Tensor) -> list[list[int]]:
    """The classes each sample holds: its label (a one-hot or soft row: its largest entry), or
    every class its mask shows."""
    if y.dim() == 1:
        return [[c] for c in y.tolist()]
    if y.dim() == 2:
        return [[c] for c in y.argmax(1).tolist()]
    return [_shown(m) for m in y]


def _shown(masks: torch.Tensor) -> list[int]:
    """The classes masks show (unlabelled ``IGNORE_INDEX`` pixels belong to none)."""
    return [c for c in torch.unique(masks).tolist() if c != IGNORE_INDEX]


def _keep(y: torch.Tensor, counts: dict[int, int], per_class: int) -> torch.Tensor:
    """Samples that still add to a class short of ``per_class``; a mask counts for every class it
    shows (so a classification selection is the usual per-class one)."""
    keep = torch.zeros(len(y), dtype=torch.bool)
    for i, classes in enumerate(_classes_in(y)):
        if any(counts.get(c, 0) < per_class for c in classes):
            keep[i] = True
            for c in classes:
                counts[c] = counts.get(c, 0) + 1
    return keep


def _labelled_batches(data: Any, per_class: int | None, batch_size: int, seed: int) -> Iterator[tuple]:
    """``(x, y, total)`` batches of at most ``per_class`` samples per class: a seeded class-balanced
    selection of an :class:`ArrayDataset` (``total`` known), or the first ones of any ``(x, y)`` batches.
    ``y`` holds labels [n] or segmentation masks [n, H, W]."""
    if isinstance(data, ArrayDataset):
        t = data.targets
        if t.dim() not in (1, 3):
            raise ValueError(f"block features need class labels [N] or masks [N, H, W]; dataset '{data.name}' "
                             f"has targets of shape {list(t.shape)}")
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        if per_class is not None and t.dim() == 1:
            perm = torch.cat([perm[t[perm] == c][:per_class] for c in torch.unique(t)])
        elif per_class is not None:
            perm = perm[_keep(t[perm], {}, per_class)]
        idx = perm.sort().values
        if t.dim() == 3:  # as many pixels a batch as 256 CIFAR images: a U-Net's outputs are large before pooling
            batch_size = max(1, min(batch_size, batch_size * 32 * 32 // (t.shape[1] * t.shape[2])))
        norm = Batches(data, batch_size, train=False)
        for i in range(0, len(idx), batch_size):
            sel = idx[i:i + batch_size]
            yield norm.normalize(data.images[sel]), t[sel], len(idx)
        return
    counts: dict[int, int] = {}
    for x, y in data:
        y = torch.as_tensor(y)
        if y.dim() == 4 and y.shape[1] == 1:  # masks [B, 1, H, W]
            y = y[:, 0]
        if per_class is not None:
            keep = _keep(y, counts, per_class)
            if not keep.any():
                continue
            x, y = x[keep.to(x.device)], y[keep]
        yield x, y, None


_MAX_GRID = 8  # cells per side of the filters' (max-pooled) features on masks


def _mask_grid(y: torch.Tensor, pool: int | str) -> int:
    """Cells per side of the grid laid over a mask batch: ``pool`` (8 for the filters' maximum),
    at most the mask's own side."""
    return max(1, min(_MAX_GRID if pool == "max" else int(pool), *y.shape[1:]))


def _cells(out: torch.Tensor, grid: int, pool: int | str) -> torch.Tensor:
    """An output pooled onto the image's ``grid`` x ``grid`` grid (average, or maximum for
    ``pool="max"``): one row [C] per cell, row-major per image, as the mask's cells. An output
    coarser than the grid is repeated onto it, a vector [B, C] (a Linear's) onto every cell."""
    if out.dim() == 2:
        return out.repeat_interleave(grid * grid, dim=0)
    if out.dim() != 4:
        raise ValueError(f"segmentation masks need outputs [B, C, H, W] or [B, C], got shape {list(out.shape)}")
    fn = F.adaptive_max_pool2d if pool == "max" else F.adaptive_avg_pool2d
    return fn(out, grid).permute(0, 2, 3, 1).flatten(0, 2)


def _mask_fractions(y: torch.Tensor, grid: int) -> dict[int, np.ndarray]:
    """For every class a mask batch [B, H, W] shows, its share of each grid cell's pixels [B * grid^2]
    (unlabelled ``IGNORE_INDEX`` pixels belong to no class)."""
    return {c: F.adaptive_avg_pool2d((y == c).float()[:, None], grid).flatten().numpy() for c in _shown(y)}


class _Labels:
    """Class labels, or for masks each sample's (cell's) share of every class: PLS regresses on
    either, a one-hot row being the share of a single class."""

    def __init__(self) -> None:
        self.parts: list[Any] = []

    def add(self, y: torch.Tensor, grid: int | None) -> None:
        self.parts.append(y.cpu().numpy() if grid is None else _mask_fractions(y.cpu(), grid))

    def array(self) -> np.ndarray:
        if not self.parts or not isinstance(self.parts[0], dict):
            return np.concatenate(self.parts)
        classes = sorted({c for p in self.parts for c in p})
        cols = [np.concatenate([p.get(c, np.zeros(len(next(iter(p.values()))))) for p in self.parts]) for c in classes]
        return np.stack(cols, axis=1)


def block_features(model: nn.Module, blocks: Sequence[Block | str], data: Any, per_class: int | None = None,
                   pool: int | str = 8, batch_size: int = 256, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled outputs of each block on at most ``per_class`` samples per class, and their labels.

    ``data`` is an :class:`~secateurs.data.ArrayDataset` (a seeded class-balanced selection is
    normalised and run in batches, so only the chosen samples are forwarded) or any iterable of
    ``(x, y)`` batches (taken in order until every class has ``per_class``). Only the pooled
    features are kept: one float32 array [n, features] per block, filled batch by batch.

    Segmentation masks ``y`` [B, H, W] or [B, 1, H, W] (a mask counts for every class it shows):
    a ``pool`` x ``pool`` grid is laid over the image, each block's output is average-pooled onto
    it (``_cells``) and every cell is a sample, labelled by its share of each class's pixels: the
    block is scored by how well its channels tell the classes apart where they lie. ``pool="max"``
    (the filters' features): each channel's maximum over each cell of an 8x8 grid. Labels [B] or
    one-hot rows [B, K] and masks cannot be mixed in one ``data``.
    """
    names = block_names(blocks)
    modules = dict(model.named_modules())
    for n in names:
        if n not in modules or not n:
            raise PruningError(f"'{n}' is not a submodule of {type(model).__name__}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    batches = _labelled_batches(data, per_class, batch_size, seed)
    feats: dict[str, Any] = {n: [] for n in names}
    labels = _Labels()
    filled = 0
    current: dict[str, torch.Tensor] = {}
    grid: list[int | None] = [None]  # masks: the batch's grid, so each hook pools straight onto it

    def hook(n):
        def fn(m, a, o):
            try:
                current[n] = _pool(o, pool) if grid[0] is None else _cells(o, grid[0], pool)
            except ValueError as err:
                raise ValueError(f"'{n}': {err}") from None
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    kind = None
    try:
        with in_mode(model, training=False), torch.no_grad():
            for x, y, total in batches:
                current.clear()
                if kind is not None and kind != (y.dim() == 3):
                    raise ValueError("`data` mixes class labels and segmentation masks")
                kind = y.dim() == 3
                grid[0] = _mask_grid(y, pool) if kind else None
                model(x.to(device))
                cells = 1 if grid[0] is None else grid[0] * grid[0]
                for n in names:
                    f = current[n].float().cpu().numpy()
                    if total is None:
                        feats[n].append(f)
                    else:
                        if isinstance(feats[n], list):
                            feats[n] = np.empty((total * cells, f.shape[1]), dtype=np.float32)
                        feats[n][filled:filled + len(f)] = f
                labels.add(y, grid[0])
                filled += len(y) * cells
    finally:
        for h in handles:
            h.remove()
    if not labels.parts:
        raise ValueError("`data` gave no samples")
    out = {n: (np.concatenate(v) if isinstance(v, list) else v[:filled]) for n, v in feats.items()}
    return out, labels.array()


def block_scores(model: nn.Module, blocks: Sequence[Block | str], data: Any, per_class: int | None = None,
                 n_components: int = 4, joint: bool = False, pool: int = 8, batch_size: int = 256,
                 seed: int = 0) -> dict[str, float]:
    """Mean VIP of each block's pooled output features: how discriminative the block's output is.

    ``joint=False`` fits one PLS per block; ``joint=True`` one PLS over all blocks' features
    together (then scores are comparable across blocks of different widths only through that
    shared fit). ``n_components`` is capped at the number of features and samples - 1.
    """
    feats, y = block_features(model, blocks, data, per_class=per_class, pool=pool, batch_size=batch_size, seed=seed)
    names = list(feats)

    def fit(X):
        h = max(1, min(n_components, X.shape[1], X.shape[0] - 1))
        return vip(X, y, h)

    if not joint:
        return {n: float(fit(feats[n]).mean()) for n in names}
    X = np.concatenate([feats[n] for n in names], axis=1)
    v = fit(X)
    out, start = {}, 0
    for n in names:
        d = feats[n].shape[1]
        out[n] = float(v[start:start + d].mean())
        start += d
    return out
