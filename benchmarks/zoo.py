"""The models users bring, by family: how to build each (no pretrained weights), its example input,
its head (what Torch-Pruning must be told to ignore) and one training step.

Families: torchvision classification/segmentation, timm, segmentation_models_pytorch, ultralytics
YOLO (built from yaml), torchvision detection, torchvision video, and a 1-D CNN. The optional
libraries come with ``pip install secateurs[zoo]``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

TIMM = ["resnet26t", "resnet34d", "seresnext26d_32x4d", "ecaresnet26t", "skresnet18", "resnest14d", "regnetz_b16",
        "regnety_002", "efficientnet_b1", "tf_efficientnet_lite1", "mobilenetv3_small_100", "mobilenetv4_conv_small",
        "mobilenetv2_050", "convnext_femto", "densenetblur121d", "ghostnetv2_100", "dla46_c", "res2next50",
        "cspresnext50", "cs3darknet_s", "repvgg_b0", "hrnet_w18_small_v2", "dpn48b", "mixnet_m", "rexnet_130",
        "lcnet_075", "spnasnet_100", "mnasnet_100", "vgg13_bn", "selecsls42", "nf_regnet_b0", "xception65",
        "inception_v3", "inception_resnet_v2", "mobileone_s1", "repvit_m1", "fastvit_sa12", "edgenext_x_small",
        "coatnet_0_rw_224", "resnetv2_50x1_bit", "gernet_m", "hardcorenas_b", "tinynet_b", "mnasnet_small",
        "eca_botnext26ts_256", "haloregnetz_b", "mobilevitv2_050", "poolformerv2_s12", "efficientformer_l1",
        "efficientformerv2_s0", "tresnet_m", "ese_vovnet19b_dw", "hgnetv2_b0", "efficientvit_m0", "starnet_s1",
        "rdnet_tiny", "fasternet_t0"]
SMP_ARCHS = ["Unet", "UnetPlusPlus", "FPN", "DeepLabV3", "DeepLabV3Plus", "Linknet", "PSPNet", "PAN", "MAnet",
             "UPerNet", "Segformer"]
SMP = [f"{a}:{e}" for a in SMP_ARCHS for e in ("resnet18", "mobilenet_v2")]
YOLO = ["yolov8s.yaml", "yolo11s.yaml", "yolo11n-seg.yaml", "yolov8n-pose.yaml"]
DETECTION = ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
             "fcos_resnet50_fpn"]
VIDEO = ["r3d_18", "r2plus1d_18", "s3d"]
CONV1D = ["cnn1d"]
QUICK = {"timm": ["resnet26t", "mixnet_m", "convnext_femto"], "smp": ["Unet:resnet18", "FPN:mobilenet_v2"],
         "ultralytics": ["yolo11n-seg.yaml"], "video": ["r2plus1d_18"], "conv1d": ["cnn1d"]}


@dataclass
class Case:
    """One model as a user brings it."""

    family: str
    name: str
    model: nn.Module
    inputs: tuple
    head: list[nn.Module] = field(default_factory=list)  # Torch-Pruning's ignored_layers
    train_step: Callable[[nn.Module], torch.Tensor] | None = None  # returns a scalar to backprop


def _sum_outputs(out: Any) -> torch.Tensor:
    from secateurs.testing import output_tensors

    return sum(t.float().sum() for t in output_tensors(out) if t.is_floating_point())


def plain_step(x: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    """A training step on a batch of two copies of ``x`` (training-mode BN needs two values)."""
    return lambda m: _sum_outputs(m(torch.cat([x, x])))


def _timm(name: str) -> Case:
    import timm

    m = timm.create_model(name, pretrained=False)
    size = m.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    return Case("timm", name, m, (x,), [m.get_classifier()], plain_step(x))


def _smp(name: str) -> Case:
    import segmentation_models_pytorch as smp

    arch, enc = name.split(":")
    m = getattr(smp, arch)(encoder_name=enc, encoder_weights=None, classes=3)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    head = [m.segmentation_head] + ([m.classification_head] if getattr(m, "classification_head", None) else [])
    return Case("smp", name, m, (x,), head, plain_step(x))


def _yolo(name: str) -> Case:
    from ultralytics.nn.tasks import DetectionModel, PoseModel, SegmentationModel

    cls = SegmentationModel if "-seg" in name else PoseModel if "-pose" in name else DetectionModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = cls(name, verbose=False)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    return Case("ultralytics", name, m, (x,), [m.model[-1]], plain_step(x))


def _detection(name: str) -> Case:
    import torchvision

    kw = {"min_size": 256, "max_size": 256} if not name.startswith("ssd") else {}
    m = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kw)
    size = 320 if name.startswith("ssd") else 256
    x = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 120.0, 150.0], [60.0, 40.0, 200.0, 220.0]]),
                "labels": torch.tensor([1, 2])}]

    def step(model):  # two images: SSDlite's last extra layers are 1x1, and training BN needs two values
        return sum(model([x, x.flip(-1)], targets * 2).values())

    heads = [h for h in (getattr(m, "head", None), getattr(m, "rpn", None), getattr(m, "roi_heads", None)) if h is not None]
    return Case("detection", name, m, ([x],), heads, step)


class RawHeads(nn.Module):
    """A torchvision detector up to its heads' raw outputs. Zeroed channels cut must leave these
    unchanged; the boxes after NMS need not be, since a randomly initialised detector's scores are
    near-equal and a 1e-7 difference reorders them."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.det = detector

    def forward(self, images):
        from collections import OrderedDict

        batch, _ = self.det.transform(images)
        feats = self.det.backbone(batch.tensors)
        if isinstance(feats, torch.Tensor):
            feats = OrderedDict([("0", feats)])
        if hasattr(self.det, "rpn"):
            objectness, deltas = self.det.rpn.head(list(feats.values()))
            return objectness + deltas
        return self.det.head(list(feats.values()))


