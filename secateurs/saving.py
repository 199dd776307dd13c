"""Saving pruned models without pickle, for any ``nn.Module``.

A pruned model is no longer what its constructor builds, so ``torch.save(model)`` (pickle) is the
usual way out, with its code-execution risk and its tie to the exact source tree. Here a run
directory holds ``model.safetensors`` (the weights) and ``model.json``: the model's class, how to
build it when known (``model.secateurs_spec``, set by :func:`secateurs.models.create_model`) and its
sizes (every integer size attribute, every tensor shape, blocks replaced by ``nn.Identity`` or by
their own tail submodule). When
the build is known, only what changed relative to a freshly built model is recorded. :func:`load`
shrinks a freshly built model (the caller's, or one built from the spec) to those sizes.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ._io import atomic_write
from ._state import copy_model, dedupe, non_persistent_buffers, recompute_weights, set_buffers
from .models import create_model, names_code
from .residual import out_of_place

__all__ = ["FORMAT", "save", "load", "describe"]

FORMAT = "secateurs/2"
_READS = ("secateurs/1", FORMAT)  # format 1: changes relative to the spec, any simple attribute
WEIGHTS = "model.safetensors"
CONFIG = "model.json"
_IDENTITY = "torch.nn.modules.linear.Identity"
_REPLACEMENTS: dict[str, type[nn.Module]] = {"Identity": nn.Identity, _IDENTITY: nn.Identity}
_BUFFER = "non_persistent:"  # key prefix in the weights file: buffers a state_dict leaves out
# a JSON array of numbers, spread over lines by indent (a newline right after "[" is structure:
# json.dumps escapes newlines inside strings, so no string can be rewritten)
_ARRAY = re.compile(r"\[\n([\d\s.eE+,-]*?)\n\s*\]")


# ----------------------------------------------------------------------------------- save / load

def save(model: nn.Module, run_dir: str | os.PathLike, example_inputs: Any = None,
         spec: Mapping[str, Any] | None = None, extra: Any = None) -> Path:
    """Write ``run_dir/model.safetensors`` and ``run_dir/model.json``; return ``run_dir``.

    Works for any model. ``spec`` (``{"name": ..., "kwargs": {...}}`` for ``create_model``)
    defaults to ``model.secateurs_spec``; with it, :func:`load` can rebuild the model alone, and
    a model that is not that model with changed sizes and ``nn.Identity`` blocks is refused
    (``ValueError``) before anything is written. Without it, ``load(run_dir, model=fresh)`` needs
    a freshly built model of the same class.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    spec = spec if spec is not None else getattr(model, "secateurs_spec", None)
    spec = _check_spec(spec, "spec") if spec is not None else None
    _check_json(extra, "extra")
    state = model.state_dict()
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state_dict entry '{key}' is a {type(t).__name__}, not a tensor; "
                             "only tensors can be saved without pickle")
        if t.is_meta:
            raise ValueError(f"state_dict entry '{key}' is on the meta device and has no values")
    sizes = describe(model)
    if spec is not None:
        fresh = _fresh(spec, "meta", trust_code=True)  # the caller's own model or spec: its code is trusted
        modules = _changes(sizes, describe(fresh), f"a fresh {spec['name']!r}")
        # the rebuilt model must have exactly these entries: check now rather than when loading
        fresh = _apply(fresh, modules, absolute=False)
        _check_keys(list(fresh.state_dict()), list(state),
                    f"the model rebuilt from {spec['name']!r} and the recorded changes", "the model being saved")
    else:
        modules = sizes

    weights, aliases = dedupe(state)
    # buffers outside the state_dict (per-channel scales, anchors): pruning may have resized them
    buffers = non_persistent_buffers(model)
    weights.update({_BUFFER + k: t.detach().cpu().contiguous().clone() for k, t in buffers.items()})
    info: dict[str, Any] = {"format": FORMAT, "class": _qualname(model), "spec": spec,
                            "relative_to": "spec" if spec is not None else "nothing",
                            "modules": modules, "tensors": {k: list(t.shape) for k, t in state.items()}}
    if buffers:
        info["buffers"] = {k: list(t.shape) for k, t in buffers.items()}
    if aliases:
        info["aliases"] = aliases
    if example_inputs is not None:
        info["input_shape"] = _input_shapes(example_inputs)
    info["extra"] = extra

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    atomic_write(run_dir / WEIGHTS, lambda p: save_file(weights, p, metadata={"format": "pt"}))
    text = _ARRAY.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
                      json.dumps(info, indent=1))  # one line per shape, not one per number
    atomic_write(run_dir / CONFIG, lambda p: Path(p).write_text(text + "\n", encoding="utf-8"))
    return run_dir


