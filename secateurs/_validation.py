"""Shared error type and argument checkers whose messages name the argument and the value."""
from __future__ import annotations

import numbers
from typing import Any


class PruningError(ValueError):
    """A pruning request that cannot be carried out; the model was left unchanged."""


def check_scalar(x: Any, name: str, target_type: type | tuple, *, min_val: float | None = None,
                 max_val: float | None = None, include_min: bool = True, include_max: bool = True) -> Any:
    """Raise a TypeError/ValueError that quotes ``name``, the accepted range and ``x``."""
    if isinstance(x, bool) or not isinstance(x, target_type):
        kind = target_type.__name__ if isinstance(target_type, type) else " or ".join(t.__name__ for t in target_type)
        raise TypeError(f"`{name}` must be {kind}, got {type(x).__name__} {x!r}")
    lo_ok = min_val is None or (x >= min_val if include_min else x > min_val)
    hi_ok = max_val is None or (x <= max_val if include_max else x < max_val)
    if not (lo_ok and hi_ok):
        lo = "" if min_val is None else f"{'[' if include_min else '('}{min_val}"
        hi = "" if max_val is None else f"{max_val}{']' if include_max else ')'}"
        raise ValueError(f"`{name}` must be in {lo or '(-inf'}, {hi or 'inf)'}, got {x!r}")
    return x


def check_ratio(x: Any, name: str = "ratio") -> float:
    """A fraction in [0, 1)."""
    return float(check_scalar(x, name, numbers.Real, min_val=0.0, max_val=1.0, include_max=False))
