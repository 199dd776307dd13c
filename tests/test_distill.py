"""Knowledge distillation from a frozen teacher: the loss against an independent computation, what
the student learns, the pipeline's teacher (the unpruned model, on resume too), the CLI flags."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import secateurs
import secateurs.methods.hfp
import secateurs.methods.importance
from secateurs.cli import _check_prune_args, get_args_parser, main
from secateurs.data import IGNORE_INDEX, ArrayDataset, Batches
from secateurs.methods import get_method
from secateurs.models import create_model
from secateurs.train import TrainConfig, distillation_loss, evaluate, fit
from tests.test_train import cfg, digits

X8 = torch.randn(1, 1, 8, 8)




def n_params(m):
    return sum(p.numel() for p in m.parameters())


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def mean_kl(teacher, student, ds):
    """KL(teacher || student) at T=1 over ``ds``, both in eval mode."""
    x, _ = next(iter(Batches(ds, len(ds), train=False)))
    with torch.no_grad():
        return F.kl_div(F.log_softmax(student.eval()(x), 1), F.log_softmax(teacher.eval()(x), 1),
                        reduction="batchmean", log_target=True).item()


# -- the loss ----------------------------------------------------------------------------------------
def test_distillation_loss_matches_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    T = 3.0
    p, q = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    by_hand = T * T * sum((q[i] * (q[i] / p[i]).log()).sum() for i in range(6)) / 6
    assert torch.allclose(distillation_loss(s, t, T), by_hand, rtol=1e-5)
    assert distillation_loss(s, s.clone(), T).item() == 0.0
    # segmentation: the same KL per pixel (softmax over dim 1), averaged over pixels
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    flat = lambda z: z.permute(0, 2, 3, 1).reshape(-1, 3)  # noqa: E731  one row per pixel
    ref = F.kl_div(F.log_softmax(flat(s) / T, 1), F.softmax(flat(t) / T, 1), reduction="batchmean") * T * T
    assert torch.allclose(distillation_loss(s, t, T), ref, rtol=1e-5)
    with pytest.raises(ValueError, match=r"`teacher` outputs shape \(2, 3\) but the model \(2, 4\)"):
        distillation_loss(torch.zeros(2, 4), torch.zeros(2, 3))


def test_distillation_skips_the_pixels_no_class_owns():
    """Padding a crop took in (IGNORE_INDEX) is no class: what the teacher says there must not pull."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    valid = torch.rand(2, 4, 5, generator=g) > 0.4
    flat = lambda z: z.permute(0, 2, 3, 1)[valid]  # noqa: E731  the valid pixels' logits, one row each
    ref = F.kl_div(F.log_softmax(flat(s) / 2, 1), F.softmax(flat(t) / 2, 1), reduction="batchmean") * 4
    assert torch.allclose(distillation_loss(s, t, 2.0, valid=valid), ref, rtol=1e-5)
    assert not torch.allclose(distillation_loss(s, t, 2.0), ref, rtol=1e-3)
    t2 = torch.where(valid[:, None], t, torch.randn(2, 3, 4, 5, generator=g) * 50)  # the teacher's padding: noise
    assert torch.allclose(distillation_loss(s, t2, 2.0, valid=valid), ref, rtol=1e-5)
    none = distillation_loss(s.requires_grad_(), t, 2.0, valid=torch.zeros(2, 4, 5, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and s.grad.abs().sum() == 0
    with pytest.raises(ValueError, match=r"`valid` has shape \(2, 4\), the outputs \(2, 4, 5\) positions"):
        distillation_loss(s, t, 2.0, valid=valid[:, :, 0])


def test_fit_trains_the_student_on_labelled_pixels_only(monkeypatch):
    """fit passes the labelled pixels of each mask to the distillation term."""
    seen = []
    real = secateurs.train.distillation_loss

    def recording(student, teacher, temperature, valid=None):
        seen.append(valid)
        return real(student, teacher, temperature, valid=valid)

    monkeypatch.setattr(secateurs.train, "distillation_loss", recording)
    images = torch.randint(0, 255, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    masks = (images[:, 0] > 127).long()
    masks[:, :2] = IGNORE_INDEX
    ds = ArrayDataset("toy-seg", images, masks, ["bg", "fg"], task="segmentation")
    torch.manual_seed(0)
    student, teacher = create_model("unet", base=4, depth=2), create_model("unet", base=4, depth=2)
    fit(student, ds, None, TrainConfig(epochs=1, batch_size=4, lr=0.01, flip=False, quiet=True, distill=0.5),
        teacher=teacher)
    assert len(seen) == 1 and torch.equal(seen[0], masks != IGNORE_INDEX)


# -- fit -----------------------------------------------------------------------------------------------
def test_kd_is_zero_against_an_identical_teacher_and_grows_as_the_student_moves(monkeypatch):
    tr, _ = digits()
    seen: list[float] = []
    real = secateurs.train.distillation_loss

    def recording(student, teacher, temperature, **kw):
        loss = real(student, teacher, temperature, **kw)
        seen.append(loss.item())
        return loss

    monkeypatch.setattr(secateurs.train, "distillation_loss", recording)
    torch.manual_seed(0)
    student = create_model("tiny_cnn", norm="none")  # no BatchNorm: train and eval mode compute the same logits
    teacher = copy.deepcopy(student)
    frozen = copy.deepcopy(teacher)
    # w = 1 and no weight decay: the KD gradient vanishes at the teacher (up to rounding: sum(softmax) = 1
    # within an ulp), so the student stays where it is
    hist = fit(student, tr, None, cfg(distill=1.0, weight_decay=0.0), teacher=teacher)
    assert len(seen) == 2 * (len(tr) // 64) and seen[0] == 0.0 and max(map(abs, seen)) < 1e-6
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(student.parameters(), frozen.parameters()))
    assert abs(hist[-1]["kd_loss"]) < 1e-6
    # w = 1 with weight decay: the weights shrink, the student leaves the teacher and KD grows from ~0 (the
    # first fit left it within rounding of the teacher, not bit-equal: how far depends on the CPU's kernels)
    seen.clear()
    hist = fit(student, tr, None, cfg(distill=1.0), teacher=teacher)
    epoch = len(seen) // 2
    assert abs(seen[0]) < 1e-6 and sum(seen[-epoch:]) > sum(seen[:epoch]) > 0
    assert hist[-1]["kd_loss"] > hist[0]["kd_loss"] > 0
    assert abs(hist[-1]["kd_loss"] - sum(seen[-epoch:]) / epoch) < 1e-9  # the history holds the epoch mean
    # w = 0.5: the labels pull the student away from its (untrained) teacher, much further than the decay did
    seen.clear()
    pulled = fit(student, tr, None, cfg(distill=0.5, epochs=2), teacher=copy.deepcopy(student))
    assert seen[0] == 0.0 and pulled[-1]["kd_loss"] > 10 * hist[-1]["kd_loss"]
    # the teacher was run, never trained, and left in the mode it came in
    assert same_state(teacher, frozen) and teacher.training
    assert all(p.grad is None for p in teacher.parameters())


def test_a_distilled_student_ends_closer_to_its_teacher():
    """The teacher learned shifted labels (digit d called d + 1): a student distilled with w = 1
    follows the teacher, not the labels it is shown; with w = 0 it follows the labels."""
    tr, te = digits()
    shifted = lambda ds: ArrayDataset(ds.name, ds.images, (ds.targets + 1) % 10, ds.classes, mean=ds.mean,  # noqa: E731
                                      std=ds.std)
    torch.manual_seed(0)
    teacher = create_model("tiny_cnn")
    fit(teacher, shifted(tr), None, cfg(epochs=3, lr=0.1, seed=0))
    assert evaluate(teacher, shifted(te))["top1"] > 70
    kl, agree = {}, {}
    for w in (0.0, 1.0):
        torch.manual_seed(1)  # the same fresh student for both
        student = create_model("tiny_cnn", width=8)
        hist = fit(student, tr, None, cfg(epochs=3, lr=0.1, distill=w, distill_temperature=2.0), teacher=teacher)
        assert ("kd_loss" in hist[-1]) == (w > 0)
        kl[w] = mean_kl(teacher, student, te)
        agree[w] = evaluate(student, shifted(te))["top1"]  # % of test digits labelled as the teacher learned
    assert kl[1.0] < 0.25 * kl[0.0], kl
    assert agree[1.0] > agree[0.0] + 25 and agree[0.0] < 10, agree


def test_segmentation_distils_per_pixel():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (4, 1, 32, 32), generator=g, dtype=torch.uint8)
    ds = ArrayDataset("toy-seg", images, (images[:, 0] > 127).long(), ["bg", "fg"], task="segmentation")
    torch.manual_seed(0)
    teacher = create_model("unet", base=4, depth=2)
    student = create_model("unet", base=4, depth=2, num_classes=2)
    hist = fit(student, ds, None, TrainConfig(epochs=2, batch_size=2, lr=0.01, crop=16, quiet=True, distill=0.5),
               teacher=teacher)
    assert hist[-1]["kd_loss"] > 0 and all(torch.isfinite(torch.tensor(r["kd_loss"])) for r in hist)


def test_bad_distillation_inputs_are_refused_before_training():
    with pytest.raises(ValueError, match=r"`distill` must be in \[0, 1\], got 1.5"):
        TrainConfig(distill=1.5)
    with pytest.raises(ValueError, match=r"`distill` must be in \[0, 1\], got -0.1"):
        TrainConfig(distill=-0.1)
    with pytest.raises(ValueError, match="`distill_temperature` must be a positive number, got 0"):
        TrainConfig(distill_temperature=0)
    with pytest.raises(TypeError, match="`distill` must be a number"):
        TrainConfig(distill="0.5")
    tr, _ = digits()
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="`distill` is 0.5: pass `teacher`"):
        fit(model, tr, None, cfg(distill=0.5))
    with pytest.raises(ValueError, match="`teacher` must be a separate, frozen module"):
        fit(model, tr, None, cfg(distill=0.5), teacher=model)
    with pytest.raises(TypeError, match="`teacher` must be a torch.nn.Module"):
        fit(model, tr, None, cfg(distill=0.5), teacher="resnet20")
    with pytest.raises(ValueError, match=r"`teacher` outputs shape \(3,\) per sample but the model \(10,\)"):
        fit(model, tr, None, cfg(distill=0.5), teacher=create_model("tiny_cnn", num_classes=3))
    assert same_state(model, before)  # BatchNorm statistics included: nothing ran in train mode
    teacher = create_model("tiny_cnn").train()
    with pytest.raises(ValueError, match="fewer than one batch"):  # raised after the teacher was readied
        fit(model, tr.subset(8), None, cfg(distill=0.5, batch_size=16), teacher=teacher)
    assert teacher.training  # back in the mode it came in
    fit(model, tr.subset(64), None, cfg(epochs=1, batch_size=16), teacher=create_model("tiny_cnn", num_classes=3))  # w = 0: unused


# -- the pipeline ---------------------------------------------------------------------------------------
def recording_fit(monkeypatch, module):
    """Replace ``module.fit`` by a wrapper that records what each call got."""
    calls = []
    real = secateurs.train.fit

    def wrapped(model, data, val, cfg, *a, teacher=None, **k):
        calls.append({"distill": cfg.distill, "teacher": teacher, "teacher_params": n_params(teacher) if teacher else None,
                      "teacher_state": copy.deepcopy(teacher.state_dict()) if teacher else None,
                      "model_params": n_params(model)})
        return real(model, data, val, cfg, *a, teacher=teacher, **k)

    monkeypatch.setattr(module, "fit", wrapped)
    return calls


def test_prune_distils_every_fine_tuning_from_the_unpruned_model(monkeypatch):
    tr, _ = digits()
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    original = copy.deepcopy(model)
    calls = recording_fit(monkeypatch, secateurs.pipeline)
    ft = {"epochs": 1, "batch_size": 64, "lr": 0.02, "pad": 1, "quiet": True, "distill": 0.5}
    model, report = secateurs.prune(model, X8, "l2", 0.4, steps=2, data=tr, finetune=ft)
    assert len(calls) == 2 and report["kept"]["macs"] <= 0.4
    for c in calls:  # each step: the same frozen unpruned model, in eval mode, no gradient
        assert c["distill"] == 0.5 and c["teacher"] is calls[0]["teacher"]
        assert c["teacher_params"] == n_params(original) > c["model_params"]
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in c["teacher_state"].items())
        assert not c["teacher"].training and not any(p.requires_grad for p in c["teacher"].parameters())
    # no distillation asked: no teacher built
    calls.clear()
    secateurs.prune(create_model("tiny_cnn"), X8, "l2", 0.5, data=tr, finetune=dict(ft, distill=0.0))
    assert calls and calls[0]["teacher"] is None


