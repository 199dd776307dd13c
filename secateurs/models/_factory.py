"""The model registry and factory (plumbing below the model families, which register into it).

``register_model`` raises on a duplicate name; ``create_model`` lists the choices on an unknown one.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn
from safetensors.torch import load as load_safetensors

from .._registry import Registry

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = _MODELS.register


def list_models() -> list[str]:
    return _MODELS.names()


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, or ``torchvision:NAME`` with ``weights=None`` by default.

    The model remembers how it was built (``model.secateurs_spec``), so that a pruned copy can be
    saved as constructor + widths and rebuilt without pickle.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = _build(name, dict(kwargs))
    model.secateurs_spec = {"name": name, "kwargs": {k: v for k, v in kwargs.items() if k not in ("weights", "weights_backbone")}}
    return model


def _build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.partition(":")[2]
        if tv_name not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model '{tv_name}'; see torchvision.models.list_models()")
        kwargs.setdefault("weights", None)
        builder = torchvision.models.get_model_builder(tv_name)
        if "weights_backbone" in inspect.signature(builder).parameters:
            kwargs.setdefault("weights_backbone", None)  # never download behind the user's back
        if tv_name in ("googlenet", "inception_v3"):
            kwargs.setdefault("init_weights", True)  # silences torchvision's FutureWarning
        return builder(**kwargs)
    return _MODELS.get(name)(**kwargs)


def zoo_dir() -> Any:
    """The zoo's folder: ``$SECATEURS_ZOO`` if set, else ``secateurs/zoo`` inside the installed
    package (a ``Path`` or an ``importlib.resources`` ``Traversable``)."""
    env = os.environ.get("SECATEURS_ZOO")
    return Path(env) if env else resources.files("secateurs") / "zoo"


def list_pretrained() -> dict[str, dict]:
    """Entries of the zoo's ``manifest.json``: trained checkpoints with their recipe and accuracy."""
    path = zoo_dir() / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_pretrained(name: str) -> nn.Module:
    """A zoo checkpoint: the registered architecture plus safetensors weights (no pickle),
    checked against the manifest's sha256."""
    entries = list_pretrained()
    if name not in entries:
        raise ValueError(f"no pretrained '{name}' in {zoo_dir() / 'manifest.json'}; available: {', '.join(sorted(entries)) or 'none'}")
    e = entries[name]
    path = zoo_dir() / e["file"]
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != e["sha256"]:
        raise ValueError(f"{path} has sha256 {digest}, the manifest says {e['sha256']}")
    model = create_model(e["model"], **e.get("kwargs", {}))
    model.load_state_dict(load_safetensors(data))
    return model.eval()

__all__ = ["create_model", "list_models", "register_model", "list_pretrained", "load_pretrained", "zoo_dir"]
