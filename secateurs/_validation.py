"""Shared error types and the two argument checkers every module uses (scalars and choices), so
each message names the argument, what it accepts and the value it got."""
from __future__ import annotations

import numbers
from typing import Any, Iterable


class PruningError(ValueError):
    """A pruning request that cannot be carried out; the model was left unchanged."""


class InvalidArgument(ValueError, TypeError):
    """A wrong argument: a ValueError and a TypeError at once (as scikit-learn's
    ``InvalidParameterError``), so callers may catch either for a bad type or a bad value."""


def _describe(target_type: type | tuple, min_val, max_val, include_min: bool, include_max: bool) -> tuple[str, str]:
    """The accepted values in words: for a wrong value ('in (0, 1]', 'a positive int') and for a
    wrong type ('a number in (0, 1]', 'a positive int')."""
    integral = target_type is int or target_type is numbers.Integral
    kind = "int" if integral else "number"
    if max_val is None and min_val is not None and min_val in (0, 1):
        if min_val == 0 and include_min:
            return (f"a non-negative {kind}",) * 2
        if (min_val == 1 and include_min and integral) or (min_val == 0 and not include_min):
            return (f"a positive {kind}",) * 2
    if min_val is None and max_val is None:
        return ("an int",) * 2 if integral else ("a finite number",) * 2
    lo = "(-inf" if min_val is None else f"{'[' if include_min else '('}{min_val}"
    hi = "inf)" if max_val is None else f"{max_val}{']' if include_max else ')'}"
    return f"in {lo}, {hi}", f"{'an int' if integral else 'a number'} in {lo}, {hi}"


def check_scalar(x: Any, name: str, target_type: type | tuple = numbers.Real, *, min_val: float | None = None,
                 max_val: float | None = None, include_min: bool = True, include_max: bool = True,
                 allow_none: bool = False) -> Any:
    """Return ``x`` if it is a ``target_type`` (never a bool) in the given range, else raise
    :class:`InvalidArgument` quoting ``name``, the range in words and ``x``. Non-finite numbers
    are refused."""
    if x is None and allow_none:
        return x
    desc, type_desc = _describe(target_type, min_val, max_val, include_min, include_max)
    ok_type = not isinstance(x, bool) and isinstance(x, target_type)
    if ok_type and isinstance(x, numbers.Real):
        ok_type = x == x and abs(x) != float("inf")
    if not ok_type:
        raise InvalidArgument(f"`{name}` must be {type_desc}, got {type(x).__name__} {x!r}")
    lo_ok = min_val is None or (x >= min_val if include_min else x > min_val)
    hi_ok = max_val is None or (x <= max_val if include_max else x < max_val)
    if not (lo_ok and hi_ok):
        raise InvalidArgument(f"`{name}` must be {desc}, got {x!r}")
    return x


def check_choice(x: Any, name: str, choices: Iterable[Any], *, allow_none: bool = False) -> Any:
    """Return ``x`` if it is one of ``choices``, else raise :class:`InvalidArgument` listing them."""
    choices = tuple(choices)
    if (x is None and allow_none) or (isinstance(x, str) and x in choices):
        return x
    if len(choices) == 2:
        accepted = f"{choices[0]!r} or {choices[1]!r}"
    else:
        accepted = "one of " + ", ".join(str(c) for c in choices)
    raise InvalidArgument(f"`{name}` must be {accepted}, got {x!r}")


def check_ratio(x: Any, name: str = "ratio") -> float:
    """A fraction in [0, 1)."""
    return float(check_scalar(x, name, numbers.Real, min_val=0, max_val=1, include_max=False))
