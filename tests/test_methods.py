"""Method 1 (heuristic estimator): exact picks on hand-made scores, stop rules, guards, coupling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs import HeuristicMethod, analyze, count
from secateurs.methods import get_method, list_estimators
from secateurs.models import create_model


class TwoLayers(nn.Module):
    """Two independent groups of 10 and 6 channels (no norm, no coupling)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 10, 1, bias=False)
        self.b = nn.Conv2d(10, 6, 1, bias=False)
        self.fc = nn.Linear(6, 2, bias=False)

    def forward(self, x):
        return self.fc(self.b(self.a(x).relu()).relu().mean((2, 3)))


def _graph():
    m = TwoLayers()
    return m, analyze(m, torch.randn(1, 1, 4, 4))


def test_estimators_pick_exactly_the_filters_under_gamma():
    _, g = _graph()
    s_a = torch.arange(1.0, 11.0)  # mean 5.5, std 2.872: gamma(kappa=0.5) = 4.064 -> 1, 2, 3, 4 go
    s_b = torch.tensor([5.0, 1.0, 5.0, 5.0, 2.0, 5.0])  # mean 3.833, std 1.572: gamma = 3.047 -> 1 and 4
    widths = {grp.name: grp.size for grp in g.groups}
    c = HeuristicMethod().candidates(g, [s_a, s_b], widths)
    assert c[0].tolist() == [0, 1, 2, 3] and sorted(c[1].tolist()) == [1, 4]
    c = HeuristicMethod(kappa=1.5).candidates(g, [s_a, s_b], widths)  # gamma_a = 1.19: only score 1
    assert c[0].tolist() == [0] and c[1].tolist() == [1]
    c = HeuristicMethod("ratio_of_mean", rho=0.6).candidates(g, [s_a, s_b], widths)  # 3.3 and 2.3
    assert c[0].tolist() == [0, 1, 2] and sorted(c[1].tolist()) == [1, 4]
    c = HeuristicMethod(lambda s, **_: float(s.max())).candidates(g, [s_a, s_b], widths)  # a callable estimator
    assert c[0].tolist() == list(range(9)) and sorted(c[1].tolist()) == [1, 4]
    assert set(list_estimators()) == {"mean_minus_std", "ratio_of_mean"}


def test_min_keep_guard_counts_from_the_original_width():
    _, g = _graph()
    s_a = torch.arange(1.0, 11.0)
    s_b = torch.tensor([5.0, 1.0, 5.0, 5.0, 2.0, 5.0])
    # original widths 20 and 6: at least ceil(0.45 * 20) = 9 of a, ceil(0.45 * 6) = 3 of b stay
    c = HeuristicMethod(min_keep=0.45).candidates(g, [s_a, s_b], {g.groups[0].name: 20, g.groups[1].name: 6})
    assert c[0].tolist() == [0] and sorted(c[1].tolist()) == [1, 4]
    c = HeuristicMethod(min_keep=0.9).candidates(g, [s_a, s_b], {g.groups[0].name: 10, g.groups[1].name: 6})
    assert c[0].tolist() == [0] and 1 not in c


def test_global_scope_pools_mean_normalised_scores():
    _, g = _graph()
    s_a = torch.arange(1.0, 11.0) * 100  # scale does not matter after dividing by the mean
    s_b = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.1])
    widths = {grp.name: grp.size for grp in g.groups}
    normed = torch.cat([s_a / s_a.mean(), s_b / s_b.mean()])
    gamma = float(normed.mean() - 0.5 * normed.std(unbiased=False))
    c = HeuristicMethod(scope="global").candidates(g, [s_a, s_b], widths)
    expect_a = (s_a / s_a.mean() < gamma).nonzero().flatten().tolist()
    expect_b = (s_b / s_b.mean() < gamma).nonzero().flatten().tolist()
    assert c[0].tolist() == expect_a and c.get(1, torch.tensor([], dtype=torch.long)).tolist() == expect_b
    assert expect_a == [0, 1, 2, 3] and expect_b == [5]


def test_heuristic_prune_keeps_the_heavy_filters_end_to_end():
    m = TwoLayers()
    with torch.no_grad():
        m.a.weight.copy_(torch.arange(1.0, 11.0).view(10, 1, 1, 1))
        m.b.weight.fill_(0.0)  # consumers add nothing to a's scores
        m.b.weight[:, :, 0, 0] = torch.tensor([1.0, 1, 1, 1, 1, 0.01]).view(6, 1) * 0.01
        m.fc.weight.fill_(1.0)
    kept_a = m.a.weight[4:].clone()
    x = torch.randn(1, 1, 4, 4)
    m, report = secateurs.prune(m, x, "heuristic", steps=1)
    assert torch.equal(m.a.weight, kept_a)  # filters with L1 1..4 went, exactly
    assert report["steps"][1]["removed"]["a"] == 4
    assert report["method"] == "heuristic" and report["budget"]["kind"] is None


