"""The capture sees functional calls inside any module class, runs the model's own control flow, and
never changes the model; exact sizes, MACs and zeroed-channel equivalence on hand-built models."""
from __future__ import annotations


import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import secateurs
from secateurs import analyze, apply_plan, count
from secateurs.capture import TrackedInt
from secateurs.testing import check_equivalence


class BatchNormAct(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d subclass whose forward calls F.batch_norm with its own tensors."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return F.relu(x)


class ConvSame(nn.Conv2d):
    """timm's Conv2dSame: F.pad then F.conv2d with the module's parameters."""

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = ConvSame(3, 8, 2)
        self.bn1 = BatchNormAct(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.ln_w = nn.Parameter(torch.rand(6) + 0.5)
        self.ln_b = nn.Parameter(torch.rand(6))
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        b, c, h, w = x.shape
        if h % 4:  # a shape check, as smp does: runs in Python, specialised on the example
            raise ValueError("height must be a multiple of 4")
        x = self.bn1(self.c1(x))
        x = self.c2(x)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.ln_w, self.ln_b).permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


def _randomize(m):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
    return m


def test_functional_calls_inside_custom_modules_are_pruned():
    m = _randomize(Functional()).eval()
    x = torch.randn(2, 3, 8, 8)
    g = analyze(m, x)
    assert [(gr.name, gr.size, gr.exact) for gr in g.groups] == [("c1", 8, True), ("c2", 6, False)]
    assert {(mod, t) for mod, t, _, _ in g.groups[0].members} == {
        ("c1", "weight"), ("c1", "bias"), ("bn1", "weight"), ("bn1", "bias"), ("bn1", "running_mean"),
        ("bn1", "running_var"), ("c2", "weight")}
    # MACs by hand: c1 (padded 9x9, k2 -> 8x8) 64*3*8*4 ; c2 64*8*6*9 ; fc 6*4
    assert count(m, x).macs == 64 * 3 * 8 * 4 + 64 * 8 * 6 * 9 + 6 * 4
    check_equivalence(m, x)
    apply_plan(m, g, {0: [1, 3, 5], 1: [0, 2]})
    assert (m.c1.out_channels, m.bn1.num_features, m.c2.in_channels, m.c2.out_channels) == (5, 5, 5, 4)
    assert m.ln_w.shape == (4,) and m.fc.in_features == 4
    assert count(m, x).macs == 64 * 3 * 5 * 4 + 64 * 5 * 4 * 9 + 4 * 4
    assert m(x).shape == (2, 4)


class CachesAttributes(nn.Module):
    """ultralytics' Detect caches anchors and the input shape on the module during forward."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)])
        self.f = [-1, -1, [0, 1]]  # ultralytics-style "from" indices: loop over a layer list
        self.shape = None

    def forward(self, x):
        outs = []
        for i, layer in enumerate(self.layers):
            if isinstance(self.f[i], list):
                x = sum(outs[j] for j in self.f[i])
            x = layer(x)
            outs.append(x)
        if self.shape != x.shape:
            self.anchors = torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
            self.shape = x.shape
        return x


def test_python_loops_run_and_the_model_is_left_exactly_as_it_was():
    m = CachesAttributes().eval()
    x = torch.randn(1, 3, 6, 6)
    before = dict(vars(m))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    g = analyze(m, x)
    assert vars(m).keys() == before.keys() and m.shape is None and not hasattr(m, "anchors")
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    (grp,) = g.groups  # layers 0 and 1 are summed: one group of 8
    assert grp.size == 8 and {"layers.0", "layers.1", "layers.2"} <= set(grp.modules)
    check_equivalence(m, x)


class ViewFromShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 2)

    def forward(self, x):
        y = self.c(x)
        b, c, h, w = y.shape
        return self.fc(y.view(b, c * h * w))


def test_sizes_read_from_shapes_follow_pruning():
    m = ViewFromShape().eval()
    x = torch.randn(1, 3, 4, 4)
    (grp,) = analyze(m, x).groups
    assert grp.size == 4
    check_equivalence(m, x)
    t = TrackedInt(4, torch.tensor([7]))
    assert (t * 3).ids.tolist() == [7] and int(t * 3) == 12 and type(int(t)) is int


class ComputedWeight(nn.Module):
    """A conv weight computed from the activations (dynamic convolution): its channels stay."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.a(x)
        for conv in (self.b, self.c):
            x = F.conv2d(x, conv.weight * torch.sigmoid(x.mean()), conv.bias)
        return self.d(x)


class WeightStandardised(nn.Module):
    """timm's StdConv2d / ScaledStdConv2d: the weight is standardised per output channel, then gained."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(8, 1, 1, 1) + 0.5)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        w = F.batch_norm(self.a.weight.reshape(1, self.a.out_channels, -1), None, None, training=True,
                         momentum=0.0).reshape_as(self.a.weight)
        return self.b(F.relu(F.conv2d(x, w * self.gain, self.a.bias, padding=1)))


def test_standardised_weights_are_cut_through_the_parameter_they_come_from():
    m = WeightStandardised().eval()
    x = torch.randn(1, 3, 6, 6)
    (grp,) = analyze(m, x).groups
    assert grp.size == 8 and grp.exact
    assert {(mod, t, ax) for mod, t, ax, _ in grp.members} == {("a", "weight", 0), ("a", "bias", 0), ("", "gain", 0),
                                                              ("b", "weight", 1)}
    check_equivalence(m, x)


@pytest.mark.parametrize("kernel,legacy", [(3, False), (1, False), (3, True), (1, True)])
def test_a_spectral_normed_conv_keeps_its_channels_and_the_rest_is_cut(kernel, legacy):
    """Spectral norm divides the weight by sigma from buffers u (outputs) and v (inputs x taps,
    flattened): no cut can resize v, so both sides of that conv stay; the conv after it is pruned.
    At 1x1 with as many inputs as outputs v has the outputs' length too, and still stays."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel, padding=kernel // 2)
    sn = nn.utils.spectral_norm(conv) if legacy else nn.utils.parametrizations.spectral_norm(conv)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), sn, nn.ReLU(),
                      nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the power iteration's ops are not layer rules
        (grp,) = analyze(m, x).groups
        assert grp.size == 6 and {mod for mod, *_ in grp.members} == {"5", "6", "10"}
        pruned, report = secateurs.prune(m, x, "l1", 0.9, quiet=True)  # was: the cut failed its check, undone
    assert pruned[5].out_channels < 6 and report["kept"]["macs"] <= 0.9
    assert pruned[3].in_channels == pruned[3].out_channels == 8 and pruned(x).shape == (2, 4)


