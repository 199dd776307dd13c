"""The dense/pruned latency guard: compare_dense_pruned, and the report, CLI and API that call it.
No assertion on how fast anything is: the clock is replaced where a number is checked."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from secateurs import latency
from secateurs.latency import compare_dense_pruned


def test_guard_flags_a_pruned_model_that_is_slower(monkeypatch):
    dense, pruned = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 3)

    def fake(models, x, repeats, warmup, threads, runtime):
        b = x.shape[0]
        drift = [1 + 0.5 * (r % 3) for r in range(repeats)]  # a slow spell of the machine hits both models of a round
        return {"dense": drift, "pruned": [d * (0.5 if b == 1 else 1.2) for d in drift]}, 2, b

    monkeypatch.setattr(latency, "_timed", fake)
    out = compare_dense_pruned(dense, pruned, torch.randn(1, 3, 8, 8))
    assert out["slower"] == [8] and out["threads"] == 2
    assert [r["batch"] for r in out["rows"]] == [1, 8] and out["rows"][0]["speedup"] == pytest.approx(2.0)
    assert out["rows"][0]["speedup_interval"] == pytest.approx([2.0, 2.0])  # paired: the drift cancels
    assert out["rows"][0]["dense_interval_ms"] == pytest.approx([1000, 2000])  # unpaired medians keep it


def test_guard_times_a_slower_batch_again_and_reports_only_what_the_second_timing_confirms(monkeypatch):
    """A spell that falls on the pruned model for one whole timing is not a slower model; one that is
    slower in both timings is."""
    calls = []

    def fake(models, x, repeats, warmup, threads, runtime):
        b = x.shape[0]
        calls.append(b)
        first = calls.count(b) == 1
        ratio = {1: 1.2 if first else 0.8, 8: 1.2}[b]  # batch 1: slower once; batch 8: slower twice
        return {"dense": [1.0] * repeats, "pruned": [ratio] * repeats}, 2, b

    monkeypatch.setattr(latency, "_timed", fake)
    out = compare_dense_pruned(nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8))
    assert calls == [1, 1, 8, 8] and out["slower"] == [8]
    b1, b8 = out["rows"]
    assert b1["timings"] == 2 and b1["timing_speedups"] == pytest.approx([1 / 1.2, 1.25])
    assert 1 / 1.2 <= b1["speedup"] <= 1.25  # both timings' rounds pooled: neither one's figure is kept alone
    assert b8["timing_speedups"] == pytest.approx([1 / 1.2, 1 / 1.2]) and b8["speedup_interval"][1] < 1


def _seconds_per_sample(monkeypatch, pruned: float):
    """A clock where the dense model takes 1 s a sample and the pruned one ``pruned`` s: the batch
    sizes timed (a list that fills as the guard runs) and the models and input to guard."""
    calls = []

    def fake(models, x, repeats, warmup, threads, runtime):
        calls.append(x.shape[0])
        return {"dense": [1.0 * x.shape[0]] * repeats, "pruned": [pruned * x.shape[0]] * repeats}, 2, x.shape[0]

    monkeypatch.setattr(latency, "_timed", fake)
    return calls, (nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8))


def test_a_second_timing_that_would_pass_the_bound_is_not_run(monkeypatch):
    """1.2 s a sample, slower: timing batch 1 again is estimated at 84 s, which fits a 200 s bound
    and not an 80 s one, where the verdict stands unconfirmed (batch 8 is left out of both)."""
    calls, (dense, pruned, x) = _seconds_per_sample(monkeypatch, pruned=1.2)
    out = compare_dense_pruned(dense, pruned, x, max_seconds=80)
    assert calls == [1] and out["slower"] == [1] and out["rows"][0]["confirmed"] is False
    calls.clear()
    assert compare_dense_pruned(dense, pruned, x, max_seconds=200)["slower"] == [1] and calls == [1, 1]


def test_guard_feeds_every_input_of_a_model_with_several():
    class Two(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, width, 3), nn.Conv2d(3, width, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    x = (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    out = compare_dense_pruned(Two(8), Two(4), x, batches=(1, 2), repeats=6, threads=1)
    assert [r["batch"] for r in out["rows"]] == [1, 2] and out["repeats"] == 6


def test_guard_leaves_out_a_batch_that_would_pass_its_time_bound(monkeypatch):
    """A slow model (1 s a sample): batch 8 would take 2 x 35 x 8 s, so a 100 s bound times batch 1
    only and says so; the report's table names the batch left out."""
    from secateurs.report import format_table

    timed, (dense, pruned, x) = _seconds_per_sample(monkeypatch, pruned=0.5)
    out = compare_dense_pruned(dense, pruned, x, max_seconds=100)
    assert timed == [1] and [r["batch"] for r in out["rows"]] == [1]
    assert out["skipped"] == [{"batch": 8, "estimated_s": 560.0}]
    assert compare_dense_pruned(dense, pruned, x, max_seconds=600)["skipped"] == []
    assert timed == [1, 1, 8]
    report = {"before": {"macs": 1, "params": 1}, "after": {"macs": 1, "params": 1}, "latency": out}
    assert "latency b8 not timed: about 560 s" in format_table(report)
    # a pruned model slower than the dense one (what the guard is for) sets the estimate
    monkeypatch.setattr(latency, "_timed", lambda models, x, repeats, *a: (
        {k: [v * x.shape[0]] * repeats for k, v in (("dense", 1.0), ("pruned", 2.0))}, 2, x.shape[0]))
    assert compare_dense_pruned(dense, pruned, x, max_seconds=600)["skipped"] == [{"batch": 8, "estimated_s": 1120.0}]


