"""Least-squares reconstruction before a cut: what the kept channels can express, the re-fitted
layers reproduce exactly, and what they cannot, they approach better than the plain cut."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs.data import ArrayDataset
from secateurs import reconstruct
from secateurs.reconstruct import refit_readers
from secateurs.surgery import PruningPlan, apply_plan
from secateurs._validation import PruningError


class Net(nn.Module):
    def __init__(self, k2: int = 3, bias2: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, k2, padding=k2 // 2, stride=2, bias=bias2)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


def _trained_like(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _group(graph, module: str) -> int:
    return next(i for i, g in enumerate(graph.groups) if any(b.module == module and b.role == "out"
                                                             for b in (graph.bindings[j] for j in g.binding_ids)))


def _cut(net: nn.Module, module: str, channels: list[int], refit: bool, compensate: bool = True, **kw):
    x = torch.randn(2, 3, 8, 8)
    graph = secateurs.analyze(net, x)
    plan = PruningPlan({_group(graph, module): channels})
    fits = refit_readers(net, graph, plan, [torch.randn(64, 3, 8, 8) for _ in range(4)], **kw) if refit else {}
    apply_plan(net, graph, plan, compensate=compensate)
    return fits


def _gap(a: nn.Module, b: nn.Module) -> float:
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def test_a_removed_copy_of_a_kept_channel_is_exactly_reconstructed():
    """conv1's channel 5 duplicates channel 2: its readers can take its weights onto channel 2, so
    the re-fitted cut computes what the unpruned net did (the plain cut drops that signal)."""
    net = _trained_like(Net())
    with torch.no_grad():
        net.conv1.weight[5], net.conv1.bias[5] = net.conv1.weight[2], net.conv1.bias[2]
        for t in (net.bn1.weight, net.bn1.bias, net.bn1.running_mean, net.bn1.running_var):
            t[5] = t[2]
    ref = copy.deepcopy(net)
    plain = copy.deepcopy(net)
    _cut(plain, "conv1", [5], refit=False)
    fits = _cut(net, "conv1", [5], refit=True, ridge=0.0)
    assert net.conv2.in_channels == 7 and set(fits) == {"conv2"}
    assert fits["conv2"][0] > 1e-3 > 1e-9 > fits["conv2"][1] - 1e-9  # the fit's own error: from the cut's to ~0
    assert _gap(plain, ref) > 1e-3
    assert _gap(net, ref) < 1e-5


def test_a_refitted_layer_whose_own_outputs_are_cut_is_carried_into_its_kept_slots():
    """conv1's channel 5 copies channel 2 and conv2's channel 4 copies channel 1 (weights and norm):
    both cut at once, conv2 (a reader of conv1 and cut itself) and fc are re-fitted in the cut copy and
    carried back into the kept rows and columns, its norm's running mean included: exact."""
    net = _trained_like(Net())
    with torch.no_grad():
        net.bn2.bias.add_(3.0)  # fc's inputs alive on every calibration image: no weight left undetermined
        net.conv1.weight[5], net.conv1.bias[5] = net.conv1.weight[2], net.conv1.bias[2]
        net.conv2.weight[4] = net.conv2.weight[1]
        for bn, (a, b) in ((net.bn1, (5, 2)), (net.bn2, (4, 1))):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t[a] = t[b]
    ref, plain = copy.deepcopy(net), copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    graph = secateurs.analyze(net, x)
    plan = PruningPlan({_group(graph, "conv1"): [5], _group(graph, "conv2"): [4]})
    apply_plan(plain, graph, plan)
    fits = refit_readers(net, graph, plan, [torch.randn(64, 3, 8, 8) for _ in range(4)], ridge=0.0)
    apply_plan(net, graph, plan)
    assert set(fits) == {"conv2", "fc"} and net.conv2.weight.shape[:2] == (5, 7) and net.fc.in_features == 5 * 16
    assert _gap(plain, ref) > 1e-3
    assert _gap(net, ref) < 1e-4


@pytest.mark.parametrize("where", ["bias", "norm"])
def test_a_removed_constant_channel_goes_into_the_intercept(where):
    """A channel that outputs a constant (norm scale 0, shift > 0) is re-fitted into conv2's bias, or
    into the running mean of the norm after it when conv2 has none (1x1: no padded border, so exact),
    with the cut's own compensation off so the re-fit alone must do it."""
    net = _trained_like(Net(k2=1, bias2=where == "bias"))
    with torch.no_grad():
        net.bn1.weight[3], net.bn1.bias[3] = 0.0, 0.8
    mean0 = net.bn2.running_mean.clone()
    ref, plain = copy.deepcopy(net), copy.deepcopy(net)
    _cut(plain, "conv1", [3], refit=False, compensate=False)
    _cut(net, "conv1", [3], refit=True, compensate=False, ridge=0.0)
    assert _gap(plain, ref) > 1e-3
    assert _gap(net, ref) < 1e-5
    assert torch.equal(net.bn2.running_mean, mean0) == (where == "bias")


