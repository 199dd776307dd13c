"""Exact MACs/params under the METHODS.md convention, against published and independent counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import secateurs
from secateurs import count
from secateurs.models import create_model


@pytest.mark.parametrize("depth, macs", [(20, 40_813_184), (56, 125_747_840), (110, 253_149_824)])
def test_cifar_resnets_match_the_papers(depth, macs):
    c = count(create_model(f"cifar_resnet{depth}"), torch.randn(1, 3, 32, 32))
    assert c.macs == macs  # 40.81 M / 125.75 M / 253.15 M
    assert round(c.macs / 1e6, 2) == {20: 40.81, 56: 125.75, 110: 253.15}[depth]


@pytest.mark.parametrize("name, gmacs, mparams", [("resnet50", 4.09, 25.557), ("vgg16", 15.47, 138.358)])
def test_torchvision_published_figures(name, gmacs, mparams):
    m = torchvision.models.get_model(name, weights=None)
    c = count(m, torch.randn(1, 3, 224, 224))
    assert round(c.macs / 1e9, 2) == gmacs
    assert round(c.params / 1e6, 3) == mparams
    assert c.params == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "squeezenet1_1", "vgg11", "shufflenet_v2_x0_5"])
def test_agrees_with_torch_flop_counter(name):
    m = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x)
    assert count(m, x).macs == fc.get_total_flops() // 2 // 2  # FLOPs = 2*MACs, batch of 2


def test_per_layer_breakdown_and_batch_independence():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1, groups=2),
                      nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    c1, c4 = count(m, torch.randn(1, 3, 8, 8)), count(m, torch.randn(4, 3, 8, 8))
    assert [(r.name, r.macs) for r in c1.layers] == [("0", 6 * 6 * 3 * 4 * 9), ("2", 6 * 6 * 2 * 8), ("4", 288 * 5)]
    assert c1.macs == c4.macs
    assert c1.params == (3 * 4 * 9 + 4) + 8 + (2 * 8 + 8) + (288 * 5 + 5)
    rows = c1.table().splitlines()
    assert len(rows) == 5 and rows[1].split()[:4] == ["0", "Conv2d", f"{6 * 6 * 3 * 4 * 9:,}", f"{3 * 4 * 9 + 4:,}"]
    assert rows[-1].split() == ["total", f"{c1.macs:,}", f"{c1.params:,}"]


def test_conv_transpose_counts_input_positions():
    m = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
    assert count(m, torch.randn(1, 6, 5, 5)).macs == 5 * 5 * 6 * (4 // 2) * 9


def test_count_restores_training_mode():
    m = create_model("cifar_resnet20").train()
    count(m, torch.randn(1, 3, 32, 32))
    assert m.training and m.layer1[0].bn1.training


def test_pruned_params_equal_sum_of_numel():
    m = torchvision.models.resnet18()
    secateurs.prune(m, torch.randn(1, 3, 64, 64), target={"ratio": 0.3})
    assert count(m, torch.randn(1, 3, 64, 64)).params == sum(p.numel() for p in m.parameters())


class _AuxHead(nn.Module):
    """A training-only branch: the eval forward runs one conv fewer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1))
        self.aux = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.body(x)
        return (y, self.aux(y)) if self.training else y


class _OwnTrain(nn.Sequential):
    def train(self, mode=True):  # may set more than the flag: the capture cannot tell
        return super().train(mode)


@pytest.mark.parametrize("model, merged", [
    (lambda: torchvision.models.mobilenet_v3_small(), True),  # only BN and dropout read the flag
    (lambda: torchvision.models.efficientnet_b0(), True),  # and stochastic depth
    (lambda: _AuxHead(), False),
    (lambda: _OwnTrain(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), False),
    (lambda: torchvision.models.googlenet(init_weights=False, aux_logits=True), False),
])
def test_analyze_and_count_is_one_capture_only_when_train_and_eval_agree(model, merged):
    """The training capture's costs stand for the eval forward's only when nothing but BN, dropout
    and stochastic depth reads `training`; either way the result is count()'s and analyze()'s."""
    from secateurs.capture import capture
    from secateurs.graph import analyze_and_count

    m, x = model().eval(), torch.randn(1, 3, 64, 64)
    ctx, _ = capture(m, (x,), count=True)
    assert (ctx.eval_costs is not None) is merged
    graph, cost = analyze_and_count(m, x)
    ref = count(m, x, reuse=False)
    assert (cost.macs, cost.params, cost.layers) == (ref.macs, ref.params, ref.layers)
    assert graph.describe() == secateurs.analyze(m, x).describe()
    assert "training" not in nn.Module.__dict__ and not m.training  # the watch is gone, the mode restored