def test_cli_report_says_loudly_when_the_pruned_model_is_slower(tmp_path, monkeypatch, capsys):
    import secateurs.cli as cli
    import secateurs.report

    def slower(dense, pruned, x, **kw):
        return {"runtime": "eager", "repeats": 30, "threads": 2, "slower": [8],
                "rows": [{"batch": 1, "dense_ms": 2.0, "pruned_ms": 1.0}, {"batch": 8, "dense_ms": 9.0, "pruned_ms": 11.0, "timings": 2}]}

    monkeypatch.setattr(secateurs.report, "compare_dense_pruned", slower)
    assert cli.main(["prune", "--model", "tiny_cnn", "--input-size", "1", "1", "8", "8", "--macs", "0.5", "--no-onnx",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "SLOWER than the dense one on this machine at batch 8 (11.00 ms vs 9.00 ms, in two timings)" in out.err
    assert "SLOWER" in out.out  # in the printed table too
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["after"]["latency_b8_ms"] == 11.0 and report["latency"]["slower"] == [8] and report["warnings"]


def _guarded(monkeypatch):
    """The guard's calls, with the two models it was given (their conv widths)."""
    import secateurs.pipeline

    calls = []

    def record(dense, model, x, report, threads):
        calls.append(([m.out_channels for m in dense.modules() if isinstance(m, nn.Conv2d)],
                      [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]))
        report["guard_threads"] = threads
        report["latency"] = {"rows": [], "slower": []}

    monkeypatch.setattr(secateurs.pipeline, "time_against_dense", record)
    return calls


def test_api_prune_that_trains_times_the_pruned_model_against_the_unpruned_one(monkeypatch):
    """Issue 19's guard after any prune that costs minutes anyway: the API report holds it too, the
    unpruned model (not a copy taken after the cut) on one side; a bare cut stays as fast as it is."""
    import secateurs
    from secateurs.data import load_dataset
    from secateurs.models import create_model
    from secateurs.train import TrainConfig

    calls = _guarded(monkeypatch)
    ds = load_dataset("digits", "train").subset(128, 0)
    x = torch.randn(1, 1, 8, 8)
    ft = TrainConfig(epochs=1, batch_size=64, pad=1, quiet=True)
    model, report = secateurs.prune(create_model("tiny_cnn", num_classes=10, in_chans=1), x, "l1", 0.5, data=ds, finetune=ft)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    full = [m.out_channels for m in create_model("tiny_cnn", num_classes=10, in_chans=1).modules() if isinstance(m, nn.Conv2d)]
    assert calls == [(full, widths)] and widths != full
    assert "latency" in report and report["timings"]["latency_guard_s"] >= 0
    _, report = secateurs.prune(create_model("tiny_cnn", num_classes=10, in_chans=1), x, "l1", 0.5)
    assert len(calls) == 1 and "latency" not in report  # a bare cut: not timed unless asked
    _, report = secateurs.prune(create_model("tiny_cnn", num_classes=10, in_chans=1), x, "l1", 0.5, latency_guard=True,
                                latency_threads=1)
    assert len(calls) == 2 and report["guard_threads"] == 1  # the thread count a latency plan was made for
    secateurs.prune(create_model("tiny_cnn", num_classes=10, in_chans=1), x, "l1", 0.5, data=ds, finetune=ft,
                    latency_guard=False)
    assert len(calls) == 2


def test_api_guard_times_on_the_device_training_left_the_model_on(monkeypatch):
    """After a GPU fine-tuning the pruned model is on the GPU: the unpruned copy and the inputs go there
    too (the harness synchronises CUDA), never a CPU model against a GPU one."""
    import secateurs.report as report_module
    from secateurs.models import create_model

    seen = {}

    def fake(dense, model, x, **kw):
        seen.update(dense=next(dense.parameters()).device, x=x.device)
        return {"rows": [], "slower": [], "skipped": []}

    monkeypatch.setattr(report_module, "compare_dense_pruned", fake)
    dense, pruned = create_model("tiny_cnn"), create_model("tiny_cnn")
    report = {"before": {}, "after": {}}
    report_module.latency_guard(dense, pruned.to("meta"), torch.randn(1, 3, 8, 8), report)
    assert seen == {"dense": torch.device("meta"), "x": torch.device("meta")} and report["latency"]["device"] == "meta"


def test_api_guard_leaves_nested_inputs_untimed():
    """A detection model takes a list of images: the harness batches flat tensors only, so the default
    guard stands aside (the prune must not fail after its cut); an explicit True is refused first
    (tests/test_bad_inputs.py, prune-latency-guard-nested)."""
    from types import SimpleNamespace

    from secateurs.pipeline import _guard_wanted

    x = ([torch.randn(3, 8, 8), torch.randn(3, 8, 8)],)
    trains = SimpleNamespace(finetune=object(), how=SimpleNamespace(trains=True), budget=None)
    assert _guard_wanted(x, trains, None) is False  # would have been timed with tensor inputs
    assert _guard_wanted((torch.randn(2, 3, 8, 8), torch.tensor(10)), trains, None) is False  # 0-d: no batch
    assert _guard_wanted((torch.randn(2, 3, 8, 8),), trains, None) is True


def test_a_guard_that_cannot_time_warns_and_keeps_the_finished_prune(monkeypatch):
    """The guard runs after the cut and its fine-tuning: a failure there (a GPU out of memory at batch 8,
    a forward that hard-codes batch 1) is said in the report and a RuntimeWarning, never raised."""
    import secateurs
    import secateurs.report as report_module
    from secateurs.models import create_model

    def fails(*a, **kw):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(report_module, "compare_dense_pruned", fails)
    x = torch.randn(1, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="latency guard could not time the models: RuntimeError: CUDA out of memory"):
        model, report = secateurs.prune(create_model("tiny_cnn", num_classes=10, in_chans=1), x, "l1", 0.5,
                                        latency_guard=True)
    assert 0.45 <= report["kept"]["macs"] <= 0.5 and secateurs.count(model, x).macs == report["after"]["macs"]
    assert "latency" not in report and any("CUDA out of memory" in w for w in report["warnings"])


def test_a_prune_that_removed_nothing_is_not_timed(monkeypatch):
    """Two copies of one model would be timed against each other (a false SLOWER about 2.5% of runs)."""
    import secateurs
    from secateurs.models import create_model

    calls = _guarded(monkeypatch)
    _, report = secateurs.prune(create_model("tiny_cnn", num_classes=10, in_chans=1), torch.randn(1, 1, 8, 8), "l1",
                                {"ratio": 0.0}, latency_guard=True)
    assert report["kept"]["macs"] == 1.0 and calls == []