def load(run_dir: str | os.PathLike, model: nn.Module | None = None, *, map_location: str | torch.device = "cpu",
         trust_code: bool = False) -> nn.Module:
    """Rebuild a model written by :func:`save`, in eval mode.

    ``model``: a freshly built model of the saved class (the user's own class, ``timm.create_model``,
    an ultralytics model from its yaml); it is shrunk to the saved sizes, filled and returned (the
    same object). Without it, the model is built from the saved spec on ``map_location``; a spec
    naming ``module:callable`` imports that code only with ``trust_code=True``, since a model.json
    from a stranger must not run code. Never unpickles. The given model is left unchanged on error.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a freshly built nn.Module or None, got {type(model).__name__}")
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`map_location` must name a device, got {map_location!r}: {err}") from None
    run_dir = Path(run_dir)
    info, cfg_path, w_path = _read_config(run_dir)
    spec = info.get("spec")
    spec = _check_spec(spec, f"'spec' in {cfg_path}") if spec is not None else None
    modules, tensors, aliases = info.get("modules", {}), info.get("tensors"), info.get("aliases", {})
    if not isinstance(modules, dict) or not isinstance(tensors, dict) or not isinstance(aliases, dict):
        raise ValueError(f"{cfg_path}: 'modules', 'tensors' and 'aliases' must be JSON objects")
    absolute = info.get("relative_to") == "nothing"
    if model is None and (spec is None or absolute):
        raise ValueError(f"{cfg_path} was saved from a {info.get('class', 'model')} that secateurs cannot build by "
                         "name (no spec): pass `model=` a freshly built model of that class")
    state, buffers = _read_weights(w_path, cfg_path, tensors, aliases)

    given = model
    if given is not None:
        model, on_meta = copy_model(given), False  # edited aside: an error leaves the caller's model as it was
    else:
        model = _fresh(spec, "meta", trust_code)
        on_meta = _is_meta(model)
        if on_meta and not _meta_safe(model):  # it needs values that the weights file does not hold
            model, on_meta = _fresh(spec, "cpu", trust_code), False
    model = _apply(model, modules, absolute=absolute, where=str(cfg_path))
    _check_keys(list(model.state_dict()), list(state), f"the model rebuilt from {cfg_path}", str(w_path))
    _resize(model, state)
    try:
        # assign=True on meta: the loaded tensors become the parameters, no copy
        model.load_state_dict(state, strict=True, assign=on_meta)
    except RuntimeError as err:
        raise ValueError(f"{w_path} does not fit the model rebuilt from {cfg_path}: {err}") from err
    set_buffers(model, buffers, info.get("buffers", {}), str(cfg_path))
    recompute_weights(model)
    if given is None:  # the weights were read on the CPU, on the meta path assigned as they are
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as err:  # e.g. CUDA asked for on a machine without it
            raise ValueError(f"cannot move the loaded model to map_location={map_location!r}: {err}") from err
    _check_sizes(model, str(cfg_path))
    if spec is not None:
        model.secateurs_spec = spec
    if given is not None and type(model) is type(given):
        given.__dict__.clear()  # the caller's object becomes the loaded model
        given.__dict__.update(model.__dict__)
        model = given
    return model.eval()


def _read_config(run_dir: Path) -> tuple[dict, Path, Path]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"`run_dir` {str(run_dir)!r} is not a directory")
    cfg_path, w_path = run_dir / CONFIG, run_dir / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; `run_dir` must be a directory written by secateurs.save")
    try:
        info = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err
    if not isinstance(info, dict) or info.get("format") not in _READS:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{cfg_path} has format {got!r}; this version of secateurs reads {', '.join(map(repr, _READS))}")
    return info, cfg_path, w_path


def _read_weights(w_path: Path, cfg_path: Path, tensors: dict, aliases: dict
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The state_dict and the non-persistent buffers the file holds."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(w_path), device="cpu")
    except Exception as err:  # safetensors raises its own error type
        raise ValueError(f"{w_path} could not be read: {err}") from err
    buffers = {k[len(_BUFFER):]: state.pop(k) for k in [k for k in state if k.startswith(_BUFFER)]}
    for alias, kept in aliases.items():
        if kept not in state:
            raise ValueError(f"{cfg_path}: alias '{alias}' points to '{kept}', which {w_path.name} lacks")
        state[alias] = state[kept]
    _check_keys(list(tensors), list(state), f"'tensors' in {cfg_path}", str(w_path))
    for key, shape in tensors.items():
        if list(state[key].shape) != list(shape):
            raise ValueError(f"'{key}' has shape {list(shape)} in {cfg_path} but {list(state[key].shape)} in {w_path}")
    return state, buffers


def _check_spec(spec: Any, name: str) -> dict[str, Any]:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("kwargs", {}), Mapping):
        raise ValueError(f"`{name}` must be {{'name': str, 'kwargs': dict}}, got {spec!r}")
    spec = {"name": spec["name"], "kwargs": dict(spec.get("kwargs", {}))}
    _check_json(spec, name)
    return json.loads(json.dumps(spec))  # what load() will see: tuples become lists


def _check_json(value: Any, name: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be JSON-serialisable: {err}") from err


def _fresh(spec: dict[str, Any], device: str, trust_code: bool) -> nn.Module:
    """The model as its constructor builds it; on meta it costs no memory and no init time."""
    if names_code(spec["name"]) and not trust_code:  # refused before anything is imported
        raise ValueError(f"the saved model is built by {spec['name']!r}, which runs code that model.json's author chose "
                         "(a module import, or an ultralytics yaml from outside the ultralytics package, whose strings "
                         "ultralytics evaluates): "
                         "pass load(..., trust_code=True) if you trust where model.json came from, or model= a "
                         "freshly built model")
    try:
        with torch.device(device):
            return create_model(spec["name"], trust_code=trust_code, **spec["kwargs"])
    except Exception as err:
        if device == "meta":  # some constructors need real values (data-dependent init)
            return _fresh(spec, "cpu", trust_code)
        raise ValueError(f"cannot rebuild model {spec['name']!r} with kwargs {spec['kwargs']}: {err}") from err


def _meta_safe(model: nn.Module) -> bool:
    """Whether a meta-built model is complete once the state_dict is assigned."""
    seen: set[int] = set()
    for m in model.modules():
        if m._non_persistent_buffers_set or any(isinstance(v, torch.Tensor) for v in vars(m).values()):
            return False
        for t in itertools.chain(m._parameters.values(), m._buffers.values()):
            if t is not None:
                if id(t) in seen:  # tied tensors: assign would untie them
                    return False
                seen.add(id(t))
    return True


def _is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


# ------------------------------------------------------------------------- the size description

def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _is_size(v: Any) -> bool:
    """A size attribute: an int, or a non-empty tuple/list of ints (bools are flags, not sizes)."""
    if isinstance(v, (tuple, list)):
        return bool(v) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    return isinstance(v, int) and not isinstance(v, bool)


def describe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's class and integer size attributes (``in_channels``, ``normalized_shape``,
    a MixNet's ``splits``...): what pruning changes, in JSON. Cached values a forward sets
    (anchors, shapes) are tensors or None when built, so they are never taken for sizes."""
    return {name: _entry(m) for name, m in model.named_modules(remove_duplicate=False)}


