"""Model names: the library schemes (timm, smp, ultralytics), ``module:callable`` behind
``trust_code``, the spec every model remembers, and the CLI's ``--model-arg``."""
from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs.cli import build_model, main, parse_model_args
from secateurs.models import create_model, sizing_kwargs

CODE = "tests.test_model_names:small_net"


def small_net(width: int = 4, num_classes: int = 3, in_chans: int = 3) -> nn.Module:
    """Built by name (``CODE``) in the tests below."""
    return nn.Sequential(nn.Conv2d(in_chans, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))


LIBS = {"timm": "timm", "smp": "segmentation_models_pytorch", "ultralytics": "ultralytics"}
BUILT = [("timm:resnet10t", {"num_classes": 5, "pretrained": False}, "ResNet"),
         ("smp:unet:resnet18", {"classes": 2, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}, "Unet"),
         ("smp:DEEPLABV3PLUS:resnet18", {"classes": 2, "encoder_weights": None}, "DeepLabV3Plus"),
         ("ultralytics:yolov8n.yaml", {"nc": 3}, "DetectionModel"),
         ("ultralytics:yolo11n-seg.yaml", {}, "SegmentationModel"),
         ("ultralytics:yolov8n-pose.yaml", {}, "PoseModel")]


@pytest.mark.parametrize("name,kwargs,cls", BUILT, ids=[b[0] for b in BUILT])
def test_library_names_build_and_remember_their_spec(name, kwargs, cls):
    pytest.importorskip(LIBS[name.partition(":")[0]])
    torch.manual_seed(0)
    m = create_model(name, **kwargs)
    assert type(m).__name__ == cls
    spec = json.loads(json.dumps(m.secateurs_spec))  # what secateurs.save writes
    assert spec == {"name": name, "kwargs": {k: v for k, v in kwargs.items()
                                             if k not in ("pretrained", "encoder_weights")}}
    again = create_model(spec["name"], **spec["kwargs"])
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_ultralytics_is_quiet(capsys):
    pytest.importorskip("ultralytics")
    create_model("ultralytics:yolov8n.yaml", nc=3)  # ultralytics logs 'Overriding model.yaml nc=80' by default
    out = capsys.readouterr()
    assert out.out == "" and "Overriding" not in out.err


@pytest.mark.parametrize("name,kwargs,msg", [
    ("timm:resnet10t", {"pretrained": True}, "timm:' models are built without downloading weights, got pretrained=True"),
    ("smp:Unet:resnet18", {"encoder_weights": "imagenet"}, "got encoder_weights='imagenet'"),
    ("smp:Unet:resnet18", {"encoder_name": "resnet34"}, "names its encoder; do not pass encoder_name"),
])
def test_weights_are_never_downloaded(name, kwargs, msg):
    pytest.importorskip(LIBS[name.partition(":")[0]])
    with pytest.raises(ValueError, match=msg):
        create_model(name, **kwargs)


@pytest.mark.parametrize("module,name", [("timm", "timm:resnet10t"), ("segmentation_models_pytorch", "smp:Unet:resnet18"),
                                         ("ultralytics", "ultralytics:yolov8n.yaml")])
def test_a_missing_library_says_what_to_install(monkeypatch, module, name):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"need the .* package: pip install secateurs\[zoo\]"):
        create_model(name)


@pytest.mark.parametrize("name,msg", [
    ("resnet9", r"unknown model 'resnet9'; available: alexnet_cifar.*; or a name of the form torchvision:NAME, "
                r"timm:NAME, smp:ARCH:ENCODER, ultralytics:FILE.yaml, module.path:callable"),
    ("torchvision:resnet5", r"unknown torchvision model 'resnet5'; did you mean resnet50"),
    ("timm:resnet5", r"unknown timm model 'resnet5'; did you mean resnet50"),
    ("smp:Unett:resnet18", r"unknown smp architecture 'Unett'; did you mean Unet.*DeepLabV3Plus, FPN"),
    ("smp:Unet", r"smp models are named smp:ARCH:ENCODER"),
    ("smp:Unet:resnet", r"unknown smp encoder 'resnet'"),
    ("ultralytics:yolov8z.yaml", r"ultralytics has no model yaml 'yolov8z.yaml'"),
    ("ultralytics:yolov8n.pt", r"named by their yaml"),
    ("tim:resnet18", r"'tim:resnet18' is not a known scheme \(torchvision:, timm:, smp:, ultralytics:\).*trust_code=True"),
    ("not a name:x", r"unknown model scheme in 'not a name:x'; model names are"),
])
def test_unknown_names_list_the_choices(name, msg):
    lib = LIBS.get(name.partition(":")[0])
    if lib:
        pytest.importorskip(lib)
    with pytest.raises(ValueError, match=msg):
        create_model(name)


