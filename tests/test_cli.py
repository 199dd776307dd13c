"""The command line end to end on digits: run folder, config files, bad input, resume after a kill."""
from __future__ import annotations

import json

import pytest
import torch

import secateurs
from secateurs.cli import main
from secateurs.data import load_dataset

FAST = ["--model", "tiny_cnn", "--data", "digits", "--batch-size", "32", "--lr", "0.05"]


def test_prune_cli_writes_a_complete_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", *FAST, "--macs", "0.5", "--finetune-epochs", "1", "--round-to", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MACs (M)" in printed and "top1" in printed and "latency b8 (ms)" in printed
    for f in ("model.safetensors", "model.json", "model.onnx", "report.json", "report.md", "widths.png", "schedule.png"):
        assert (out / f).stat().st_size > 0, f
    report = json.loads((out / "report.json").read_text())
    assert 0.49 <= report["kept"]["macs"] <= 0.5 and report["onnx"]["max_rel_diff"] < 1e-4
    model = secateurs.load(out)
    x = torch.randn(1, 1, 8, 8)
    assert secateurs.count(model, x).macs == report["after"]["macs"]
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 2 == 0 for w in widths), widths
    ds = load_dataset("digits", "test")
    assert abs(secateurs.train.evaluate(model, ds)["top1"] - report["after"]["metric"]) < 1e-9


@pytest.mark.parametrize("extra,expected", [([], 512), (["--reconstruct", "0"], None), (["--reconstruct", "64"], 64),
                                            (["--method", "heuristic"], None)])
