"""Model registry: the papers' architectures by name, plus ``torchvision:NAME``.

``register_model`` raises on a duplicate name; ``create_model`` lists the choices on an unknown one.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from .._registry import Registry

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = _MODELS.register


def list_models() -> list[str]:
    return _MODELS.names()


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, or ``torchvision:NAME`` with ``weights=None`` by default."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith("torchvision:"):
        import torchvision

        tv_name = name.partition(":")[2]
        if tv_name not in torchvision.models.list_models():
            raise ValueError(f"unknown torchvision model '{tv_name}'; see torchvision.models.list_models()")
        kwargs.setdefault("weights", None)
        return torchvision.models.get_model(tv_name, **kwargs)
    return _MODELS.get(name)(**kwargs)


from . import cifar_resnet, cifar_vgg, tiny, unet  # noqa: E402,F401  (registers on import)

__all__ = ["create_model", "list_models", "register_model"]
