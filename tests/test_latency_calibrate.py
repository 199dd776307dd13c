"""The latency model's fixed share of the rest of the model, fitted to the search's first timing.
No real clock: the tables, the model's timing and the confirming ratio are stand-ins."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn

from secateurs import analyze, latency_table
from secateurs import budget as budget_mod
from secateurs._validation import PruningError
from secateurs.budget import Allocator, Budget, latency_plan
from secateurs.criteria import group_scores

X = torch.randn(2, 3, 16, 16)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 48, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(48, 5)).eval()


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """Tables where a layer's time is proportional to its width, and a dense model timed at twice
    what its layers add up to: half of it is the rest (norms, activations). The search's own tables
    go to a cache of the test's (never the machine's, where they would pass for measured ones)."""
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    monkeypatch.setattr(latency_table.LatencyModel, "_measure", lambda self, layer: {
        axis: [[w, 1e-3 * w] for w in latency_table._grid(layer.cin if axis == "in" else layer.cout, 4)]
        for axis in (("dw",) if layer.depthwise else ("out", "in"))})
    layers_s = 1e-3 * (3 + 32 + 32 + 48)  # each layer at full width: 1e-3 x its inputs
    monkeypatch.setattr(latency_table, "time_models",
                        lambda models, *a, **k: {n: types.SimpleNamespace(median_s=2 * layers_s) for n in models})
    return tmp_path


def test_calibrating_fits_the_fixed_share_to_one_measured_plan_and_keeps_the_dense_prediction(stand_in):
    model = _model()
    graph = analyze(model, X)
    lm = latency_table.LatencyModel(model, graph, X, cache_dir=stand_in, grid=4, repeats=3)
    assert lm.rest_s == pytest.approx(lm.measured_s / 2) and lm.fixed == 0.0
    alloc = Allocator(graph, group_scores(model, graph, "l2"), "global")
    removed = alloc.removed([g.size // 2 for g in graph.groups])
    full, shrinking = lm.full(), lm(removed) / lm.full()
    lm.fixed = 1.0
    staying = lm(removed) / full
    assert staying > shrinking + 0.1  # half the activations kept: half the rest more
    for share in (0.0, 0.3, 1.0):  # the share whose prediction a measured ratio equals
        lm.fixed = 0.5
        assert lm.calibrate(removed, shrinking + share * (staying - shrinking)) == pytest.approx(share)
        assert lm(removed) / lm.full() == pytest.approx(shrinking + share * (staying - shrinking))
        assert lm.full() == pytest.approx(full)
    assert lm.calibrate(removed, shrinking - 0.05) == 0.0 and lm.calibrate(removed, staying + 0.05) == 1.0
    lm.fixed = 0.5
    assert lm.calibrate(torch.zeros_like(removed), 1.3) == 0.5  # the dense plan says nothing: unchanged


def _search(monkeypatch, cache, target: float, share: float, calibrate: bool = True,
            measured: list[float] | None = None) -> list[dict]:
    """latency_plan on a machine whose latency is the tables' with ``share`` of the rest of the model
    fixed (per-op cost that no channel cut removes); ``measured`` collects the confirming ratios."""
    model = _model()
    graph = analyze(model, X)
    truth = latency_table.LatencyModel(model, graph, X, cache_dir=cache, grid=4)
    truth.fixed = share
    measured = [] if measured is None else measured
    real_apply = budget_mod.apply_plan

    def apply(m, g, plan):  # the plan the search confirms next, as the components it removes
        apply.removed = torch.zeros(g.n_components, dtype=torch.bool)
        for gi, positions in plan.remove.items():
            apply.removed[g.groups[gi].components[positions]] = True
        return real_apply(m, g, plan)

    def ratio(dense_model, pruned, x, **kw):
        measured.append(truth(apply.removed) / truth.full())
        return measured[-1]

    monkeypatch.setattr(budget_mod, "apply_plan", apply)
    monkeypatch.setattr(budget_mod, "latency_ratio", ratio)
    if not calibrate:
        monkeypatch.setattr(latency_table.LatencyModel, "calibrate", lambda self, removed, r: 0.0)
    _, info = latency_plan(model, graph, X, group_scores(model, graph, "l2"), Budget("latency", target), "global", 1,
                           1, None, lambda *a: None)
    return info["latency_search"]


def test_the_search_lands_on_the_first_aim_after_calibrating(monkeypatch, stand_in):
    """Most of the rest stays: tables whose rest shrinks with the activations aim too low each time,
    and scaling the aim by target / measured creeps up on it."""
    measured: list[float] = []
    tried = _search(monkeypatch, stand_in, 0.6, 0.8, measured=measured)
    assert tried[0]["fixed_share"] == pytest.approx(0.8)
    assert abs(measured[0] - 0.6) > 0.05 * 0.6 and abs(measured[1] - 0.6) <= 0.05 * 0.6  # (then one aim up: stretch)
    uncalibrated: list[float] = []
    _search(monkeypatch, stand_in, 0.6, 0.8, calibrate=False, measured=uncalibrated)
    assert abs(uncalibrated[1] - 0.6) > 0.05 * 0.6


def test_an_unreachable_target_is_refused_once_the_smallest_model_is_timed(monkeypatch, stand_in):
    """All of the rest stays, and no channel cut gets to 0.4 of the dense time: calibrated, the tables
    know it after one timing and the second times the smallest model the constraints allow;
    uncalibrated, every try aims lower."""
    for calibrate, most in ((True, 2), (False, 6)):
        measured: list[float] = []
        with pytest.raises(PruningError, match="no plan met a latency target of 0.4"):
            _search(monkeypatch, stand_in, 0.4, 1.0, calibrate, measured)
        assert len(measured) == most