def test_a_linear_reader_is_refitted():
    """The flatten -> linear head reads conv2's channels (16 features each): cutting a copy of a
    kept one is undone exactly there too."""
    net = _trained_like(Net())
    with torch.no_grad():
        net.conv2.weight[4] = net.conv2.weight[1]
        for t in (net.bn2.weight, net.bn2.bias, net.bn2.running_mean, net.bn2.running_var):
            t[4] = t[1]
    ref = copy.deepcopy(net)
    fits = _cut(net, "conv2", [4], refit=True, ridge=0.0, positions=64)
    assert set(fits) == {"fc"} and net.fc.in_features == 80
    assert _gap(net, ref) < 1e-5


def test_an_ordinary_cut_moves_the_outputs_less():
    """Nothing to copy: the re-fit still brings the outputs (on inputs it was not fitted on) closer."""
    torch.manual_seed(3)
    net = _trained_like(Net())
    ref, plain = copy.deepcopy(net), copy.deepcopy(net)
    _cut(plain, "conv1", [0, 1, 4], refit=False)
    fits = _cut(net, "conv1", [0, 1, 4], refit=True)
    assert all(after < before for before, after in fits.values())
    assert _gap(net, ref) < 0.7 * _gap(plain, ref)


def test_kept_targets_and_recomputed_ones_fit_the_same(monkeypatch):
    """The unpruned outputs are kept from one forward per batch, or (over TARGET_BYTES) recomputed
    per layer: the same rows, so the same fit."""
    net = _trained_like(Net())
    nets, plain = [net, copy.deepcopy(net)], copy.deepcopy(net)
    _cut(plain, "conv1", [0, 1, 4], refit=False)
    torch.manual_seed(5)  # the same calibration batches
    _cut(nets[0], "conv1", [0, 1, 4], refit=True)
    monkeypatch.setattr(reconstruct, "TARGET_BYTES", 0)
    torch.manual_seed(5)
    _cut(nets[1], "conv1", [0, 1, 4], refit=True)
    assert not torch.allclose(nets[1].conv2.weight, plain.conv2.weight, atol=1e-3)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))


def _refit_counting(net: nn.Module, batches: list) -> list[int]:
    """conv1's channels [0, 1, 4] cut with a re-fit on ``batches``; the batch sizes of the forwards
    ``net`` and its copies (the unpruned one, the cut ones) ran, sorted."""
    x = torch.randn(2, 3, 8, 8)
    graph = secateurs.analyze(net, x)
    forwards = []
    h = net.register_forward_pre_hook(lambda m, args: forwards.append(len(args[0])))  # copies carry it
    try:
        refit_readers(net, graph, PruningPlan({_group(graph, "conv1"): [0, 1, 4]}), batches)
    finally:
        h.remove()
    return sorted(n for n in forwards if n != len(x))  # not the cuts' own check on the example input


def test_one_forward_over_all_batches_fits_what_a_forward_per_layer_does(monkeypatch):
    """All layers re-fitted in one forward over the stacked batches (each in its pre-hook, batches of
    unequal sizes split back), or, over ONE_PASS_BYTES, each layer with its own forward per batch:
    the same fits, and the one pass runs the model once instead of once per layer and batch."""
    net = _trained_like(Net())
    nets, ref = [net, copy.deepcopy(net)], copy.deepcopy(net)
    batches = [torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(n)) for n in (64, 33, 17)]
    one = _refit_counting(nets[0], batches)
    monkeypatch.setattr(reconstruct, "ONE_PASS_BYTES", 0)
    per_layer = _refit_counting(nets[1], batches)
    # the call order, the cut copy's largest activation and the final check (2 forwards) on the 1st batch;
    # the unpruned targets per batch; then the one pass over all 114 images, or conv2 (conv1's only
    # reader) with a forward per batch
    assert one == sorted([64, 64, 64, 64, 64, 33, 17, 114])
    assert per_layer == sorted([64, 64, 64, 64, 64, 33, 17, 64, 33, 17])
    kept = [1, 2, 3, 5, 6, 7]
    assert not torch.allclose(nets[0].conv2.weight[:, kept], ref.conv2.weight[:, kept], atol=1e-3)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))


