"""The benchmark report is built from its results files only: every number in it comes from a row."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
import torch

from benchmarks import all as report
from benchmarks.compare import summarize

ACC = [  # model, target, method, seed, tool, kept, before, top1
    ("r20", 0.5, "l1", 0, "secateurs", 0.498, 86.0, 79.0),
    ("r20", 0.5, "l1", 1, "secateurs", 0.500, 86.0, 81.0),
    ("r20", 0.5, "tp_magnitude", 0, "torch_pruning", 0.49, 86.0, 78.0),
    ("r20", 0.5, "tp_magnitude", 1, "torch_pruning", 0.49, 86.0, 78.0),
]


def _write(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _results(tmp_path):
    _write(tmp_path / "compare_accuracy.csv", [
        {"model": m, "target": t, "method": me, "seed": s, "tool": tool, "kept_macs": k, "top1_before": b, "top1": a,
         "epochs": 2, "train_images": 500, "val_images": 200, "seconds": 1800} for m, t, me, s, tool, k, b, a in ACC])
    seg = {"model": "unet16_isbi2012", "seed": 0, "dice": 70.0, "pixel_acc": 90.0, "iou_before": 65.29, "epochs": 20}
    _write(tmp_path / "compare_segmentation.csv", [
        {**seg, "target": 0.8, "method": "l1", "tool": "secateurs", "kept_macs": 0.7998, "iou": 64.77, "seconds": 30,
         "note": ""},
        {**seg, "target": 0.8, "method": "tp_magnitude", "tool": "torch_pruning", "kept_macs": 0.79, "iou": 63.0,
         "seconds": 30, "note": ""},
        {**seg, "target": 0.8, "method": "tp_group_norm", "tool": "torch_pruning", "kept_macs": "", "iou": "",
         "dice": "", "pixel_acc": "", "seconds": "", "note": "IndexError: index 16 is out of bounds"},
    ])
    sp = {"model": "cifar_resnet56", "repeats": 30, "threads": 2}
    _write(tmp_path / "compare_speedup.csv", [
        {**sp, "tool": "secateurs", "kept_macs": 0.499, "torch_b1_speedup": 1.5, "torch_b1_ci": "1.400-1.600",
         "torch_b8_speedup": 0.9, "torch_b8_ci": "0.850-0.950"},
        {**sp, "tool": "torch_pruning", "kept_macs": 0.49, "torch_b1_speedup": 0.97, "torch_b1_ci": "0.900-1.020",
         "torch_b8_speedup": 1.2, "torch_b8_ci": "1.100-1.300"}])


def test_summary_is_mean_and_spread_over_seeds_and_keeps_failures(tmp_path):
    _results(tmp_path)
    acc = {r["method"]: r for r in summarize(tmp_path / "compare_accuracy.csv", "top1")}
    assert acc["l1"]["mean"] == 80.0 and abs(acc["l1"]["std"] - 2 ** 0.5) < 1e-9 and acc["l1"]["seeds"] == 2
    assert abs(acc["l1"]["kept_macs"] - 0.499) < 1e-9 and acc["tp_magnitude"]["std"] == 0.0
    seg = {r["method"]: r for r in summarize(tmp_path / "compare_segmentation.csv", "iou")}
    assert seg["l1"]["mean"] == 64.77 and seg["l1"]["before"] == 65.29
    assert seg["tp_group_norm"]["mean"] is None and seg["tp_group_norm"]["note"].startswith("IndexError")


def test_report_numbers_come_from_the_results_files(tmp_path):
    _results(tmp_path)
    args = argparse.Namespace(out=str(tmp_path), quick=False, threads=2, seeds=[0, 1])
    text = report.write_report(args).read_text()
    assert "| r20 | 50% | l1 | secateurs | 49.9% | 86.00 | 80.00 +- 1.41 | 2 |" in text
    assert "best of ours `l1` 80.00, best of Torch-Pruning's `tp_magnitude` 78.00 (+2.00 points)" in text
    assert "| l1 | secateurs | 64.77 +- 0.00 (80.0%) |" in text
    assert "| tp_group_norm | torch_pruning | error |" in text
    assert "- `tp_group_norm` failed: IndexError: index 16 is out of bounds" in text
    assert "best of ours `l1` 64.77, best of Torch-Pruning's `tp_magnitude` 63.00 (+1.77 points)" in text
    assert "segmentation curves 3/" in text and "cost 2.0 h of this machine" in text  # 4 x 1800 s + 60 s
    # the paired speed-up with its interval; slower only where the whole interval is below 1
    assert "| cifar_resnet56 | secateurs | 49.9% | 1.50x (1.40-1.60) | 0.90x (0.85-0.95) **slower** | - | - |" in text
    assert "| cifar_resnet56 | torch_pruning | 49.0% | 0.97x (0.90-1.02) | 1.20x (1.10-1.30) | - | - |" in text
    assert "unpruned (interval below 1): cifar_resnet56 secateurs torch_b8." in text
    for png in ("accuracy_vs_macs.png", "segmentation_iou_vs_macs.png", "latency_vs_macs.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text


def test_every_flag_a_benchmark_reads_is_declared():
    """`args.resnet50_check` was read after its flag was removed: the script crashed at its end."""
    import ast
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
    declared: set[str] = set()
    used: dict[str, set[str]] = {}
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                opts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                dest = next((k.value.value for k in node.keywords if k.arg == "dest"), None)
                longs = [o for o in opts if o.startswith("--")] or opts
                declared.add(dest or longs[0].lstrip("-").replace("-", "_"))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args":
                used.setdefault(f.name, set()).add(node.attr)
    missing = {f: sorted(a - declared) for f, a in used.items() if a - declared}
    assert not missing, f"flags read but never declared: {missing}"


def test_claims_are_read_from_the_results_files(tmp_path):
    from benchmarks.claims import claims

    _write(tmp_path / "hfp.csv", [
        {"model": "r20", "method": "HFP", "macs_kept": 0.4975, "params_kept": 0.8, "top1_before": 86.0,
         "top1_after": 79.0, "epochs": 5, "note": "converged at step 281"},
        {"model": "r20", "method": "L1 global, same MACs", "macs_kept": 0.497, "params_kept": 0.57,
         "top1_before": 86.0, "top1_after": 82.4, "epochs": 5, "note": "one shot"}])
    rows = dict((name, measured) for name, _, measured in claims(tmp_path))
    assert rows["3. HFP"] == ("docs/hfp.csv: r20: MACs kept 49.75% (converged at step 281), top-1 79.00, "
                              "best L1 at the same MACs 82.40")
    assert rows["1. heuristic"].startswith("no results file yet")  # never a hand-written figure


def test_the_85_percent_claim_is_read_with_and_without_the_refit(tmp_path):
    import json

    from benchmarks.claims import _importance_fixed

    docs = tmp_path
    assert _importance_fixed(docs) == ""
    (docs / "segmentation.json").write_text(json.dumps({"args": {"fixed": 0.15}, "results": _seg_results([20, 25, 30], [3] * 3)}))
    (docs / "segmentation_reconstruct").mkdir()
    (docs / "segmentation_reconstruct" / "segmentation.json").write_text(
        json.dumps({"args": {"fixed": 0.15}, "results": _seg_results([0.5, 0.5, 0.8], [1] * 3)}))
    text = _importance_fixed(docs)
    assert ".;" not in text and text.endswith(").")
    plain, refit = text.split("; docs/segmentation_reconstruct/segmentation.json: ")
    assert plain.startswith("docs/segmentation.json: At 15% of the MACs (the paper's -85%), importance weights' drops")
    assert "IoU +25.00 +- 12.42 (more than 1 point)" in plain
    assert refit.startswith("At 15% of the MACs (the paper's -85%), re-fitted importance weights' drops")
    assert "IoU +0.60 +- 0.43 (within 1 point on average only)" in refit


def _seg_results(drops_iw, drops_l1):
    base = {"pixel_acc": 92.0, "iou": 65.0, "dice": 79.0, "macs_256": 3.0e9, "params": 1.9e6}
    def row(drop, macs):
        return {"pixel_acc": 91.0, "iou": 65.0 - drop, "dice": 78.0, "macs_256": macs, "params": 1e5, "epochs": 20}
    runs = {str(s): {"fixed": {"iw": row(a, 0.45e9), "l1": row(b, 0.45e9)}} for s, (a, b) in enumerate(zip(drops_iw, drops_l1))}
    return {"unet16_isbi2012": {"base": base, "runs": runs}}


def test_segmentation_report_pairs_seeds_and_checks_the_85_percent_claim():
    from benchmarks.segmentation_report import claim_line, seg_summary

    res = _seg_results([0.5, 1.0, 1.5], [2.5, 2.0, 3.5])  # IW loses 1.0 IoU on average, L1 2.67
    line = claim_line(res, 0.15)
    assert "unet16_isbi2012 at 15.0 +- 0.0% MACs: IoU +1.00 +- 1.24 (within 1 point on average only)" in line
    assert "pixel accuracy +1.00 +- 0.00 (3 seeds)" in line and "-85%" in line
    table = "\n".join(seg_summary(res))
    assert "| fixed MACs | importance weights | 15.0 +- 0.0% | 64.00 +- 1.24 | 1.00 +- 1.24 | 1.67 +- 1.43 | 3 |" in table  # paired: [2, 1, 2]
    assert "more than 1 point" in claim_line(_seg_results([1.5, 1.0, 1.5], [0, 0, 0]), 0.15)
    one = claim_line(_seg_results([0.5], [0]), 0.15)  # one seed: no interval, so no verdict
    assert "IoU +0.50 +- 0.00 (too few seeds for a verdict)" in one and "(1 seed)" in one
    assert seg_summary({"m": {"base": {}, "iw": {}}})[0].startswith("segmentation.json holds the earlier")


def test_segmentation_report_counts_the_runs_the_collapse_guard_flagged():
    from benchmarks.segmentation_report import _rows, claim_line, seg_summary

    res = _seg_results([0.5, 1.0, 1.5], [2.5, 2.0, 3.5])
    res["unet16_isbi2012"]["runs"]["1"]["fixed"]["iw"]["collapsed"] = True
    assert "(3 seeds, 1 of 3 collapsed)" in claim_line(res, 0.15)
    rows = _rows("unet16_isbi2012", res["unet16_isbi2012"], "fixed")
    assert "| importance weights (**1 of 3 collapsed**) |" in rows[0] and "collapsed" not in rows[1]
    short = seg_summary(res)  # BENCHMARKS.md's table too
    assert "| fixed MACs | importance weights (**1 of 3 collapsed**) |" in short[2] and "collapsed" not in short[3]


def test_a_change_to_importance_weights_is_paired_by_seed():
    from benchmarks.segmentation_report import versus_lines

    here, there = _seg_results([0.5, 1.0, 3.0], [0, 0, 0]), _seg_results([1.5, 1.0, 1.0], [0, 0, 0])
    del there["unet16_isbi2012"]["runs"]["2"]  # only the seeds both runs have are paired
    table = "\n".join(versus_lines(here, there, "x"))
    assert "| unet16_isbi2012 | fixed MACs | importance weights | 15.0 +- 0.0% | 15.0 +- 0.0% | 64.25 +- 3.18 | 63.75 +- 3.18 | +0.50 +- 6.35 | 2 |" in table
    assert "| L1 |" not in table and versus_lines(here, {}, "x") == []
    here["unet16_isbi2012"]["runs"]["1"]["fixed"]["l1"]["iou"] = 66.0  # a change to both methods: each paired on its own
    table = "\n".join(versus_lines(here, there, "x", methods=("iw", "l1")))
    assert "| unet16_isbi2012 | fixed MACs | L1 | 15.0 +- 0.0% | 15.0 +- 0.0% | 65.50 +- 6.35 | 65.00 +- 0.00 | +0.50 +- 6.35 | 2 |" in table


def test_benchmarks_md_titles_each_importance_weights_change_from_its_run(tmp_path):
    import json

    from benchmarks.all import _iw_change_lines

    def write(folder, args, ious):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "segmentation.json").write_text(json.dumps({"args": args, "results": _seg_results(ious, [0] * 3)}))

    write("segmentation_min_keep", {"alpha_lr": 0.02, "min_keep": 0.25}, [2.0, 2.0, 4.0])
    (tmp_path / "alpha_gradients.csv").write_text("model\n")
    assert _iw_change_lines(tmp_path) == []  # the run it is paired with is absent: nothing, not even the pointer
    write("segmentation_alpha_lr", {"alpha_lr": 0.02, "lr": 3e-4}, [1.0, 2.0, 3.0])
    text = "\n".join(_iw_change_lines(tmp_path))
    assert "### No layer below 25% of its width (ours, `--min-keep 0.25`; \"here\") against the method's 5%" in text
    assert "both with alpha at its own rate (0.02)" in text and "Details: segmentation_min_keep/segmentation.md." in text
    assert "| -0.67 +- " in text and "alpha_gradients.md" in text  # paired by seed: IoU -(1 + 0 + 1) / 3
    write("segmentation_penalty", {"alpha_lr": 0.02, "min_keep": 0.25, "penalty": "gradient"}, [3.0, 2.0, 4.0])
    text = "\n".join(_iw_change_lines(tmp_path))
    assert "(ours, `--penalty gradient`; \"here\") against one penalty for every channel" in text
    assert "both with the 25% floor, alpha at 0.02" in text and "| -0.33 +- " in text  # drops 3, 2, 4 against 2, 2, 4
    (tmp_path / "alpha_gradients.csv").unlink()
    assert "alpha_gradients.md" not in "\n".join(_iw_change_lines(tmp_path))


def test_benchmarks_md_pairs_the_refitted_segmentation_run_with_the_plain_one(tmp_path):
    """BENCHMARKS.md's re-fit section: both methods paired by seed against the run without the re-fit,
    and the -85% claim read on the re-fitted importance weights; nothing while that run is absent."""
    import json

    from benchmarks.all import _reconstruct_lines

    plain, refit = _seg_results([20.0, 25.0, 30.0], [3.0, 3.5, 4.0]), _seg_results([0.5, 0.5, 0.8], [0.2, 0.6, 1.0])
    assert _reconstruct_lines(tmp_path, plain) == []
    (tmp_path / "segmentation_reconstruct").mkdir()
    (tmp_path / "segmentation_reconstruct" / "segmentation.json").write_text(
        json.dumps({"args": {"reconstruct": 8, "fixed": 0.15}, "results": refit}))
    text = "\n".join(_reconstruct_lines(tmp_path, plain))
    assert "re-fitted by least squares on 8 training images" in text
    assert "| fixed MACs | importance weights | 15.0 +- 0.0% | 15.0 +- 0.0% | 64.40 +- 0.43 | 40.00 +- 12.42 | +24.40 +- 12.05 | 3 |" in text
    assert "| fixed MACs | L1 | 15.0 +- 0.0% | 15.0 +- 0.0% | 64.40 +- 0.99 | 61.50 +- 1.24 | +2.90 +- 0.25 | 3 |" in text
    assert "re-fitted importance weights' drops" in text and "IoU +0.60 +- 0.43 (within 1 point on average only)" in text


def test_report_takes_the_accuracy_protocol_rows_when_there_are_any(tmp_path):
    from benchmarks.accuracy import FIELDS

    _results(tmp_path)
    rows = []
    for s, (ours, theirs) in enumerate(((86.0, 84.0), (86.5, 85.0), (87.0, 85.5))):
        for method, tool, top1 in (("l2", "secateurs", ours), ("tp_magnitude", "torch_pruning", theirs)):
            row = dict.fromkeys(FIELDS, "")
            row.update(model="r20", target=0.5, method=method, tool=tool, seed=s, steps=500, kept_macs=0.5, top1=top1,
                       val_top1=top1, over_budget="False", test_images=10000)
            rows.append(row)
    _write(tmp_path / "accuracy.csv", rows)
    text = report.write_report(argparse.Namespace(out=str(tmp_path), quick=False, threads=2, seeds=[0, 1])).read_text()
    assert "every row 500 optimizer steps" in text and "Rows so far: r20 at 50%: 2 methods" in text
    assert "| r20 | 50% | l2 (ours) - tp_magnitude | +1.67 +- 0.72 | 3 | met |" in text  # paired [2.0, 1.5, 1.5]
    assert "| r20 | 50% | l1 | secateurs | 49.9% | 86.00 |" not in text  # the epoch-based rows give way
    # another model whose grid has not reached every Torch-Pruning pruner yet: no verdict on a partial best
    more = []
    for s in range(3):
        for method, tool, top1 in (("l2", "secateurs", 90.0), ("tp_magnitude", "torch_pruning", 85.0),
                                   ("tp_bn_scale", "torch_pruning", 85.5)):
            row = dict.fromkeys(FIELDS, "")
            row.update(model="r20", target=0.3, method=method, tool=tool, seed=s, steps=500, kept_macs=0.3, top1=top1,
                       val_top1=top1, over_budget="False", test_images=10000)
            more.append(row)
    _write(tmp_path / "accuracy.csv", rows + more + [{**more[0], "model": "r56", "target": 0.5, "steps": 300},
                                                     {**more[1], "model": "r56", "target": 0.5, "steps": 300}])
    text = report.write_report(argparse.Namespace(out=str(tmp_path), quick=False, threads=2, seeds=[0, 1])).read_text()
    assert "| r20 | 30% | l2 (ours) - tp_bn_scale | +4.50 +- 0.00 | 3 | met |" in text
    assert "| r20 | 50% | l2 (ours) - tp_magnitude | +1.67 +- 0.72 | 3 | pending (tp_bn_scale not on every seed yet) |" in text
    assert "| r56 | 50% | l2 (ours) - tp_magnitude | +5.00 +- 0.00 | 1 | pending (1 of 3 seeds) |" in text
    assert "every row 500 (r20), 300 (r56) optimizer steps" in text  # each model's own budget, never one for all


def test_segmentation_report_of_a_refitted_fixed_only_run_says_so(tmp_path):
    """`--runs fixed --reconstruct 8`: the command line and the re-fit are stated, and no schedule curve
    (drawn from tolerance runs, which this run has none of) is linked or drawn."""
    from benchmarks.segmentation_report import plot, write_markdown

    res = _seg_results([0.5, 1.0, 1.5], [2.5, 2.0, 3.5])
    args = argparse.Namespace(
        runs=["fixed"], reconstruct=8, threads=2, init="ones", rank="alpha", l1=1e-4, iw_epochs=5, lr=3e-4,
        fraction=0.1, ft_epochs=2, metric="pixel_acc", tolerance=1.0, refinements=2, fixed=0.15, latency_repeats=30)
    defaults = {**vars(args), "runs": ["tol", "fixed"], "reconstruct": 0, "threads": 1}
    write_markdown(res, args, tmp_path / "segmentation.md", defaults)
    text = (tmp_path / "segmentation.md").read_text()
    assert "`python -m benchmarks.segmentation --runs fixed --reconstruct 8`" in text  # threads change no result
    assert "**Both methods re-fit** the layers that read a removed channel by least squares before every cut, on 8" in text
    assert "segmentation_curves.png" not in text and "| fixed MACs | importance weights |" in text
    plot(res, tmp_path / "work", tmp_path, "pixel_acc", first_test=None)  # saved models absent: no figure redrawn
    assert not list(tmp_path.glob("*.png"))
    args.runs, args.reconstruct = ["tol", "fixed"], 0  # the results say which runs they hold: fixed only
    write_markdown(res, args, tmp_path / "segmentation.md", defaults)
    text = (tmp_path / "segmentation.md").read_text()
    assert "`python -m benchmarks.segmentation --runs fixed`" in text and "re-fit" not in text
    for s in res["unet16_isbi2012"]["runs"].values():  # a tolerance run added later into the same folder
        s["tol"] = {m: {**v, "stopped": "", "held_after_alpha": 92.0, "time_s": 1.0} for m, v in s["fixed"].items()}
    args.runs = ["fixed"]
    write_markdown(res, args, tmp_path / "segmentation.md", defaults)
    text = (tmp_path / "segmentation.md").read_text()
    assert "`python -m benchmarks.segmentation`" in text
    res["unet16_isbi2012"]["runs"] = {"1": res["unet16_isbi2012"]["runs"]["1"]}  # seeds 1 and up only: no seed 0
    write_markdown(res, args, tmp_path / "segmentation.md", defaults)
    assert "| fixed MACs | importance weights |" in (tmp_path / "segmentation.md").read_text()


def test_segmentation_report_only_reads_missing_options_as_what_the_results_were_made_with(tmp_path):
    """A results file from before --reconstruct, reported with --reconstruct 8 on the command line:
    it was made without the re-fit, and its report must not say otherwise."""
    import json

    from benchmarks.segmentation import main

    saved = dict(models=["unet16_isbi2012"], seeds=[0, 1, 2], tolerance=1.0, metric="pixel_acc", fixed=0.15, iw_epochs=5,
                 ft_epochs=2, fraction=0.1, max_steps=40, init="ones", rank="alpha", versus=None, cost_aware=False,
                 l1=1e-4, lr=3e-4, refinements=2, threads=2, latency_repeats=30)
    (tmp_path / "segmentation.json").write_text(json.dumps({"args": saved, "results": _seg_results([1.0] * 3, [1.0] * 3)}))
    main(["--report-only", "--out", str(tmp_path), "--work", str(tmp_path / "none"), "--reconstruct", "8"])
    text = (tmp_path / "segmentation.md").read_text()
    assert "`python -m benchmarks.segmentation --runs fixed`" in text and "re-fit" not in text


def test_segmentation_resume_refuses_results_made_with_other_settings(tmp_path):
    import json

    import pytest

    from benchmarks.segmentation import SETTINGS, _load

    args = argparse.Namespace(**dict.fromkeys(SETTINGS, 1))
    path = tmp_path / "segmentation.json"
    path.write_text(json.dumps({"args": {**vars(args), "tolerance": 2.0}, "results": _seg_results([1.0], [1.0])}))
    with pytest.raises(SystemExit, match="tolerance: 2.0 there, 1 now"):
        _load(path, args)
    path.write_text(json.dumps({"args": vars(args), "results": _seg_results([1.0], [1.0])}))
    assert set(_load(path, args)) == {"unet16_isbi2012"}
    path.write_text(json.dumps({"args": {}, "results": {"m": {"base": {}, "iw": {}}}}))  # the earlier layout: redone
    assert _load(path, args) == {}
    # results made before --reconstruct existed were made without the re-fit: they resume a run without it only
    before = {k: v for k, v in vars(args).items() if k != "reconstruct"}
    path.write_text(json.dumps({"args": before, "results": _seg_results([1.0], [1.0])}))
    assert set(_load(path, argparse.Namespace(**{**before, "reconstruct": 0}))) == {"unet16_isbi2012"}
    with pytest.raises(SystemExit, match="reconstruct: 0 there, 8 now"):
        _load(path, argparse.Namespace(**{**before, "reconstruct": 8}))
    # and before --min-keep, with the method's floor of 5%
    before = {k: v for k, v in vars(args).items() if k != "min_keep"}
    path.write_text(json.dumps({"args": before, "results": _seg_results([1.0], [1.0])}))
    assert set(_load(path, argparse.Namespace(**{**before, "min_keep": 0.05}))) == {"unet16_isbi2012"}
    with pytest.raises(SystemExit, match="min_keep: 0.05 there, 0.25 now"):
        _load(path, argparse.Namespace(**{**before, "min_keep": 0.25}))


def test_alpha_gradients_report_counts_the_channels_below_the_penalty_by_side(tmp_path):
    from benchmarks.alpha_gradients import write_markdown

    def row(layer, channels, size, below):
        return {"model": "net", "layer": layer, "channels": channels, "size": size, "mean_abs_grad": "0.001",
                "median_abs_grad": "0.001", "rms_grad": "0.002", "below_l1": below, "wants_up": 0.5, "snr": 1.0, "epochs": 5, "l1": 1e-4}
    rows = [row("a", 16, 256, 0.0), row("b", 16, 256, 0.5), row("c", 64, 16, 1.0), row("d", 192, 16, 0.5)]
    text = write_markdown(rows, tmp_path).read_text()
    assert "side: 256px 25% of 32; 16px 62% of 256." in text  # (8 + 0) / 32; (64 + 96) / 256
    assert "| c | 64 | 16 | 0.001 | 0.001 | 0.002 | 100% | 50% | 1.0 |" in text and "(0.0001, the method's default)" in text


def test_alpha_gradients_feed_the_model_the_phases_batches_normalised_once(monkeypatch):
    """The gradients are read on the batches fit trains alpha's phase on: normalised once (a second
    normalisation turns every image into a near-constant), the crops the segmentation benchmark uses."""
    import secateurs.models
    from benchmarks.alpha_gradients import layer_rows

    seen, load = [], secateurs.models.load_pretrained

    def spied(name):
        m = load(name)
        m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone())
                                   if mod.training and args[0].device.type != "meta" else None)  # (not analyze's)
        return m
    monkeypatch.setattr(secateurs.models, "load_pretrained", spied)
    rows = layer_rows("unet16_isbi2012", 1, 1e-4)
    x = torch.cat(seen)
    assert x.shape[-2:] == (128, 128) and len(seen) == rows[0]["batches"] == 3  # 24 slices, batch 8
    assert 0.5 < float(x.std()) < 2 and abs(float(x.mean())) < 1  # about N(0, 1), not -mean / std everywhere
    assert all(float(r["rms_grad"]) > 0 for r in rows)


def test_segmentation_latency_is_the_paired_speedup_of_each_saved_model(tmp_path, monkeypatch):
    import torch.nn as nn

    import secateurs
    from benchmarks import segmentation
    from benchmarks.segmentation_report import _speedup

    nets = {tag: nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 1, 1))
            for tag, w in (("base", 32), ("fixed_iw", 4), ("fixed_l1", 8))}
    for tag in nets:
        (tmp_path / "u" / tag).mkdir(parents=True)
    monkeypatch.setattr(secateurs, "load", lambda path: nets[path.name])  # the saved models of seed 0
    # an earlier harness's medians (ms) are measured again; the report reads either kind
    results = {"u": {"runs": {"0": {"fixed": {}}}, "latency": {"256": {"base": 2.0, "fixed_iw": 1.0}}}}
    assert _speedup(results["u"]["latency"]["256"], "fixed_iw") == "2.00x"
    segmentation.measure_latency(results, tmp_path, threads=1, repeats=6)
    for size in ("256", "512"):
        cell = results["u"]["latency"][size]
        assert set(cell["speedup"]) == {"fixed_iw", "fixed_l1"}
        med, lo, hi = cell["speedup"]["fixed_iw"]
        assert lo <= med <= hi and med > 1  # 4 filters instead of 32 at 256x256 and up
        assert _speedup(cell, "fixed_iw") == f"{med:.2f}x ({lo:.2f}-{hi:.2f})"
        assert _speedup(cell, "tol_iw") == "-"
    # a tolerance run added later (--runs tol into the same folder): measured alone, the others kept
    before = {s: dict(results["u"]["latency"][s]["speedup"]) for s in ("256", "512")}
    results["u"]["runs"]["0"]["tol"] = {}
    for tag, w in (("tol_iw", 2), ("tol_l1", 16)):
        nets[tag] = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 1, 1))
        (tmp_path / "u" / tag).mkdir()
    segmentation.measure_latency(results, tmp_path, threads=1, repeats=6)
    for size in ("256", "512"):
        cell = results["u"]["latency"][size]["speedup"]
        assert set(cell) == {"fixed_iw", "fixed_l1", "tol_iw", "tol_l1"}
        assert {t: cell[t] for t in before[size]} == before[size]


def test_method_benchmarks_time_dense_and_pruned_interleaved(monkeypatch):
    """heuristic.py and layer_pruning.py take their latency from the one harness (issue 19): both
    models in one call, the speed-up its per-round median with the interval, never two separate medians."""
    import torch

    import secateurs.latency as lat
    from benchmarks import _protocol

    calls = []

    def fake(dense, pruned, x, *, batches, repeats, threads):
        calls.append((dense, pruned, batches, repeats, threads))
        return {"rows": [{"batch": b, "dense_ms": 10.0 * b, "pruned_ms": 5.0 * b + 0.004, "speedup": 1.987,
                          "speedup_interval": [1.912, 2.051]} for b in batches]}

    monkeypatch.setattr(lat, "compare_dense_pruned", fake)
    row = _protocol.latency_columns("dense", "pruned", torch.zeros(1, 3, 8, 8), threads=2)
    assert calls == [("dense", "pruned", (1, 8), 30, 2)]
    assert row == {"lat_b1_before": 10.0, "lat_b1_after": 5.0, "b1_speedup": 1.99, "b1_speedup_low": 1.91,
                   "b1_speedup_high": 2.05, "lat_b8_before": 80.0, "lat_b8_after": 40.0, "b8_speedup": 1.99,
                   "b8_speedup_low": 1.91, "b8_speedup_high": 2.05}
    assert _protocol.speedup_cell(row, 8) == "1.99x (1.91-2.05)"
    assert _protocol.speedup_cell({"b8_speedup": "1.3"}, 8) == "1.3x"  # a row kept from the old harness
    for name in ("heuristic", "layer_pruning"):
        src = (Path(_protocol.__file__).parent / f"{name}.py").read_text()
        assert "latency_columns(" in src and "measure_latency" not in src, name


def test_reconstruct_report_is_the_mean_and_spread_of_the_draws(tmp_path):
    from benchmarks import reconstruct
    from benchmarks._protocol import write_rows

    row = {"model": "m", "target": 0.5, "draw": 0, "kept_macs": 0.4991, "seconds": 1.0, "images": 0, "test_images": 100}
    write_rows(tmp_path / "reconstruct.csv", [
        {**row, "method": "l1", "top1": 10.0, "finetune_steps": 100, "top1_finetuned": 80.5},
        {**row, "method": "l1+reconstruct", "top1": 70.0, "images": 512},
        {**row, "method": "l1+reconstruct", "draw": 1, "top1": 74.0, "images": 512, "seconds": 3.0}])
    text = reconstruct.report(tmp_path / "reconstruct.csv").read_text()
    assert "| m | 50% | l1 | 49.9% | 10.00 | 1 | 1.0 | 80.5 |" in text
    assert "| m | 50% | l1+reconstruct | 49.9% | 72.00 +- 2.83 | 2 | 2.0 |  |" in text
    assert "Then 100 steps of fine-tuning" in text
    assert "least squares on 512 training images" in text
    assert "cost at 224px" not in text  # no cost file: no section
    write_rows(tmp_path / "reconstruct_cost.csv", [
        {"model": "resnet50", "size": 224, "images": 64, "requested": "default", "path": "one pass", "layers": 53,
         "error_before": 0.4123,
         "error_after": 0.1, "seconds": 28.8, "threads": 2}])
    text = reconstruct.report(tmp_path / "reconstruct.csv").read_text()
    assert "| torchvision:resnet50 | 224px | 64 | default | one pass | 53 | 0.412, 0.100 | 28.8 |" in text
    assert "2 threads on this CPU" in text and "## The re-fit's cost at 224px" in text
    assert "on a U-Net" not in text
    write_rows(tmp_path / "reconstruct_segmentation.csv", [
        {"model": "u", "target": 0.15, "method": "l1+reconstruct", "kept_macs": 0.1498, "iou": 62.98, "pixel_acc": 90.72,
         "seconds": 46.2, "images": 24, "val_images": 6}])
    text = reconstruct.report(tmp_path / "reconstruct.csv").read_text()
    assert "| u | 15% | l1+reconstruct | 15.0% | 62.98 | 90.72 | 46.2 |" in text
    assert "re-fit on its 24 training slices" in text and "on the 6 validation slices" in text


def test_plan_noise_distances_and_report(tmp_path):
    """Two plans' distance is the share of the unpruned channels whose count differs, and the report
    reads the draws' latencies from the rows (hand-computed: |4-6| + |4-2| of 8 + 4 channels)."""
    import json

    from benchmarks import plan_noise

    full = {"a": 8, "b": 4}
    assert plan_noise.moved({"a": 4, "b": 4}, {"a": 6, "b": 2}, full) == (4 / 12, 0.0)
    assert plan_noise.moved({"a": 4, "b": 4}, {"a": 4, "b": 2}, full) == (2 / 12, 0.5)

    def row(draw, w, ratio, lo, hi, again):
        return {"latency_ratio_2": again, "model": "m", "variant": "latency 50% (tables)", "draw": draw, "macs_kept": 0.3, "prune_s": 1.0,
                "search_ratio": 0.5, "widths": json.dumps(w), "full_widths": json.dumps(full), "repeats": 30,
                "threads": 2, "cpu": "cpu", "latency_ratio": ratio, "latency_lo": lo, "latency_hi": hi}
    rows = [row(0, {"a": 4, "b": 4}, 0.50, 0.48, 0.52, 0.51), row(1, {"a": 6, "b": 2}, 0.55, 0.53, 0.57, 0.54),
            row(2, {"a": 4, "b": 2}, 0.51, 0.49, 0.53, 0.51)]
    missed = {"model": "m", "variant": "macs 50% latency-allocated", "draw": 0, "repeats": 30, "threads": 2,
              "cpu": "cpu", "note": "no plan met a latency target of 0.5"}
    rows.append(missed)  # a search that failed: listed, never compared (one draw alone has no pair either)
    (s,) = plan_noise.summary(rows)
    assert s["moved_mean"] == pytest.approx((4 + 2 + 2) / 3 / 12) and s["moved_max"] == pytest.approx(4 / 12)
    plan_noise.write_report(rows, tmp_path)
    text = (tmp_path / "plan_noise.md").read_text()
    assert "| m | latency 50% (tables) | 3 | 30.0%, 30.0%, 30.0% | 22.2%, 33.3% | 33% |" in text
    assert "| 0.510, 0.540, 0.510 | 10.0% | 2.0% |" in text  # spread 0.55 / 0.50 - 1; re-timed 0.51 / 0.50 - 1
    assert "noise): none." in text  # 0.48-0.52 and 0.53-0.57 do not overlap
    assert "- Not planned: m macs 50% latency-allocated draw 0: no plan met a latency target of 0.5" in text
    from benchmarks._protocol import write_rows

    write_rows(tmp_path / "plan_noise.csv", rows)
    (line, _) = report._plan_noise_lines(tmp_path)
    assert "each of 3 draws" in line and "m latency 50% (tables): 22.2% of the channels moved, MACs kept 30.0%-30.0%, latency 0.500-0.550" in line


