"""Depth surgery: residual blocks are found from the graph, removed exactly, truncated with the
paper's ResNet-56 arithmetic, and scored by a VIP that matches the METHODS.md formula."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from secateurs import PruningError
from secateurs.depth import Block, find_blocks, remove_blocks, truncate
from secateurs.pls import block_features, block_scores, vip
from secateurs.cost import count
from secateurs.data import ArrayDataset, Batches
from secateurs.saving import load, save
from secateurs.models import create_model
from secateurs.testing import randomize_norms

torch.set_num_threads(1)

X64 = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X32 = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def build(name):
    torch.manual_seed(0)
    return create_model(name).eval()


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def unchanged(model, snap):
    mods, state = snapshot(model)
    return mods == snap[0] and state.keys() == snap[1].keys() and all(torch.equal(state[k], snap[1][k]) for k in state)


# -- VIP ---------------------------------------------------------------------------------------------
def test_vip_worked_example_one_component():
    # y = 0,0,0,1,1,1. Scaled one-hot Y has rank 1, so w is proportional to the correlations
    # r = (corr(x1,y), corr(x2,y), corr(x3,y)) = (1, 0, 1/sqrt(2)) and with one component
    # VIP_j = sqrt(3) |r_j| / ||r|| = sqrt(3/1.5) * (1, 0, 1/sqrt(2)) = (sqrt(2), 0, 1).
    y = np.array([0, 0, 0, 1, 1, 1])
    X = np.array([[0, 1, 0], [0, -1, 0], [0, 0, 1], [1, 1, 1], [1, -1, 1], [1, 0, 1]], dtype=float)
    v = vip(X, y, n_components=1)
    np.testing.assert_allclose(v, [np.sqrt(2), 0.0, 1.0], atol=1e-6)
    from sklearn.cross_decomposition import PLSRegression

    w = PLSRegression(1).fit(X, np.eye(2)[y]).x_weights_[:, 0]
    np.testing.assert_allclose(v, np.sqrt(3) * np.abs(w) / np.linalg.norm(w), atol=1e-9)


def test_vip_two_components_matches_the_formula():
    from sklearn.cross_decomposition import PLSRegression

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    X = rng.normal(size=(60, 5))
    X[:, 0] += 2 * (y == 1)
    X[:, 3] -= 2 * (y == 2)
    Y = np.eye(3)[y]
    for h in (1, 2, 3):
        pls = PLSRegression(h).fit(X, Y)
        expect = np.zeros(5)
        total = 0.0
        for a in range(h):
            t, q, w = pls.x_scores_[:, a], pls.y_loadings_[:, a], pls.x_weights_[:, a]
            ss = float(t @ t) * float(q @ q)
            total += ss
            expect += ss * (w / np.sqrt(w @ w)) ** 2
        expect = np.sqrt(5 * expect / total)
        got = vip(X, y, n_components=h)
        np.testing.assert_allclose(got, expect, rtol=1e-10)
        assert np.sum(got ** 2) == pytest.approx(5.0)  # sum_j (w_ja/||w_a||)^2 = 1 for every a
        assert got[0] > 1 and got[3] > 1 and max(got[1], got[2], got[4]) < 1  # the informative ones


def test_vip_rejects_bad_input():
    with pytest.raises(ValueError, match="single class"):
        vip(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="samples"):
        vip(np.ones((4, 2)), np.array([0, 1, 0]))


# -- discovery -----------------------------------------------------------------------------------------
def _tv_res(model, cls_name, attr_ok):
    """Expected (removable, not removable) names from the torchvision classes' own flags."""
    yes, no = set(), set()
    for n, m in model.named_modules():
        if type(m).__name__ == cls_name:
            (yes if attr_ok(m) else no).add(n)
    return yes, no


def expected(name, model):
    if name == "torchvision:resnet18":
        return {"layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"}, {"layer2.0", "layer3.0", "layer4.0"}
    if name == "torchvision:resnet50":
        return ({f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(1, n)},
                {f"layer{i}.0" for i in range(1, 5)})
    if name == "torchvision:mobilenet_v2":
        return _tv_res(model, "InvertedResidual", lambda m: m.use_res_connect)
    if name == "torchvision:efficientnet_b0":
        return _tv_res(model, "MBConv", lambda m: m.use_res_connect)
    if name == "torchvision:convnext_tiny":
        return _tv_res(model, "CNBlock", lambda m: True)
    if name == "torchvision:regnet_y_400mf":
        return _tv_res(model, "ResBottleneckBlock", lambda m: m.proj is None)
    if name == "cifar_resnet56":
        return ({f"layer{i}.{j}" for i in (1, 2, 3) for j in range(9)} - {"layer2.0", "layer3.0"}, {"layer2.0", "layer3.0"})
    raise KeyError(name)