def equivalence_view(case: Case) -> nn.Module:
    """The module whose outputs the zeroed-channel check compares."""
    return RawHeads(case.model).eval() if case.family == "detection" else case.model


def _video(name: str) -> Case:
    import torchvision

    m = getattr(torchvision.models.video, name)(weights=None)
    shape = (1, 3, 16, 224, 224) if name == "s3d" else (1, 3, 8, 64, 64)  # S3D pools 7x7 at the end
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    head = [m.fc] if hasattr(m, "fc") else [m.classifier[-1]]
    return Case("video", name, m, (x,), head, plain_step(x))


class CNN1d(nn.Module):
    """A small 1-D CNN (signals, audio, sensor streams): residual Conv1d blocks and a linear head."""

    def __init__(self, cin: int = 2, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(cin, 32, 7, 2, 3), nn.BatchNorm1d(32), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv1d(32, 32, 5, 1, 2), nn.BatchNorm1d(32), nn.ReLU(), nn.Conv1d(32, 32, 5, 1, 2))
        self.down = nn.Sequential(nn.Conv1d(32, 64, 3, 2, 1, groups=2), nn.BatchNorm1d(64), nn.ReLU())
        self.dw = nn.Conv1d(64, 64, 9, 1, 4, groups=64)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = self.down(x)
        x = x + self.dw(x)
        return self.fc(x.mean(-1))


def _conv1d(name: str) -> Case:
    m = CNN1d()
    x = torch.randn(1, 2, 256, generator=torch.Generator().manual_seed(1))
    return Case("conv1d", name, m, (x,), [m.fc], plain_step(x))


def _torchvision(name: str) -> Case:
    import torchvision

    seg = name in torchvision.models.list_models(module=torchvision.models.segmentation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torchvision.models.get_model(name, weights=None)
    s = 299 if name == "inception_v3" else 224
    x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(1))
    head = [mod for mod in m.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))][-1:]
    return Case("torchvision-segmentation" if seg else "torchvision", name, m, (x,), head, plain_step(x))


BUILDERS: dict[str, Callable[[str], Case]] = {
    "timm": _timm, "smp": _smp, "ultralytics": _yolo, "detection": _detection, "video": _video,
    "conv1d": _conv1d, "torchvision": _torchvision,
}


def model_names(family: str) -> list[str]:
    if family == "torchvision":
        import torchvision

        return (torchvision.models.list_models(module=torchvision.models)
                + torchvision.models.list_models(module=torchvision.models.segmentation))
    return {"timm": TIMM, "smp": SMP, "ultralytics": YOLO, "detection": DETECTION, "video": VIDEO,
            "conv1d": CONV1D}[family]


def build(family: str, name: str) -> Case:
    from secateurs.testing import randomize_norms

    case = BUILDERS[family](name)
    randomize_norms(case.model).eval()
    return case
