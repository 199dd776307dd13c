"""Channel coupling on small hand-built models: one test per rule, exact shapes and sizes."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import secateurs
from secateurs import analyze, apply_plan, count

from secateurs.testing import check_equivalence, randomize_norms


def cbr(cin, cout, k=3, groups=1, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def group_by_name(graph, name):
    (g,) = [g for g in graph.groups if g.name == name]
    return g


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_plain_chain_groups_shapes_and_macs():
    m = Plain().eval()
    x = torch.randn(2, 3, 8, 8)
    g = analyze(m, x)
    assert [(gr.name, gr.size) for gr in g.groups] == [("c1", 8), ("c2", 16)]
    assert {(mod, t) for mod, t, _, _ in g.groups[0].members} == {
        ("c1", "weight"), ("c1", "bias"), ("bn", "weight"), ("bn", "bias"),
        ("bn", "running_mean"), ("bn", "running_var"), ("c2", "weight")}
    # hand count: 8*8*3*8*9 + 8*8*8*16*9 + 16*10
    assert count(m, x).macs == 13824 + 73728 + 160
    apply_plan(m, g, {0: [0, 2, 4, 6]})
    assert m.c1.weight.shape == (4, 3, 3, 3) and m.c1.bias.shape == (4,)
    assert m.bn.running_mean.shape == (4,) and m.bn.num_features == 4
    assert m.c2.weight.shape == (16, 4, 3, 3) and m.c1.out_channels == 4 and m.c2.in_channels == 4
    assert count(m, x).macs == 8 * 8 * 3 * 4 * 9 + 8 * 8 * 4 * 16 * 9 + 160
    assert m(x).shape == (2, 10)


def test_classifier_outputs_are_never_pruned():
    g = analyze(Plain(), torch.randn(1, 3, 8, 8))
    assert all("fc" not in gr.name for gr in g.groups)


def test_ignore_keeps_a_module_outputs():
    m = Plain()
    g = analyze(m, torch.randn(1, 3, 8, 8), ignore=[m.c1])
    assert [gr.name for gr in g.groups] == ["c2"]
    g = analyze(m, torch.randn(1, 3, 8, 8), ignore=["c2"])
    assert [gr.name for gr in g.groups] == ["c1"]
    with pytest.raises(secateurs.PruningError, match="'nope'"):
        analyze(m, torch.randn(1, 3, 8, 8), ignore=["nope"])


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.a = cbr(8, 4)
        self.b = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.proj = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.c = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b(self.a(x)))  # identity shortcut couples stem and b
        x = F.relu(self.proj(x) - self.c(x))  # subtraction couples too
        return self.fc(x.mean((2, 3)))


def test_residual_add_and_sub_couple_channels():
    m = randomize_norms(Residual()).eval()
    x = torch.randn(2, 3, 8, 8)
    g = analyze(m, x)
    sizes = {gr.name: gr.size for gr in g.groups}
    assert sizes == {"stem.0": 8, "a.0": 4, "proj.0": 16}
    stem = group_by_name(g, "stem.0")
    assert {mod for mod in stem.modules} == {"stem.0", "stem.1", "a.0", "b.0", "b.1", "proj.0", "c.0"}
    pruned, err, n = check_equivalence(m, x)
    assert n == 3 and pruned.b[0].out_channels == 4 and pruned.proj[0].in_channels == 4
    assert pruned.c[0].in_channels == 4 and pruned.fc.in_features == 8


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 4)
        self.b = cbr(3, 6)
        self.head = nn.Conv2d(10, 7, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def test_concat_maps_offsets_into_the_consumer():
    m = randomize_norms(Concat()).eval()
    x = torch.randn(1, 3, 6, 6)
    g = analyze(m, x)
    a, b = group_by_name(g, "a.0"), group_by_name(g, "b.0")
    assert (a.size, b.size) == (4, 6)
    w = m.head.weight.detach().clone()
    apply_plan(m, g, {a.index: [1], b.index: [0, 5]})
    # head keeps input slices 0,2,3 (from a) and 4+1..4+4 (from b)
    assert torch.equal(m.head.weight, w[:, [0, 2, 3, 5, 6, 7, 8]])
    assert m.head.in_channels == 7 and m(x).shape == (1, 7, 6, 6)
    check_equivalence(Concat().eval(), x)


class Chunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.l = nn.Conv2d(4, 5, 1)
        self.r = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        left, right = self.a(x).chunk(2, dim=1)
        return self.l(left) + self.r(right)


def test_chunk_keeps_the_pieces_equal():
    m = Chunk().eval()
    x = torch.randn(1, 3, 4, 4)
    g = analyze(m, x)
    a = group_by_name(g, "a")
    assert a.size == 4  # channel i and i+4 go together, so chunk(2) still splits correctly
    w = m.a.weight.detach().clone()
    apply_plan(m, g, {a.index: [1]})
    assert torch.equal(m.a.weight, w[[0, 2, 3, 4, 6, 7]])
    assert m.l.in_channels == 3 and m.r.in_channels == 3
    check_equivalence(Chunk().eval(), x)


class FixedSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.l = nn.Conv2d(3, 2, 1)
        self.r = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        left, right = torch.split(self.a(x), [3, 5], dim=1)
        return self.l(left) + self.r(right)


def test_split_with_literal_sizes_freezes_the_channels():
    g = analyze(FixedSplit(), torch.randn(1, 3, 4, 4))
    assert [gr.name for gr in g.groups] == []


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = cbr(3, 8, k=1)
        self.dw = cbr(8, 8, groups=8)  # depthwise
        self.gc = cbr(8, 12, groups=4)  # 4 groups of 2 -> 3
        self.mult = nn.Conv2d(12, 24, 3, padding=1, groups=12)  # depthwise, multiplier 2
        self.out = nn.Conv2d(24, 3, 1)

    def forward(self, x):
        return self.out(self.mult(self.gc(self.dw(self.pw(x)))))


def test_depthwise_and_grouped_convs():
    m = randomize_norms(Grouped()).eval()
    x = torch.randn(1, 3, 6, 6)
    g = analyze(m, x)
    pw, gc = group_by_name(g, "pw.0"), group_by_name(g, "gc.0")
    # depthwise follows the pointwise channels; the grouped conv's inputs go 4 at a time
    assert pw.size == 2 and {"dw.0", "gc.0"} <= set(pw.modules)
    assert gc.size == 3 and "mult" in gc.modules  # multiplier-2 depthwise follows gc outputs
    apply_plan(m, g, {pw.index: [1], gc.index: [0]})
    assert (m.dw[0].in_channels, m.dw[0].out_channels, m.dw[0].groups) == (4, 4, 4)
    assert (m.gc[0].in_channels, m.gc[0].out_channels, m.gc[0].groups) == (4, 8, 4)
    assert m.gc[0].weight.shape == (8, 1, 3, 3)
    assert (m.mult.in_channels, m.mult.out_channels, m.mult.groups) == (8, 16, 8)
    assert m(x).shape == (1, 3, 6, 6)
    check_equivalence(randomize_norms(Grouped()).eval(), x)


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.act = nn.PReLU(6)
        self.c3 = nn.Conv2d(6, 4, 3, padding=1)
        self.ln = nn.GroupNorm(1, 4)  # LayerNorm over (C, H, W)

    def forward(self, x):
        x = self.act(self.inorm(self.c2(F.relu(self.gn(self.c1(x))))))
        return self.ln(self.c3(x)).sum((2, 3))


def test_group_instance_norm_and_prelu():
    m = Norms().eval()
    x = torch.randn(2, 3, 5, 5)
    g = analyze(m, x)
    c1, c2 = group_by_name(g, "c1"), group_by_name(g, "c2")
    assert c1.size == 4 and c1.exact  # GroupNorm(4, 8): whole groups of 2 go
    assert c2.size == 6 and c2.exact and "act" in c2.modules
    assert all(gr.name != "c3" for gr in g.groups)  # output channels of the model
    apply_plan(m, g, {c1.index: [0, 3], c2.index: [1]})
    assert (m.gn.num_groups, m.gn.num_channels, m.gn.weight.shape[0]) == (2, 4, 4)
    assert m.inorm.num_features == 5 and m.act.num_parameters == 5 and m.act.weight.shape == (5,)
    assert m(x).shape == (2, 4)
    check_equivalence(Norms().eval(), x)


class ConvNeXtish(nn.Module):
    """Channels-last LayerNorm between permutes, a layer-scale parameter and a residual."""

    def __init__(self, d=8):
        super().__init__()
        self.stem = nn.Conv2d(3, d, 2, 2)
        self.dw = nn.Conv2d(d, d, 3, padding=1, groups=d)
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(torch.rand(d, 1, 1))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.ln(y)))).permute(0, 3, 1, 2)
        x = x + self.gamma * y
        return self.head(x.mean((2, 3)))


def test_channels_last_layernorm_and_layer_scale():
    m = ConvNeXtish().eval()
    x = torch.randn(1, 3, 8, 8)
    g = analyze(m, x)
    stem, hid = group_by_name(g, "stem"), group_by_name(g, "fc1")
    assert stem.size == 8 and not stem.exact  # LayerNorm over channels: values shift
    assert ("", "gamma", 0, "out") in stem.members
    assert hid.size == 32 and hid.exact
    apply_plan(m, g, {stem.index: [0, 1, 2], hid.index: list(range(16))})
    assert m.gamma.shape == (5, 1, 1) and m.ln.normalized_shape == (5,) and m.head.in_features == 5
    assert m.fc1.out_features == 16 and m.fc2.in_features == 16 and m(x).shape == (1, 3)
    check_equivalence(ConvNeXtish().eval(), x)


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(F.relu(self.fc(torch.flatten(self.pool(self.c(x)), 1))))


def test_flatten_into_linear_removes_hw_inputs_per_channel():
    m = FlattenLinear().eval()
    x = torch.randn(1, 3, 6, 6)
    g = analyze(m, x)
    c = group_by_name(g, "c")
    w = m.fc.weight.detach().clone()
    apply_plan(m, g, {c.index: [2]})
    keep = [i for i in range(36) if not 18 <= i < 27]  # channel 2 owns inputs 18..26
    assert torch.equal(m.fc.weight, w[:, keep]) and m.fc.in_features == 27
    assert count(m, x).macs == 6 * 6 * 3 * 3 * 9 + 27 * 6 + 6 * 2
    check_equivalence(FlattenLinear().eval(), x)


class HardcodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.c(x).view(-1, 64))


def test_view_with_a_literal_channel_size_freezes():
    assert analyze(HardcodedView(), torch.randn(1, 3, 4, 4)).groups == []


class UNetish(nn.Module):
    """Encoder skip concatenated with a transposed-conv decoder path."""

    def __init__(self):
        super().__init__()
        self.enc = cbr(3, 8)
        self.down = cbr(8, 16, stride=2)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = cbr(16, 8)
        self.cls = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = self.enc(x)
        d = self.up(self.down(e))
        return self.cls(self.dec(torch.cat([e, d], 1)))


def test_unet_skip_concat_and_transposed_conv():
    m = randomize_norms(UNetish()).eval()
    x = torch.randn(1, 3, 8, 8)
    g = analyze(m, x)
    enc, down, up = group_by_name(g, "enc.0"), group_by_name(g, "down.0"), group_by_name(g, "up")
    assert (enc.size, down.size, up.size) == (8, 16, 8)
    assert ("up", "weight", 0, "in") in down.members and ("up", "weight", 1, "out") in up.members
    w = m.dec[0].weight.detach().clone()
    apply_plan(m, g, {enc.index: [7], up.index: [0, 1], down.index: [3]})
    assert torch.equal(m.dec[0].weight, w[:, [0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15]])
    assert (m.up.in_channels, m.up.out_channels) == (15, 6) and m.up.weight.shape == (15, 6, 2, 2)
    assert m(x).shape == (1, 2, 8, 8)
    # ConvTranspose MACs are counted per input position: 4*4*15*6*2*2
    up_macs = [r.macs for r in count(m, x).layers if r.name == "up"]
    assert up_macs == [4 * 4 * 15 * 6 * 4]
    check_equivalence(randomize_norms(UNetish()).eval(), x)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = cbr(3, 8)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.sp = nn.Conv2d(8, 1, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.c(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = x * s  # channel broadcast: couples fc2 outputs with x
        x = x * torch.sigmoid(self.sp(x))  # spatial gate [N,1,H,W]: couples nothing
        return self.out(F.interpolate(x, scale_factor=2.0, mode="bilinear"))


def test_squeeze_excitation_and_spatial_gate():
    m = randomize_norms(SqueezeExcite()).eval()
    x = torch.randn(1, 3, 6, 6)
    g = analyze(m, x)
    c = group_by_name(g, "c.0")
    assert c.size == 8 and {"fc2", "fc1", "sp", "out"} <= set(c.modules)
    assert group_by_name(g, "fc1").size == 2
    check_equivalence(m, x)


class Shuffle(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)
        self.sh = nn.ChannelShuffle(2)

    def forward(self, x):
        x = self.a(x)
        if self.how == "view":  # ShuffleNet's code: sizes read from the tensor, groups literal
            n, c, h, w = x.shape
            return self.b(x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w))
        return self.b(self.sh(x))


@pytest.mark.parametrize("how", ["view", "module"])
def test_channel_shuffle(how):
    m = Shuffle(how).eval()
    x = torch.randn(1, 3, 4, 4)
    g = analyze(m, x)
    a = group_by_name(g, "a")
    assert a.size == 4  # channel i and i+4 go together, so both halves stay equal
    w = m.b.weight.detach().clone()
    apply_plan(m, g, {a.index: [1]})
    # after the shuffle, channels 1 and 5 sat at positions 2 and 3
    assert torch.equal(m.b.weight, w[:, [0, 1, 4, 5, 6, 7]])
    check_equivalence(Shuffle(how).eval(), x)


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.b(torch.cumsum(self.a(x), dim=1))  # mixes channels in a way we do not model
        return self.c(x)


def test_unknown_op_freezes_its_inputs_and_warns():
    with pytest.warns(UserWarning, match="cumsum"):
        g = analyze(Unsupported(), torch.randn(1, 3, 4, 4))
    assert [gr.name for gr in g.groups] == ["b"]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.odd = DataDependent()
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.odd(self.a(x)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


def test_data_dependent_branch_is_specialised_on_real_values():
    m = randomize_norms(Untraceable()).eval()
    x = torch.randn(1, 3, 4, 4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = analyze(m, x)  # `x.sum() > 0` needs values: the meta pass gives way to a real one
    assert g.capture_mode == "train/real"
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # BN stats untouched
    took_conv = bool(m.a(x).sum() > 0)
    assert ("odd.conv" in {gr.name for gr in g.groups}) == took_conv
    check_equivalence(m, x)


def test_eval_no_grad_and_frozen_parameters():
    m = randomize_norms(Residual()).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        g = analyze(m, torch.randn(1, 3, 8, 8))
    assert len(g.groups) == 3
    assert not m.training and all(not p.requires_grad for p in m.parameters())


def test_training_mode_is_restored_and_aux_branches_seen():
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.aux = nn.Conv2d(8, 2, 1)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = self.a(x)
            return (self.out(x), self.aux(x)) if self.training else self.out(x)

    m = Aux().eval()
    g = analyze(m, torch.randn(1, 3, 4, 4))
    assert not m.training and "aux" in g.groups[0].modules


def test_prune_front_door():
    m = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    before = count(m, x)
    out, report = secateurs.prune(m, x, target={"ratio": 0.5})
    assert report["kept"]["macs"] == count(m, x).macs / before.macs
    assert out is m and m(x).shape == (1, 5)
    assert m.stem[0].out_channels == 4 and m.a[0].out_channels == 2 and m.proj[0].out_channels == 8
    assert count(m, x).macs < before.macs
    with pytest.raises(ValueError, match="`ratio` must be in"):
        secateurs.prune(m, x, ratio=1.0)
    with pytest.raises(ValueError, match="unknown method 'l3'; criteria \\(pruned to a budget\\): bn_scale, l1, l2, random, taylor, vip; methods: dlp"):
        secateurs.prune(m, x, "l3", ratio=0.5)


def test_l2_prune_removes_the_smallest_channels():
    m = Plain().eval()
    with torch.no_grad():
        m.c1.weight.mul_(0.01)
        m.c1.weight[[1, 5]] *= 1000  # channels 1 and 5 are by far the largest
        m.c2.weight.mul_(0.01)
    keep = m.c1.weight[[1, 5]].clone()
    secateurs.prune(m, torch.randn(1, 3, 8, 8), target={"ratio": 0.75})
    assert torch.equal(m.c1.weight, keep)


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        analyze("resnet", torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="`example_inputs` must be a tensor"):
        analyze(Plain(), "x")
    with pytest.raises(TypeError, match="`ignore` takes modules or qualified names"):
        analyze(Plain(), torch.randn(1, 3, 8, 8), ignore=[3])
    with pytest.raises(secateurs.PruningError, match="failed in module .c1.: RuntimeError"):
        analyze(Plain(), torch.randn(1, 5, 8, 8))  # wrong channel count for c1


class Reductions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        a = F.normalize(self.a(x), dim=1)  # divides by a norm over channels: inexact
        b = self.b(x)
        gate = torch.max(b, b.mean(1, keepdim=True))  # elementwise max with a channel mean
        return self.c(a + gate)


def test_reductions_over_channels_mark_groups_inexact():
    g = analyze(Reductions(), torch.randn(1, 3, 4, 4))
    (grp,) = g.groups
    assert grp.size == 6 and not grp.exact and {"a", "b", "c"} <= set(grp.modules)