def test_a_cascade_distils_from_the_teacher_it_is_given(monkeypatch):
    """The second prune of a cascade works on an already pruned model: `teacher=` keeps the unpruned
    one as the target instead of a copy of the model as given."""
    tr, _ = digits()
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    original = copy.deepcopy(model)
    ft = {"epochs": 1, "batch_size": 64, "lr": 0.02, "pad": 1, "quiet": True, "distill": 0.5}
    secateurs.prune(model, X8, "l2", 0.7)
    calls = recording_fit(monkeypatch, secateurs.pipeline)
    secateurs.prune(model, X8, "l2", 0.6, data=tr, finetune=ft, teacher=original)
    assert len(calls) == 1 and calls[0]["teacher"] is original and not original.training
    assert calls[0]["teacher_params"] == n_params(original) > calls[0]["model_params"]
    # refused before anything is cut: the model itself, or a teacher that is not a module
    before = copy.deepcopy(model)
    for bad, msg in ((model, "not the model being pruned"), ("resnet20", "`teacher`")):
        with pytest.raises((ValueError, TypeError), match=msg):
            secateurs.prune(model, X8, "l2", 0.5, data=tr, finetune=ft, teacher=bad)
        assert same_state(model, before)


def test_a_resumed_run_distils_from_the_original_model_too(tmp_path, monkeypatch):
    tr, _ = digits()
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    original = copy.deepcopy(model)
    ft = {"epochs": 1, "batch_size": 64, "lr": 0.02, "pad": 1, "quiet": True, "distill": 0.5}
    kw = dict(steps=2, data=tr, finetune=ft, out_dir=tmp_path)
    real = secateurs.train.fit
    n = [0]

    def dies_in_step_two(*a, **k):
        n[0] += 1
        if n[0] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(secateurs.pipeline, "fit", dies_in_step_two)
    with pytest.raises(KeyboardInterrupt):
        secateurs.prune(copy.deepcopy(original), X8, "l2", 0.4, **kw)
    assert json.loads((tmp_path / "state.json").read_text())["completed_steps"] == 1
    calls = recording_fit(monkeypatch, secateurs.pipeline)
    secateurs.prune(copy.deepcopy(original), X8, "l2", 0.4, resume=True, **kw)
    assert len(calls) == 1 and calls[0]["teacher_params"] == n_params(original) > calls[0]["model_params"]
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in calls[0]["teacher_state"].items())