def test_stop_rules_nothing_under_gamma_and_macs_target():
    m = TwoLayers()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.5)  # every score equal: std 0, gamma = mean, nothing strictly below
    m, report = secateurs.prune(m, torch.randn(1, 1, 4, 4), "heuristic", steps=5)
    assert report["stopped"] == "no filter falls under the estimator" and len(report["steps"]) == 1
    torch.manual_seed(0)
    r20 = create_model("cifar_resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    base = count(r20, x).macs
    r20, report = secateurs.prune(r20, x, "heuristic", 0.6, steps=20, method_options={"kappa": 0.0})
    assert report["stopped"] == "macs target 0.6 met"
    assert 0.59 <= count(r20, x).macs / base <= 0.6  # the last round took only what the target needed


def test_min_keep_floor_is_reached_and_then_the_schedule_stops():
    torch.manual_seed(0)
    m = create_model("cifar_resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    widths0 = {grp.name: grp.size for grp in analyze(m, x).groups}
    always = lambda s, **_: float("inf")  # noqa: E731  every filter is "under"
    m, report = secateurs.prune(m, x, "heuristic", steps=3, method_options={"estimator": always, "min_keep": 0.25})
    widths = {grp.name: grp.size for grp in analyze(m, x).groups}
    assert widths == {n: max(1, math.ceil(0.25 * w)) for n, w in widths0.items()}
    assert report["stopped"] == "no filter falls under the estimator" and len(report["steps"]) == 2


def test_residual_groups_are_cut_together():
    torch.manual_seed(0)
    m = create_model("cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    m, _ = secateurs.prune(m, x, "heuristic", steps=2, method_options={"kappa": 0.2})
    stage1 = {m.conv1.out_channels, m.bn1.num_features} | {b.conv2.out_channels for b in m.layer1}
    assert len(stage1) == 1 and stage1.pop() < 16
    assert all(b.conv1.in_channels == m.conv1.out_channels for b in m.layer1)
    assert m(x).shape == (2, 10)


def test_bad_options_name_themselves():
    with pytest.raises(ValueError, match="`scope` must be 'layer' or 'global'"):
        get_method("heuristic", scope="net")
    with pytest.raises(ValueError, match="`min_keep` must be in \\(0, 1\\]"):
        get_method("heuristic", min_keep=0)
    with pytest.raises(ValueError, match="unknown estimator 'median'"):
        get_method("heuristic", estimator="median")
    with pytest.raises(ValueError, match="method 'heuristic'.*unexpected keyword argument 'kapa'"):
        get_method("heuristic", kapa=1)
    with pytest.raises(ValueError, match="macs or params target as a stop rule"):
        secateurs.prune(TwoLayers(), torch.randn(1, 1, 4, 4), "heuristic", {"latency": 0.5})


def test_heuristic_from_the_command_line_reports_each_round(tmp_path):
    import json

    from secateurs.cli import main

    out = tmp_path / "h"
    assert main(["prune", "--model", "cifar_resnet20", "--input-size", "1", "3", "32", "32", "--method", "heuristic",
                 "--kappa", "0.3", "--min-keep", "0.25", "--macs", "0.5", "--steps", "4", "--no-latency", "--no-onnx",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method_options"]["kappa"] == 0.3 and 0.49 <= report["kept"]["macs"] <= 0.5
    assert all(st["removed"] for st in report["steps"][1:])
    assert "filters removed per group" in (out / "report.md").read_text()
    with pytest.raises(SystemExit, match="--method: `scope` must be 'layer' or 'global', got 'net'"):
        main(["prune", "--model", "cifar_resnet20", "--method", "heuristic", "--scope", "net"])


@pytest.mark.parametrize("name,size", [("torchvision:alexnet", 64), ("torchvision:vgg16", 32), ("torchvision:resnet34", 32),
                                       ("alexnet_cifar", 32), ("vgg16_bn_cifar", 32), ("cifar_resnet56", 32)])
def test_heuristic_runs_on_the_papers_architectures(name, size):
    torch.manual_seed(0)
    m = create_model(name).eval()
    x = torch.randn(1, 3, size, size)
    before = count(m, x)
    y0 = m(x).shape
    m, report = secateurs.prune(m, x, "heuristic", steps=1)
    assert m(x).shape == y0 and report["after"]["macs"] < before.macs and report["steps"][1]["removed"]


def test_iterated_methods_default_to_their_papers_schedules():
    """heuristic iterates rounds while a target or tolerance can stop it (one round without); the
    dlp+filters cascade runs the blocks then the paper's 6 filter iterations."""
    from secateurs.budget import Budget
    from secateurs.methods import get_method

    heuristic = get_method("heuristic")
    assert heuristic.steps_for(Budget("macs", 0.5), None) == 10 and heuristic.steps_for(None, 1.0) == 10
    assert heuristic.steps_for(None, None) == 1
    assert get_method("dlp+filters").steps_for(None, None) == 7 and get_method("dlp").steps_for(None, None) == 1


def test_the_heuristics_last_round_keeps_round_to_multiples():
    """The round trimmed to the budget took a prefix of candidates across groups: kept widths that
    were multiples of round_to stopped being so."""
    import secateurs
    from secateurs.models import create_model

    torch.manual_seed(0)
    m = create_model("cifar_resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    m, report = secateurs.prune(m, x, "heuristic", {"macs": 0.8}, round_to=4)
    widths = [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    assert report["kept"]["macs"] <= 0.8 and all(w % 4 == 0 for w in widths), widths
