"""Latency on a CUDA GPU: graphed timing and per-layer tables timed where the model runs. Skipped
without a GPU (CI has none); run on a lent one (docs/latency_gpu.md)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs import analyze, latency_table
from secateurs.latency import cuda_graphed, runtime_of, time_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                         nn.Conv2d(128, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval().cuda()


def test_a_replayed_graph_computes_what_the_model_does():
    """The graphed forward must be the model's forward, or its time is some other program's."""
    model, x = _net(), torch.randn(8, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        run = cuda_graphed(lambda: model(x))
        assert torch.allclose(run(), model(x), atol=1e-5)
    assert runtime_of(model) == "cuda_graph" and runtime_of(model.cpu()) == "eager"


def test_a_forward_that_cannot_be_captured_is_timed_eager_with_a_warning():
    class HostSync(nn.Module):
        def forward(self, x):
            return x * float(x.sum().item() > 0)  # a host sync: illegal during capture

    x = torch.randn(2, 3, device="cuda")
    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph"):
        t = time_models({"m": HostSync().cuda()}, x, runtime="cuda_graph", repeats=6)
    assert t["m"].median_s > 0 and t["m"].runtime == "cuda_graph"


def test_tables_are_timed_on_the_gpu_and_cached_apart_from_the_cpus(tmp_path):
    model, x = _net(), torch.randn(8, 3, 32, 32, device="cuda")
    graph = analyze(model, x)
    lm = latency_table.LatencyModel(model, graph, x, runtime=runtime_of(model), cache_dir=tmp_path, grid=3, repeats=5)
    assert lm.device.type == "cuda" and lm.full() == pytest.approx(lm.measured_s, rel=1e-6)
    cpu = latency_table.LatencyModel(model.cpu(), analyze(model, x.cpu()), x.cpu(), cache_dir=tmp_path, grid=3, repeats=5)
    assert cpu.path != lm.path and len(list(tmp_path.iterdir())) == 2


def test_a_latency_target_on_the_gpu_is_met_by_the_graphed_timing():
    """The search's confirming timing replays graphs; a target it reports met is within 5%."""
    model, x = _net(), torch.randn(32, 3, 128, 128, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned, report = secateurs.prune(model, x, "l2", target={"latency": 0.6}, round_to=8, latency_guard=True)
    assert next(pruned.parameters()).is_cuda
    assert report["method_output"]["latency_ratio"] <= 0.6 * 1.05
    assert report["latency"]["runtime"] == "cuda_graph" and report["latency"]["device"].startswith("cuda")
    assert pruned(x).shape == (32, 10)


def test_a_cpu_input_to_a_gpu_model_is_timed_eager_with_a_warning():
    """A model that moves a CPU input itself cannot be graphed (the copy is outside any graph): it
    is timed eager, as it ran before graphs were the GPU's runtime, not refused."""
    class MovesInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x.to(self.conv.weight.device))

    with pytest.warns(UserWarning, match="needs every input on the GPU"):
        t = time_models({"m": MovesInput().cuda()}, torch.randn(2, 3, 16, 16), runtime="cuda_graph", repeats=6)
    assert t["m"].median_s > 0
