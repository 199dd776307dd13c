"""VGG-16 with BatchNorm and an AlexNet-style net, both sized for 32x32 inputs.

VGG-16-BN follows the CIFAR variant of the filter-pruning literature (13 conv layers of
Simonyan & Zisserman with BN, 2x2 max-pools, a 512-512-classes head). ``alexnet_cifar`` is our
choice (the heuristic-pruning paper does not publish its CIFAR AlexNet): AlexNet's five conv
layers with 3x3 kernels and BN, three 2x2 pools, and a 1024-1024-classes head.
"""
from __future__ import annotations

import torch.nn as nn

from ._factory import register_model

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _features(cfg, in_chans: int, bn: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = in_chans
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=not bn)] + ([nn.BatchNorm2d(v)] if bn else []) + [nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    def __init__(self, cfg=VGG16, num_classes: int = 10, in_chans: int = 3, hidden: int = 512) -> None:
        super().__init__()
        self.features = _features(cfg, in_chans)
        last = [v for v in cfg if v != "M"][-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class CifarAlexNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.features = _features([64, "M", 192, "M", 384, 256, 256, "M"], in_chans)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * 4 * 4, 1024), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(1024, 1024), nn.ReLU(inplace=True),
                                        nn.Linear(1024, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@register_model()
def vgg16_bn_cifar(num_classes: int = 10, **kw) -> CifarVGG:
    """VGG-16 with BN for 32x32 inputs (313 M conv MACs)."""
    return CifarVGG(VGG16, num_classes=num_classes, **kw)


@register_model()
def vgg_small_cifar(num_classes: int = 10, **kw) -> CifarVGG:
    """A quarter-width 8-conv VGG for CPU-sized experiments (e.g. Fashion-MNIST)."""
    cfg = [16, 16, "M", 32, 32, "M", 64, 64, "M", 128, 128, "M"]
    return CifarVGG(cfg, num_classes=num_classes, hidden=128, **kw)


@register_model()
def alexnet_cifar(num_classes: int = 10, **kw) -> CifarAlexNet:
    """AlexNet-style net for 32x32 inputs (our layout; see module docstring)."""
    return CifarAlexNet(num_classes=num_classes, **kw)