def test_benchmarks_md_puts_the_widths_probe_before_the_change_it_motivated(tmp_path):
    import json

    from benchmarks.all import _iw_change_lines

    arm = {"iou": 0.0, "pixel_acc": 0.0, "dice": 0.0, "macs_256": 1, "params": 1}
    runs = {str(s): {"iw": dict(arm, iou=60.0), "l1w": dict(arm, iou=62.0 + s), "l1": dict(arm, iou=63.0)}
            for s in range(3)}
    (tmp_path / "segmentation_widths").mkdir()
    (tmp_path / "segmentation_widths" / "widths.json").write_text(json.dumps({"results": {"unet": runs}}))
    for folder, ious in (("segmentation_penalty", [3.0, 2.0, 4.0]), ("segmentation_rank_norm", [1.0, 1.0, 1.0])):
        (tmp_path / folder).mkdir()
        args = {"alpha_lr": 0.02, "min_keep": 0.25, "penalty": "gradient", "rank": folder[-4:]}
        (tmp_path / folder / "segmentation.json").write_text(json.dumps({"args": args,
                                                                         "results": _seg_results(ious, [0] * 3)}))
    (tmp_path / "segmentation_min_keep").mkdir()
    (tmp_path / "segmentation_min_keep" / "segmentation.json").write_text(
        json.dumps({"args": {}, "results": _seg_results([3.0] * 3, [0] * 3)}))
    text = "\n".join(_iw_change_lines(tmp_path))
    probe, norm = text.index("### Allocation or ranking"), text.index("(ours, `--rank norm`")
    assert text.index("`--penalty gradient`") < probe < norm
    assert "| unet | 0.00 +- 2.48 | -3.00 +- 2.48 | 3 |" in text  # seeds (-1, 0, 1) and (-2, -3, -4)
    assert "| +2.00 +- 2.48 |" in text[norm:]  # drops 1, 1, 1 against 3, 2, 4, paired