def _entry(m: nn.Module) -> dict[str, Any]:
    entry = {"class": _qualname(m), "attrs": {k: v for k, v in vars(m).items() if not k.startswith("_") and _is_size(v)}}
    if isinstance(getattr(m, "_secateurs_child", None), str):  # a removed block's own tail stands in for it
        entry["child"] = m._secateurs_child
    return entry


def _under(name: str, roots: list[str]) -> bool:
    return any(r == "" or name.startswith(r + ".") for r in roots)


def _changes(mine: dict, fresh: dict, what: str) -> dict[str, dict[str, Any]]:
    """What differs between two descriptions: resized modules and ``nn.Identity`` replacements."""
    out: dict[str, dict[str, Any]] = {}
    replaced: list[str] = []
    for name, f in fresh.items():
        if _under(name, replaced):
            continue
        m, label = mine.get(name), name or "<root>"
        if m is None:
            raise ValueError(f"module '{label}' of {what} is missing from the model; only resized layers and blocks "
                             "replaced by nn.Identity() can be saved (replace it instead of deleting it)")
        if m["class"] != f["class"]:
            child = m.get("child")
            if child is not None and fresh.get(f"{name}.{child}", {}).get("class") == m["class"]:
                out[name] = {"class": m["class"], "child": child}
            elif m["class"] != _IDENTITY:
                raise ValueError(f"module '{label}' is a {m['class'].rpartition('.')[2]} but a "
                                 f"{f['class'].rpartition('.')[2]} in {what}; only replacement by nn.Identity "
                                 "(or a removed block's own tail) can be saved")
            else:
                out[name] = {"class": _IDENTITY}
            replaced.append(name)
            continue
        lost = [k for k in f["attrs"] if k not in m["attrs"]]
        if lost:
            raise ValueError(f"module '{label}' lacks attribute(s) {lost} that {what} has; deleted attributes cannot be saved")
        attrs = {k: v for k, v in m["attrs"].items() if k in f["attrs"] and v != f["attrs"][k]}
        if attrs:
            out[name] = {"attrs": attrs}
    extra = [n for n in mine if n not in fresh and not _under(n, replaced)]
    if extra:
        raise ValueError(f"module(s) {extra} are not in {what}; added modules cannot be saved")
    return out


