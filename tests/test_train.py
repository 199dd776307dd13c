"""Training substrate: determinism, bit-exact resume after SIGKILL, DDP parity, metrics."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from secateurs.data import ArrayDataset, load_dataset
from secateurs.models import create_model
from secateurs.metrics import batch_stats, summarize
from secateurs.train import TrainConfig, evaluate, fit

ROOT = Path(__file__).resolve().parents[1]


def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def cfg(**kw):
    base = dict(epochs=2, batch_size=64, lr=0.05, pad=1, quiet=True, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_training_is_deterministic_and_learns():
    tr, te = digits()
    torch.manual_seed(0)
    a = create_model("tiny_cnn")
    torch.manual_seed(0)
    b = create_model("tiny_cnn")
    before = evaluate(a, te)["top1"]
    ha = fit(a, tr, te, cfg(epochs=4))
    hb = fit(b, tr, te, cfg(epochs=4))
    timeless = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
    assert len(ha) == len(hb) == 4 and timeless(ha) == timeless(hb)  # same losses, lr and metrics, epoch by epoch
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ha[-1]["val_top1"] > before + 20 and ha[-1]["val_top1"] == hb[-1]["val_top1"]


def test_step_budget_counts_optimizer_steps_and_ends_the_schedule():
    tr, _ = digits()  # 1437 images: 23 batches of 64 per epoch
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    calls = []

    def reg():
        calls.append(1)
        return torch.zeros(())

    history = fit(model, tr, None, cfg(steps=30, epochs=99), regularizer=reg)
    assert len(calls) == 30 and len(history) == 2  # one full epoch of 23 steps, then 7
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule spans the 30 steps
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="cutout"):
        TrainConfig(cutout=-1)


def test_training_stops_at_the_weights_a_regularizer_called_done():
    """A pruning budget met at a step is met by that step's weights: no optimizer step follows, which
    (HFP's gates swinging at a large weight) could lift dead gates back above the threshold."""
    tr, _ = digits()
    torch.manual_seed(0)
    model = create_model("tiny_cnn")

    class DoneAtThird:
        done, calls, seen = False, 0, None

        def __call__(self):
            self.calls += 1
            self.done = self.calls == 3
            if self.done:
                self.seen = [p.detach().clone() for p in model.parameters()]
            return torch.zeros(())

    reg = DoneAtThird()
    fit(model, tr, None, cfg(epochs=5), regularizer=reg)
    assert reg.calls == 3 and all(torch.equal(p, q) for p, q in zip(model.parameters(), reg.seen))


def test_resume_under_other_settings_says_which(tmp_path):
    tr, _ = digits()
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    fit(model, tr, None, cfg(epochs=1, milestones=(1,), out_dir=str(tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings (and a new thread layout): a plain resume
        fit(model, tr, None, cfg(epochs=1, milestones=(1,), out_dir=str(tmp_path), resume=True, channels_last=True))
    with pytest.warns(UserWarning, match=r"epoch 1 .*epochs 1 -> 2; lr 0.05 -> 0.01"):
        fit(model, tr, None, cfg(epochs=2, lr=0.01, milestones=(1,), out_dir=str(tmp_path), resume=True))


def _train_cmd(out, epochs, extra=()):
    return [sys.executable, "-m", "secateurs.cli", "train", "--model", "tiny_cnn", "--data", "digits",
            "--epochs", str(epochs), "--batch-size", "64", "--lr", "0.05", "--pad", "1", "--seed", "1",
            "--out", str(out), "--quiet", *extra]


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ref = tmp_path / "ref"
    cut = ["--cutout", "3"]  # the cutout squares are part of each epoch's seeded augmentation too
    subprocess.run(_train_cmd(ref, 3, cut), check=True, env=env, cwd=ROOT)
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(run, 3, ["--step-delay", "0.05", *cut]), env=env, cwd=ROOT)
    deadline = time.time() + 120
    while not (run / "log.csv").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # now inside epoch 2 (22 steps of 50 ms each)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1, "the kill should land in the second epoch"
    subprocess.run(_train_cmd(run, 3, ["--resume", *cut]), check=True, env=env, cwd=ROOT)
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert b["epoch"] == 3 and a["config"]["cutout"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["val_top1"] for r in a["history"]] == [r["val_top1"] for r in b["history"]]


def test_torchrun_two_processes_match_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    common = ["--model", "tiny_cnn", "--data", "digits", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
              "--pad", "1", "--seed", "2", "--quiet"]
    # no BatchNorm: per-process batch statistics would legitimately differ
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "secateurs.cli", "train", *common, "--out", str(one), "--norm", "gn"],
                   check=True, env=env, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "secateurs.cli", "train", *common, "--out", str(two), "--norm", "gn"],
                   check=True, env=env, cwd=ROOT)
    a = torch.load(one / "checkpoint.pt", weights_only=True)
    b = torch.load(two / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5), k
    assert abs(a["history"][-1]["val_top1"] - b["history"][-1]["val_top1"]) < 1.0