MODELS = ["torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2", "torchvision:efficientnet_b0",
          "torchvision:convnext_tiny", "torchvision:regnet_y_400mf", "cifar_resnet56"]


@pytest.mark.parametrize("name", MODELS)
def test_find_and_remove_all(name):
    model = build(name)
    x = X32 if name.startswith("cifar") else X64
    blocks = find_blocks(model, x)
    yes, no = expected(name, model)
    assert {b.name for b in blocks if b.removable} == yes
    assert {b.name for b in blocks if not b.removable} == no
    assert all(b.reason for b in blocks if not b.removable) and not any(b.reason for b in blocks if b.removable)
    if name == "cifar_resnet56":
        assert len(blocks) == 27 and sum(b.removable for b in blocks) == 25
        assert [b.stage for b in blocks] == [0] * 9 + [1] * 9 + [2] * 9
    # forward order, a stage never mixes input shapes, and a non-removable block starts a stage
    for a, b in zip(blocks, blocks[1:]):
        assert b.stage in (a.stage, a.stage + 1)
        if b.stage == a.stage:
            assert b.removable and (b.input_shape == a.input_shape or not a.removable)
    base = count(model, x)
    with torch.no_grad():
        shape = model(x).shape
    rem = [b for b in blocks if b.removable]
    remove_blocks(model, rem, x)
    after = count(model, x)
    with torch.no_grad():
        assert model(x).shape == shape
    assert after.macs == base.macs - sum(b.macs for b in rem) < base.macs
    assert after.params == base.params - sum(b.params for b in rem)
    assert all(isinstance(model.get_submodule(b.name), nn.Identity) for b in rem)
    assert not any(b.removable for b in find_blocks(model, x))


def test_projection_reason_names_the_shortcut():
    blocks = {b.name: b for b in find_blocks(build("torchvision:resnet18"), X64)}
    r = blocks["layer2.0"].reason
    assert "'layer2.0.downsample'" in r and "[1, 64, 16, 16]" in r and "[1, 128, 8, 8]" in r


