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

from ._validation import PruningError
from .data import ArrayDataset, Batches
from .depth import Block, block_names

__all__ = ["vip", "vip_from_pls", "block_features", "block_scores"]


def _one_hot(Y: np.ndarray) -> np.ndarray:
    if Y.ndim == 2:
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


def _labelled_batches(data: Any, per_class: int | None, batch_size: int, seed: int) -> Iterator[tuple]:
    """``(x, y, total)`` batches of at most ``per_class`` samples per class: a seeded class-balanced
    selection of an :class:`ArrayDataset` (``total`` known), or the first ones of any ``(x, y)`` batches."""
    if isinstance(data, ArrayDataset):
        t = data.targets
        if t.dim() != 1:
            raise ValueError(f"block features need class labels; dataset '{data.name}' has targets of shape {list(t.shape)}")
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        if per_class is not None:
            perm = torch.cat([perm[t[perm] == c][:per_class] for c in torch.unique(t)])
        idx = perm.sort().values
        norm = Batches(data, batch_size, train=False)
        for i in range(0, len(idx), batch_size):
            sel = idx[i:i + batch_size]
            yield norm.normalize(data.images[sel]), t[sel], len(idx)
        return
    counts: dict[int, int] = {}
    for x, y in data:
        y = torch.as_tensor(y)
        if per_class is not None:
            keep = torch.zeros(len(y), dtype=torch.bool)
            for i, c in enumerate(y.tolist()):
                if counts.get(c, 0) < per_class:
                    counts[c] = counts.get(c, 0) + 1
                    keep[i] = True
            if not keep.any():
                continue
            x, y = x[keep.to(x.device)], y[keep]
        yield x, y, None


def block_features(model: nn.Module, blocks: Sequence[Block | str], data: Any, per_class: int | None = None,
                   pool: int | str = 8, batch_size: int = 256, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled outputs of each block on at most ``per_class`` samples per class, and their labels.

    ``data`` is an :class:`~secateurs.data.ArrayDataset` (a seeded class-balanced selection is
    normalised and run in batches, so only the chosen samples are forwarded) or any iterable of
    ``(x, y)`` batches (taken in order until every class has ``per_class``). Only the pooled
    features are kept: one float32 array [n, features] per block, filled batch by batch.
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
    labels: list[np.ndarray] = []
    filled = 0
    current: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: current.__setitem__(n, _pool(o, pool)))
               for n in names]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            for x, y, total in batches:
                current.clear()
                model(x.to(device))
                k = len(y)
                for n in names:
                    f = current[n].float().cpu().numpy()
                    if total is None:
                        feats[n].append(f)
                    else:
                        if isinstance(feats[n], list):
                            feats[n] = np.empty((total, f.shape[1]), dtype=np.float32)
                        feats[n][filled:filled + k] = f
                labels.append(y.cpu().numpy())
                filled += k
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if not labels:
        raise ValueError("`data` gave no samples")
    out = {n: (np.concatenate(v) if isinstance(v, list) else v[:filled]) for n, v in feats.items()}
    return out, np.concatenate(labels)


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
