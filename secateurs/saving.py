"""Saving pruned models without pickle.

A pruned model is no longer what its constructor builds, so ``torch.save(model)`` (pickle) is the
usual way out, with its code-execution risk and its tie to the exact source tree. Here a run
directory holds ``model.safetensors`` (the weights) and ``model.json``: how to build the original
model (``model.secateurs_spec``, set by :func:`secateurs.models.create_model`) and what changed
since (new sizes of layers, blocks replaced by ``nn.Identity``). :func:`load` rebuilds from that.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ._io import atomic_write
from .models import create_model

__all__ = ["FORMAT", "save", "load"]

FORMAT = "secateurs/1"
WEIGHTS = "model.safetensors"
CONFIG = "model.json"
_REPLACEMENTS: dict[str, type[nn.Module]] = {"Identity": nn.Identity}
_SKIP_ATTRS = {"training"}  # the mode is the caller's business; load() returns eval mode
_ARRAY = re.compile(r"\[\s+([^\[\]{}\"]*?)\s+\]")  # a JSON array of numbers, spread over lines


# ----------------------------------------------------------------------------------- save / load

def save(model: nn.Module, run_dir: str | os.PathLike, example_inputs: Any = None,
         spec: Mapping[str, Any] | None = None, extra: Any = None) -> Path:
    """Write ``run_dir/model.safetensors`` and ``run_dir/model.json``; return ``run_dir``.

    ``spec`` (``{"name": ..., "kwargs": {...}}`` for ``create_model``) defaults to
    ``model.secateurs_spec``. Raises ``ValueError`` when the model cannot be described as that
    model with changed sizes and ``nn.Identity`` blocks, before anything is written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    spec = _check_spec(spec if spec is not None else getattr(model, "secateurs_spec", None), "spec")
    _check_json(extra, "extra")
    fresh = _fresh(spec, "meta")
    modules = _diff_modules(model, fresh, spec)

    state = model.state_dict()
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state_dict entry '{key}' is a {type(t).__name__}, not a tensor; "
                             "only tensors can be saved without pickle")
        if t.is_meta:
            raise ValueError(f"state_dict entry '{key}' is on the meta device and has no values")
    # the rebuilt model must have exactly these entries: check now rather than when loading
    _edit_modules(fresh, modules)
    _check_keys(list(fresh.state_dict()), list(state), f"the model rebuilt from {spec['name']!r} and the recorded changes",
                "the model being saved")

    weights, aliases = _dedupe(state)
    info: dict[str, Any] = {"format": FORMAT, "spec": spec, "modules": modules,
                            "tensors": {k: list(t.shape) for k, t in state.items()}}
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