class Scaled(nn.Module):
    """Layer scale and a functional drop-path on the branch; the add is in this module."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((1, c, 1, 1), 0.5))

    def forward(self, x):
        return x + self.gamma * F.dropout(self.conv(x), 0.1, self.training)


class Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class PostNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(x + self.conv(x))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(Wrap(Scaled(8)), PostNorm(8), Scaled(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def test_generic_rules_largest_unit_and_post_norm():
    blocks = {b.name: b for b in find_blocks(Custom(), torch.randn(1, 3, 8, 8))}
    assert set(blocks) == {"body.0", "body.1", "body.2"}  # the wrapper, not body.0.inner
    assert blocks["body.0"].removable and blocks["body.2"].removable
    assert not blocks["body.1"].removable and "follow the residual add" in blocks["body.1"].reason
    assert blocks["body.0"].params == 8 * 8 * 9 + 8 + 8


class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.bn(self.conv(x))


class Untraceable(nn.Module):
    """fx cannot trace its forward (it iterates a tensor's chunks), like ultralytics' DetectionModel;
    one of its residual children is called twice."""

    def __init__(self):
        super().__init__()
        self.stem, self.body, self.shared = nn.Conv2d(3, 8, 3, padding=1), nn.ModuleList([Res(8), Res(8)]), Res(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.cat(list(self.stem(x).chunk(2, 1)), 1)
        for m in self.body:
            x = m(x)
        return self.fc(self.shared(self.shared(x)).mean((2, 3)))


class Split(nn.Module):
    """Kept opaque by fx (a list of its input's chunks), like ultralytics' C2f."""

    def __init__(self):
        super().__init__()
        self.m, self.out = nn.ModuleList([Res(4), Res(4)]), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = list(x.chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.out(torch.cat(y, 1))


class WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.split, self.post = nn.Conv2d(3, 8, 3, padding=1), Split(), Res(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.post(self.split(self.stem(x))).mean((2, 3)))


def test_blocks_of_models_fx_cannot_trace_whole():
    """Traced piecewise: units named in the whole model, in forward order, a twice-called one kept,
    removal exact when the branch is zero; without example inputs such a block is refused (how its
    caller calls it is unseen); with no unit anywhere, fx's own reason is raised."""
    x = torch.randn(2, 3, 8, 8)
    for model, removable, kept in ((Untraceable(), ["body.0", "body.1"], {"shared": "called 2 times"}),
                                   (WithOpaque(), ["split.m.0", "split.m.1", "post"], {})):
        model = randomize_norms(model).eval()
        blocks = find_blocks(model, x)
        assert [b.name for b in blocks if b.removable] == removable
        assert {b.name: b.reason for b in blocks if not b.removable}.keys() == kept.keys()
        assert all(why in b.reason for b in blocks for n, why in kept.items() if b.name == n)
        gone = removable[::2]
        for name in gone:
            zero_branch(model, name, x)
        with torch.no_grad():
            ref = model(x)
        remove_blocks(model, gone, x)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
        assert all(isinstance(model.get_submodule(n), nn.Identity) for n in gone)
    with pytest.raises(PruningError, match="tracing a submodule on its own"):
        remove_blocks(Untraceable(), ["body.0"])
    m = WithOpaque()
    remove_blocks(m, ["post"])  # found in the whole model's graph: no forward needed
    assert isinstance(m.post, nn.Identity)
    with pytest.raises(PruningError, match="cannot trace _NoUnits.forward itself"):
        find_blocks(_NoUnits(), torch.randn(1, 8, 4, 4))


class _NoUnits(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return torch.cat(list(self.conv(x).chunk(2, 1)), 1)


class ResReLU(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.act = nn.Conv2d(c, c, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.act(x + self.conv(x))


class ResFunctionalReLU(ResReLU):
    def forward(self, x):
        return torch.relu(x + self.conv(x))


def test_ops_after_the_add_must_leave_the_input_unchanged_or_replace_the_block():
    """relu(x + f(x)) is x where f is zero only if x >= 0: after a ReLU (every torchvision ResNet) the
    block becomes nn.Identity; after a plain conv (a CSP stage's first block) its own ReLU module
    replaces it (relu(x + 0) is relu(x)), and a functional ReLU, which nothing can stand in for,
    makes it non-removable, saying why."""
    x = torch.randn(2, 3, 8, 8)
    after_relu = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ResReLU(8), ResReLU(8)).eval()
    raw = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ResReLU(8), ResReLU(8)).eval()
    functional = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ResFunctionalReLU(8), ResReLU(8)).eval()
    assert [(b.removable, b.replacement) for b in find_blocks(after_relu, x)] == [(True, ""), (True, "")]
    assert [(b.removable, b.replacement) for b in find_blocks(raw, x)] == [(True, "act"), (True, "")]
    blocks = find_blocks(functional, x)
    assert [b.removable for b in blocks] == [False, True]  # the second one's input is the first one's ReLU
    assert "'relu' after its residual add" in blocks[0].reason
    for m in (after_relu, raw, functional):
        for b in find_blocks(m, x):
            if b.removable:
                zero_branch(m, b.name, x)
        with torch.no_grad():
            ref = m(x)
        remove_blocks(m, [b.name for b in find_blocks(m, x) if b.removable], x)
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref, atol=1e-6, rtol=0)
    assert isinstance(raw[1], nn.ReLU) and isinstance(raw[2], nn.Identity)
    with pytest.raises(PruningError, match="change\\(s\\) its input"):
        remove_blocks(functional, ["1"], x)
    dropped = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ResReLU(8))
    dropped[2].act = nn.Sequential(nn.Dropout(0.5), nn.ReLU())  # a train-mode model: the check runs in eval mode
    dropped.train()
    assert [b.removable for b in find_blocks(dropped, x)] == [True]
    assert all(m.training for m in dropped.modules())  # modes put back


def test_a_block_replaced_by_its_tail_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    raw = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ResReLU(8), ResReLU(8)).eval()
    fresh = copy.deepcopy(raw)
    remove_blocks(raw, ["1"], x)
    save(raw, tmp_path)
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["modules"]["1"]["child"] == "act"
    loaded = load(tmp_path, model=fresh)
    assert isinstance(loaded[1], nn.ReLU) and not any(True for _ in loaded[1].parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), raw(x))
    save(loaded, tmp_path / "again")  # a loaded model saves the same way
    assert json.loads((tmp_path / "again" / "model.json").read_text())["modules"]["1"]["child"] == "act"


class NeedsItsBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.b = nn.Conv2d(3, 8, 3, padding=1), ResReLU(8)

    def forward(self, x):
        if not isinstance(self.b, ResReLU):
            raise RuntimeError("this model needs its block")
        return self.b(self.conv(x))


def test_a_failed_removal_leaves_no_trace(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    m = NeedsItsBlock().eval()
    assert [(b.name, b.replacement) for b in find_blocks(m, x)] == [("b", "act")]
    with pytest.raises(PruningError, match="no longer runs"):
        remove_blocks(m, ["b"], x)
    assert isinstance(m.b, ResReLU) and not hasattr(m.b.act, "_secateurs_child")
    save(m, tmp_path)  # described as it is: loads into a fresh one
    load(tmp_path, model=NeedsItsBlock())


# -- exactness ---------------------------------------------------------------------------------------
def zero_branch(model, block, x):
    """Zero every parameter of the last parametrised layer the block runs: its branch gives 0."""
    sub = model.get_submodule(block)
    ran = []
    hs = [m.register_forward_hook(lambda m, a, o: ran.append(m)) for m in sub.modules()
          if not m._modules and any(True for _ in m.parameters(recurse=False))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    with torch.no_grad():
        for p in ran[-1].parameters():
            p.zero_()


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:convnext_tiny",
                                  "torchvision:regnet_y_400mf", "torchvision:efficientnet_b0", "cifar_resnet56"])
def test_removal_is_exact_when_the_branch_is_zero(name):
    model = randomize_norms(build(name)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("layer_scale"):
                p.fill_(0.5)  # ConvNeXt starts at 1e-6, which would make any removal look exact
    x = X32 if name.startswith("cifar") else X64
    rem = [b.name for b in find_blocks(model, x) if b.removable]
    plain = copy.deepcopy(model)
    with torch.no_grad():
        ref_plain = plain(x)
    remove_blocks(plain, rem[::2], x)
    with torch.no_grad():
        assert not torch.allclose(plain(x), ref_plain, atol=1e-5)  # live branches do matter
    for b in rem[::2]:
        zero_branch(model, b, x)
    with torch.no_grad():
        ref = model(x)
    remove_blocks(model, rem[::2], x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)


# -- truncation ---------------------------------------------------------------------------------------
def test_resnet56_truncate_after_layer3_0():
    model = build("cifar_resnet56")
    base = count(model, X32)
    truncate(model, "layer3.0", example_inputs=X32)
    cut = count(model, X32)
    dm, dp = 1 - cut.macs / base.macs, 1 - cut.params / base.params
    print(f"\nResNet-56 truncated after layer3.0: MACs {base.macs:,} -> {cut.macs:,} ({-100 * dm:.2f}%), "
          f"params {base.params:,} -> {cut.params:,} ({-100 * dp:.2f}%)")
    assert base.macs == pytest.approx(125.75e6, rel=5e-3)
    assert cut.macs == pytest.approx(88.0e6, rel=5e-3)
    assert dm == pytest.approx(0.300, abs=5e-3) and dp == pytest.approx(0.69, abs=5e-3)
    assert [n for n, m in model.layer3.named_children() if not isinstance(m, nn.Identity)] == ["0"]
    assert model.fc.in_features == 64 and model.fc.out_features == 10
    # the other reading (remove stage-3 blocks 1..8, keep the head) is the same model size here
    other = build("cifar_resnet56")
    remove_blocks(other, [f"layer3.{j}" for j in range(1, 9)], X32)
    assert (count(other, X32).macs, count(other, X32).params) == (cut.macs, cut.params)


def test_truncate_torchvision_resnet_new_head_and_save_load(tmp_path):
    model = build("torchvision:resnet18")
    truncate(model, "layer2", num_classes=7, example_inputs=X64)  # a stage: cut after its last block
    assert isinstance(model.layer3, nn.Identity) and isinstance(model.layer4, nn.Identity)
    assert (model.fc.in_features, model.fc.out_features) == (128, 7)
    with torch.no_grad():
        out = model(X64)
    assert out.shape == (1, 7)
    save(model, tmp_path, X64)
    back = load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(X64), out, atol=1e-6, rtol=0)


