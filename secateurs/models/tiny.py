"""A tiny CNN for smoke tests and CI-sized runs (e.g. scikit-learn digits, 8x8 pixels)."""
from __future__ import annotations

import torch.nn as nn

from .._validation import check_choice
from ._factory import register_model


@register_model()
def tiny_cnn(num_classes: int = 10, in_chans: int = 1, width: int = 16, norm: str = "bn") -> nn.Sequential:
    """conv-norm-relu x3 (one stride 2), global pool, linear. ``norm``: bn, gn or none."""
    check_choice(norm, "norm", ("bn", "gn", "none"))

    def block(cin, cout, stride=1):
        n = {"bn": lambda: nn.BatchNorm2d(cout), "gn": lambda: nn.GroupNorm(4, cout), "none": nn.Identity}[norm]()
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none"), n, nn.ReLU(inplace=True)]

    return nn.Sequential(*block(in_chans, width), *block(width, 2 * width, 2), *block(2 * width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))