def _apply(model: nn.Module, modules: Mapping[str, Any], *, absolute: bool,
           where: str = "the recorded changes") -> nn.Module:
    """Give a fresh model the recorded classes and sizes (parents before children). ``absolute``:
    ``modules`` describes every module, so the model must have no other and the same classes."""
    replaced: list[str] = []
    for name in sorted(modules, key=lambda n: (n.count(".") + bool(n), n)):
        entry, label = modules[name], name or "<root>"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: entry for module '{label}' must be an object, got {entry!r}")
        try:
            target = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{where} names module '{label}', which the model it is loaded into does not have") from err
        cls = entry.get("class", entry.get("type"))
        new = _replacement(target, entry, cls, label, where)
        if new is not None:
            if not name:
                return new
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            replaced.append(name)
            continue
        if absolute and cls != _qualname(target):
            raise ValueError(f"{where}: module '{label}' was a {cls} when saved but is a {_qualname(target)} in the "
                             "model it is loaded into; pass a freshly built model of the saved class")
        _set_sizes(target, entry.get("attrs", {}), absolute)
    if absolute:
        extra = [n for n, _ in model.named_modules(remove_duplicate=False) if n not in modules and not _under(n, replaced)]
        if extra:
            raise ValueError(f"{where}: the model it is loaded into has module(s) {extra[:5]} that the saved one has not; "
                             "pass a freshly built model of the saved class")
    return model


def _replacement(target: nn.Module, entry: Mapping[str, Any], cls: Any, label: str, where: str) -> nn.Module | None:
    """What stands in for a removed block: ``nn.Identity()``, or the block's own tail submodule
    (``child``) as the fresh model builds it; None where nothing is replaced (or it already is)."""
    child = entry.get("child")
    if child is not None:
        if getattr(target, "_secateurs_child", None) == child:
            return None
        try:
            new = target.get_submodule(str(child))
        except AttributeError as err:
            raise ValueError(f"{where}: module '{label}' was replaced by its submodule '{child}', which the model "
                             "it is loaded into does not have") from err
        if _qualname(new) != cls:
            raise ValueError(f"{where}: module '{label}.{child}' was a {cls} when saved but is a {_qualname(new)}")
        new._secateurs_child = child
        return out_of_place(new)
    if cls in _REPLACEMENTS and not isinstance(target, nn.Identity):
        return _REPLACEMENTS[cls]()
    return None


