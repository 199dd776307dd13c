"""Bias compensation: a removed channel that carried a constant leaves the outputs unchanged."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs.surgery import apply_plan


class Net(nn.Module):
    """conv -> bn -> relu -> reader -> (bn) -> relu -> head; the reader is what absorbs the constant."""

    def __init__(self, reader: str = "1x1", bn_after: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.reader = reader
        if reader == "linear":
            self.conv2 = nn.Linear(8 * 6 * 6, 5)
        else:
            k, p = (1, 0) if reader in ("1x1", "grouped") else (3, 1)
            self.conv2 = nn.Conv2d(8, 6, k, padding=p, bias=not bn_after, groups=2 if reader == "grouped" else 1)
        self.bn2 = nn.BatchNorm2d(6) if bn_after and reader != "linear" else nn.Identity()
        self.fc = nn.Linear(6, 4) if reader in ("1x1", "grouped") else nn.Identity()

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.reader == "linear":
            return self.conv2(x.flatten(1))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3))) if self.reader in ("1x1", "grouped") else x


def _trained_like(net: nn.Module, dead=(2, 5), gamma=0.0) -> nn.Module:
    """Random running statistics and affine terms, as after training; channels ``dead`` have a
    norm scale of ``gamma`` and a positive shift, so they output (about) relu(shift) everywhere."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    with torch.no_grad():
        net.bn1.weight[list(dead)] = gamma
        net.bn1.bias[list(dead)] = torch.tensor([0.7, 0.3])
    return net.eval()


def _cut(net: nn.Module, x: torch.Tensor, channels, compensate: bool = True) -> nn.Module:
    net = copy.deepcopy(net)
    graph = secateurs.analyze(net, x)
    (group,) = graph.groups_of("conv1")
    apply_plan(net, graph, {group.index: list(channels)}, compensate=compensate)
    assert net.conv1.out_channels == 8 - len(channels)
    return net


@pytest.mark.parametrize("reader,bn_after", [("1x1", True), ("1x1", False), ("linear", False)])
def test_a_zero_gamma_channel_is_removed_with_outputs_unchanged(reader, bn_after):
    x = torch.randn(4, 3, 6, 6)
    net = _trained_like(Net(reader, bn_after))
    with torch.no_grad():
        ref = net(x)
        cut = _cut(net, x[:1], (2, 5))(x)
        plain = _cut(net, x[:1], (2, 5), compensate=False)(x)
    torch.testing.assert_close(cut, ref, atol=1e-5, rtol=1e-5)
    assert (plain - ref).abs().max() > 1e-2  # without compensation the constant is lost


@pytest.mark.parametrize("bn_after", [True, False])
def test_a_grouped_reader_folds_each_constant_into_its_own_group(bn_after):
    """conv2 has 2 groups of 4 inputs: a channel is cut with its twin in the other group (one unit),
    and each constant reaches only its own group's 3 outputs."""
    x = torch.randn(4, 3, 6, 6)
    net = _trained_like(Net("grouped", bn_after), dead=(2, 6))
    with torch.no_grad():
        ref = net(x)
        outs = []
        for compensate in (True, False):
            cut = copy.deepcopy(net)
            graph = secateurs.analyze(cut, x[:1])
            (group,) = graph.groups_of("conv1")
            apply_plan(cut, graph, {group.index: [2]}, compensate=compensate)
            assert cut.conv1.out_channels == 6 and cut.conv2.weight.shape == (6, 3, 1, 1)
            outs.append(cut(x))
    torch.testing.assert_close(outs[0], ref, atol=1e-5, rtol=1e-5)
    assert (outs[1] - ref).abs().max() > 1e-2  # without compensation the constant is lost