def test_truncate_errors_leave_the_model_untouched():
    model = build("torchvision:convnext_tiny")
    snap = snapshot(model)
    with pytest.raises(PruningError, match="features.2"):  # the down-sampling layer between stages
        truncate(model, "features.1.2", example_inputs=X64)
    assert unchanged(model, snap)
    model = build("cifar_resnet20")
    snap = snapshot(model)
    with pytest.raises(PruningError, match="'layer9.0'"):
        truncate(model, "layer9.0", example_inputs=X32)
    assert unchanged(model, snap)


# -- removal errors and save/load ---------------------------------------------------------------------
def test_remove_errors_name_the_block_and_change_nothing():
    model = build("cifar_resnet20")
    snap = snapshot(model)
    with pytest.raises(PruningError, match=r"'layer1\.9' is not a block"):
        remove_blocks(model, ["layer1.1", "layer1.9"], X32)
    assert unchanged(model, snap)
    with pytest.raises(PruningError, match=r"block 'layer2\.0' cannot be removed: .*shortcut"):
        remove_blocks(model, ["layer1.1", "layer2.0"])  # structural check, no example inputs
    assert unchanged(model, snap)
    with pytest.raises(PruningError, match="'conv1' is not a block"):
        remove_blocks(model, ["conv1"], X32)
    assert unchanged(model, snap)
    stale = Block("layer3.0", 2, 0, 0, (), True, "")  # a Block object is re-checked, not trusted
    with pytest.raises(PruningError, match="layer3.0"):
        remove_blocks(model, [stale], X32)
    assert unchanged(model, snap)
    with pytest.raises(TypeError, match="`blocks` must be block names"):
        remove_blocks(model, None, X32)
    for after, num_classes, err, msg in ((3, None, TypeError, "`after` must be a block name"),
                                         ("layer2.2", 2.7, ValueError, "`num_classes` must be a positive int"),
                                         ("layer2.2", 0, ValueError, "`num_classes` must be a positive int"),
                                         ("layer2.2", True, ValueError, "`num_classes` must be a positive int")):
        with pytest.raises(err, match=msg):
            truncate(model, after, num_classes, example_inputs=X32)
        assert unchanged(model, snap)


class _LeakyUnit(nn.Module):
    def __init__(self, c, inplace=False):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.LeakyReLU(0.1, inplace)

    def forward(self, x):
        return self.act(x + self.bn(self.conv(x)))


def test_without_inputs_a_block_goes_with_its_own_tail():
    """No forward to tell whether the tail changes the block's input (here it does: a leaky ReLU on
    a conv's signed output): the block's own tail module stands in, which is exact either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _LeakyUnit(8), _LeakyUnit(8)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model[1].bn.weight.zero_()
        model[1].bn.bias.zero_()
        ref = model(x)
    remove_blocks(model, ["1"])
    assert isinstance(model[1], nn.LeakyReLU)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)


class _Tapped(nn.Module):
    """The unit's input is read again after it (a U-Net skip, a feature tap)."""

    def __init__(self):
        super().__init__()
        self.stem, self.unit = nn.Conv2d(3, 8, 3, padding=1), _LeakyUnit(8, inplace=True)

    def forward(self, x):
        s = self.stem(x)
        return torch.cat([self.unit(s), s], 1)


@pytest.mark.parametrize("with_inputs", [True, False])
def test_an_inplace_tail_standing_in_leaves_the_blocks_input_alone(with_inputs, tmp_path):
    """leaky_relu_(x + f(x)) wrote into the sum; standing in, leaky_relu_(x) would write into x,
    which the skip reads afterwards: the stand-in runs out of place, also after save and load."""
    torch.manual_seed(0)
    model, x = _Tapped().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.unit.bn.weight.zero_()
        model.unit.bn.bias.zero_()
        ref = model(x)
    remove_blocks(model, ["unit"], x if with_inputs else None)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
    save(model, tmp_path, x)
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path, model=_Tapped())(x), ref, atol=1e-6, rtol=0)


def test_removed_blocks_save_and_load(tmp_path):
    model = randomize_norms(build("cifar_resnet20")).eval()
    remove_blocks(model, ["layer1.1", "layer2.2", "layer3.1", "layer3.2"])  # no inputs: each by its own ReLU
    with torch.no_grad():
        out = model(X32)
    save(model, tmp_path, X32)
    back = load(tmp_path)
    assert isinstance(back.layer3[1], nn.ReLU) and sum(p.numel() for p in back.parameters()) == \
        sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(back(X32), out, atol=0, rtol=0)