def _set_sizes(target: nn.Module, attrs: Mapping[str, Any], absolute: bool) -> None:
    """Only sizes are set: a value a forward caches (YOLO's ``Detect.shape``) is None or absent
    in a fresh model and must stay so, or the model would skip rebuilding what goes with it."""
    for k, v in attrs.items():
        if not isinstance(k, str) or not k.isidentifier() or k.startswith("__"):
            raise ValueError(f"module {type(target).__name__}: {k!r} is not an attribute name a size description sets")
        have = vars(target).get(k, _MISSING)
        if (have is _MISSING and absolute) or (have is not _MISSING and not _is_size(have)):
            continue
        if isinstance(have, tuple) and isinstance(v, list):
            v = _as_tuple(v)  # JSON has no tuples
        if have is _MISSING or have != v:
            setattr(target, k, v)


_MISSING = object()


def _size_claims(m: nn.Module) -> list[tuple[str, Any, str, Any]]:
    """(attribute, its value, tensor, the value the tensor implies) for the standard layers."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.modules.conv._ConvNd) and isinstance(w, torch.Tensor):
        out_ax, in_ax = (1, 0) if m.transposed else (0, 1)
        return [("out_channels", m.out_channels, "weight", w.shape[out_ax] * (m.groups if m.transposed else 1)),
                ("in_channels", m.in_channels, "weight", w.shape[in_ax] * (1 if m.transposed else m.groups))]
    if isinstance(m, nn.Linear) and isinstance(w, torch.Tensor):
        return [("out_features", m.out_features, "weight", w.shape[0]), ("in_features", m.in_features, "weight", w.shape[1])]
    if isinstance(m, nn.modules.batchnorm._NormBase):
        t = w if isinstance(w, torch.Tensor) else getattr(m, "running_mean", None)
        return [("num_features", m.num_features, "weight" if t is w else "running_mean", t.shape[0])] if t is not None else []
    if isinstance(m, nn.GroupNorm) and isinstance(w, torch.Tensor):
        return [("num_channels", m.num_channels, "weight", w.shape[0])]
    if isinstance(m, nn.LayerNorm) and isinstance(w, torch.Tensor):
        return [("normalized_shape", tuple(m.normalized_shape), "weight", tuple(w.shape))]
    return []


def _check_sizes(model: nn.Module, where: str) -> None:
    """The size attributes a description sets must agree with the weights that were loaded."""
    for name, m in model.named_modules():
        for attr, says, tensor, holds in _size_claims(m):
            if says != holds:
                raise ValueError(f"{where}: module '{name or '<root>'}' has {attr}={says} but its {tensor} implies "
                                 f"{holds}; the description and the weights disagree (edited or from another run?)")


def _as_tuple(v: Any) -> Any:
    return tuple(_as_tuple(x) for x in v) if isinstance(v, list) else v


def _check_keys(have: list[str], want: list[str], have_name: str, want_name: str) -> None:
    missing = [k for k in want if k not in set(have)]
    unexpected = [k for k in have if k not in set(want)]
    if missing or unexpected:
        msg = [f"{have_name} and {want_name} have different tensors"]
        if missing:
            msg.append(f"only in {want_name}: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            msg.append(f"only in {have_name}: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        raise ValueError("; ".join(msg))


def _resize(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give each tensor the saved shape and dtype so that strict loading can fill it."""
    new_of: dict[int, torch.Tensor] = {}  # tied tensors get one replacement, so they stay tied
    for prefix, m in model.named_modules(remove_duplicate=False):
        for store in (m._parameters, m._buffers):
            for name, t in list(store.items()):
                key = f"{prefix}.{name}" if prefix else name
                if t is None or key not in state:
                    continue
                ref = state[key]
                if t.shape == ref.shape and t.dtype == ref.dtype:
                    continue
                if id(t) not in new_of:
                    new = torch.empty(ref.shape, dtype=ref.dtype, device=t.device)
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    new_of[id(t)] = new
                store[name] = new_of[id(t)]


def _input_shapes(example_inputs: Any) -> list:
    if isinstance(example_inputs, torch.Tensor):
        return list(example_inputs.shape)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        shapes = [list(x.shape) for x in example_inputs]
        return shapes[0] if len(shapes) == 1 else shapes
    raise TypeError(f"`example_inputs` must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