def test_padded_reader_is_exact_inside_the_border():
    x = torch.randn(2, 3, 8, 8)
    net = _trained_like(Net("3x3", bn_after=False))
    with torch.no_grad():
        ref, cut = net(x), _cut(net, x[:1], (2, 5))(x)
    torch.testing.assert_close(cut[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5, rtol=1e-5)
    assert (cut - ref).abs().amax() > 1e-3  # border pixels read padding zeros, not the constant


def test_a_near_zero_gamma_is_folded_and_ordinary_channels_are_not():
    x = torch.randn(4, 3, 6, 6)
    near = _trained_like(Net("1x1"), gamma=1e-4)
    with torch.no_grad():
        ref = near(x)
        err = (_cut(near, x[:1], (2, 5))(x) - ref).abs().max()
        err_plain = (_cut(near, x[:1], (2, 5), compensate=False)(x) - ref).abs().max()
    assert err < 1e-2 * err_plain
    live = _trained_like(Net("1x1"), dead=(2, 5), gamma=1.0)  # ordinary channels: nothing folded
    a, b = _cut(live, x[:1], (2, 5)), _cut(live, x[:1], (2, 5), compensate=False)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


def test_prune_with_bn_scale_keeps_a_slimmed_network_working():
    """A network slimmed by training (half the scales of every inner norm ~0) pruned by bn_scale:
    the cut changes the outputs far less with compensation (the default) than without."""
    from secateurs.models import create_model

    torch.manual_seed(0)
    model = create_model("cifar_resnet20").eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("bn1") and name.startswith("layer"):
                m.weight[::2] = 0.0
                m.bias.uniform_(0.1, 0.5)
        ref = model(x)
    errs = {}
    for comp in (True, False):
        m = copy.deepcopy(model)
        graph = secateurs.analyze(m, x[:1])
        scores = secateurs.group_scores(m, graph, "bn_scale")
        plan = {g.index: [c for c in range(g.size) if scores[g.index][c] == 0] for g in graph.groups
                if g.name.endswith("conv1") and g.name.startswith("layer")}
        apply_plan(m, graph, plan, compensate=comp)
        with torch.no_grad():
            errs[comp] = (m(x) - ref).abs().mean().item()
    assert errs[True] < 0.3 * errs[False]


def test_has_candidates_flags_exactly_the_removed_small_scale_channels():
    """The fused test agrees with the rule it replaces (a removed channel whose |gamma| is at most
    SCALE_TOL x its norm's mean |gamma|), norm by norm, on random scales and masks."""
    from secateurs.compensate import SCALE_TOL, has_candidates

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        modules, outs, expected = {}, [], False
        for i in range(int(torch.randint(1, 5, (1,), generator=g))):
            n = int(torch.randint(2, 9, (1,), generator=g))
            bn = nn.BatchNorm2d(n)
            with torch.no_grad():
                bn.weight.copy_(torch.rand(n, generator=g) * (torch.rand(n, generator=g) > 0.2))
            gone = torch.rand(n, generator=g) > 0.5
            modules[f"bn{i}"] = bn
            outs.append((f"bn{i}", "weight", gone))
            a = bn.weight.detach().abs()
            expected |= bool((a[gone] <= SCALE_TOL * a.mean()).any())
        modules["lin"] = nn.Linear(3, 3)  # not a norm: never a candidate
        outs.append(("lin", "weight", torch.ones(3, dtype=torch.bool)))
        assert has_candidates(modules, outs) == expected, trial


def test_an_inplace_op_between_reader_and_norm_stops_the_running_mean_fold():
    """conv(bias=False) -> ReLU(inplace) -> BN: the BN reads the same tensor object as the conv's
    output, changed in place; folding into its running mean would shift the post-ReLU values."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 1, bias=False), nn.ReLU(inplace=True), nn.BatchNorm2d(6))
    for bn in (net[1], net[5]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        net[1].weight[[2, 5]] = 0.0
        net[1].bias[[2, 5]] = torch.tensor([0.7, 0.3])
        net[3].weight.copy_(-net[3].weight.abs())  # the reader's output <= 0: after the ReLU the cut is exact
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    cut = copy.deepcopy(net)
    graph = secateurs.analyze(cut, x[:1])
    (group,) = graph.groups_of("0")
    apply_plan(cut, graph, {group.index: [2, 5]})
    with torch.no_grad():
        torch.testing.assert_close(cut(x), net(x), atol=1e-5, rtol=1e-5)


class _ScaledConv(nn.Conv2d):
    """A conv that computes with its weight times a per-output gain (as scaled-weight layers do)."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 3.0))

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight * self.gain, self.bias)


def test_a_reader_that_computes_its_weight_gets_no_fold_from_the_stored_one():
    """W @ value with the stored weight would fold a third of the constant into this reader's bias:
    a reader whose forward is not the stock one is left alone (the cut is then as without compensation)."""
    from secateurs.compensate import compensation

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), _ScaledConv(8, 6, 1))
    with torch.no_grad():
        net[1].weight[[2, 5]] = 0.0
        net[1].bias[[2, 5]] = torch.tensor([0.7, 0.3])
    gone = torch.zeros(8, dtype=torch.bool)
    gone[[2, 5]] = True
    x = torch.randn(1, 3, 8, 8)
    assert compensation(net.eval(), (x,), {"3": gone}) == {}
    plain = nn.Sequential(*[copy.deepcopy(m) for m in net[:3]], nn.Conv2d(8, 6, 1))
    plain[3].weight.data.copy_(net[3].weight * net[3].gain)
    plain[3].bias.data.copy_(net[3].bias)
    assert set(compensation(plain.eval(), (x,), {"3": gone})) == {("3", "bias")}  # the stock conv: folded