def test_batches_that_do_not_stack_are_fitted_a_layer_at_a_time():
    """Images of two sizes cannot go through one forward: each layer is fitted with its own."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    net = _trained_like(net)
    graph = secateurs.analyze(net, torch.randn(2, 3, 8, 8))
    batches = [torch.randn(16, 3, 8, 8), torch.randn(16, 3, 12, 12)]
    fits = refit_readers(net, graph, PruningPlan({0: [2, 5]}), batches)
    assert set(fits) == {"3"} and fits["3"][1] < fits["3"][0]


def test_a_failed_fit_in_the_one_pass_names_the_layer_and_leaves_the_model(monkeypatch):
    def fails_on_fc(self, ridge):
        if isinstance(self.m, nn.Linear):
            raise RuntimeError("no memory left")
        return solve(self, ridge)

    solve = reconstruct._Fit.solve
    monkeypatch.setattr(reconstruct._Fit, "solve", fails_on_fc)
    net = _trained_like(Net())
    before = copy.deepcopy(net.state_dict())
    graph = secateurs.analyze(net, torch.randn(2, 3, 8, 8))
    plan = PruningPlan({_group(graph, "conv1"): [1], _group(graph, "conv2"): [2]})
    with pytest.raises(PruningError, match="re-fitting 'fc' failed .RuntimeError: no memory left.*as it was"):
        refit_readers(net, graph, plan, [torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_failed_refit_leaves_the_model_as_it_was(monkeypatch):
    monkeypatch.setattr(reconstruct, "TARGET_BYTES", 0)  # each layer runs its own forwards: conv2 is fitted first
    net = _trained_like(Net())
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    graph = secateurs.analyze(net, x)
    plan = PruningPlan({_group(graph, "conv1"): [1], _group(graph, "conv2"): [2]})
    with pytest.raises(PruningError, match="re-fitting 'fc' failed.*the model is as it was"):
        refit_readers(net, graph, plan, [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 9, 9)])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def _data(n: int = 96) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return ArrayDataset("toy", images, torch.randint(0, 5, (n,), generator=g), classes=list("abcde"))


def test_prune_reconstructs_and_reports_the_fit(tmp_path):
    net, data = _trained_like(Net()), _data()
    ref, plain = copy.deepcopy(net), copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    secateurs.prune(plain, x, "l1", 0.6, steps=2, latency_guard=False)
    _, rep = secateurs.prune(net, x, "l1", 0.6, steps=2, data=data, reconstruct=64, latency_guard=False)
    assert count_same(net, plain)
    assert rep["reconstruct"] == 64 and set(rep["method_output"]["reconstruction"]) == {"1", "2"}  # every cut
    fits = rep["method_output"]["reconstruction"]["1"]
    assert fits and all(after < before for before, after in fits.values())
    assert _gap(net, ref) < _gap(plain, ref)
    from secateurs.report import write_report
    assert "least-squares re-fit on 64 images" in write_report(rep, tmp_path)["md"].read_text()


def count_same(a: nn.Module, b: nn.Module) -> bool:
    """The same widths: the re-fit changes weights, never what is cut."""
    return [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


@pytest.mark.parametrize("kw, match", [({"reconstruct": -1}, "reconstruct"), ({"reconstruct": 1.5}, "reconstruct"),
                                       ({"reconstruct": 64, "data": None}, "reconstruct")])
def test_bad_reconstruct_arguments_name_it_and_leave_the_model(kw, match):
    net = _trained_like(Net())
    before = copy.deepcopy(net.state_dict())
    kw = {"data": _data(), **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        secateurs.prune(net, torch.randn(2, 3, 8, 8), "l1", 0.6, latency_guard=False, **kw)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 5)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_a_norm_over_the_cut_channels_is_refitted_on_the_cut_model():
    """A LayerNorm normalises over the cut channels too, so zeroing them is not the cut: the layers are
    re-fitted in a cut copy (its LayerNorm over the kept channels) and carried back, and the cut model's
    outputs move less than the plain cut's."""
    torch.manual_seed(0)
    net = Norms().eval()
    with torch.no_grad():
        net.a.bias[3] += 4.0
    ref, plain = copy.deepcopy(net), copy.deepcopy(net)
    x = torch.randn(4, 8)
    graph = secateurs.analyze(net, x)
    plan = PruningPlan({_group(graph, "a"): [3, 7]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = refit_readers(net, graph, plan, [torch.randn(64, 8) for _ in range(4)])
    assert set(fits) == {"b"} and fits["b"][1] < fits["b"][0]
    apply_plan(net, graph, plan)
    apply_plan(plain, graph, plan)
    xs = torch.randn(256, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert float((net(xs) - ref(xs)).norm()) < 0.7 * float((plain(xs) - ref(xs)).norm())


def test_weights_that_do_not_cut_to_the_refitted_copy_are_not_kept(monkeypatch):
    """The last check: cutting the model as the pipeline will must give the re-fitted copy; weights
    that do not (here: nothing carried back) leave the model as it was, with a warning."""
    monkeypatch.setattr(reconstruct, "_carry", lambda *a: None)
    net = _trained_like(Net())
    before = copy.deepcopy(net.state_dict())
    graph = secateurs.analyze(net, torch.randn(2, 3, 8, 8))
    with pytest.warns(UserWarning, match="not re-fitted"):
        assert refit_readers(net, graph, PruningPlan({_group(graph, "conv1"): [0, 1, 4]}), [torch.randn(64, 3, 8, 8)]) == {}
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class Branches(nn.Module):
    """conv1's channels read by a grouped conv (cut as usual: bias compensation) and by a plain one
    (re-fitted): the re-fit must see what the cut grouped conv will compute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.grouped, self.plain = nn.Conv2d(8, 6, 1, groups=2), nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc((torch.relu(self.grouped(x)) + self.plain(x)).mean((2, 3)))


def test_readers_cut_as_usual_and_refitted_ones_together():
    """Channels 1 and 5 (position 1 of both groups, cut together) output constants: the grouped conv
    gets them folded into its bias before the fits, the plain one re-fits them into its intercept; with
    the cut's own compensation off, only that makes the outputs exact."""
    net = _trained_like(Branches())
    with torch.no_grad():
        net.bn1.weight[1], net.bn1.bias[1], net.bn1.weight[5], net.bn1.bias[5] = 0.0, 0.8, 0.0, 0.3
    ref, plain = copy.deepcopy(net), copy.deepcopy(net)
    _cut(plain, "conv1", [1], refit=False, compensate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not skipped as "not what the cut computes"
        fits = _cut(net, "conv1", [1], refit=True, compensate=False, ridge=0.0)
    assert set(fits) == {"plain"} and net.grouped.in_channels == 6
    assert _gap(plain, ref) > 1e-3
    assert _gap(net, ref) < 1e-5


def test_a_layer_too_wide_to_solve_is_cut_as_usual(monkeypatch):
    monkeypatch.setattr(reconstruct, "MAX_FEATURES", 50)  # conv2 reads 7 x 9 = 63 > 50; fc 5 x 16 = 80
    net = _trained_like(Net())
    assert _cut(net, "conv1", [5], refit=True) == {}
    assert net.conv2.in_channels == 7


def test_segmentation_frames_of_any_size_are_padded_for_the_refit_as_evaluation_pads_them():
    """HeLa frames are 700x1100: a U-Net runs only on a multiple of its downsampling, so whole frames
    failed the re-fit ('Sizes of tensors must match'). Calibration pads them as `evaluate` does, and
    the re-fitted cut predicts closer to the unpruned model than the plain cut."""
    from secateurs.models import create_model
    from secateurs.train import predict_padded

    torch.manual_seed(0)
    net = _trained_like(create_model("unet", base=8, depth=2))
    gen = torch.Generator().manual_seed(1)
    frames = ArrayDataset("frames", torch.randint(0, 256, (12, 1, 42, 58), dtype=torch.uint8, generator=gen),
                          torch.randint(0, 2, (12, 42, 58), generator=gen), ["bg", "fg"], "segmentation")
    x = torch.randn(1, 1, 64, 64)
    plain, ref = copy.deepcopy(net), copy.deepcopy(net)
    secateurs.prune(plain, x, "l1", {"macs": 0.5}, latency_guard=False)
    _, rep = secateurs.prune(net, x, "l1", {"macs": 0.5}, data=frames, reconstruct=8, latency_guard=False)
    assert rep["method_output"]["reconstruction"]["1"] and count_same(net, plain)
    probe = frames.images[:4].float() / 255
    with torch.no_grad():
        out = {k: predict_padded(m, probe) for k, m in (("ref", ref), ("plain", plain), ("refit", net))}
    assert out["refit"].shape == (4, 2, 42, 58)
    assert (out["refit"] - out["ref"]).abs().mean() < (out["plain"] - out["ref"]).abs().mean()