# -- features and scores ------------------------------------------------------------------------------
def tiny_dataset(n=36, classes=3):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    images[:, 0] = (images[:, 0] // 2 + 100 * y.view(-1, 1, 1)).to(torch.uint8)  # some class signal
    return ArrayDataset("tiny", images, y, ["a", "b", "c"], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_block_features_pool_and_per_class():
    model = randomize_norms(build("cifar_resnet20")).eval()
    ds = tiny_dataset()
    names = ["layer1.2", "layer2.2", "layer3.2"]
    feats, y = block_features(model, names, ds, per_class=5, pool=8, batch_size=4)
    assert [feats[n].shape for n in names] == [(15, 16 * 4 * 4), (15, 32 * 2 * 2), (15, 64)]
    assert np.bincount(y).tolist() == [5, 5, 5] and feats["layer1.2"].dtype == np.float32
    # any iterable of batches works; features are the pooled block outputs, sample by sample
    feats2, y2 = block_features(model, names, Batches(ds, 8, train=False), per_class=None)
    assert y2.tolist() == ds.targets.tolist()
    x = Batches(ds, 36, train=False).normalize(ds.images)
    outs = {}
    hs = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o)) for n in names]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    np.testing.assert_allclose(feats2["layer1.2"], F.avg_pool2d(outs["layer1.2"], 8).flatten(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(feats2["layer3.2"], outs["layer3.2"].mean((2, 3)).numpy(), atol=1e-5)  # 8x8: global


def test_block_scores_per_block_and_joint():
    model = randomize_norms(build("cifar_resnet20")).eval()
    blocks = [b for b in find_blocks(model, X32) if b.removable][:4]
    ds = tiny_dataset()
    s = block_scores(model, blocks, ds, per_class=6, n_components=2)
    j = block_scores(model, blocks, ds, per_class=6, n_components=2, joint=True)
    assert list(s) == list(j) == [b.name for b in blocks]
    # mean VIP <= sqrt(mean VIP^2) = 1 for one block's own PLS (Jensen)
    assert all(0 < v <= 1 + 1e-9 for v in s.values())
    # joint: one PLS over the concatenated features; each block scores the mean VIP of its own slice,
    # and the squared VIPs of one fit sum to the number of features
    feats, y = block_features(model, blocks, ds, per_class=6)
    X = np.concatenate([feats[b.name] for b in blocks], axis=1)
    v = vip(X, y, 2)
    np.testing.assert_allclose((v ** 2).sum(), X.shape[1], rtol=1e-9)
    widths = np.cumsum([0] + [feats[b.name].shape[1] for b in blocks])
    expected = {b.name: float(v[widths[i]:widths[i + 1]].mean()) for i, b in enumerate(blocks)}
    assert j == pytest.approx(expected, rel=1e-9) and s != j


def test_blocks_are_found_again_after_one_before_them_was_removed():
    """A removed block is an nn.Identity call in the graph: the next block's input comes from it,
    which is not a shortcut of that block (it was unwrapped as one, so layer1.2 had 'no identity
    shortcut' and could not be removed in a second call)."""
    torch.manual_seed(0)
    model = build("cifar_resnet20").eval()
    remove_blocks(model, ["layer1.1"], X32)
    found = {b.name: b for b in find_blocks(model, X32)}
    assert "layer1.1" not in found and found["layer1.2"].removable and found["layer1.2"].stage == found["layer1.0"].stage
    remove_blocks(model, ["layer1.2"], X32)
    assert isinstance(model.layer1[2], nn.Identity) and model(X32).shape == (1, 10)


def test_a_failed_removal_leaves_the_blocks_inplace_tail_as_it_was():
    class ResLeaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.1, inplace=True)

        def forward(self, x):
            return self.act(x + self.conv(x))

    class NeedsItsBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.b = nn.Conv2d(3, 8, 3, padding=1), ResLeaky()

        def forward(self, x):
            if not isinstance(self.b, ResLeaky):
                raise RuntimeError("needs its block")
            return self.b(self.conv(x))

    model = NeedsItsBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    assert [b.replacement for b in find_blocks(model, x)] == ["act"]  # the leaky tail stands in for it
    with pytest.raises(PruningError, match="no longer runs after removing"):
        remove_blocks(model, ["b"], x)
    assert isinstance(model.b, ResLeaky) and model.b.act.inplace  # was switched off by the attempt