def test_code_names_need_trust_code():
    with pytest.raises(ValueError, match="imports and runs that module's code: pass trust_code=True"):
        create_model(CODE, width=6)
    m = create_model(CODE, trust_code=True, width=6)
    assert m[0].out_channels == 6 and m.secateurs_spec == {"name": CODE, "kwargs": {"width": 6}}
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_module'.*not a scheme.*schemes: torchvision:"):
        create_model("no_such_module:build", trust_code=True)
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        create_model("tests.test_model_names:nope", trust_code=True)
    with pytest.raises(TypeError, match="returned a str, not an nn.Module"):
        create_model("os:getcwd", trust_code=True)


def test_sizing_uses_each_builders_names():
    assert sizing_kwargs("cifar_resnet20", 10, 3) == {"num_classes": 10, "in_chans": 3}
    assert sizing_kwargs("torchvision:resnet18", 10, 3) == {"num_classes": 10}  # no in_chans argument
    assert sizing_kwargs("timm:resnet10t", 10, 1) == {"num_classes": 10, "in_chans": 1}
    assert sizing_kwargs("smp:Unet:resnet18", 2, 1) == {"classes": 2, "in_channels": 1}
    assert sizing_kwargs("ultralytics:yolov8n.yaml", 4, 3) == {"nc": 4, "ch": 3}
    assert sizing_kwargs(CODE, 10, 3) == {}  # user code is not imported to be inspected


def test_model_args_are_json_with_a_raw_string_fallback():
    assert parse_model_args(["base=16", "pretrained=false", "ch=[16, 8]", 'enc="resnet34"', "mode=fast", "s=",
                             "x=null", "r=0.5"]) == \
        {"base": 16, "pretrained": False, "ch": [16, 8], "enc": "resnet34", "mode": "fast", "s": "", "x": None, "r": 0.5}
    for bad in ("base", "=3", "two words=1"):
        with pytest.raises(SystemExit, match="--model-arg must look like KEY=VALUE"):
            parse_model_args([bad])


def test_cli_sizes_library_models_for_the_data_and_trusts_code(capsys):
    pytest.importorskip("segmentation_models_pytorch")
    ds = argparse.Namespace(num_classes=10, images=torch.zeros(2, 1, 8, 8))
    args = argparse.Namespace(pretrained=None, model="smp:Unet:resnet18",
                              model_arg=["encoder_depth=3", "decoder_channels=[16,8,4]", "classes=4"])
    m = build_model(args, ds)
    assert m.secateurs_spec["kwargs"] == {"classes": 4, "in_channels": 1, "encoder_depth": 3, "decoder_channels": [16, 8, 4]}
    assert m(torch.randn(1, 1, 8, 8)).shape == (1, 4, 8, 8)
    assert main(["analyze", "--model", CODE, "--model-arg", "width=6", "--input-size", "1", "3", "16", "16"]) == 0
    assert "group" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--model: unknown timm model"):
        main(["analyze", "--model", "timm:resnet5"])


def test_cli_prunes_saves_and_exports_a_timm_model(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "run"
    assert main(["prune", "--model", "timm:resnet10t", "--model-arg", "num_classes=5", "--input-size", "1", "3", "32",
                 "32", "--ratio", "0.3", "--no-latency", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["max_rel_diff"] < 1e-4
    loaded = secateurs.load(out)
    assert loaded.secateurs_spec == {"name": "timm:resnet10t", "kwargs": {"num_classes": 5}}
    assert secateurs.count(loaded, torch.randn(1, 3, 32, 32)).macs == report["after"]["macs"]
