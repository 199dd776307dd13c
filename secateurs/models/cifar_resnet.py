"""CIFAR ResNet v1 (He et al. 2016, section 4.2) with 1x1 projection shortcuts.

Depth 6n+2: three stages of n BasicBlocks at 16/32/64 channels. The shortcut of the two
down-sampling blocks is a strided 1x1 conv + BN, as in the layer-pruning paper's code, which gives
40.81 M / 125.75 M / 253.15 M MACs for ResNet-20 / 56 / 110 on 32x32 inputs.
"""
from __future__ import annotations

import torch.nn as nn

from ._factory import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"`depth` must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        widths, cin = (16, 32, 64), 16
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin if j == 0 else w, w, 1 if i == 0 or j else 2) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _make(depth: int):
    def build(num_classes: int = 10, **kw) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, **kw)

    build.__name__ = f"cifar_resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} v1 with 1x1 projection shortcuts."
    return build


for _d in (20, 32, 44, 56, 110):
    register_model()(_make(_d))