def load(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save`, in eval mode, on ``map_location``.

    Never unpickles: the architecture comes from the registry, the weights from safetensors.
    """
    run_dir = Path(run_dir)
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
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{cfg_path} has format {got!r}; this version of secateurs reads {FORMAT!r}")
    spec = _check_spec(info.get("spec"), f"'spec' in {cfg_path}")
    modules, tensors, aliases = info.get("modules", {}), info.get("tensors"), info.get("aliases", {})
    if not isinstance(modules, dict) or not isinstance(tensors, dict) or not isinstance(aliases, dict):
        raise ValueError(f"{cfg_path}: 'modules', 'tensors' and 'aliases' must be JSON objects")

    from safetensors.torch import load_file

    device = torch.device(map_location)
    try:
        state = load_file(str(w_path), device=str(device))
    except Exception as err:  # safetensors raises its own error type
        raise ValueError(f"{w_path} could not be read: {err}") from err
    for alias, kept in aliases.items():
        if kept not in state:
            raise ValueError(f"{cfg_path}: alias '{alias}' points to '{kept}', which {w_path.name} lacks")
        state[alias] = state[kept]
    _check_keys(list(tensors), list(state), f"'tensors' in {cfg_path}", str(w_path))
    for key, shape in tensors.items():
        if list(state[key].shape) != list(shape):
            raise ValueError(f"'{key}' has shape {list(shape)} in {cfg_path} but {list(state[key].shape)} in {w_path}")

    model = _fresh(spec, "meta")
    on_meta = _is_meta(model)
    if on_meta and not _meta_safe(model):  # it needs values that the weights file does not hold
        model, on_meta = _fresh(spec, "cpu"), False
    model = _edit_modules(model, modules, where=str(cfg_path))
    _check_keys(list(model.state_dict()), list(state), f"the model rebuilt from {cfg_path}", str(w_path))
    _resize(model, state)
    if not on_meta:
        model.to(device)
    try:
        # assign=True on meta: the loaded tensors become the parameters, no copy
        model.load_state_dict(state, strict=True, assign=on_meta)
    except RuntimeError as err:
        raise ValueError(f"{w_path} does not fit the model rebuilt from {cfg_path}: {err}") from err
    model.secateurs_spec = spec
    return model.eval()


def _check_spec(spec: Any, name: str) -> dict[str, Any]:
    if spec is None and name != "spec":
        raise ValueError(f"{name} is missing")
    if spec is None:
        raise ValueError("the model has no `secateurs_spec`: build it with secateurs.models.create_model, "
                         "or pass spec={'name': ..., 'kwargs': {...}} (the create_model arguments)")
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


def _fresh(spec: dict[str, Any], device: str) -> nn.Module:
    """The model as its constructor builds it; on meta it costs no memory and no init time."""
    try:
        with torch.device(device):
            return create_model(spec["name"], **spec["kwargs"])
    except Exception as err:
        if device == "meta":  # some constructors need real values (data-dependent init)
            return _fresh(spec, "cpu")
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


def _is_simple(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    return isinstance(v, (tuple, list)) and all(_is_simple(x) for x in v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))


def _diff_modules(model: nn.Module, fresh: nn.Module, spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    mods = dict(model.named_modules(remove_duplicate=False))
    out: dict[str, dict[str, Any]] = {}
    replaced: list[str] = []
    what = f"a fresh {spec['name']!r}"
    for name, fm in fresh.named_modules(remove_duplicate=False):
        if any(name.startswith(r + ".") or r == "" for r in replaced):
            continue
        m = mods.get(name)
        label = name or "<root>"
        if m is None:
            raise ValueError(f"module '{label}' of {what} is missing from the model; only resized layers and blocks "
                             "replaced by nn.Identity() can be saved (replace it instead of deleting it)")
        if type(m) is not type(fm):
            kind = next((k for k, cls in _REPLACEMENTS.items() if type(m) is cls), None)
            if kind is None:
                raise ValueError(f"module '{label}' is a {type(m).__name__} but a {type(fm).__name__} in {what}; "
                                 f"only replacement by {', '.join('nn.' + k for k in _REPLACEMENTS)} can be saved")
            out[name] = {"type": kind}
            replaced.append(name)
            continue
        mine, theirs = vars(m), vars(fm)
        attrs = {k: v for k, v in mine.items()
                 if k not in _SKIP_ATTRS and not k.startswith("_") and _is_simple(v)
                 and not (k in theirs and _same(v, theirs[k]))}
        lost = [k for k, v in theirs.items() if k not in mine and not k.startswith("_") and _is_simple(v)]
        if lost:
            raise ValueError(f"module '{label}' lacks attribute(s) {lost} that {what} has; deleted attributes cannot be saved")
        if attrs:
            _check_json(attrs, f"attributes of module '{label}'")
            out[name] = {"attrs": attrs}
    fresh_names = {n for n, _ in fresh.named_modules(remove_duplicate=False)}
    extra = [n for n in mods if n not in fresh_names
             and not any(n.startswith(r + ".") or r == "" for r in replaced)]
    if extra:
        raise ValueError(f"module(s) {extra} are not in {what}; added modules cannot be saved")
    return out


def _edit_modules(model: nn.Module, modules: Mapping[str, Any], where: str = "the recorded changes") -> nn.Module:
    """Apply the recorded replacements and attributes to a fresh model (parents before children)."""
    for name in sorted(modules, key=lambda n: (n.count(".") + bool(n), n)):
        entry = modules[name]
        label = name or "<root>"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: entry for module '{label}' must be an object, got {entry!r}")
        try:
            target = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{where} names module '{label}', which the rebuilt model does not have") from err
        if "type" in entry:
            cls = _REPLACEMENTS.get(entry["type"])
            if cls is None:
                raise ValueError(f"{where}: module '{label}' has type {entry['type']!r}; known: {sorted(_REPLACEMENTS)}")
            new = cls()
            if not name:
                return new
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            continue
        for k, v in entry.get("attrs", {}).items():
            if isinstance(getattr(target, k, None), tuple) and isinstance(v, list):
                v = _as_tuple(v)  # JSON has no tuples
            setattr(target, k, v)
    return model


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


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory: keep tied ones once, copy overlapping ones."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for key, t in state.items():
        t = t.detach()
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in first:
            aliases[key] = first[ident]
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        shared = t.numel() > 0 and storage in storages
        if t.numel():
            first[ident] = key
            storages.add(storage)
        t = t.to("cpu").contiguous()
        out[key] = t.clone() if shared else t
    return out, aliases


def _input_shapes(example_inputs: Any) -> list:
    if isinstance(example_inputs, torch.Tensor):
        return list(example_inputs.shape)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        shapes = [list(x.shape) for x in example_inputs]
        return shapes[0] if len(shapes) == 1 else shapes
    raise TypeError(f"`example_inputs` must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