def test_sums_across_processes_travel_on_the_backends_device(monkeypatch):
    """NCCL reduces GPU tensors only: the epoch's loss and the evaluation sums (CPU tensors) go to the
    process's GPU for the reduce and come back; gloo keeps them on the CPU."""
    import torch.distributed as dist

    from secateurs import distributed

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t: (seen.append(t.device), t.mul_(2)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    assert distributed._collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    t = torch.tensor([1.0, 3.0], dtype=torch.float64)
    out = distributed.all_sum(t)
    assert seen == [torch.device("cpu")] and out.device == t.device and out.tolist() == [2.0, 6.0]


class _NarrowShortcut(torch.nn.Module):
    """A ResNet downsampling shortcut pruned to 7 channels: a strided 1x1 conv with 7 inputs."""

    def __init__(self, cin: int = 7) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, cin, 3, padding=1)
        self.shortcut = torch.nn.Conv2d(cin, 16, 1, stride=2, bias=False)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.shortcut(torch.relu(self.stem(x))).mean((2, 3)))


def test_channels_last_is_refused_where_the_cpu_backward_corrupts_memory():
    """torch's channels-last CPU backward of a strided 1x1 conv with < 8 inputs corrupts the heap
    (this test process would crash): fit warns, names the module and trains contiguous."""
    from secateurs.train import channels_last_hazard

    cpu = torch.device("cpu")
    assert channels_last_hazard(_NarrowShortcut(7), cpu) == "shortcut"
    assert channels_last_hazard(_NarrowShortcut(8), cpu) is None
    assert channels_last_hazard(create_model("tiny_cnn"), cpu) is None
    g = torch.Generator().manual_seed(0)  # 32px images: at 8px the corruption goes unnoticed
    tr = ArrayDataset("noise", torch.randint(0, 256, (256, 1, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (256,), generator=g), [str(i) for i in range(10)], mean=(0.5,), std=(0.25,))
    model, threads = _NarrowShortcut(7), torch.get_num_threads()
    model.to(memory_format=torch.channels_last)  # handed over channels-last, e.g. pruned from such a model
    torch.set_num_threads(1)  # where the unguarded kernel crashes reliably
    try:
        with pytest.warns(RuntimeWarning, match="'shortcut'"):
            hist = fit(model, tr, None, cfg(epochs=2, batch_size=32, channels_last=True))
    finally:
        torch.set_num_threads(threads)
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert model.shortcut.weight.is_contiguous() and model.stem.weight.is_contiguous()


def test_segmentation_metrics_by_hand():
    y = torch.tensor([[[0, 1], [1, 1]]])
    out = torch.tensor([[[[5.0, 0.0], [5.0, 0.0]], [[0.0, 5.0], [0.0, 5.0]]]])  # predicts [[0,1],[0,1]]
    m = summarize(batch_stats(out, y, "segmentation", 2), "segmentation", 2)
    assert m["pixel_acc"] == 75.0
    assert m["iou"] == pytest.approx(100 * 2 / 3)  # foreground: inter 2, union 3
    assert m["dice"] == pytest.approx(100 * 4 / 5)


def test_unlabelled_pixels_count_nowhere():
    """IGNORE_INDEX (VOC's void) pixels: no metric and no loss, whatever the network predicts there."""
    from secateurs.data import IGNORE_INDEX
    from secateurs.train import task_loss

    y = torch.tensor([[[0, 1], [IGNORE_INDEX, 1]]])
    out = torch.tensor([[[[5.0, 0.0], [0.0, 0.0]], [[0.0, 5.0], [5.0, 5.0]]]])  # predicts [[0,1],[1,1]]
    m = summarize(batch_stats(out, y, "segmentation", 2), "segmentation", 2)
    assert m["pixel_acc"] == 100.0 and m["iou"] == 100.0 and m["miou"] == 100.0  # the void pixel's 1 is no error
    labelled = torch.tensor([[[0, 1], [0, 1]]])
    by_hand = F.cross_entropy(out.permute(0, 2, 3, 1).reshape(-1, 2)[[0, 1, 3]], labelled.flatten()[[0, 1, 3]])
    assert torch.allclose(task_loss(out, y), by_hand)
    with pytest.raises((IndexError, RuntimeError)):  # without the ignore label, 255 is a class the model lacks
        F.cross_entropy(out, y)


def test_classification_metrics_by_hand():
    out = torch.eye(6)[[0, 1, 2, 3]] * 10 + torch.arange(6) * 0.1
    y = torch.tensor([0, 1, 5, 4])
    m = summarize(batch_stats(out, y, "classification", 6), "classification", 6)
    assert m["top1"] == 50.0 and m["top5"] == 100.0


def test_config_validation():
    with pytest.raises(ValueError, match="`optimizer` must be 'sgd' or 'adamw', got 'adam'"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="`epochs` must be a positive int"):
        TrainConfig(epochs=0)
    for kwargs, name in (({"lr": -1.0}, "lr"), ({"label_smoothing": 1.5}, "label_smoothing"),
                         ({"pad": -1}, "pad"), ({"warmup_epochs": -1}, "warmup_epochs")):
        with pytest.raises(ValueError, match=f"`{name}` must be"):
            TrainConfig(**kwargs)


def test_a_class_neither_predicted_nor_present_is_left_out_of_the_means():
    """A perfect prediction on 3 classes where class 2 never appears scored IoU 50 (class 2 as 0)."""
    y = torch.tensor([[[0, 1], [1, 0]]])
    out = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() * 5
    m = summarize(batch_stats(out, y, "segmentation", 3), "segmentation", 3)
    assert m["pixel_acc"] == m["iou"] == m["dice"] == m["miou"] == 100.0


def test_a_batch_without_labelled_pixels_adds_no_nan():
    from secateurs.data import IGNORE_INDEX
    from secateurs.metrics import task_loss

    out = torch.randn(1, 2, 2, 2, requires_grad=True)
    loss = task_loss(out, torch.full((1, 2, 2), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(out.grad, torch.zeros_like(out))


def test_too_little_data_is_refused_naming_it():
    ds = ArrayDataset("toy", torch.randint(0, 255, (5, 1, 8, 8), dtype=torch.uint8), torch.arange(5) % 2, ["a", "b"])
    model = create_model("tiny_cnn", in_chans=1, width=4, num_classes=2)
    with pytest.raises(ValueError, match="`train_ds` has 5 samples, fewer than one batch"):
        fit(model, ds, None, TrainConfig(epochs=1, batch_size=8, quiet=True))  # trained nothing, silently
    with pytest.raises(ValueError, match="`ds` .* is empty"):
        evaluate(model, ArrayDataset("empty", ds.images[:0], ds.targets[:0], ["a", "b"]))


@pytest.mark.shared_data("isbi2012-membranes")
def test_segmentation_training_runs_on_isbi():
    tr = load_dataset("isbi2012", "train").subset(4)
    te = load_dataset("isbi2012", "test").subset(2)
    assert tr.images.shape == (4, 1, 512, 512) and set(tr.targets.unique().tolist()) == {0, 1}
    te = ArrayDataset(te.name, te.images[..., :128, :128], te.targets[..., :128, :128], te.classes, te.task, te.mean, te.std)
    torch.manual_seed(0)
    m = create_model("unet", base=4, depth=2)
    h = fit(m, tr, te, TrainConfig(epochs=1, batch_size=2, lr=0.01, crop=64, quiet=True))
    assert {"val_pixel_acc", "val_iou", "val_dice"} <= set(h[0])


def test_tensorboard_logging_is_optional(tmp_path):
    with pytest.raises(ValueError, match="`tensorboard` needs `out_dir`"):
        cfg(tensorboard=True)
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tr, te = digits()
    fit(create_model("tiny_cnn"), tr.subset(200, 0), te.subset(100, 0), cfg(epochs=2, out_dir=str(tmp_path), tensorboard=True))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val_top1")] == [1, 2]
    assert {"loss", "lr", "val_top1", "val_top5"} <= set(acc.Tags()["scalars"])


def test_train_init_from_starts_a_second_stage_from_an_earlier_run(tmp_path, monkeypatch):
    from secateurs import cli

    first = tmp_path / "first"
    assert cli.main(_train_cmd(first, 1)[3:]) == 0
    seen = {}
    monkeypatch.setattr(cli, "fit", lambda model, *a, **k: seen.update(model.state_dict()) or [])
    # --resume with nothing to resume yet (how scripts/baselines.sh calls it): the weights are loaded
    assert cli.main(_train_cmd(tmp_path / "second", 1, ["--init-from", str(first), "--lr", "0.01", "--resume"])[3:]) == 0
    want = torch.load(first / "checkpoint.pt", weights_only=True)["model"]
    assert set(seen) == set(want) and all(torch.equal(seen[k], want[k]) for k in want)
    with pytest.raises(SystemExit, match="--init-from .*missing.pt"):
        cli.main(_train_cmd(tmp_path / "third", 1, ["--init-from", str(tmp_path / "missing.pt")])[3:])
    other = _train_cmd(tmp_path / "fourth", 1, ["--init-from", str(first)])
    other[other.index("tiny_cnn")] = "cifar_resnet20"
    with pytest.raises(SystemExit, match="(?s)--init-from .*(size mismatch|Missing key)"):
        cli.main(other[3:])


def test_the_label_check_sees_labels_edited_in_place():
    """The range is remembered per targets tensor for evaluate's every call, and read again after an
    in-place edit; unlabelled mask pixels never count."""
    from secateurs.metrics import check_labels

    from secateurs.data import IGNORE_INDEX, ArrayDataset

    tr, _ = digits()
    ds = ArrayDataset("d", tr.images[:32].clone(), tr.targets[:32].clone(), tr.classes)  # its own tensors to edit
    check_labels(ds, 10, "ds")
    ds.targets[3] = 12
    with pytest.raises(ValueError, match=r"`ds` \(.*\) has labels 0..12 but the model outputs 10 classes"):
        check_labels(ds, 10, "ds")
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    masks[0, 0, 0], masks[1] = 1, IGNORE_INDEX
    seg = ArrayDataset("toy-seg", torch.zeros(2, 1, 4, 4, dtype=torch.uint8), masks, ["bg", "fg"], task="segmentation")
    check_labels(seg, 2, "ds")
    with pytest.raises(ValueError, match="has labels 0..1 but the model outputs 1 classes"):
        check_labels(seg, 1, "ds")
