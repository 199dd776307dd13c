"""Method 4: importance weights (alpha) folded exactly, the error-tolerance search, U-Net skips."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs import ImportanceWeights, analyze, apply_plan, count
from secateurs.cli import main
from secateurs.models import create_model
from secateurs.testing import randomize_norms
from secateurs.train import evaluate

from tests.conftest import FT


@pytest.mark.parametrize("name,kwargs,shape", [
    ("unet", {"base": 4, "depth": 2}, (2, 1, 32, 32)),
    ("ternausnet", {"base": 4, "in_chans": 1}, (2, 1, 64, 64)),  # no norm layers, transposed-conv decoder
    ("tiny_cnn", {"norm": "none"}, (2, 1, 8, 8)),
])
def test_alpha_folds_into_the_weights_without_changing_outputs(name, kwargs, shape):
    torch.manual_seed(0)
    m = randomize_norms(create_model(name, **kwargs)).eval()
    x = torch.randn(*shape)
    n_params = sum(p.numel() for p in m.parameters())
    iw = ImportanceWeights(m, analyze(m, x), init="uniform", seed=1)
    if name == "unet":  # after every BN, never on a conv that a BN follows; on the BN-less upsampling convs
        assert all(isinstance(m.get_submodule(n), nn.BatchNorm2d) or n.startswith("up.") for n in iw.labels)
        assert {n for n in iw.labels if n.startswith("up.")} == {"up.0", "up.1"}
    else:
        assert all(isinstance(m.get_submodule(n), nn.modules.conv._ConvNd) for n in iw.labels)
    if name == "ternausnet":
        assert "center.1" in iw.labels  # a ConvTranspose2d output feeding a skip concat
    assert "head" not in iw.labels and "11" not in iw.labels  # outputs of the model keep their width
    with torch.no_grad():
        hooked = m(x)
    assert iw().item() == 0.0  # no penalty unless asked
    iw.fold()
    assert sum(p.numel() for p in m.parameters()) == n_params and not any(m._forward_hooks for m in m.modules())
    with torch.no_grad():
        folded = m(x)
    assert (folded - hooked).abs().max() <= 1e-5 * hooked.abs().max()


def test_alpha_changes_the_function_until_folded():
    torch.manual_seed(0)
    m = randomize_norms(create_model("unet", base=4, depth=2)).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        ref = m(x)
    iw = ImportanceWeights(m, analyze(m, x), init="uniform")
    with torch.no_grad():
        hooked = m(x)
    assert (hooked - ref).abs().max() > 1e-2  # the weights are really on the forward path
    iw.fold()
    with torch.no_grad():
        assert torch.allclose(m(x), hooked, atol=1e-5)


def test_initialisations_and_penalty(trained):
    x = torch.randn(1, 1, 8, 8)
    g = analyze(trained, x)
    m = copy.deepcopy(trained)
    iw = ImportanceWeights(m, g, init="l1", l1=0.5)
    l1 = secateurs.group_scores(trained, g, "l1")
    for grp, s, mine in zip(g.groups, l1, iw.scores()):
        assert torch.allclose(mine, s / s.mean(), atol=1e-5) and abs(mine.mean().item() - 1) < 1e-5
    assert torch.isclose(iw(), 0.5 * sum(p.abs().sum() for p in iw.scales.scales.values()))
    iw.fold()
    ones = ImportanceWeights(copy.deepcopy(trained), g, init="ones")
    assert all(torch.equal(s, torch.ones_like(s)) for s in ones.scores())
    u1 = ImportanceWeights(copy.deepcopy(trained), g, init="uniform", seed=3).scores()
    u2 = ImportanceWeights(copy.deepcopy(trained), g, init="uniform", seed=3).scores()
    assert all(torch.equal(a, b) and 0 <= a.min() and a.max() < 1 for a, b in zip(u1, u2))
    with pytest.raises(ValueError, match="`init` must be one of ones, uniform, l1"):
        ImportanceWeights(copy.deepcopy(trained), g, init="gauss")


def test_unet_skip_concat_removes_the_matching_decoder_input_slice():
    torch.manual_seed(0)
    m = randomize_norms(create_model("unet", base=4, depth=2)).eval()
    x = torch.randn(1, 1, 32, 32)
    g = analyze(m, x)
    enc0 = next(grp for grp in g.groups if grp.name == "enc.0.3")  # the first encoder block's output
    dec_last = m.dec[-1][0]  # its first conv reads cat([enc.0 output (4), up output (4)])
    w = dec_last.weight.detach().clone()
    with torch.no_grad():  # channel 2 of the skip is exactly zero (BN weight and bias 0, then ReLU)
        m.enc[0][4].weight[2] = 0
        m.enc[0][4].bias[2] = 0
        ref = m(x)
    plan = {enc0.index: [2]}
    apply_plan(m, g, plan)
    assert m.enc[0][3].out_channels == 3 and dec_last.in_channels == 7
    assert torch.equal(dec_last.weight, w[:, [0, 1, 3, 4, 5, 6, 7]])  # the skip's slice, not the upsampled one
    assert m.head.out_channels == 2
    with torch.no_grad():
        assert (m(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_tolerance_is_honoured_and_the_breaking_step_is_undone(trained, digits):
    tr, va = digits
    x = torch.randn(1, 1, 8, 8)
    m = copy.deepcopy(trained)
    top0 = evaluate(m, va)["top1"]
    m, rep = secateurs.prune(m, x, "importance-weights", data=tr, val_data=va, tolerance=3.0,
                             finetune=dict(FT, epochs=2), method_options={"epochs": 2, "fraction": 0.2})
    steps = rep["steps"]
    assert steps[-1].get("reverted") and top0 - steps[-1]["metric"] > 3.0  # the step that broke it...
    assert "step undone" in rep["stopped"]
    kept = [r for r in steps if not r.get("reverted")]
    assert len(kept) >= 2  # ...after at least one step within the tolerance
    final = evaluate(m, va)["top1"]
    assert final == kept[-1]["metric"] and top0 - final <= 3.0  # the model returned is inside it
    assert count(m, x).macs == rep["after"]["macs"] == kept[-1]["macs"] < rep["before"]["macs"]
    assert all(top0 - r["metric"] <= 3.0 for r in kept[1:])
    assert "iw_history" in rep["method_output"] and "_state" not in rep["method_output"]


def test_a_model_broken_by_learning_alpha_is_given_back_unchanged(trained, digits):
    tr, va = digits
    m = copy.deepcopy(trained)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m, rep = secateurs.prune(m, torch.randn(1, 1, 8, 8), "importance-weights", data=tr, val_data=va, tolerance=0.5,
                             finetune=dict(FT, lr=50.0), method_options={"epochs": 1})
    assert "while learning the importance weights" in rep["stopped"] and rep["kept"]["macs"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_bisection_finds_a_cut_within_the_tolerance(trained, digits):
    tr, va = digits
    m = copy.deepcopy(trained)
    top0 = evaluate(m, va)["top1"]
    m, rep = secateurs.prune(m, torch.randn(1, 1, 8, 8), "importance-weights", data=tr, val_data=va, tolerance=2.0,
                             finetune=FT, method_options={"epochs": 1, "search": "bisect", "bisect_iters": 4})
    probes = rep["method_output"]["iw_bisection"]
    assert len(probes) == 4 and any(p["within"] for p in probes)
    best = max(p["removed_channels"] for p in probes if p["within"])
    assert all(p["removed_channels"] > best for p in probes if not p["within"])
    assert top0 - evaluate(m, va)["top1"] <= 2.0 and rep["kept"]["macs"] < 1.0
    assert rep["stopped"] == "bisection done"


def test_macs_target_is_a_stop_rule_met_from_above(trained, digits):
    tr, va = digits
    x = torch.randn(1, 1, 8, 8)
    m, rep = secateurs.prune(copy.deepcopy(trained), x, "importance-weights", 0.6, data=tr, val_data=va,
                             method_options={"epochs": 0, "fraction": 0.25})
    assert 0.6 - 0.035 <= rep["kept"]["macs"] <= 0.6  # one channel here costs 2-3% of the MACs
    assert "macs target 0.6 met" in rep["stopped"]
    widths = rep["original_widths"]
    assert all(c.out_channels >= max(1, round(0.05 * widths[n])) for n, c in m.named_modules()
               if isinstance(c, nn.Conv2d) and n in widths)


def test_fraction_one_is_a_single_cut_to_the_target(trained, digits):
    """fraction=1: one step, every removable channel ranked at once, filled back up to the target."""
    tr, va = digits
    x = torch.randn(1, 1, 8, 8)
    m, rep = secateurs.prune(copy.deepcopy(trained), x, "importance-weights", 0.5, data=tr, steps=1,
                             method_options={"epochs": 0, "fraction": 1.0})
    assert len(rep["steps"]) == 2 and 0.5 - 0.035 <= rep["kept"]["macs"] <= 0.5
    assert count(m, x).macs == rep["steps"][-1]["macs"]
    # wide layers: a cut to 90% re-adds ~1000 channels after ranking them all; the target is still met
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Conv2d(1, 400, 3, padding=1), nn.BatchNorm2d(400), nn.ReLU(),
                         nn.Conv2d(400, 400, 3, padding=1), nn.BatchNorm2d(400), nn.ReLU(),
                         nn.Conv2d(400, 400, 3, padding=1), nn.BatchNorm2d(400), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(400, 10)).eval()
    _, rep = secateurs.prune(wide, x, "importance-weights", 0.9, data=tr, steps=1,
                             method_options={"epochs": 0, "fraction": 1.0, "init": "l1"})
    assert 0.9 - 0.005 <= rep["kept"]["macs"] <= 0.9


def test_bad_options_fail_before_the_model_is_touched(trained, digits):
    tr, va = digits
    m = copy.deepcopy(trained)
    for opts, msg in [({"fraction": 1.5}, "`fraction` must be in"), ({"init": "zeros"}, "`init` must be one of"),
                      ({"search": "golden"}, "`search` must be"), ({"l1": -1}, "`l1` must be")]:
        with pytest.raises(ValueError, match=msg):
            secateurs.prune(m, torch.randn(1, 1, 8, 8), "importance-weights", data=tr, val_data=va, method_options=opts)
    with pytest.raises(ValueError, match="`metric` must be one of top1, top5"):
        secateurs.prune(m, torch.randn(1, 1, 8, 8), "importance-weights", data=tr, val_data=va, tolerance=1.0,
                        metric="iou")
    with pytest.raises(ValueError, match="needs `tolerance`"):  # an explicit schedule, no metric to bisect on
        secateurs.prune(m, torch.randn(1, 1, 8, 8), "importance-weights", data=tr, steps=3,
                        method_options={"search": "bisect"})
    with pytest.raises(ValueError, match=r"stops on its tolerance \(1.0 points by default, read on `val_data`\)"):
        secateurs.prune(m, torch.randn(1, 1, 8, 8), "importance-weights", data=tr)  # nothing would stop it
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), trained.state_dict().values()))


CLI = ["prune", "--model", "tiny_cnn", "--data", "digits", "--batch-size", "32", "--lr", "0.05",
       "--method", "importance-weights", "--tolerance", "1.0", "--iw-epochs", "1", "--fraction", "0.25",
       "--steps", "3", "--finetune-epochs", "1", "--no-onnx", "--no-latency"]


def test_cli_killed_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    assert main([*CLI, "--out", str(tmp_path / "full")]) == 0
    real_fit = secateurs.train.fit
    calls = []

    def dies_in_step_two(model, *a, **k):  # call 1 learns alpha, 2 fine-tunes step 1, 3 step 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_fit(model, *a, **k)

    monkeypatch.setattr(secateurs.pipeline, "fit", dies_in_step_two)  # where fit is called
    monkeypatch.setattr(secateurs.methods.importance, "fit", dies_in_step_two)  # where fit is called
    with pytest.raises(KeyboardInterrupt):
        main([*CLI, "--out", str(tmp_path / "cut")])
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["completed_steps"] == 1
    monkeypatch.setattr(secateurs.pipeline, "fit", real_fit)  # where fit is called
    monkeypatch.setattr(secateurs.methods.importance, "fit", real_fit)  # where fit is called
    assert main([*CLI, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a, b = secateurs.load(tmp_path / "full"), secateurs.load(tmp_path / "cut")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("full", "cut"))
    assert ra["steps"] == rb["steps"] and ra["method"] == "importance-weights"


def test_cost_aware_weights_are_the_macs_each_channel_saves(trained):
    from secateurs.methods import StepContext, channel_macs

    x = torch.randn(1, 1, 8, 8)
    g = analyze(trained, x)
    base = count(trained, x)
    ctx = StepContext(model=trained, graph=g, example_inputs=x, step=1, steps=1, budget=None, base=base, current=base)
    w = channel_macs(ctx)
    # tiny_cnn at 8x8: conv0 1->16 (8x8), conv3 16->32 stride 2 (4x4), conv6 32->32 (4x4), fc 32->10
    # one channel less saves its own filter's MACs and its column in the next layer (BN: no MACs)
    saved = {"0": 9 * 1 * 64 + 32 * 9 * 16, "3": 16 * 9 * 16 + 32 * 9 * 16, "6": 32 * 9 * 16 + 10}
    mean = (16 * saved["0"] + 32 * saved["3"] + 32 * saved["6"]) / 80
    for grp in g.groups:
        assert torch.allclose(w[grp.components], torch.full((grp.size,), saved[grp.name] / mean))
    m = copy.deepcopy(trained)
    iw = ImportanceWeights(m, g, init="uniform", l1=0.1, cost_weights=w)
    expected = sum(0.1 * (w[iw.labels[n]] * p.abs()).sum() for n, p in iw.scales.scales.items())
    assert torch.isclose(iw(), expected) and not torch.isclose(iw(), 0.1 * sum(p.abs().sum() for p in iw.scales.scales.values()))


def test_an_undone_step_is_retried_smaller_before_the_schedule_stops(trained, digits):
    tr, va = digits
    x = torch.randn(1, 1, 8, 8)
    top0 = evaluate(trained, va)["top1"]
    runs = {}
    for refinements in (0, 2):
        m, rep = secateurs.prune(copy.deepcopy(trained), x, "importance-weights", data=tr, val_data=va, tolerance=3.0,
                                 finetune=dict(FT, epochs=2),
                                 method_options={"epochs": 2, "fraction": 0.2, "refinements": refinements})
        runs[refinements] = rep
        undone = [r for r in rep["steps"] if r.get("reverted")]
        assert 1 <= len(undone) <= refinements + 1 and rep["steps"][-1].get("reverted")
        assert top0 - evaluate(m, va)["top1"] <= 3.0 and count(m, x).macs == rep["after"]["macs"]
    first_undone = next(i for i, r in enumerate(runs[2]["steps"]) if r.get("reverted"))
    assert runs[2]["steps"][:first_undone] == runs[0]["steps"][:first_undone]  # the same schedule up to there
    later = runs[2]["steps"][first_undone + 1]  # then a smaller step than the undone one
    assert later["macs"] > runs[2]["steps"][first_undone]["macs"]
    assert runs[2]["after"]["macs"] <= runs[0]["after"]["macs"]


def test_cost_aware_steps_remove_a_share_of_the_macs(trained, digits):
    tr, _ = digits
    x = torch.randn(1, 1, 8, 8)
    # no val_data: with it the method's 1-point tolerance would stop the schedule (METHODS.md's default)
    m, rep = secateurs.prune(copy.deepcopy(trained), x, "importance-weights", data=tr, steps=3,
                             method_options={"epochs": 0, "fraction": 0.1, "cost_aware": True})
    macs = [r["macs"] for r in rep["steps"]]
    for a, b in zip(macs, macs[1:]):  # each step: at least 10% of the MACs, and not much more (one channel)
        assert 0.9 * a - 0.035 * macs[0] <= b <= 0.9 * a


def test_cli_refuses_a_metric_the_task_does_not_have(tmp_path):
    with pytest.raises(SystemExit, match="--metric: `metric` must be one of top1, top5 for classification data"):
        main([*CLI, "--metric", "iou", "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_scaled_rank_weighs_alpha_by_the_channels_own_scale(trained, digits):
    """rank='scale': with alpha at 1 the scores are the |gamma| ranking (bn_scale); alpha scales them."""
    x = torch.randn(1, 1, 8, 8)
    g = analyze(trained, x)
    iw = ImportanceWeights(copy.deepcopy(trained), g, init="ones")
    bn = secateurs.group_scores(trained, g, "bn_scale")
    for mine, ref in zip(iw.scores(scaled=True), bn):
        assert torch.allclose(mine, ref.float(), atol=1e-6)
    with torch.no_grad():
        for p in iw.scales.scales.values():
            p.mul_(0.5)
    for mine, ref in zip(iw.scores(scaled=True), bn):
        assert torch.allclose(mine, 0.5 * ref.float(), atol=1e-6)
    m, report = secateurs.prune(copy.deepcopy(trained), x, "importance-weights", 0.6, data=digits[0], finetune=FT,
                                method_options={"epochs": 1, "fraction": 1.0, "rank": "scale"})
    assert report["kept"]["macs"] <= 0.6 and report["method_options"]["rank"] == "scale"


def test_scaled_rank_reads_transposed_convs_by_their_output_channels():
    """A carrier without a norm layer is weighed by its filters' norms: a transposed conv (a U-Net's
    up-sampling) keeps them along dim 1, group by group; its scores have one value per output channel."""
    from secateurs.methods.gates import out_channel_norms

    up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
    w = up.weight.detach()  # (6, 2, 2, 2): in, out / groups, k, k
    want = torch.stack([w[3 * (o // 2):3 * (o // 2) + 3, o % 2].norm() for o in range(4)])
    assert torch.allclose(out_channel_norms(up), want)
    conv = nn.Conv2d(3, 5, 3)
    assert torch.allclose(out_channel_norms(conv), conv.weight.detach().flatten(1).norm(dim=1))
    torch.manual_seed(0)
    unet, x = randomize_norms(create_model("unet", in_chans=1, num_classes=2, base=4)).eval(), torch.randn(1, 1, 32, 32)
    g = analyze(unet, x)
    iw = ImportanceWeights(copy.deepcopy(unet), g, init="ones")
    assert any(isinstance(iw.scales.model.get_submodule(n), nn.ConvTranspose2d) for n in iw.scales.scales)
    scores = iw.scores(scaled=True)
    assert [len(s) for s in scores] == [grp.size for grp in g.groups]
    assert all(torch.isfinite(s).all() for s in scores)


def test_the_tolerance_defaults_to_one_point_and_an_undo_reports_the_model_it_leaves(trained, digits):
    """METHODS.md: the allowed drop is 1 point by default. An undone cut keeps the learned alpha (it
    ranks the next step), so the report's final metric is that model's, measured again."""
    from secateurs.train import evaluate

    tr, va = digits
    opts = {"epochs": 1, "fraction": 0.9, "refinements": 0, "lr": 1e-3}
    _, rep = secateurs.prune(copy.deepcopy(trained), torch.randn(1, 1, 8, 8), "importance-weights", data=tr,
                             val_data=va, method_options=dict(opts, epochs=0))
    assert rep["tolerance"] == 1.0
    # 5 points: alpha's epoch (BN statistics move with it) holds them, a 90% cut does not
    m, rep = secateurs.prune(copy.deepcopy(trained), torch.randn(1, 1, 8, 8), "importance-weights", data=tr,
                             val_data=va, tolerance=5.0, method_options=opts)
    last = rep["steps"][-1]
    assert last["reverted"] and len(rep["steps"]) == 2
    # the model keeps alpha folded in, uncut: not the weights it came with, and its own metric reported
    assert not all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), trained.state_dict().values()))
    assert rep["after"]["metric"] == last["metric_restored"] == evaluate(m, va)["top1"] and rep["kept"]["macs"] == 1.0


def test_layer_rank_keeps_a_layer_whose_alphas_shrank_as_a_whole(trained, digits, monkeypatch):
    """rank='layer': a layer whose |alpha| are all small (the deep layers under the L1 penalty) keeps
    its share, chosen by alpha inside it; the paper's global |alpha| ranking empties it to min_keep."""
    x = torch.randn(1, 1, 8, 8)
    g = analyze(trained, x)
    torch.manual_seed(1)
    comp = torch.rand(g.n_components) + 0.5
    first = g.groups[0]
    comp[first.components] *= 0.01
    monkeypatch.setattr(ImportanceWeights, "importance", lambda self: comp.clone())
    widths = {}
    for rank in ("alpha", "layer"):
        m, rep = secateurs.prune(copy.deepcopy(trained), x, "importance-weights", 0.6, data=digits[0], steps=1,
                                 method_options={"epochs": 0, "fraction": 1.0, "rank": rank, "min_keep": 0.1})
        assert rep["kept"]["macs"] <= 0.6
        widths[rank] = analyze(m, x).groups[0].size
    assert widths["alpha"] == max(1, -(-first.size // 10))  # emptied down to min_keep
    assert widths["layer"] >= first.size // 2


def test_alpha_lr_is_alphas_own_rate_and_moves_it_within_a_short_phase(trained, digits):
    """A short phase at the network's (fine-tuning) rate leaves alpha near 1, so the ranking is noise;
    ``alpha_lr`` puts alpha in its own optimizer group (no decay) at that rate."""
    x = torch.randn(1, 1, 8, 8)
    g = analyze(trained, x)
    cfg = secateurs.train.TrainConfig(epochs=1, batch_size=64, lr=1e-4, optimizer="adamw", pad=1, quiet=True)
    moved = {}
    for lr in (None, 0.05):
        m = copy.deepcopy(trained)
        iw = ImportanceWeights(m, g, l1=1e-4, alpha_lr=lr)
        opt = secateurs.train.make_optimizer(m, cfg)
        own = [grp for grp in opt.param_groups if any(p is q for p in grp["params"] for q in iw.scales.scales.values())]
        assert len(own) == 1 and own[0]["weight_decay"] == 0.0 and own[0]["lr"] == (lr or cfg.lr)
        if lr is not None:  # alpha alone in its group; the network keeps its rate
            assert len(own[0]["params"]) == len(iw.scales.scales) and opt.param_groups[0]["lr"] == cfg.lr
        secateurs.train.fit(m, digits[0], None, cfg, regularizer=iw)
        moved[lr] = max((p.detach() - 1).abs().max().item() for p in iw.scales.scales.values())
    assert moved[None] < 0.01 < moved[0.05]
    with pytest.raises(ValueError, match="`alpha_lr`"):
        ImportanceWeights(copy.deepcopy(trained), g, alpha_lr=0)


def test_alpha_lr_option_reaches_the_phase_and_a_resume_under_another_refuses(trained, digits, tmp_path):
    """The method option moves alpha within the phase (its learnt scores, kept in the run's state);
    resuming that phase's checkpoint with alpha_lr removed refuses before touching the model."""
    x = torch.randn(1, 1, 8, 8)
    ft = dict(FT, lr=1e-4, optimizer="adamw")
    spread = {}
    for lr in (None, 0.05):
        out = tmp_path / f"run{lr}"
        secateurs.prune(copy.deepcopy(trained), x, "importance-weights", 0.6, data=digits[0], finetune=ft, steps=1,
                        out_dir=out, method_options={"epochs": 1, "fraction": 1.0, "alpha_lr": lr, "l1": 1e-4})
        state = json.loads((out / "state.json").read_text())
        scores = [v for g in _find(state, "before_step").values() for v in g]
        spread[lr] = max(abs(v - 1) for v in scores)
    assert spread[None] < 0.01 < spread[0.05]
    m = copy.deepcopy(trained)
    g = analyze(m, x)
    iw = ImportanceWeights(m, g, alpha_lr=0.05)
    cfg = secateurs.train.TrainConfig(**dict(ft, epochs=2, out_dir=str(tmp_path / "phase")))
    secateurs.train.fit(m, digits[0], None, secateurs.train.TrainConfig(**dict(ft, epochs=1, out_dir=cfg.out_dir)),
                        regularizer=iw)
    plain = copy.deepcopy(trained)
    ImportanceWeights(plain, g)  # the same parameters, no group of their own
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="has 3 parameter groups, this run.s 2.*alpha_lr"):
        secateurs.train.fit(plain, digits[0], None, dataclasses.replace(cfg, resume=True))
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def _find(d, key):
    """The first value under ``key`` anywhere in nested dicts."""
    if isinstance(d, dict):
        for k, v in d.items():
            found = v if k == key else _find(v, key)
            if found is not None:
                return found
    return None


def test_gradient_penalty_weights_are_each_layers_rms_gradient_and_leave_the_model_as_it_was(trained, digits):
    """penalty='gradient': per channel, its layer's root-mean-square loss gradient on alpha = 1 over
    the phase's own batches (mean 1), read without moving BN's statistics or leaving gradients."""
    from secateurs.methods.gates import ChannelScales
    from secateurs.methods.importance import gradient_weights
    from secateurs.train import task_loss, train_batches

    x = torch.randn(1, 1, 8, 8)
    g = analyze(trained, x)
    cfg = secateurs.train.TrainConfig(**dict(FT, batch_size=64))
    m = copy.deepcopy(trained).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    w = gradient_weights(m, g, digits[0], cfg, batches=25)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not m.training and all(p.grad is None for p in m.parameters())
    assert not any(ChannelScales.NAME in n for n, _ in m.named_parameters())
    # by hand: the same batches; 1,437 images at 64 are 22 batches an epoch, so 25 run into the second
    ref = copy.deepcopy(trained).train()
    iw = ImportanceWeights(ref, g)
    sq = {n: 0.0 for n in iw.scales.scales}
    batches = train_batches(digits[0], cfg)
    assert len(batches) == 22
    for epoch, take in ((0, 22), (1, 3)):
        batches.set_epoch(epoch)
        for _, (xb, yb) in zip(range(take), batches):
            ref.zero_grad()
            task_loss(ref(xb), yb).backward()
            for n, p in iw.scales.scales.items():
                sq[n] += float(p.grad.square().mean())
    rms = {n: (s / 25) ** 0.5 for n, s in sq.items()}
    expect = torch.cat([torch.full((len(iw.labels[n]),), r) for n, r in rms.items()])
    expect = expect / expect.mean()
    got = torch.cat([w[iw.labels[n]] for n in rms])
    assert torch.allclose(got, expect, rtol=1e-4)
    assert got.max() / got.min() > 1.5  # the layers differ: a uniform answer would fail above
    dead = copy.deepcopy(trained)
    head = [mod for mod in dead.modules() if isinstance(mod, nn.Linear)][-1]
    nn.init.zeros_(head.weight)  # the output no longer depends on any alpha: one penalty, not NaN
    flat = gradient_weights(dead, g, digits[0], cfg, batches=2)
    assert torch.equal(flat, (flat > 0).float()) and flat.sum() == sum(grp.size for grp in g.groups)
    frozen = copy.deepcopy(trained).train()
    bn = next(mod for mod in frozen.modules() if isinstance(mod, nn.BatchNorm2d)).eval()  # the user froze it
    gradient_weights(frozen, g, digits[0], cfg, batches=1)
    assert frozen.training and not bn.training
    nn.init.constant_(head.bias, float("nan"))
    with pytest.raises(ValueError, match="non-finite training loss"):
        gradient_weights(dead, g, digits[0], cfg, batches=2)


def test_gradient_penalty_option_weights_the_l1_pull_and_multiplies_cost_aware(trained, digits, monkeypatch):
    from secateurs.methods import importance

    x = torch.randn(1, 1, 8, 8)
    n = analyze(trained, x).n_components
    fake = torch.linspace(0.5, 1.5, n)
    monkeypatch.setattr(importance, "gradient_weights", lambda *a, **k: fake.clone())
    seen = {}

    class Spy(importance.ImportanceWeights):
        def __init__(self, *a, cost_weights=None, **k):
            seen["w"] = cost_weights
            super().__init__(*a, cost_weights=cost_weights, **k)
    monkeypatch.setattr(importance, "ImportanceWeights", Spy)
    for penalty, cost_aware in (("uniform", False), ("gradient", False), ("gradient", True)):
        secateurs.prune(copy.deepcopy(trained), x, "importance-weights", 0.6, data=digits[0], steps=1, finetune=FT,
                        method_options={"epochs": 1, "fraction": 1.0, "penalty": penalty, "cost_aware": cost_aware})
        seen[penalty, cost_aware] = seen.pop("w")
    assert seen["uniform", False] is None
    prunable = torch.cat([grp.components for grp in analyze(trained, x).groups])  # mean 1 over these
    assert torch.allclose(seen["gradient", False], fake / fake[prunable].mean())
    both, groups = seen["gradient", True], {grp.name: grp.components for grp in analyze(trained, x).groups}
    assert both[prunable].mean().item() == pytest.approx(1.0)
    macs = both / fake  # what cost_aware alone gives, up to its scale: the MACs a channel saves (see above)
    for name in groups:
        assert torch.allclose(macs[groups[name]], macs[groups[name]][0].expand(len(groups[name])))
    ratio = float(macs[groups["3"]][0] / macs[groups["0"]][0])
    assert ratio == pytest.approx((16 * 9 * 16 + 32 * 9 * 16) / (9 * 64 + 32 * 9 * 16), rel=1e-5)
    with pytest.raises(ValueError, match="penalty"):
        secateurs.prune(copy.deepcopy(trained), x, "importance-weights", 0.6, data=digits[0],
                        method_options={"penalty": "layer"})