def test_training_watch_is_removed_when_the_forward_fails():
    from secateurs.capture import capture

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(secateurs.PruningError):
        capture(Broken(), (torch.randn(1, 3),), count=True)
    assert "training" not in nn.Module.__dict__


def test_training_watch_reads_sets_and_deletes_the_instance_flag():
    from secateurs._training import watch_training

    m = nn.BatchNorm1d(3)
    with watch_training([m]) as watch:
        assert m.training and watch.unsafe == 1 and "test_cost.py" in watch.first  # read here: not a safe reader
        m.eval()
        assert m.__dict__["training"] is False and not m.training
        del m.training
        assert not hasattr(m, "training")
    m.training = True
    assert m.training and "training" not in nn.Module.__dict__


class _StandardisedConv(nn.Conv2d):
    def forward(self, x):  # a computed weight: it belongs to no module
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def test_a_layer_with_a_computed_weight_is_named_after_the_module_calling_it():
    """Counting passes run without module hooks while every weight names its layer; a computed
    weight sends the count through the pass with them."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(_StandardisedConv(8, 4, 3)))
    c = count(m, torch.randn(1, 3, 16, 16), reuse=False)
    assert [(l.name, l.kind) for l in c.layers] == [("0", "Conv2d"), ("1.0", "_StandardisedConv")]
    assert c.macs == 14 * 14 * 8 * 27 + 12 * 12 * 4 * 72


def test_a_remembered_count_is_not_reused_after_a_setting_changes():
    """The cache key held shapes only: a new stride or a forward flag kept the old MACs."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.twice = nn.Conv2d(3, 4, 3), False

        def forward(self, x):
            y = self.conv(x)
            return self.conv(x) + y if self.twice else y

    m = Twice()
    x = torch.randn(1, 3, 10, 10)
    once = count(m, x).macs
    assert once == 8 * 8 * 3 * 4 * 9
    m.twice = True
    assert count(m, x).macs == 2 * once
    m.conv.stride = (2, 2)
    assert count(m, x).macs == 2 * 4 * 4 * 3 * 4 * 9


