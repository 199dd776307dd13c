"""Run a model only as far as one of its layers: what a caller reads there (its input or output)
and nothing after it, which may not run at all (a head that no longer fits) or need not (the rest
of a forward whose result is not wanted)."""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

__all__ = ["until"]


class _Reached(Exception):
    """Raised from the hook once the layer is reached: it ends the forward there."""


def until(layer: nn.Module, forward: Callable[[], Any], want: str = "in") -> Any:
    """``layer``'s first input (``want="in"``, the layer itself is not run) or its output (``"out"``)
    in ``forward()``, which stops there."""
    seen = []

    def before(m, args):
        seen.append(args[0])
        raise _Reached

    def after(m, args, out):
        seen.append(out)
        raise _Reached

    h = layer.register_forward_pre_hook(before) if want == "in" else layer.register_forward_hook(after)
    try:
        forward()
    except _Reached:
        pass
    finally:
        h.remove()
    if not seen:
        raise RuntimeError(f"{type(layer).__name__} did not run in the forward")
    return seen[0]
