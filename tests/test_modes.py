"""Every entry point that runs a user's model in eval (or train) mode gives each module its own mode
back: a frozen BatchNorm (eval inside a model in training mode) stays frozen, and the rest train."""
import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs.data import ArrayDataset
from secateurs.pls import block_features
from secateurs.train import TrainConfig, evaluate, fit

X = torch.randn(2, 3, 16, 16)


def _net() -> nn.Sequential:
    """Training mode, with its first BatchNorm frozen as a fine-tuning user freezes one."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).train()
    net[1].eval()
    return net


def _modes(net: nn.Module) -> list[bool]:
    return [m.training for m in net.modules()]


def _data(n: int = 12) -> ArrayDataset:
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ArrayDataset("toy", images, torch.arange(n) % 3, ["a", "b", "c"], mean=(0.5,) * 3, std=(0.25,) * 3)


CALLS = {
    "evaluate": lambda net: evaluate(net, _data()),
    "prune with data": lambda net: secateurs.prune(net, X, "l1", 0.5, data=_data(), latency_guard=False),
    "block_features": lambda net: block_features(net, ["3"], _data(), per_class=2, batch_size=4),
    "measure_latency": lambda net: secateurs.measure_latency(net, X, repeats=6, warmup=0),
    "taylor": lambda net: secateurs.prune(net, X, "taylor", 0.5, data=[(X, torch.tensor([0, 1]))]),
}


@pytest.mark.parametrize("call", CALLS)
def test_each_modules_own_mode_comes_back(call):
    net = _net()
    modes = _modes(net)
    CALLS[call](net)
    assert _modes(net) == modes and not net[1].training and net[4].training


def test_export_restores_each_modules_mode(tmp_path):
    pytest.importorskip("onnxruntime")
    net = _net()
    modes = _modes(net)
    secateurs.export_onnx(net, X, tmp_path / "m.onnx")
    assert _modes(net) == modes


def test_the_teacher_keeps_its_own_modes_through_fit():
    student, teacher = _net(), _net()
    modes = _modes(teacher)
    fit(student, _data(), None, TrainConfig(epochs=1, batch_size=4, lr=0.01, quiet=True, distill=0.5), teacher=teacher)
    assert _modes(teacher) == modes