def test_a_criterion_cut_with_data_is_reconstructed_by_default(tmp_path, extra, expected):
    """On by default where it measured better (a criterion's cut, training images given); off when
    asked, and for the methods it was not measured with."""
    out = tmp_path / "run"
    assert main(["prune", *FAST, "--macs", "0.5", "--no-onnx", "--no-latency", "--quiet", "--out", str(out), *extra]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (report.get("reconstruct") or None) == expected
    assert ("reconstruction" in report["method_output"]) == (expected is not None)


def test_a_unet_on_frames_of_any_size_is_pruned_and_refitted_from_the_command_line(tmp_path):
    """HeLa's 700x1100 frames: the example input was the raw frame size, on which the U-Net cannot run
    (700 is not a multiple of the 16 its poolings need), so `prune --data hela` failed before any
    work, and so did the default re-fit on whole frames. Both now take the frames padded as evaluation
    pads them (to 704x1120), and the MACs are counted at that size."""
    out = tmp_path / "run"
    assert main(["prune", "--pretrained", "unet16_hela", "--data", "hela", "--macs", "0.5", "--subset", "2",
                 "--val-subset", "1", "--reconstruct", "2", "--no-onnx", "--no-latency", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["reconstruct"] == 2 and report["method_output"]["reconstruction"]["1"]
    model = secateurs.load(out)
    assert secateurs.count(model, torch.randn(1, 1, 704, 1120)).macs == report["after"]["macs"]
    assert report["after"]["metric"] > 50  # IoU: the re-fitted cut still segments


def test_config_file_sets_options_and_rejects_unknown_keys(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: cifar_resnet20\ninput-size: [1, 3, 32, 32]\nlayers:\n  layer1.0.conv1: 0.5\nno_onnx: true\nno_latency: true\n")
    assert main(["prune", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 0
    model = secateurs.load(tmp_path / "r")
    assert model.layer1[0].conv1.out_channels == 8 and model.layer1[1].conv1.out_channels == 16
    cfg.write_text("model: cifar_resnet20\nmacs: 0.5\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit, match="unknown key.*learning_rate; valid keys: .*lr"):
        main(["prune", "--config", str(cfg)])


@pytest.mark.parametrize("args,msg", [
    (["--macs", "0"], r"--macs: a macs target is the kept fraction, in \(0, 1\]; got 0.0"),
    (["--params", "1.5"], r"--params: a params target is the kept fraction"),
    (["--macs", "0.5", "--method", "l7"], "--method: unknown method 'l7'; criteria \\(pruned to a budget\\): bn_scale, l1, l2"),
    (["--macs", "0.5", "--allocation", "greedy"], "--allocation: `allocation` must be one of global, uniform, latency"),
    ([], "give exactly one budget"),
    (["--macs", "0.5", "--finetune-epochs", "1", "--data", ""], "--finetune-epochs needs --data"),
    (["--macs", "0.5", "--reconstruct", "256"], "--reconstruct needs --data"),
    (["--macs", "0.5", "--reconstruct", "-1", "--data", "cifar10"], "--reconstruct: a number of calibration images"),
])
def test_bad_input_fails_before_any_work(tmp_path, args, msg):
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=msg):
        main(["prune", "--model", "cifar_resnet20", "--input-size", "1", "3", "32", "32", *args, "--out", str(out)])
    assert not out.exists()


def test_killed_iterative_run_resumes_to_the_same_model(tmp_path, monkeypatch):
    args = ["prune", *FAST, "--params", "0.4", "--steps", "2", "--finetune-epochs", "1", "--no-onnx", "--no-latency"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    real_fit = secateurs.train.fit
    calls = []

    def dies_in_step_two(model, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed while fine-tuning step 2
        return real_fit(model, *a, **k)

    monkeypatch.setattr(secateurs.pipeline, "fit", dies_in_step_two)  # where fit is called
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "cut")])
    state = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert state["completed_steps"] == 1
    monkeypatch.setattr(secateurs.pipeline, "fit", real_fit)  # where fit is called
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a, b = secateurs.load(tmp_path / "full"), secateurs.load(tmp_path / "cut")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("full", "cut"))
    assert ra["steps"] == rb["steps"]


def test_sensitivity_cli_writes_json_and_plot(tmp_path, capsys):
    assert main(["sensitivity", *FAST[:4], "--ratios", "0.5", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sensitivity.json").read_text())
    assert result["ratios"] == [0.5] and len(result["groups"]) == 3
    assert (tmp_path / "sensitivity.png").stat().st_size > 0 and "most sensitive" in capsys.readouterr().out


def test_the_guard_times_both_models_in_the_pruned_models_layout(monkeypatch):
    """Fine-tuned channels-last, the pruned model runs other kernels than a contiguous dense copy:
    the guard must time both channels-last, not compare two layouts."""
    import secateurs.report as report_module
    from secateurs.models import create_model

    seen = []
    monkeypatch.setattr(report_module, "compare_dense_pruned", lambda dense, model, x, **kw: seen.append(kw["runtime"]) or
                        {"rows": [], "slower": [], "skipped": []})
    dense = create_model("cifar_resnet20")
    pruned = create_model("cifar_resnet20").to(memory_format=torch.channels_last)
    report = {"before": {}, "after": {}}
    report_module.latency_guard(dense, pruned, torch.randn(1, 3, 32, 32), report)
    report_module.latency_guard(dense, dense, torch.randn(1, 3, 32, 32), report)
    assert seen == ["channels_last", "eager"]


def test_holdout_gives_the_stop_rule_training_samples_and_reports_the_test_split(tmp_path, capsys):
    """With --holdout the tolerance reads held-out training samples and the test split is only
    reported; without it the run says that the test split chose where the schedule stopped."""
    out = tmp_path / "held"
    args = ["prune", *FAST, "--macs", "0.7", "--tolerance", "50", "--no-onnx", "--no-latency"]
    assert main([*args, "--holdout", "200", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    model = secateurs.load(out)
    test = load_dataset("digits", "test")
    assert report["test"]["samples"] == len(test) and not report.get("warnings")
    assert report["test"]["after"]["top1"] == secateurs.train.evaluate(model, test)["top1"]
    held = load_dataset("digits", "train").holdout(200)[1]
    assert report["after"]["metric"] == secateurs.train.evaluate(model, held)["top1"]
    assert "200 held-out training samples" in report["protocol"]
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("test top1")]
    assert printed and printed[0][2:4] == [f"{report['test'][k]['top1']:.2f}" for k in ("before", "after")]
    assert main([*args, "--out", str(tmp_path / "test")]) == 0
    report = json.loads((tmp_path / "test" / "report.json").read_text())
    assert "test" not in report and "read the test split" in report["warnings"][0]
    assert "pass --holdout N" in capsys.readouterr().err


def test_a_failing_command_leaves_a_torchrun_group_open_and_a_clean_one_closes_it(tmp_path, monkeypatch):
    """Errors leave through SystemExit, which skips the except hook: the command itself marks the
    process failed, so its exit does not close a group that peers may still be blocked in."""
    from secateurs import distributed

    monkeypatch.setitem(distributed._EXIT, "crashed", False)
    assert main(["analyze", "--model", "tiny_cnn", "--input-size", "1", "1", "16", "16"]) == 0
    assert distributed._EXIT["crashed"] is False
    with pytest.raises(SystemExit, match="no_such_model"):
        main(["analyze", "--model", "no_such_model"])
    assert distributed._EXIT["crashed"] is True