@pytest.mark.parametrize("method,module,options", [
    ("hfp", secateurs.methods.hfp, {"epochs": 1}),
    ("importance-weights", secateurs.methods.importance, {"epochs": 1}),
])
def test_methods_that_train_get_the_teacher(monkeypatch, method, module, options):
    tr, _ = digits()
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    size = n_params(model)
    calls = recording_fit(monkeypatch, module)
    ft = {"epochs": 1, "batch_size": 64, "lr": 0.02, "pad": 1, "quiet": True, "distill": 0.5}
    target = 0.6 if method == "hfp" else None
    secateurs.prune(model, X8, method, target, steps=1, data=tr, finetune=ft, method_options=options)
    assert calls and all(c["distill"] == 0.5 and c["teacher_params"] == size for c in calls)


# -- the command line -------------------------------------------------------------------------------------
FAST = ["prune", "--model", "tiny_cnn", "--data", "digits", "--batch-size", "32", "--lr", "0.05", "--macs", "0.5"]


def test_cli_flags_reach_the_fine_tuning_config(monkeypatch):
    args = get_args_parser().parse_args([*FAST, "--finetune-epochs", "1", "--distill", "0.3",
                                         "--distill-temperature", "2"])
    _, ft, _ = _check_prune_args(args, get_method("l2"))
    assert (ft.distill, ft.distill_temperature) == (0.3, 2.0)
    _, ft, _ = _check_prune_args(get_args_parser().parse_args([*FAST, "--finetune-epochs", "1"]), get_method("l2"))
    assert (ft.distill, ft.distill_temperature) == (0.5, 4.0)  # on by default when fine-tuning (it measured better)
    _, ft, _ = _check_prune_args(get_args_parser().parse_args([*FAST, "--finetune-epochs", "1", "--distill", "0"]),
                                 get_method("l2"))
    assert ft.distill == 0.0  # and off when asked
    calls = recording_fit(monkeypatch, secateurs.pipeline)
    assert main([*FAST, "--finetune-epochs", "1", "--distill", "0.5", "--no-onnx", "--no-latency", "--quiet"]) == 0
    assert len(calls) == 1 and calls[0]["distill"] == 0.5 and calls[0]["teacher_params"] > calls[0]["model_params"]


