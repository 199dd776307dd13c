"""The collapse guard: a cut that leaves a model predicting one class for everything, where the
unpruned model did clearly better, is said loudly; a healthy cut, or a model no better than a
constant before the cut, is not."""
import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs.data import IGNORE_INDEX, ArrayDataset, Batches
from secateurs.report import collapse_guard, guard_samples, predictions
from secateurs.train import TrainConfig

X = torch.randn(1, 3, 16, 16)


def _images(n: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


class Net(nn.Module):
    """Channels 0-2: large weights (the highest L1 norms) behind a bias that keeps them dead, 0 for
    every input; channel 3: small weights, alive, and the only one the head reads a class from."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:3] = 1.0
            self.conv.bias[:3] = -1e4  # dead: ReLU(w x - 1e4) = 0 for normalised images
            self.conv.weight[3, 0] = 0.01 * torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
            self.conv.bias[3] = 0.0
            self.fc.weight.zero_()
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def _task() -> tuple[Net, ArrayDataset]:
    """A net whose head splits the live channel at its median (class 0 above, 2 below), and images
    labelled by what it predicts: the unpruned model is right on every one."""
    net, images = Net(), _images()
    blank = ArrayDataset("toy", images, torch.zeros(len(images), dtype=torch.long), ["a", "b", "c"],
                         mean=(0.5,) * 3, std=(0.25,) * 3)
    x = next(iter(Batches(blank, len(blank), train=False)))[0]
    with torch.no_grad():
        a = net.pool(net.relu(net.conv(x)))[:, 3].flatten()
        m, k = a.median().item(), 1.0 / max(a.std().item(), 1e-6)
        net.fc.weight[:, 3] = torch.tensor([k, 0.0, -k])
        net.fc.bias.copy_(torch.tensor([-k * m, 0.0, k * m]))
        labels = net(x).argmax(1)
    return net, ArrayDataset("toy", images, labels, blank.classes, mean=blank.mean, std=blank.std)


def test_a_cut_that_kills_the_last_live_channel_is_reported_as_collapsed(capsys):
    net, ds = _task()
    assert predictions(net, guard_samples(ds)).unique().tolist() == [0, 2]
    # L1 ranks the live channel lowest; 80% of the MACs removes exactly it
    pruned, report = secateurs.prune(net, X, "l1", 0.8, val_data=ds, latency_guard=False)
    assert pruned.conv.out_channels == 3
    c = report["collapsed"]
    assert c["predicted_class"] == 2 and c["accuracy_before"] == 1.0  # the head's bias alone decides now
    assert c["accuracy_after"] == pytest.approx((ds.targets == 2).float().mean().item())
    assert any("COLLAPSED" in w for w in report["warnings"])
    assert "COLLAPSED" in capsys.readouterr().err
    assert "COLLAPSED" in secateurs.report.format_table(report)


def test_a_collapse_with_no_training_after_the_cut_advises_fine_tuning_first():
    """A one-shot cut is often constant until fine-tuned: the advice says so, and a collapse that
    survived fine-tuning (here a learning rate too small to move anything) blames the widths alone."""
    net, ds = _task()
    _, report = secateurs.prune(net, X, "l1", 0.8, val_data=ds, latency_guard=False)
    assert report["collapsed"]["trained_after_cut"] is False
    assert "nothing was trained after the cut" in report["warnings"][0]
    net, ds = _task()
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-12, quiet=True, distill=0.0)
    _, report = secateurs.prune(net, X, "l1", 0.8, data=ds, val_data=ds, finetune=cfg, latency_guard=False)
    assert report["collapsed"]["trained_after_cut"] is True
    assert "nothing was trained" not in report["warnings"][0] and "cut too narrow" in report["warnings"][0]


def test_a_method_that_trains_before_its_cut_is_not_counted_as_trained_after_it(monkeypatch):
    """importance-weights trains its weights, then cuts: with no fine-tuning nothing trains after the cut."""
    seen = []
    real = secateurs.pipeline.collapse_guard
    monkeypatch.setattr(secateurs.pipeline, "collapse_guard", lambda *a, **kw: seen.append(kw["trained"]) or real(*a, **kw))
    net, ds = _task()
    ds = ArrayDataset("toy", ds.images.repeat(3, 1, 1, 1), ds.targets.repeat(3), ds.classes, mean=ds.mean, std=ds.std)
    secateurs.prune(net, X, "importance-weights", 0.8, data=ds, latency_guard=False, method_options={"epochs": 1})
    assert seen == [False]


def test_a_healthy_prune_is_not_flagged():
    net, ds = _task()
    with torch.no_grad():  # the dead channels now alive and weak: L1 cuts one of them, the live one stays
        net.conv.weight[:3] = 1e-4
        net.conv.bias[:3] = 0.0
    _, report = secateurs.prune(net, X, "l1", 0.8, data=ds, latency_guard=False)
    assert "collapsed" not in report and not report.get("warnings")


def test_a_model_no_better_than_a_constant_before_the_cut_is_not_blamed_on_it():
    net, ds = _task()
    ds = ArrayDataset("toy", ds.images, torch.arange(len(ds)) % 3, ds.classes, mean=ds.mean, std=ds.std)
    _, report = secateurs.prune(net, X, "l1", 0.8, data=ds, latency_guard=False)  # labels unrelated to it
    assert "collapsed" not in report


def test_segmentation_reads_labelled_pixels_only():
    images = _images(4)
    masks = (images[:, 0] > 127).long()
    masks[:, :2] = IGNORE_INDEX
    ds = ArrayDataset("toy-seg", images, masks, ["bg", "fg"], task="segmentation")

    class Constant(nn.Module):  # background everywhere, whatever the image
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.bias.copy_(torch.tensor([1.0, 0.0]))

        def forward(self, x):
            return self.conv(x)

    labelled, samples = masks[masks != IGNORE_INDEX], guard_samples(ds)
    assert torch.equal(samples.y, labelled)
    assert torch.equal(predictions(Constant(), samples), torch.zeros_like(labelled))
    report: dict = {}
    collapse_guard(Constant(), samples, report, before=labelled.clone())  # the unpruned model was right everywhere
    assert report["collapsed"]["accuracy_after"] == pytest.approx((labelled == 0).float().mean().item())

    report = {}
    collapse_guard(Constant(), samples, report, before=1 - labelled)  # wrong everywhere before: not the cut's doing
    assert "collapsed" not in report


@pytest.mark.parametrize("data", [None, [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))]])
def test_data_it_cannot_read_is_not_checked(data):
    report: dict = {}
    assert guard_samples(data) is None and predictions(Net(), guard_samples(data)) is None
    collapse_guard(Net(), guard_samples(data), report, before=torch.tensor([0, 1]))
    assert report == {}


def test_the_held_out_split_is_read_when_given():
    """``data`` here is labelled so that the cut model's constant is right: only ``val_data`` shows the collapse."""
    net, val = _task()
    data = ArrayDataset("toy", val.images, torch.full_like(val.targets, 2), val.classes, mean=val.mean, std=val.std)
    _, report = secateurs.prune(net, X, "l1", 0.8, data=data, val_data=val, latency_guard=False)
    assert "collapsed" in report


def test_outputs_without_class_scores_are_not_checked_nor_warned_about():
    class Wrapped(nn.Module):  # a dict without "out", and one logit per sample
        def __init__(self, net, kind):
            super().__init__()
            self.net, self.kind = net, kind

        def forward(self, x):
            out = self.net(x)
            return {"logits": out} if self.kind == "dict" else out[:, 0]

    for kind in ("dict", "binary"):
        net, ds = _task()
        _, report = secateurs.prune(Wrapped(net, kind), X, "l1", 0.8, data=ds, latency_guard=False)
        assert "collapsed" not in report and not report.get("warnings"), kind


def test_the_models_train_and_eval_modes_are_left_as_they_were():
    net, ds = _task()
    net.train()
    net.pool.eval()  # a frozen submodule inside a training model
    samples = guard_samples(ds)
    predictions(net, samples)
    assert net.training and net.conv.training and not net.pool.training


def test_a_resumed_run_compares_with_the_unpruned_model(tmp_path):
    """The unpruned model's predictions are taken before a resume loads a finished step's weights."""
    from secateurs.train import TrainConfig

    cfg = TrainConfig(steps=1, lr=1e-9, batch_size=16, quiet=True)  # a step that changes nothing: the collapse stays
    net, ds = _task()
    dense = {k: v.clone() for k, v in net.state_dict().items()}
    _, first = secateurs.prune(net, X, "l1", 0.8, data=ds, finetune=cfg, out_dir=tmp_path, latency_guard=False)
    assert "collapsed" in first
    again, _ = _task()
    again.load_state_dict(dense)
    _, resumed = secateurs.prune(again, X, "l1", 0.8, data=ds, finetune=cfg, out_dir=tmp_path, resume=True,
                                 latency_guard=False)
    assert resumed["collapsed"] == first["collapsed"]