class _Encoder(nn.Module):
    """A conv stem, then attention over the positions: queries from the image, keys and values
    from a second input of another width (cross-attention, kdim = vdim = 6)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=batch_first)

    def forward(self, x, memory):  # x: [N, 4, L]; memory: [S, N, 6] (or [N, S, 6] batch-first)
        q = self.conv(x).permute(0, 2, 1) if self.batch_first else self.conv(x).permute(2, 0, 1)
        return self.attn(q, memory, memory, need_weights=False)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_counts_keys_and_values_from_their_own_width(batch_first):
    L, S, n = 5, 7, 3
    model = _Encoder(batch_first).eval()
    memory = torch.randn(n, S, 6) if batch_first else torch.randn(S, n, 6)
    c = count(model, (torch.randn(n, 4, L), memory))
    conv = L * 8 * 4 * 3
    attn = L * 8 * 8 + S * 6 * 8 + S * 6 * 8 + L * 8 * 8  # q, k, v, out projections per sample
    assert c.macs == conv + attn and [lc.macs for lc in c.layers] == [conv, attn]


def test_a_sequence_first_input_is_counted_per_sample():
    """The model reads [L, N, E] directly: the batch is its dim 1, not the leading size."""
    attn = nn.MultiheadAttention(8, 2).eval()
    model = nn.Sequential()  # forward(x) = attn(x, x, x)[0]
    model.forward = lambda x: attn(x, x, x, need_weights=False)[0]
    model.attn = attn
    per_sample = 6 * 4 * 8 * 8
    assert count(model, torch.randn(6, 3, 8)).macs == per_sample  # L = 6 tokens, N = 3 samples
    assert count(model, torch.randn(6, 1, 8)).macs == per_sample
    assert count(model, torch.randn(6, 8)).macs == per_sample  # unbatched [L, E]


def test_unbatched_and_listed_inputs_are_counted_per_sample():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(0), nn.Linear(4 * 25, 2))
    per_sample = 25 * 4 * 3 * 9 + 100 * 2
    assert count(conv, torch.randn(3, 5, 5)).macs == per_sample  # [C, H, W]: one sample, not three

    class Listed(nn.Module):  # torchvision detection's calling convention: a list of [C, H, W] images
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, images):
            return self.conv(torch.stack(images))

    assert count(Listed(), ([torch.randn(3, 5, 5), torch.randn(3, 5, 5)],)).macs == 25 * 4 * 3 * 9

    class OneByOne(Listed):  # each image through the conv unbatched: the list length stays the batch
        def forward(self, images):
            return torch.stack([self.conv(im) for im in images])

    assert count(OneByOne(), ([torch.randn(3, 5, 5), torch.randn(3, 5, 5)],)).macs == 25 * 4 * 3 * 9

    class Paired(nn.Module):  # one argument holding two batched tensors is not a list of images
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(6, 2)

        def forward(self, pair):
            img, aux = pair
            return self.conv(img - 0.5).mean((2, 3)).sum() + self.fc(aux)

    assert count(Paired(), ((torch.randn(1, 3, 5, 5), torch.randn(1, 6)),)).macs == 25 * 4 * 3 * 9 + 12
    assert count(Paired(), ((torch.randn(3, 3, 5, 5), torch.randn(3, 6)),)).macs == 25 * 4 * 3 * 9 + 12


class _CrossAttnNet(nn.Module):
    """Queries from 8x8 positions, keys/values from a stride-2 branch (16 positions): L != S. With
    ``kdim`` the memory has its own width (separate projections), else MHA packs them in one weight."""

    def __init__(self, kdim: int | None):
        super().__init__()
        self.q = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),  # 6: prunable
                               nn.Conv2d(6, 8, 1))
        self.mem = nn.Sequential(nn.Conv2d(3, kdim or 8, 3, stride=2, padding=1), nn.BatchNorm2d(kdim or 8), nn.ReLU())
        self.attn = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        q, m = self.q(x).flatten(2).transpose(1, 2), self.mem(x).flatten(2).transpose(1, 2)
        return self.head(self.attn(q, m, m, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("kdim", [None, 6])
def test_cross_attention_cost_model_is_exact_after_pruning(kdim):
    """Attention keeps its channels (its MACs are fixed in a plan); the plan's cost of cutting the
    channels before it equals a count of the cut model."""
    import copy

    from secateurs import analyze, apply_plan
    from secateurs.cost import PlanCost

    torch.manual_seed(0)
    m, x = _CrossAttnNet(kdim).eval(), torch.randn(2, 3, 8, 8)
    g = analyze(m, x)
    pc = PlanCost(m, g, x)
    assert pc(torch.zeros(g.n_components, dtype=torch.bool)) == (count(m, x).macs, count(m, x).params)
    gen = torch.Generator().manual_seed(1)
    removed = torch.zeros(g.n_components, dtype=torch.bool)
    for grp in g.groups:
        removed[grp.components] = torch.rand(grp.size, generator=gen) < 0.4
        removed[grp.components[0]] = False
    assert removed.any() and [grp.size for grp in g.groups] == [6]
    plan = {grp.index: removed[grp.components].nonzero().flatten().tolist() for grp in g.groups}
    real = count(apply_plan(copy.deepcopy(m), g, {k: v for k, v in plan.items() if v}), x)
    macs, params = pc.soft((~removed).double())
    assert (round(float(macs)), round(float(params))) == (real.macs, real.params) == pc(removed)


@pytest.mark.parametrize("norm", ["legacy", "parametrization"])
def test_a_computed_weight_shrinks_with_the_parameter_it_comes_from(norm):
    """Weight norm computes the conv's weight from ``weight_v`` (or a parametrization's ``original1``):
    the plan's cost must shrink that conv's MACs too, or a budget cuts far more than it asks."""
    import copy
    import warnings

    from secateurs import analyze, apply_plan
    from secateurs.cost import PlanCost

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        conv = nn.Conv2d(8, 8, 3, padding=1)
        conv = nn.utils.weight_norm(conv) if norm == "legacy" else nn.utils.parametrizations.weight_norm(conv)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), conv, nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    g = analyze(m, x)
    pc = PlanCost(m, g, x)
    removed = torch.zeros(g.n_components, dtype=torch.bool)
    for grp in g.groups:
        removed[grp.components[:3]] = True
    plan = {grp.index: removed[grp.components].nonzero().flatten().tolist() for grp in g.groups}
    cut = apply_plan(copy.deepcopy(m) if norm != "legacy" else secateurs._state.copy_model(m), g, plan)
    real = count(cut, x)
    assert [grp.size for grp in g.groups] == [8, 8] and real.macs == 256 * 9 * (3 * 5 + 5 * 5) + 5 * 4
    assert pc(removed) == (real.macs, real.params)
