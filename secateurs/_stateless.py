"""Run a model on stand-in tensors (meta copies, or detached parameters and cloned buffers) and put
back exactly what it had: its tensors, and every attribute its forward set on a module.

This is what ``torch.func.functional_call`` does, in one walk of the module tree instead of one per
tensor name (the capture runs two or three times per prune), and with one swap per tensor *slot*: a module
reached by two paths is swapped once, so it gets its own tensors back.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn as nn

__all__ = ["Stateless", "named_by_kind", "named_tensors", "walk"]


def walk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (path, module) in the order of ``named_modules(remove_duplicate=False)``."""
    out: list[tuple[str, nn.Module]] = []
    stack = [("", model)]
    while stack:
        prefix, m = stack.pop()
        out.append((prefix, m))
        children = [(f"{prefix}.{n}" if prefix else n, c) for n, c in m._modules.items() if c is not None]
        stack.extend(reversed(children))
    return out


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``named_parameters()`` then ``named_buffers()``: each tensor once, under its first name."""
    return {key: t for _, key, t in named_by_kind(model)}


def named_by_kind(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """``("parameter", name, p)`` for ``named_parameters()`` then ``("buffer", name, b)`` for
    ``named_buffers()``, in their order, from one walk of the module tree."""
    out: list[tuple[str, str, torch.Tensor]] = []
    unique, seen_modules = [], set()
    for path, m in walk(model):
        if id(m) not in seen_modules:
            seen_modules.add(id(m))
            unique.append((path, m))
    for kind, attr in (("parameter", "_parameters"), ("buffer", "_buffers")):
        seen: set[int] = set()
        for path, m in unique:
            for k, v in m.__dict__[attr].items():
                if v is not None and id(v) not in seen:
                    seen.add(id(v))
                    out.append((kind, f"{path}.{k}" if path else k, v))
    return out


_MISSING = object()


class Stateless:
    """The stand-ins of one model and the means to swap them in and back.

    ``owners`` maps each stand-in (by id) to the (module path, tensor name) that first holds it,
    parameters before buffers; ``modules`` maps each module's first path to it.
    """

    def __init__(self, model: nn.Module, meta: bool) -> None:
        walked = walk(model)
        self.modules: dict[str, nn.Module] = {}
        seen: set[int] = set()
        for path, m in walked:
            if id(m) not in seen:
                seen.add(id(m))
                self.modules[path] = m
        self.owners: dict[int, tuple[str, str]] = {}
        self.slots: list[tuple[dict, str, torch.Tensor, torch.Tensor]] = []
        standin: dict[int, torch.Tensor] = {}
        bufs = {id(b) for _, m in walked for b in m._buffers.values() if b is not None}
        done: set[tuple[int, str]] = set()
        for kind in ("_parameters", "_buffers"):
            for path, m in walked:
                d = m.__dict__[kind]
                for k, v in d.items():
                    if v is None:
                        continue
                    new = standin.get(id(v))
                    if new is None:
                        new = standin[id(v)] = _standin(v, meta, id(v) in bufs)
                    self.owners.setdefault(id(new), (path, k))
                    if (id(d), k) not in done:
                        done.add((id(d), k))
                        self.slots.append((d, k, v, new))
        self.device = self.slots[0][2].device if self.slots else None
        self._saved: list[tuple[nn.Module, dict]] = []

    def set_mode(self, model: nn.Module, train: bool) -> None:
        """``model.train(train)``; when no module overrides ``train``, by setting the flags directly
        (Module.train goes through Module.__setattr__ once per module; __exit__ restores the flags)."""
        if any(type(m).train is not nn.Module.train for m in self.modules.values()):
            model.train(train)
            return
        for m in self.modules.values():
            m.__dict__["training"] = train

    def __enter__(self) -> "Stateless":
        self._saved = [(m, dict(m.__dict__)) for m in self.modules.values()]
        for d, k, _, new in self.slots:
            d[k] = new
        return self

    def __exit__(self, *exc: Any) -> None:
        for d, k, orig, _ in reversed(self.slots):
            d[k] = orig
        for m, saved in self._saved:  # undo every attribute the forward set (modes, cached shapes...)
            d = m.__dict__
            if "training" in saved and "training" in d:  # set_mode's flag first: then most compare equal below
                d["training"] = saved["training"]
            if list(d) == list(saved) and all(map(operator.is_, d.values(), saved.values())):
                continue  # nothing changed (the common case), checked at C speed
            for k in [k for k in d if k not in saved]:
                del d[k]
            for k, v in saved.items():
                if d.get(k, _MISSING) is not v:
                    d[k] = v


def _standin(t: torch.Tensor, meta: bool, buffer: bool) -> torch.Tensor:
    if meta:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return t.detach().clone() if buffer else t.detach()
