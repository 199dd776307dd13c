"""Model registry: the papers' architectures by name, plus ``torchvision:NAME``, ``timm:NAME``,
``smp:ARCH:ENCODER``, ``ultralytics:FILE.yaml`` and ``module.path:callable`` (``trust_code=True``).

One file per family (``cifar_resnet``, ``cifar_vgg``, ``tiny``, ``unet``) registers its models into
:mod:`._factory` on import, as timm's families do.
"""
from ._factory import (SCHEMES, create_model, list_models, list_pretrained, load_pretrained, model_forms,
                       names_code, register_model, sizing_kwargs, zoo_dir)
from . import cifar_resnet, cifar_vgg, tiny, unet  # noqa: E402,F401  (registers on import)

__all__ = ["create_model", "list_models", "register_model", "list_pretrained", "load_pretrained", "model_forms", "names_code",
           "sizing_kwargs", "zoo_dir", "SCHEMES"]
