"""Shared error types and the checkers every front door uses (scalars, choices, the model, its
example inputs, datasets, the run folder), so each message names the argument, what it accepts
and the value it got, and a bad input is refused before the model is touched."""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from ._io import atomic_write
from ._stateless import named_by_kind
from ._threads import one_thread


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


# -- the front doors' checks: model, example inputs, datasets, run folder ---------------------------
def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def check_model(model: Any, name: str = "model", *, values: bool = False) -> Any:
    """Return ``model`` if it is an ``nn.Module``, else raise a TypeError naming ``name``. With
    ``values`` (what pruning needs: scores are computed from the weights) every parameter must
    hold finite values, every buffer no NaN (masks may hold -inf on purpose) and normalisation
    statistics finite values: the first tensor on the meta device or breaking this is named in a
    ValueError."""
    if not isinstance(model, nn.Module):
        hint = " (build it first, e.g. secateurs.models.create_model(name))" if isinstance(model, str) else ""
        raise TypeError(f"`{name}` must be a torch.nn.Module, got {type(model).__name__} {_short(model)}{hint}")
    if values:
        named = named_by_kind(model)  # named_parameters() then named_buffers(), from one walk
        for kind, key, t in named:
            if t.is_meta:
                raise ValueError(f"`{name}` {kind} '{key}' is on the meta device and has no values; "
                                 "load the weights first (e.g. model.to_empty(device='cpu') then load_state_dict)")
        with one_thread():  # a few hundred small reductions whose only use is "finite or not"
            suspects = _suspects(named)  # only tensors whose norm is not finite are looked at closely
            for kind, key, t in suspects:
                stats = key.endswith(("running_mean", "running_var"))
                _check_finite_tensor(t, f"`{name}` {kind} '{key}'", nan_only=kind == "buffer" and not stats)
    return model


def _suspects(named: list) -> list:
    """The tensors that may hold NaN or inf: a NaN or inf makes the norm non-finite (so does an
    overflow, which the exact check then clears). One fused norm over all of them is ~8x faster
    than a check per tensor."""
    floats = [(kind, key, t) for kind, key, t in named if t.is_floating_point() or t.is_complex()]
    if not floats:
        return []
    tensors = [t.detach() for _, _, t in floats]
    try:
        norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
    except (AttributeError, RuntimeError, TypeError):  # no fused kernel for this mix: check each
        return floats
    return [floats[i] for i in (~torch.isfinite(norms)).nonzero().flatten().tolist()]


def _check_finite_tensor(t: Any, what: str, nan_only: bool = False) -> None:
    if t.is_floating_point() or t.is_complex():
        bad = t.detach().isnan() if nan_only else ~torch.isfinite(t.detach())
        if bool(bad.any()):
            n = int(bad.sum())
            kinds = "NaN" if bool(t.detach().isnan().any()) else "infinite"
            raise ValueError(f"{what} holds {n} {kinds} value{'s' if n > 1 else ''} (of {t.numel()}); "
                             "scores and costs would be meaningless: fix or reload the weights first")


def check_example_inputs(example_inputs: Any, name: str = "example_inputs", *, finite: bool = False) -> tuple:
    """One forward's positional inputs as a tuple: a tensor, or a non-empty tuple/list whose
    (nested) leaves are tensors. Strings, None, dicts and other objects raise a TypeError naming
    ``name``; with ``finite``, a NaN or infinite input value raises a ValueError."""
    accepted = f"`{name}` must be a tensor or a tuple of tensors (one per positional input of forward)"
    if isinstance(example_inputs, torch.Tensor):
        inputs: tuple = (example_inputs,)
    elif isinstance(example_inputs, (str, bytes)):
        raise TypeError(f"{accepted}, got a {type(example_inputs).__name__} {_short(example_inputs)}; "
                        "a string is not an input (it would be split into characters)")
    elif isinstance(example_inputs, Mapping):
        raise TypeError(f"{accepted}, got a {type(example_inputs).__name__} with keys {list(example_inputs)[:5]}; "
                        "pass the tensors positionally, in forward's order, as a tuple")
    elif isinstance(example_inputs, (list, tuple)) and example_inputs:
        leaves = tree_leaves(list(example_inputs))
        odd = next((v for v in leaves if not isinstance(v, torch.Tensor)), None)
        if odd is not None or not leaves:
            raise TypeError(f"{accepted}, got a {type(example_inputs).__name__} holding a "
                            f"{type(odd).__name__} {_short(odd)}")
        inputs = tuple(example_inputs)
    else:
        got = "an empty " + type(example_inputs).__name__ if isinstance(example_inputs, (list, tuple)) else (
            f"{type(example_inputs).__name__} {_short(example_inputs)}")
        raise TypeError(f"{accepted}, got {got}")
    for i, t in enumerate(tree_leaves(list(inputs))):
        if t.numel() == 0:
            raise ValueError(f"`{name}` (tensor {i}) is empty, shape {list(t.shape)}; give at least one sample")
    if finite:
        with one_thread():  # one elementwise check: waking the pool costs more than it saves
            for i, t in enumerate(tree_leaves(list(inputs))):
                if not t.is_meta:
                    _check_finite_tensor(t, f"`{name}` (tensor {i})")
    return inputs


def check_dataset(data: Any, name: str, example_inputs: tuple, *, arrays: bool = False) -> Any:
    """A dataset given to :func:`secateurs.prune` must fit the model's inputs: with ``arrays`` it
    must be an ``ArrayDataset`` (``images`` and ``targets``); when it is one, it must be non-empty
    and its images must have as many channels as ``example_inputs``."""
    images = getattr(data, "images", None)
    if data is None:
        return data
    if images is None or not hasattr(data, "targets"):
        if arrays:
            raise TypeError(f"`{name}` must be a secateurs.data.ArrayDataset (secateurs.data.load_dataset), "
                            f"got {type(data).__name__}")
        return data  # an iterable of (x, y) batches: checked by the criterion that reads it
    if len(images) == 0:
        raise ValueError(f"`{name}` ({getattr(data, 'name', type(data).__name__)}) holds no samples")
    x = example_inputs[0] if example_inputs else None
    if x is not None and getattr(x, "dim", lambda: 0)() >= 2 and images.dim() >= 2 and images.shape[1] != x.shape[1]:
        raise ValueError(f"`{name}` ({getattr(data, 'name', '')}) has {images.shape[1]}-channel images but "
                         f"`example_inputs` has {x.shape[1]} channels (shape {list(x.shape)}); they must fit the same model")
    return data


def check_out_dir(out_dir: Any, resume: bool, name: str = "out_dir") -> Any:
    """A run folder that can be written, checked before any work: it is created, and one small file
    is written to it and removed (through the package's one atomic writer), so a read-only folder
    or a full disk fails here with an error naming ``out_dir``, not after the model was cut."""
    if resume and out_dir is None:
        raise ValueError("`resume=True` needs `out_dir` (the run folder of the run to continue)")
    if out_dir is None:
        return None
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path (str or os.PathLike), got {type(out_dir).__name__} {_short(out_dir)}")
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"`{name}` {str(path)!r} is a file, not a folder")
    probe = path / f".secateurs-write-check-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(probe, lambda tmp: Path(tmp).write_text("ok"))
        probe.unlink()
    except OSError as err:
        msg = f"`{name}` {str(path)!r} cannot be written: {err.strerror or err}"
        raise (type(err)(err.errno, msg) if err.errno is not None else type(err)(msg)) from err
    return out_dir
