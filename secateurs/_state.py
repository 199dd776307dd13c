"""How a model's tensors are stored without pickle: the state_dict with shared storages kept once,
and the non-persistent buffers a state_dict leaves out (pruning may have resized them)."""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

_COMPUTED_BY_HOOK = (WeightNorm, SpectralNorm)  # legacy hooks that store the weight they compute

__all__ = ["copy_model", "dedupe", "non_persistent_buffers", "recompute_weights", "set_buffers"]


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies a model using the legacy ``nn.utils.weight_norm`` or
    ``spectral_norm``, whose hook keeps the computed weight as a plain attribute that deepcopy
    refuses (not a graph leaf). Only those attributes are copied detached (the hook computes them
    again at the next forward); any other non-leaf attribute still makes deepcopy refuse."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            v = getattr(m, getattr(hook, "name", ""), None) if isinstance(hook, _COMPUTED_BY_HOOK) else None
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    return copy.deepcopy(model, memo)


def recompute_weights(model: nn.Module) -> None:
    """The legacy ``nn.utils.weight_norm`` stores ``weight`` computed at the last forward: after new
    ``weight_g``/``weight_v`` are loaded it still has the old sizes until the hook runs again."""
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                with torch.no_grad():
                    setattr(m, hook.name, hook.compute_weight(m))


def dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        for b in sorted(m._non_persistent_buffers_set):
            t = m._buffers.get(b)
            if isinstance(t, torch.Tensor) and not t.is_meta:
                out[f"{name}.{b}" if name else b] = t
    return out


def set_buffers(model: nn.Module, buffers: dict[str, torch.Tensor], shapes: Any, where: str) -> None:
    """Put the saved non-persistent buffers back, each into a buffer the rebuilt model has."""
    if not isinstance(shapes, dict) or set(shapes) != set(buffers):
        raise ValueError(f"{where}: 'buffers' does not list the non-persistent buffers its weights file holds")
    for key, t in buffers.items():
        if list(t.shape) != list(shapes[key]):
            raise ValueError(f"{where}: buffer '{key}' has shape {list(shapes[key])} but {list(t.shape)} in the weights")
        owner, _, b = key.rpartition(".")
        try:
            m = model.get_submodule(owner)
        except AttributeError:
            m = None
        if m is None or b not in m._non_persistent_buffers_set:
            raise ValueError(f"{where}: the rebuilt model has no non-persistent buffer '{key}'")
        old = m._buffers[b]
        m._buffers[b] = t.to(dtype=old.dtype) if isinstance(old, torch.Tensor) and not old.is_meta else t
