"""Builders behind ``create_model``'s schemes: models from torchvision, timm,
segmentation_models_pytorch, ultralytics and user code.

Each builder takes what follows the scheme in the name (``timm:resnet18`` -> ``"resnet18"``) and the
constructor's keyword arguments, never downloads weights, and returns an ``nn.Module``. The
libraries other than torchvision are optional (``pip install secateurs[zoo]``); a missing one raises
an ``ImportError`` that says what to install.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch.nn as nn

ZOO_HINT = "pip install secateurs[zoo]"


def _require(module: str, package: str, scheme: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"'{scheme}:' models need the {package} package: {ZOO_HINT} "
                          f"(or pip install {package})") from err


def _unknown(kind: str, name: str, choices: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {kind} '{name}'{hint} (the list: {where})")


def _no_weights(kwargs: dict[str, Any], key: str, off: Any, scheme: str) -> None:
    """Builders start from random weights; asking for downloaded ones is an error, not ignored."""
    if kwargs.get(key, off) not in (off, False):
        raise ValueError(f"'{scheme}:' models are built without downloading weights, got {key}={kwargs[key]!r}; "
                         f"load a state_dict into the model instead")
    kwargs[key] = off


def build_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``torchvision:NAME``: ``weights=None`` (and ``weights_backbone=None``) unless given."""
    import torchvision

    if name not in torchvision.models.list_models():
        raise _unknown("torchvision model", name, torchvision.models.list_models(), "torchvision.models.list_models()")
    _no_weights(kwargs, "weights", None, "torchvision")
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        _no_weights(kwargs, "weights_backbone", None, "torchvision")  # never download behind the user's back
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", True)  # silences torchvision's FutureWarning
    return builder(**kwargs)


def build_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``timm:NAME`` (a pretrained tag such as ``resnet50.a1_in1k`` is allowed): ``pretrained=False``."""
    timm = _require("timm", "timm", "timm")
    if not timm.is_model(name):
        raise _unknown("timm model", name, timm.list_models(), "timm.list_models()")
    _no_weights(kwargs, "pretrained", False, "timm")
    if kwargs.get("checkpoint_path"):  # timm would torch.load it
        raise ValueError(f"'timm:' models are built without loading files, got checkpoint_path={kwargs['checkpoint_path']!r}; "
                         "load a state_dict into the model instead")
    return timm.create_model(name, **kwargs)


def build_smp(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``smp:ARCH:ENCODER`` (ARCH in any case: unet, FPN, DeepLabV3Plus...): ``encoder_weights=None``."""
    smp = _require("segmentation_models_pytorch", "segmentation-models-pytorch", "smp")
    arch, sep, encoder = name.partition(":")
    if not sep or not arch or not encoder:
        raise ValueError(f"smp models are named smp:ARCH:ENCODER (e.g. smp:Unet:resnet34), got 'smp:{name}'")
    archs = {k.lower(): v for k, v in getattr(smp, "MODEL_ARCHITECTURES_MAPPING", {}).items()}
    if arch.lower() not in archs:
        raise _unknown("smp architecture", arch, sorted(v.__name__ for v in archs.values()),
                       ", ".join(sorted(v.__name__ for v in archs.values())))
    encoders = smp.encoders.get_encoder_names()
    if encoder not in encoders and not encoder.startswith("tu-"):
        raise _unknown("smp encoder", encoder, encoders, "segmentation_models_pytorch.encoders.get_encoder_names(), "
                       "or tu-NAME for a timm encoder")
    if "encoder_name" in kwargs:
        raise ValueError(f"'smp:{name}' names its encoder; do not pass encoder_name={kwargs['encoder_name']!r} too")
    _no_weights(kwargs, "encoder_weights", None, "smp")
    return archs[arch.lower()](encoder_name=encoder, **kwargs)


_YOLO_TASKS = {"detect": "DetectionModel", "segment": "SegmentationModel", "pose": "PoseModel",
               "classify": "ClassificationModel", "obb": "OBBModel"}


def packaged_yaml(name: str) -> bool:
    """Whether ``name`` is a bare yaml name that ultralytics ships (``yolov8n.yaml`` is its
    ``yolov8.yaml`` at scale n). ultralytics evaluates some strings of a model yaml as Python (its
    ``activation``), so a yaml from anywhere else runs code its author chose."""
    if any(c in name for c in "/\\:") or not name.endswith((".yaml", ".yml")):
        return False
    try:
        import ultralytics
    except ImportError:
        return False
    shipped = {p.name for p in (Path(ultralytics.__file__).parent / "cfg" / "models").rglob("*.y*ml")}
    scaled = re.fullmatch(r"(.*\d+)[nslmx](.*\.ya?ml)", name)
    return name in shipped or (scaled is not None and scaled.group(1) + scaled.group(2) in shipped)


def build_ultralytics(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``ultralytics:FILE.yaml`` (``yolov8n.yaml``, ``yolo11s-seg.yaml``, or a path): the task's model
    class (detect, segment, pose, classify, obb) built from the yaml, no weights, ``verbose=False``."""
    _require("ultralytics", "ultralytics", "ultralytics")
    tasks = importlib.import_module("ultralytics.nn.tasks")
    if not name.endswith((".yaml", ".yml")):
        raise ValueError(f"ultralytics models are named by their yaml, e.g. ultralytics:yolov8n.yaml, got "
                         f"'ultralytics:{name}' (weights files are not loaded)")
    try:
        cfg = tasks.yaml_model_load(name)
    except (FileNotFoundError, OSError) as err:
        raise ValueError(f"ultralytics has no model yaml '{name}' (names such as yolov8n.yaml, yolo11n-seg.yaml, "
                         f"yolov8s-pose.yaml, or a path to a yaml file): {err}") from None
    task = tasks.guess_model_task(cfg)
    if task not in _YOLO_TASKS or not hasattr(tasks, _YOLO_TASKS[task]):
        raise ValueError(f"'ultralytics:{name}' is a '{task}' model; supported tasks: {', '.join(_YOLO_TASKS)}")
    kwargs.setdefault("verbose", False)
    logger, level = logging.getLogger("ultralytics"), logging.getLogger("ultralytics").level
    logger.setLevel(logging.WARNING)  # quiet: 'Overriding model.yaml nc=80 with nc=3' is what was asked for
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(tasks, _YOLO_TASKS[task])(cfg, **kwargs)
    finally:
        logger.setLevel(level)


def build_code(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``module.path:callable`` (the callable may be dotted: ``pkg.mod:Class.build``), called with kwargs."""
    module_name, _, attr = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"cannot import module '{module_name}' for model '{name}': {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module '{module_name}' has no attribute '{attr}' (model '{name}')")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"'{name}' is not callable (it is a {type(obj).__name__})")
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"'{name}' returned a {type(model).__name__}, not an nn.Module")
    return model
