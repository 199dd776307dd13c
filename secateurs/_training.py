"""Which code reads ``module.training`` during a captured forward.

:func:`secateurs.prune` needs the eval forward's layer costs (``count``) and the training forward's
channel groups (``analyze``). When nothing but batch norm, dropout and stochastic depth reads the
training flag, the two forwards call the same convs and linears on the same shapes, so the
training capture can record the costs too and the model runs once instead of twice. A read by
any other code (an auxiliary head, a custom ``if self.training``) means they may differ: then the
costs come from their own eval pass, as before.

The reads are seen through a property on ``nn.Module`` installed for the length of the capture
only; it returns the instance's own flag, so every model (in any thread) behaves as without it.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterable, Iterator

import torch.nn as nn

__all__ = ["watch_training"]

# readers whose training branch changes the arguments or elementwise ops, never which layers run
_SAFE = [("torch.nn.modules.batchnorm", "_BatchNorm"), ("torch.nn.modules.instancenorm", "_InstanceNorm"),
         ("torch.nn.modules.dropout", "Dropout"), ("torch.nn.modules.dropout", "Dropout1d"),
         ("torch.nn.modules.dropout", "Dropout2d"), ("torch.nn.modules.dropout", "Dropout3d"),
         ("torch.nn.modules.dropout", "AlphaDropout"), ("torch.nn.modules.dropout", "FeatureAlphaDropout"),
         ("torchvision.ops.stochastic_depth", "StochasticDepth"), ("timm.layers.drop", "DropPath")]

_LOCAL = threading.local()
_LOCK = threading.Lock()
_installed = 0


class _Watch:
    """What one capture saw: ``unsafe`` reads (by code outside ``_SAFE``), or a model it cannot see."""

    def __init__(self, safe: frozenset) -> None:
        self.safe = safe
        self.unsafe = 0
        self.first: str | None = None  # the first unsafe reader, for tests and messages


def _get(self: nn.Module) -> bool:
    try:
        value = self.__dict__["training"]
    except KeyError:  # as without the property: nn.Module.__getattr__ raises
        raise AttributeError("training") from None
    watch = getattr(_LOCAL, "watch", None)
    if watch is not None:
        code = sys._getframe(1).f_code
        if code not in watch.safe:
            watch.unsafe += 1
            watch.first = watch.first or f"{code.co_filename}:{code.co_firstlineno} ({code.co_name})"
    return value


def _set(self: nn.Module, value: bool) -> None:
    self.__dict__["training"] = value


def _del(self: nn.Module) -> None:
    del self.__dict__["training"]


_PROPERTY = property(_get, _set, _del)


def _safe_codes() -> frozenset:
    """The forward code objects of the safe readers among the modules already imported."""
    codes = set()
    for module, cls in _SAFE:
        forward = getattr(getattr(sys.modules.get(module), cls, None), "forward", None)
        if forward is not None and hasattr(forward, "__code__"):
            codes.add(forward.__code__)
    return frozenset(codes)


@contextlib.contextmanager
def watch_training(modules: Iterable[nn.Module]) -> Iterator[_Watch]:
    """Count the reads of ``training`` by unsafe code in this thread while the block runs. A model
    whose classes define ``training`` or ``train`` (which may set more than the flag), or a torch
    with a class attribute ``training`` of its own, counts as unsafe from the start."""
    global _installed
    watch = _Watch(_safe_codes())
    with _LOCK:
        mine = _installed > 0 or "training" not in nn.Module.__dict__
        if mine:
            if _installed == 0:
                nn.Module.training = _PROPERTY
            _installed += 1
    try:
        if not mine:
            watch.unsafe, watch.first = 1, "nn.Module.training is defined"
        for cls in {type(m) for m in modules}:
            if getattr(cls, "training", None) is not _PROPERTY or cls.train is not nn.Module.train:
                watch.unsafe, watch.first = watch.unsafe + 1, f"{cls.__qualname__} defines training or train()"
                break
        previous = getattr(_LOCAL, "watch", None)
        _LOCAL.watch = watch
        try:
            yield watch
        finally:
            _LOCAL.watch = previous
    finally:
        if mine:
            with _LOCK:
                _installed -= 1
                if _installed == 0:
                    del nn.Module.training
