"""Real torchvision models: zeroed channels cut with outputs unchanged, 50% prune runs forward and backward.

The default run takes one model per family at small inputs; ``-m slow`` takes every
classification and segmentation model in torchvision (benchmarks/coverage.py does the same at
224x224 and writes docs/coverage.md).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import secateurs
from secateurs.models import create_model

from secateurs.testing import check_equivalence, main_output, randomize_norms

FAST = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5", "efficientnet_b0",
        "regnet_y_400mf", "densenet121", "convnext_tiny", "googlenet", "mnasnet0_5", "resnext50_32x4d",
        "lraspp_mobilenet_v3_large"]
SEGMENTATION = set(torchvision.models.list_models(module=torchvision.models.segmentation))
ALL = torchvision.models.list_models(module=torchvision.models) + sorted(SEGMENTATION)


def build(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return randomize_norms(create_model(f"torchvision:{name}")).eval()


def size(name, small):
    if name.startswith(("vit", "maxvit")):
        return 224
    if name == "inception_v3":
        return 299 if not small else 128
    return 64 if small else 128


def check(name, small):
    torch.manual_seed(0)
    m = build(name)
    s = size(name, small)
    x = torch.randn(1, 3, s, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, err, cut = check_equivalence(m, x)
        assert cut > 0
        before = secateurs.count(m, x)
        secateurs.prune(m, x, target={"ratio": 0.5})
    with torch.no_grad():
        out = main_output(m(x))
    assert out.shape == main_output(build(name)(x)).shape
    assert secateurs.count(m, x).macs < before.macs
    m.train()
    main_output(m(torch.randn(2, 3, s, s))).sum().backward()


@pytest.mark.parametrize("name", FAST)
def test_family_representatives(name):
    check(name, small=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_torchvision_model(name):
    check(name, small=False)
