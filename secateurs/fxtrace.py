"""Module-level structure from :mod:`torch.fx`: which modules call which, for depth analysis.

Channel analysis does not use this (see :mod:`secateurs.capture`, which runs the model's own
Python). Residual-block discovery needs the module-level dataflow graph, which fx gives cheaply;
submodules fx cannot trace become opaque leaves.
"""
from __future__ import annotations

import itertools

import torch
import torch.fx as fx
import torch.nn as nn

from ._modes import in_mode
from ._validation import PruningError

__all__ = ["trace_fx"]

_MAX_LEAF_RETRIES = 32


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.failed_in: str | None = None
        self._names: dict[int, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves:
            return True
        return super().is_leaf_module(m, qualname)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # fx scans all named parameters on every access; a dict built once is O(1)
        if isinstance(attr_val, torch.Tensor):
            if self._names is None:
                self._names = {id(t): n for n, t in itertools.chain(self.root.named_parameters(), self.root.named_buffers())}
            n = self._names.get(id(attr_val))
            if n is not None:
                if n not in parameter_proxy_cache:
                    parameter_proxy_cache[n] = self.create_proxy("get_attr", n, (), {})
                return parameter_proxy_cache[n]
        return attr_val

    def call_module(self, m, forward, args, kwargs):
        qual = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = qual
            raise


def trace_fx(model: nn.Module) -> tuple[fx.Graph, list[str]]:
    """fx graph of ``model`` traced in training mode, and the submodules kept opaque.

    Training mode, so that training-only branches (auxiliary heads) are seen; modes are restored.
    """
    leaves: set[str] = set()
    with in_mode(model, training=True):
        for _ in range(_MAX_LEAF_RETRIES):
            tracer = _Tracer(leaves)
            try:
                return tracer.trace(model), sorted(leaves)
            except Exception as err:  # fx raises many types; we retry with the culprit opaque
                culprit = tracer.failed_in
                if culprit is None or culprit == "" or culprit in leaves:
                    raise PruningError(
                        f"torch.fx cannot trace {type(model).__name__}.forward itself: {type(err).__name__}: {err}"
                    ) from err
                leaves.add(culprit)
        raise PruningError(f"gave up tracing {type(model).__name__}: too many untraceable submodules")