class _Exp(nn.Module):
    def forward(self, z):
        return z.exp()


def test_a_parametrized_per_channel_parameter_is_still_cut():
    """A layer scale under a parametrization (exp) follows the channels through its ``original``."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
            self.gamma = nn.Parameter(torch.randn(8) * 0.1)

        def forward(self, x):
            return self.c2(self.c1(x) * self.gamma.view(1, -1, 1, 1))

    m = Scaled()
    nn.utils.parametrize.register_parametrization(m, "gamma", _Exp())
    x = torch.randn(1, 3, 6, 6)
    (grp,) = analyze(m.eval(), x).groups
    assert grp.size == 8 and ("parametrizations.gamma", "original", 0) in {t[:3] for t in grp.members}
    check_equivalence(m, x)


def test_an_unknown_operation_warns_once_per_kind():
    with pytest.warns(UserWarning) as rec:
        g = analyze(ComputedWeight(), torch.randn(1, 3, 4, 4))
    msgs = [str(r.message) for r in rec if "computed" in str(r.message)]
    assert len(msgs) == 1 and "at '<top-level forward>' and 1 more places" in msgs[0]
    assert g.groups == []


class LosesTrack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, dims=3))


def test_a_tensor_leaving_pytorch_keeps_its_channels():
    class Numpy(LosesTrack):
        def forward(self, x):
            return self.b(torch.from_numpy(self.a(x).detach().numpy().copy()))

    with pytest.warns(UserWarning, match="'numpy'"):
        assert analyze(Numpy().eval(), torch.randn(1, 3, 4, 4)).groups == []


def test_a_cut_that_breaks_the_model_is_undone_with_a_clear_error(monkeypatch):
    from secateurs import _layers, _ops

    monkeypatch.setitem(_layers.FUNCTIONS, torch.roll, _ops.nothing)  # a rule bug: roll drops the channel ids
    m = LosesTrack().eval()
    x = torch.randn(1, 3, 4, 4)
    g = analyze(m, x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    (grp,) = g.groups
    with pytest.raises(secateurs.PruningError, match="no longer runs, so the cut was undone.*module 'b'"):
        apply_plan(m, g, {grp.index: [0, 1]})
    assert m.a.out_channels == 8 and all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert m(x).shape == (1, 2, 4, 4)


def test_training_only_branch_without_batch_statistics_falls_back_to_eval():
    class SE(nn.Module):  # BN after global pooling: training mode needs more than one value
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm1d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(F.batch_norm(self.c(x).mean((2, 3)), self.bn.running_mean, self.bn.running_var,
                                        self.bn.weight, self.bn.bias, self.training))

    m = SE().eval()
    g = analyze(m, torch.randn(1, 3, 4, 4))
    assert [gr.size for gr in g.groups] == [8] and g.capture_mode.startswith(("train", "eval"))


def test_conv1d_conv3d_and_depthwise_transposed():
    m = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1, groups=8),
                      nn.Conv1d(8, 3, 1)).eval()
    x = torch.randn(1, 2, 16)
    g = analyze(m, x)
    assert [gr.size for gr in g.groups] == [8]
    assert count(m, x).macs == 16 * 2 * 8 * 3 + 16 * 8 * 3 + 16 * 8 * 3
    check_equivalence(m, x)
    v = nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.ReLU(), nn.ConvTranspose3d(6, 6, 2, stride=2, groups=6),
                      nn.Conv3d(6, 2, 1)).eval()
    xv = torch.randn(1, 3, 2, 4, 4)
    gv = analyze(v, xv)
    assert [gr.size for gr in gv.groups] == [6]
    # conv3d 32 positions * 3*27*6 ; transposed per input position 32 * 6 * 1*8 ; 1x1 256 * 6*2
    assert count(v, xv).macs == 32 * 3 * 27 * 6 + 32 * 6 * 8 + 256 * 6 * 2
    check_equivalence(v, xv)


class LiteralScale(nn.Module):
    """poolformer's Scale: ``x * self.scale.view(self.shape)`` with a literal shape tuple."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.shape = (8, 1, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x) * self.scale.view(self.shape)))


def test_a_parameter_reshaped_to_literal_sizes_keeps_its_channels():
    m = LiteralScale().eval()
    x = torch.randn(1, 3, 4, 4)
    g = analyze(m, x)
    assert [gr.name for gr in g.groups] == ["b"]  # a's channels meet the literal (8, 1, 1): kept
    check_equivalence(m, x)


@pytest.mark.parametrize("meta", [True, False])
def test_a_module_reached_by_two_paths_gets_its_tensors_back(meta):
    """One Linear held twice by a Sequential: it was swapped twice and got a stand-in back."""
    from secateurs.capture import run_captured
    from secateurs._ids import Context

    shared = nn.Linear(8, 8)
    m = nn.Sequential(nn.Linear(4, 8), shared, nn.ReLU(), shared, nn.Linear(8, 2))
    before = {n: t for n, t in m.state_dict(keep_vars=True).items()}
    run_captured(m, (torch.randn(2, 4),), Context(), train=False, meta=meta)
    after = m.state_dict(keep_vars=True)
    assert all(after[n] is t for n, t in before.items())
    assert isinstance(shared.weight, nn.Parameter) and shared.weight.device.type == "cpu"