@pytest.mark.parametrize("args,msg", [
    (["--finetune-epochs", "1", "--distill", "1.5"], r"--distill: `distill` must be in \[0, 1\], got 1.5"),
    (["--finetune-epochs", "1", "--distill", "0.5", "--distill-temperature", "0"],
     "--distill-temperature: `distill_temperature` must be a positive number"),
    (["--distill", "0.5"], "--distill needs --finetune-epochs"),
])
def test_cli_refuses_bad_distillation_flags(args, msg):
    with pytest.raises(SystemExit, match=msg):
        main([*FAST, *args])


def test_train_distils_from_the_run_named_by_teacher(tmp_path, monkeypatch):
    """`secateurs train --teacher` (how scripts/baselines.sh lifts ResNet-20 with ResNet-56): the frozen
    teacher holds the named run's weights and the config carries its weight and temperature."""
    from secateurs import cli
    from tests.test_train import _train_cmd

    first = tmp_path / "teacher"
    assert cli.main(_train_cmd(first, 1)[3:]) == 0
    wide = ["--model-arg", "width=24"]
    assert cli.main(_train_cmd(tmp_path / "wide", 1, wide)[3:]) == 0
    assert cli.main(_train_cmd(tmp_path / "gn", 1, ["--norm", "gn"])[3:]) == 0
    seen = {}
    monkeypatch.setattr(cli, "fit", lambda model, tr, va, cfg, teacher=None: seen.update(cfg=cfg, teacher=teacher) or [])
    assert cli.main(_train_cmd(tmp_path / "s", 1, ["--teacher", str(first), "--distill", "0.9",
                                                   "--distill-temperature", "3"])[3:]) == 0
    want = torch.load(first / "checkpoint.pt", weights_only=True)["model"]
    got = seen["teacher"].state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not seen["teacher"].training and not any(p.requires_grad for p in seen["teacher"].parameters())
    assert (seen["cfg"].distill, seen["cfg"].distill_temperature) == (0.9, 3.0)
    assert cli.main(_train_cmd(tmp_path / "plain", 1)[3:]) == 0  # no --teacher: no distillation
    assert seen["teacher"] is None and seen["cfg"].distill == 0.0
    # no --teacher-model: the teacher is the student's architecture, its --model-arg included
    assert cli.main(_train_cmd(tmp_path / "s24", 1, [*wide, "--teacher", str(tmp_path / "wide")])[3:]) == 0
    assert seen["teacher"][0].out_channels == 24
    gn = ["--norm", "gn"]  # the student's --norm shapes the teacher too
    assert cli.main(_train_cmd(tmp_path / "sgn", 1, [*gn, "--teacher", str(tmp_path / "gn")])[3:]) == 0
    assert isinstance(seen["teacher"][1], torch.nn.GroupNorm)
    unfinished = torch.load(first / "checkpoint.pt", weights_only=True)
    unfinished["config"]["epochs"] = 5
    (tmp_path / "half").mkdir()
    torch.save(unfinished, tmp_path / "half" / "checkpoint.pt")
    for extra, msg in [(["--teacher-model", "tiny_cnn"], "--teacher-model needs --teacher"),
                       (["--distill", "0.9"], "--distill needs --teacher"),
                       (["--distill-temperature", "2"], "--distill-temperature needs --teacher"),
                       (["--teacher", str(first), "--distill-temperature", "0"], "--distill-temperature must be > 0"),
                       (["--teacher", str(tmp_path / "half")], "--teacher .*an unfinished run .epoch 1 of 5"),
                       (["--init-from", str(tmp_path / "half")], "--init-from .*an unfinished run"),
                       (["--teacher", str(first), "--distill", "0"], r"--distill must be in \(0, 1\]"),
                       (["--teacher", str(first), "--teacher-model", "cifar_resnet20"], "(?s)--teacher .*(size mismatch|Missing key)"),
                       (["--teacher", str(first), "--teacher-model", "no_such_model"], "--teacher-model")]:
        with pytest.raises(SystemExit, match=msg):
            cli.main(_train_cmd(tmp_path / "bad", 1, extra)[3:])
