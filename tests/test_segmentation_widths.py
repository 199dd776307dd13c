"""The widths probe (benchmarks.segmentation_widths): what importance weights' allocation, their
choice of channels and their schedule each cost on the U-Nets, against L1."""
from __future__ import annotations

import torch


def test_l1_at_importance_weights_widths_lands_on_each_layers_width_exactly():
    """The widths probe: a run's removed counts summed over its kept steps (an undone one skipped),
    then L1 cut to exactly those widths, transposed convs and the skip concatenations included."""
    from benchmarks.segmentation_widths import l1_at_widths, removed_per_layer, widths
    from secateurs.models import create_model

    state = {"steps": [{"step": 0}, {"removed": {"enc.0.0": 1, "up.0": 2}},
                       {"removed": {"enc.0.0": 5}, "reverted": True}, {"removed": {"enc.0.0": 1, "dec.0.0": 3}}]}
    removed = removed_per_layer(state)
    assert removed == {"enc.0.0": 2, "up.0": 2, "dec.0.0": 3}
    torch.manual_seed(0)
    base = create_model("unet", base=8, depth=2)
    before = widths(base)
    model, _ = l1_at_widths(base, removed, torch.randn(1, 1, 32, 32))
    after = widths(model)
    assert {n: before[n] - after[n] for n in before if after[n] != before[n]} == removed
    assert model(torch.randn(2, 1, 32, 32)).shape == base(torch.randn(2, 1, 32, 32)).shape


def test_widths_report_pairs_allocation_and_ranking_by_seed(tmp_path):
    from benchmarks.segmentation_widths import write_markdown

    def arm(iou):
        return {"iou": iou, "pixel_acc": 90.0, "dice": 70.0, "macs_256": 4.5e8, "params": 2e5}

    runs = {str(s): {"iw": arm(60.0 + s), "l1w": arm(63.0 + 2 * s), "l1": arm(64.0)} for s in range(3)}
    write_markdown({"m": runs}, {"from": "docs/x", "args": {"fixed": 0.15, "penalty": "gradient"}}, tmp_path / "w.md")
    text = (tmp_path / "w.md").read_text()
    assert "--penalty gradient" in text and "15% of the MACs" in text
    alloc, rank = [ln for ln in text.splitlines() if ln.startswith("| | *")]
    assert "| 1.00 +- 4.97 |" in alloc and "| -4.00 +- 2.48 |" in rank  # seeds (-1, 1, 3) and (-3, -4, -5)


def test_widths_report_adds_the_schedule_arm_only_when_every_seed_has_it(tmp_path):
    from benchmarks.segmentation_widths import summary_lines, write_markdown

    arm = {"iou": 0.0, "pixel_acc": 90.0, "dice": 70.0, "macs_256": 4.5e8, "params": 2e5}
    runs = {str(s): {k: dict(arm, iou=v + s) for k, v in (("iw", 60.0), ("l1w", 62.0), ("l1", 64.0))}
            for s in range(3)}
    saved = {"from": "docs/x", "args": {"fixed": 0.15, "ft_epochs": 2, "iw_epochs": 5}}
    runs["0"]["l1s"] = dict(arm, iou=61.0)
    write_markdown({"m": runs}, saved, tmp_path / "w.md")
    assert "schedule" not in (tmp_path / "w.md").read_text()  # one seed of three: no arm, no pair
    for s in "12":
        runs[s]["l1s"] = dict(arm, iou=61.0 + 2 * int(s))
    write_markdown({"m": runs}, saved, tmp_path / "w.md")
    text = (tmp_path / "w.md").read_text()
    assert "then alpha's 5 epochs as plain fine-tuning" in text
    assert "| | *L1 on importance weights' schedule - L1 one-shot (the schedule, and the widths global L1 drifts to on it), IoU* | | | | -2.00 +- 2.48 |" in text
    assert summary_lines({"m": runs})[3] == "|---|---|---|---|---|"  # model, three pairs, seeds
    other = {s: {k: v for k, v in r.items() if k != "l1s"} for s, r in runs.items()}
    lines = summary_lines({"m": runs, "n": other})  # a model the schedule arm has not reached yet
    assert lines[-5].endswith("| -2.00 +- 2.48 | 3 |") and lines[-4].endswith("| - | 3 |")


