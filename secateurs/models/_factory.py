"""The model registry and factory (plumbing below the model families, which register into it).

``register_model`` raises on a duplicate name; ``create_model`` lists the choices on an unknown one.
Names: a registered model (``cifar_resnet20``), ``SCHEME:REST`` for the libraries in :data:`SCHEMES`
(``torchvision:resnet50``, ``timm:convnext_femto``, ``smp:Unet:resnet34``,
``ultralytics:yolov8n.yaml``), or ``module.path:callable`` (imports code: ``trust_code=True`` only).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn
from safetensors.torch import load as load_safetensors

from .._registry import Registry
from . import _external

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = _MODELS.register

WEIGHT_ARGS = ("weights", "weights_backbone", "pretrained", "encoder_weights")  # never part of a spec


@dataclass(frozen=True)
class Scheme:
    """How ``SCHEME:REST`` names are built, and the constructor's names for the number of classes and
    of input channels (what the CLI sizes for a dataset; None: the builder has no such argument)."""

    build: Callable[[str, dict[str, Any]], nn.Module]
    form: str
    classes: str | None = "num_classes"
    channels: str | None = "in_chans"


SCHEMES: dict[str, Scheme] = {
    "torchvision": Scheme(_external.build_torchvision, "torchvision:NAME", channels=None),
    "timm": Scheme(_external.build_timm, "timm:NAME"),
    "smp": Scheme(_external.build_smp, "smp:ARCH:ENCODER", "classes", "in_channels"),
    "ultralytics": Scheme(_external.build_ultralytics, "ultralytics:FILE.yaml", "nc", "ch"),
}
CODE_FORM = "module.path:callable"


def list_models() -> list[str]:
    return _MODELS.names()


def model_forms() -> list[str]:
    """The forms a model name can take, for help texts and errors."""
    return ["a registered name (list_models())"] + [s.form for s in SCHEMES.values()] + [CODE_FORM + " (trust_code=True)"]


def create_model(name: str, trust_code: bool = False, **kwargs: Any) -> nn.Module:
    """Build a model by name; no weights are downloaded (zoo checkpoints: :func:`load_pretrained`).

    Parameters
    ----------
    name : str
        A registered model (``list_models()``), ``torchvision:NAME`` (``weights=None`` by default),
        ``timm:NAME`` (``pretrained=False``), ``smp:ARCH:ENCODER`` (``encoder_weights=None``; ARCH
        in any case), ``ultralytics:FILE.yaml`` (the yaml's task model, ``verbose=False``), or
        ``module.path:callable``, which imports that module and calls the callable.
    trust_code : bool, default=False
        Allow ``module.path:callable`` names. Importing a module runs its code, so a name read from a
        file (``secateurs.load``) must not do it unless the caller says so.
    **kwargs
        Constructor arguments; ``None`` values are dropped, so the constructor's defaults apply.

    The model remembers how it was built: ``model.secateurs_spec = {"name": name, "kwargs": {...}}``
    (the kwargs given, without weight arguments), so a pruned copy can be saved as constructor +
    widths and rebuilt without pickle.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    _check_code_name(name, trust_code)
    model = _build(name, dict(kwargs))
    model.secateurs_spec = {"name": name, "kwargs": {k: v for k, v in kwargs.items() if k not in WEIGHT_ARGS}}
    return model


def _split(name: str) -> tuple[str | None, str]:
    """(scheme, rest); (None, name) for registry names, ("", name) for ``module:callable``."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if ":" not in name:
        return None, name
    scheme, _, rest = name.partition(":")
    return (scheme, rest) if scheme in SCHEMES else ("", name)


def names_code(name: str) -> bool:
    """Whether building ``name`` runs code that whoever wrote the name chose: ``module:callable``
    imports a module, and an ultralytics yaml from outside the ultralytics package has strings that
    ultralytics evaluates. :func:`secateurs.load` builds such names only with ``trust_code=True``."""
    if not isinstance(name, str):
        return False
    scheme, rest = _split(name)
    return scheme == "" or (scheme == "ultralytics" and not _external.packaged_yaml(rest))


def _check_code_name(name: str, trust_code: bool) -> None:
    """A name outside the registry and the schemes is ``module.path:callable``: well formed, and
    only with ``trust_code``."""
    scheme, _ = _split(name)
    if scheme != "":
        return
    module, _, attr = name.partition(":")
    if not module or not attr or not all(p.isidentifier() for p in module.split(".") + attr.split(".")):
        raise ValueError(f"unknown model scheme in '{name}'; model names are {', '.join(model_forms())}")
    if not trust_code:
        raise ValueError(f"'{name}' is not a known scheme ({', '.join(s + ':' for s in SCHEMES)}), so it would be "
                         f"read as {CODE_FORM}, which imports and runs that module's code: pass trust_code=True "
                         f"(the CLI does, for a name typed on its command line) if you trust it")


def _build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    scheme, rest = _split(name)
    if scheme is None:
        if name not in _MODELS.names():
            raise ValueError(f"unknown model '{name}'; available: {', '.join(_MODELS.names())}; "
                             f"or a name of the form {', '.join(model_forms()[1:])}")
        return _MODELS.get(name)(**kwargs)
    if scheme:
        return SCHEMES[scheme].build(rest, kwargs)
    try:
        return _external.build_code(name, kwargs)
    except ValueError as err:
        raise ValueError(f"{err} ('{name.partition(':')[0]}' is not a scheme, so the name was read as {CODE_FORM}; "
                         f"schemes: {', '.join(s + ':' for s in SCHEMES)})") from None


def sizing_kwargs(name: str, num_classes: int | None = None, in_chans: int | None = None) -> dict[str, Any]:
    """The constructor arguments that size model ``name`` for a dataset, under the names its builder
    uses (``num_classes``/``in_chans``, smp's ``classes``/``in_channels``, ultralytics' ``nc``/``ch``);
    an argument the builder does not take is left out."""
    scheme, _ = _split(name)
    if scheme:
        keys = (SCHEMES[scheme].classes, SCHEMES[scheme].channels)
    else:
        try:
            fn = _MODELS.get(name) if scheme is None else None
            params = inspect.signature(fn).parameters if fn is not None else {}
        except (ValueError, TypeError):
            params = {}
        keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
        keys = tuple(k if (k in params or keyword) else None for k in ("num_classes", "in_chans"))
    return {k: v for k, v in zip(keys, (num_classes, in_chans)) if k is not None and v is not None}


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

__all__ = ["create_model", "list_models", "register_model", "list_pretrained", "load_pretrained", "model_forms", "names_code",
           "sizing_kwargs", "zoo_dir", "SCHEMES"]