def test_final_epochs_recover_the_last_cut_and_l1_gets_them_too(tmp_path, monkeypatch):
    """`benchmarks.segmentation --final-epochs N`: importance weights' last cut is fine-tuned N more
    epochs (resumably, in its own folder) and the one-shot L1 it is paired with gets the same total."""
    import argparse

    import benchmarks.segmentation as seg
    import secateurs
    import secateurs.train

    rep = {"steps": [{"step": i, "macs": 100 - 20 * i, "metric": 90.0, "reverted": i == 2} for i in range(4)], "method_output": {},
           "before": {"macs": 100}, "after": {"macs": 20}}
    pruned, fits = [], []
    monkeypatch.setattr(secateurs, "prune", lambda m, x, method, t, **kw: pruned.append((method, kw["finetune"].epochs)) or (m, rep))
    monkeypatch.setattr(secateurs.train, "fit", lambda m, tr, va, cfg: fits.append(cfg))
    monkeypatch.setattr(seg, "_measure", lambda *a: {})
    args = argparse.Namespace(tolerance=1.0, fixed=0.15, metric="pixel_acc", max_steps=40, ft_epochs=2, iw_epochs=5,
                              fraction=0.1, init="ones", l1=1e-4, rank="alpha", cost_aware=False, refinements=2,
                              alpha_lr=None, min_keep=0.05, penalty="uniform", reconstruct=0, lr=3e-4, final_epochs=3)
    base, data = torch.nn.Conv2d(1, 1, 1), (None, None, None)
    out = seg.run_pair("unet16_isbi2012", "fixed", base, data, 1, args, tmp_path)
    assert [(c.epochs, c.resume, c.out_dir) for c in fits] == [(3, True, str(tmp_path / "unet16_isbi2012" / "s1_fixed_final3"))]
    assert pruned == [("importance-weights", 2), ("l1", 5 + 2 * 2 + 3)] and out["iw"]["epochs"] == 12
    args.final_epochs, fits[:], pruned[:] = 0, [], []
    out = seg.run_pair("unet16_isbi2012", "fixed", base, data, 1, args, tmp_path)
    assert not fits and pruned[1] == ("l1", 9) and out["iw"]["epochs"] == 9


def test_l1_on_schedule_adds_the_final_epochs_only_where_importance_weights_kept_a_step(monkeypatch):
    """The schedule arm matches importance weights' epochs: the last cut's recovery exists only after a
    kept step (run_pair), so a run that kept none is matched without it, not refused."""
    import argparse

    import secateurs
    import secateurs.train
    from benchmarks.segmentation import SETUPS
    from benchmarks.segmentation_widths import l1_on_schedule

    fits = []
    monkeypatch.setattr(secateurs.train, "fit", lambda m, tr, va, cfg: fits.append(cfg.epochs))
    settings = argparse.Namespace(iw_epochs=5, ft_epochs=2, final_epochs=3, reconstruct=0, lr=3e-4)
    base, setup = torch.nn.Conv2d(1, 1, 1), SETUPS["unet16_isbi2012"]
    for kept, epochs in [(2, 5 + 2 * 2 + 3), (0, 5)]:
        rep = {"steps": [{"step": i} for i in range(kept + 1)]}
        monkeypatch.setattr(secateurs, "prune", lambda m, x, method, t, rep=rep, **kw: (m, rep))
        row = {"iw": {"macs_256": 1.0, "steps": kept, "epochs": epochs}}
        fits.clear()
        l1_on_schedule(base, row, 1.0, None, setup, settings, 0, None)
        assert fits == [epochs - 2 * kept]


def test_bad_final_epochs_is_refused_before_any_run(capsys):
    import pytest

    from benchmarks.segmentation import main

    with pytest.raises(SystemExit):
        main(["--final-epochs", "-1", "--out", "unused", "--work", "unused"])
    assert "--final-epochs must be >= 0, got -1" in capsys.readouterr().err
