"""The whole benchmark report, secateurs beside Torch-Pruning, by one command.

Runs every section into ``--out`` (results files first, then ``BENCHMARKS.md`` and its plots
generated from them only), keeping finished rows so that a killed run continues:

1. coverage (``benchmarks.compare``), 2. engine time (``benchmarks.engine_speed``),
3. realized speed-up (``benchmarks.compare``), 4. accuracy at equal MACs (``benchmarks.compare``),
5. segmentation: MACs vs IoU per method on U-Net, ISBI 2012 and HeLa (``benchmarks.compare``), and
   method 4 with its error tolerance beside L1 (``benchmarks.segmentation``).

Usage::

    python -m benchmarks.all                    # the CPU protocol report: docs/BENCHMARKS.md (hours on 2 cores)
    python -m benchmarks.all --quick            # the same machinery on tiny settings (< 10 minutes), into runs/bench-quick
    python -m benchmarks.all --report-only      # regenerate the markdown and plots from the results files
    python -m benchmarks.all --sections accuracy --epochs 30 --subset 0 --val-subset 0   # paper-scale accuracy (GPU)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from benchmarks._protocol import read_rows

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["coverage", "engine", "speedup", "accuracy", "segmentation"]



def run(args) -> None:
    from benchmarks import compare, engine_speed, segmentation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--out", str(out), "--threads", str(args.threads)]
    if args.quick:
        compare.main(["--sections", "coverage", "--coverage-models", "resnet18", "mobilenet_v2", *common])
        engine_speed.main(["--models", "resnet18", "mobilenet_v2", "--repeats", "1", "--out", str(out)])
        compare.main(["--sections", "speedup", "--speedup-models", "cifar_resnet56", "--repeats", "6", *common])
        compare.main(["--sections", "accuracy", "--models", "cifar_resnet20_cifar10", "--targets", "0.5",
                      "--methods", "l1", "heuristic", "importance-weights", "tp_magnitude", "tp_bn_scale",
                      "--seeds", "0", "1", "--epochs", "1", "--subset", "256", "--val-subset", "200", *common])
        segmentation.main(["--models", "unet16_isbi2012", "--seeds", "0", "--max-steps", "1", "--iw-epochs", "1",
                           "--ft-epochs", "1", "--fraction", "0.2", "--fixed", "0.8", "--latency-repeats", "6",
                           "--work", str(out / "seg_runs"), "--out", str(out), "--threads", str(args.threads)])
        compare.main(["--sections", "segmentation", "--seg-models", "unet16_isbi2012", "--seg-targets", "0.6", "0.3",
                      "--seg-methods", "l1", "importance-weights", "tp_magnitude", "--seg-epochs", "2",
                      "--seg-phase-epochs", "1", *common])
    else:
        if "coverage" in args.sections:
            compare.main(["--sections", "coverage", *common])
        if "engine" in args.sections:
            engine_speed.main(["--out", str(out)])
        if "speedup" in args.sections:
            compare.main(["--sections", "speedup", *common])
        if "accuracy" in args.sections:
            compare.main(["--sections", "accuracy", "--epochs", str(args.epochs), "--subset", str(args.subset),
                          "--val-subset", str(args.val_subset), "--seeds", *map(str, args.seeds), *common])
        if "segmentation" in args.sections:
            compare.main(["--sections", "segmentation", *common])
            segmentation.main(["--out", str(out), "--work", str(ROOT / "runs" / "segmentation"),
                               "--threads", str(args.threads)])


def _pareto(out: Path, rows: list[dict], ylabel: str, filename: str) -> str | None:
    """One panel per model: the metric against the MACs kept, a line per method (theirs dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["mean"] is not None]
    models = sorted({r["model"] for r in rows})
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for method in sorted({r["method"] for r in mine}):
            pts = sorted((r["kept_macs"], r["mean"], r["std"]) for r in mine if r["method"] == method)
            ax.errorbar([100 * p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        linestyle="--" if method.startswith("tp_") else "-", label=method, capsize=3)
        ax.axhline(mine[0]["before"], color="gray", linewidth=0.8)
        ax.set_xlabel("MACs kept (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / filename, dpi=80)
    plt.close(fig)
    return filename


def _plots(out: Path, acc: list[dict], speed: list[dict], seg: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = [f for f in (_pareto(out, acc, "top-1 (%)", "accuracy_vs_macs.png"),
                        _pareto(out, seg, "IoU (%)", "segmentation_iou_vs_macs.png")) if f]
    if speed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for tool, marker in (("secateurs", "o"), ("secateurs_latency", "^"), ("torch_pruning", "s")):
            pts = [(float(r["kept_macs"]), float(r["torch_b8_speedup"])) for r in speed
                   if r["tool"] == tool and r.get("torch_b8_speedup")]
            ax.scatter([100 * p[0] for p in pts], [p[1] for p in pts], marker=marker, label=tool)
        ax.plot([30, 100], [100 / 30, 1], color="gray", linewidth=0.8, label="1 / MACs kept")
        ax.set_xlabel("MACs kept (%)")
        ax.set_ylabel("speed-up, PyTorch batch 8")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "latency_vs_macs.png", dpi=80)
        plt.close(fig)
        made.append("latency_vs_macs.png")
    return made


def _speedup_section(speed: list[dict]) -> list[str]:
    """Section 3: each tool's paired speed-up over the unpruned model, its interval, and a loud mark
    on any pruned model measurably slower than the unpruned one."""
    cols = [f"{c}_b{b}" for c in ("torch", "ort") for b in (1, 8)]
    L = ["", "## 3. Realized speed-up at 50% MACs", "",
         "`secateurs`: L2, global, widths multiples of 8, the settings Torch-Pruning's row runs with; "
         "`secateurs_latency`: L2 allocated by this machine's latency tables, `round_to=\"auto\"`.", "",
         "| model | tool | MACs kept | PyTorch b1 | PyTorch b8 | onnxruntime b1 | onnxruntime b8 |",
         "|---|---|---|---|---|---|---|"]
    slower = []
    for r in speed:
        cells = []
        for k in cols:
            if not r.get(f"{k}_speedup"):
                cells.append("-")
                continue
            lo, hi = (float(v) for v in r[f"{k}_ci"].split("-"))
            cells.append(f"{float(r[f'{k}_speedup']):.2f}x ({lo:.2f}-{hi:.2f})" + (" **slower**" if hi < 1 else ""))
            if hi < 1:
                slower.append(f"{r['model']} {r['tool']} {k}")
        L.append(f"| {r['model']} | {r['tool']} | {float(r['kept_macs']):.1%} | " + " | ".join(cells) + " |")
    reps = sorted({r.get("repeats", "") for r in speed})
    L += ["", f"Speed-up: the median over {', '.join(reps)} rounds of unpruned time / pruned time, the two timed back "
          "to back in each round (`secateurs.latency.compare_dense_pruned`), with its 95% interval; onnxruntime in a "
          "fresh process. Pruned models measurably slower than unpruned (interval below 1): "
          f"{', '.join(slower) if slower else 'none'}. Every variant on more models and runtimes: docs/speedup.md; the "
          "issue's models in 3 fresh processes each: docs/speedup_mbv2/speedup.md, docs/speedup_r50_vgg16/speedup.md; "
          "the latency budget 0.5 on them with the calibrated search: docs/speedup_latency/speedup.md; CIFAR "
          "ResNets at 32px: docs/speedup_cifar/speedup.md.", ""]
    return L


def _plan_noise_lines(out: Path) -> list[str]:
    """How far the latency tables' timing noise moves a latency-driven plan (docs/plan_noise.md)."""
    from benchmarks.plan_noise import summary

    rows = read_rows(out / "plan_noise.csv")
    if not rows:
        return []
    cells = [f"{s['model']} {s['variant']}: {s['moved_mean']:.1%} of the channels moved, MACs kept "
             f"{min(s['macs']):.1%}-{max(s['macs']):.1%}, latency {min(s['ratios']):.3f}-{max(s['ratios']):.3f}"
             + (f" (one plan timed twice: up to {s['retime']:.1%} apart)" if s.get("retime") is not None else "")
             for s in summary(rows)]
    return [f"Table noise: each of {len({r['draw'] for r in rows})} draws "
            "measured its own latency tables and pruned the same model; between two draws' plans (mean over the "
            "pairs), and each draw's latency timed with the unpruned model: " + "; ".join(cells)
            + " (docs/plan_noise.md).", ""]


def _protocol_accuracy(path: Path) -> list[str]:
    """Section 4 from the accuracy protocol's rows: its goals, the changes it measured, latency at equal accuracy."""
    from benchmarks.accuracy_report import _latency_section, changes_section, goals_section, summarize as by_method

    from benchmarks.accuracy_report import one_budget

    rows, left_out = one_budget(read_rows(path))
    if not rows:
        return ["`accuracy.csv` has no rows yet.", ""]
    summary = by_method(rows)
    r0 = rows[0]
    seeds = sorted({int(r["seed"]) for r in rows})
    done = ", ".join(f"{m} at {t:.0%}: {sum(1 for k in summary if k[:2] == (m, t))} methods"
                     for m, t in sorted({k[:2] for k in summary}, key=lambda k: (k[0], -k[1])))
    budgets = dict.fromkeys(f"{r['steps']} ({r['model']})" for r in rows)  # one per model (one_budget)
    per_row = f"{r0['steps']}" if len(budgets) == 1 else ", ".join(budgets)
    return [f"The accuracy protocol (`benchmarks/accuracy.py`, `scripts/accuracy_grid.sh`): every row {per_row} "
            f"optimizer steps, pruning phase and fine-tuning together; top-1 on the full {r0['test_images']}-image test "
            f"set; seeds {seeds}; anything that picks or stops on a metric reads a held-out split of the training set. "
            f"Rows so far: {done}. Every row, its notes (HFP convergence step, fallbacks) and the paired same-criterion "
            "comparisons: accuracy.md in this folder." + (" " + " ".join(left_out) if left_out else ""), ""] \
        + goals_section(summary, "###") + changes_section(summary, "###") + _latency_section(summary, "###") + [""]


def _best_line(label: str, rows: list[dict]) -> list[str]:
    """The best of our rows beside the best of Torch-Pruning's (failed rows left out)."""
    ok = [r for r in rows if r["mean"] is not None]
    best = {t: max((r for r in ok if r["tool"] == t), key=lambda r: r["mean"], default=None)
            for t in ("secateurs", "torch_pruning")}
    if not all(best.values()):
        return []
    a, b = best["secateurs"], best["torch_pruning"]
    return [f"- {label}: best of ours `{a['method']}` {a['mean']:.2f}, best of Torch-Pruning's `{b['method']}` "
            f"{b['mean']:.2f} ({a['mean'] - b['mean']:+.2f} points)."]


RESULTS = ("compare_coverage.csv", "engine_speed.csv", "compare_speedup.csv", "accuracy.csv", "compare_accuracy.csv",
           "compare_segmentation.csv", "segmentation.json", "reconstruct.csv")


def _r56_baseline(run: Path = Path(__file__).resolve().parents[1] / "runs/baselines/r56") -> str:
    """How far ResNet-56's baseline has trained, from its run's log and checkpoint (tracked by git,
    resumed across sessions; the checkpoint holds the run's settings, its length among them)."""
    import torch

    rows = [r for r in read_rows(run / "log.csv") if (r.get("val_top1") or "").strip()]
    if not rows or not (run / "checkpoint.pt").exists():
        return "its baseline is not trained (about 8.5 h of this machine, `scripts/baselines.sh r56`)"
    total = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["config"]["epochs"]
    epoch, top1 = int(rows[-1]["epoch"]), float(rows[-1]["val_top1"])
    state = "has trained" if epoch >= total else "is training (`scripts/baselines.sh r56`, resumable):"
    return (f"its baseline {state} epoch {epoch} of {total}, {top1:.2f}% top-1 on the test set "
            "(runs/baselines/r56/log.csv)")


def _status(out: Path, args) -> list[str]:
    """How far the long sections have got, from their results files (the accuracy protocol's rows
    when they exist: the epoch-based accuracy rows before it are kept only for the record)."""
    from benchmarks.compare import COVERAGE_MODELS, OURS, SEG_METHODS, SEG_MODELS, SEG_SEEDS, SEG_TARGETS, THEIRS

    seg_rows = read_rows(out / "compare_segmentation.csv")
    want_seg = len(SEG_MODELS) * len(SEG_TARGETS) * len(SEG_METHODS) * len(SEG_SEEDS)
    if (out / "accuracy.csv").exists():
        from benchmarks.accuracy_report import one_budget

        rows, _ = one_budget(read_rows(out / "accuracy.csv"))  # as the section counts them: no failed rows
        per = {}
        for r in rows:
            per.setdefault((r["model"], float(r["target"])), set()).add(r["method"])
        acc_rows = rows
        acc = (f"accuracy protocol {len(rows)} rows ({'; '.join(f'{m} at {t:.0%}: {len(v)} methods' for (m, t), v in sorted(per.items(), key=lambda k: (k[0][0], -k[0][1])))}"
               f"{'' if any('resnet56' in m for m, _ in per) else '; ResNet-56 none yet: ' + _r56_baseline()})")
    else:
        acc_rows = read_rows(out / "compare_accuracy.csv")
        acc = (f"accuracy {len(acc_rows)}/{2 * 2 * len(OURS + THEIRS) * len(args.seeds)} runs (ResNet-20 and ResNet-56 x "
               f"2 targets x {len(OURS + THEIRS)} methods x {len(args.seeds)} seeds)")
    hours = sum(float(r["seconds"] or 0) for r in acc_rows + seg_rows) / 3600
    return ["**Status.** "
            f"Coverage {len(read_rows(out / 'compare_coverage.csv'))}/{2 * len(COVERAGE_MODELS)} rows; {acc}; "
            f"segmentation curves {len(seg_rows)}/{want_seg} points ({len(SEG_MODELS)} U-Nets x {len(SEG_TARGETS)} "
            f"targets x {len(SEG_METHODS)} methods x {len(SEG_SEEDS)} seeds). Coverage, speed-up, accuracy and "
            "segmentation keep their finished rows, so a killed run goes on where it stopped (delete the results "
            f"files to start from scratch: the accuracy and segmentation rows alone cost {hours:.1f} h of this "
            "machine); the engine times are measured afresh by every run. Paper-scale accuracy needs a GPU "
            "(not run: no GPU was lent).", ""]


IW_CHANGES = (  # (folder, the run it is paired with, title): issue 18's changes to importance weights
    ("segmentation_rank_scale", "segmentation.json",
     "### Importance weights ranked by |alpha| x the channel's scale (ours, `--rank scale`; \"here\") against "
     "|alpha| alone (the paper's; \"there\"), paired by seed"),
    ("segmentation_rank_layer", "segmentation_reconstruct/segmentation.json",
     "### Importance weights ranked by |alpha| over its layer's mean (ours, `--rank layer`; \"here\") against "
     "|alpha| alone (the paper's; \"there\"), both re-fitted before every cut, paired by seed"),
    ("segmentation_alpha_lr", "segmentation_reconstruct/segmentation.json",
     "### Alpha learnt at its own rate (ours, `--alpha-lr {alpha_lr}`; \"here\") against the network's rate ({lr}, "
     "\"there\"), both re-fitted before every cut, paired by seed"),
    ("segmentation_min_keep", "segmentation_alpha_lr/segmentation.json",
     "### No layer below {min_keep:.0%} of its width (ours, `--min-keep {min_keep}`; \"here\") against the method's "
     "5% (\"there\"), both with alpha at its own rate ({alpha_lr}) and re-fitted before every cut, paired by seed"),
    ("segmentation_penalty", "segmentation_min_keep/segmentation.json",
     "### The L1 penalty scaled per layer by its loss gradient on alpha (ours, `--penalty {penalty}`; \"here\") "
     "against one penalty for every channel (the paper's; \"there\"), both with the {min_keep:.0%} floor, alpha at "
     "{alpha_lr} and re-fitted before every cut, paired by seed"),
    ("segmentation_rank_norm", "segmentation_penalty/segmentation.json",
     "### |alpha| setting each layer's width and the filters' L1 norms the channels inside it (ours, `--rank norm`; "
     "\"here\") against |alpha| choosing both (\"there\"), both with the gradient-scaled penalty, the {min_keep:.0%} "
     "floor, alpha at {alpha_lr} and re-fitted before every cut, paired by seed"),
    ("segmentation_final", "segmentation_rank_norm/segmentation.json",
     "### 1 fine-tuning epoch per step and {final_epochs} more after the last cut (\"here\") against 2 per step and "
     "none after (\"there\"; about the same epochs in all), both ranked by `norm`, paired by seed: is the short "
     "recovery after importance weights' last cut what it loses to L1's one cut?"),
)


def _iw_change_lines(out: Path) -> list[str]:
    """Each change to importance weights against the run it is paired with, when both
    results files are there (``benchmarks.segmentation --rank scale|layer`` or ``--alpha-lr``, ``--out docs/<folder>``)."""
    from benchmarks.segmentation import LATER
    from benchmarks.segmentation_report import versus_lines

    lines, widths = [], out / "segmentation_widths" / "widths.json"
    for folder, versus, title in IW_CHANGES:
        if folder == "segmentation_rank_norm" and widths.exists():  # the probe that motivated it goes first
            from benchmarks.segmentation_widths import summary_lines

            lines += summary_lines(json.loads(widths.read_text())["results"])
        path, other = out / folder / "segmentation.json", out / versus
        if not (path.exists() and other.exists()):
            continue
        saved = json.loads(path.read_text())
        rows = versus_lines(saved["results"], json.loads(other.read_text())["results"], "",
                            title.format_map({**LATER, "lr": None, **saved["args"]}))
        lines += rows + ["", f"Details: {folder}/segmentation.md.", ""] if rows else []
    if lines and (out / "alpha_gradients.csv").exists():
        lines += ["Why |alpha| empties the deep layers first: the loss gradient on alpha per layer, against the L1 "
                  "penalty, in alpha_gradients.md (`python -m benchmarks.alpha_gradients`).", ""]
    return lines


def _reconstruct_lines(out: Path, seg: dict) -> list[str]:
    """Both methods re-fitted before every cut on the U-Nets (``benchmarks.segmentation --runs fixed
    --reconstruct 8 --out docs/segmentation_reconstruct --work runs/segmentation_reconstruct``), against
    the same runs without the re-fit, and the -85% claim read again on the re-fitted importance
    weights, when that run is there."""
    from benchmarks.segmentation_report import claim_line, versus_lines

    path = out / "segmentation_reconstruct" / "segmentation.json"
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    n = saved["args"].get("reconstruct", 0)
    title = (f"### Each cut re-fitted by least squares on {n} training images (`reconstruct={n}`; \"here\") against the "
             "same runs without it (\"there\"), paired by seed")
    lines = versus_lines(saved["results"], seg, "", title, methods=("iw", "l1"))
    if not lines:
        return []
    claim = claim_line(saved["results"], saved["args"].get("fixed", 0.15)).replace("importance weights' drops",
                                                                                   "re-fitted importance weights' drops")
    return lines + ["", claim, "", "Details: segmentation_reconstruct/segmentation.md.", ""]


def write_report(args) -> Path:
    from benchmarks.claims import claims
    from benchmarks.compare import (OURS, SEG_PHASE_EPOCHS, THEIRS, summarize)

    out = Path(args.out)
    cov = read_rows(out / "compare_coverage.csv")
    eng = read_rows(out / "engine_speed.csv")
    speed = read_rows(out / "compare_speedup.csv")
    acc = summarize(out / "compare_accuracy.csv", "top1")
    curves = summarize(out / "compare_segmentation.csv", "iou")
    # the epoch-based rows' scatter only while they stand in for the accuracy protocol's
    made = _plots(out, [] if (out / "accuracy.csv").exists() else acc, speed, curves)
    seg = json.loads((out / "segmentation.json").read_text())["results"] if (out / "segmentation.json").exists() else {}
    try:
        import torch_pruning as tp
        tp_version = tp.__version__
    except ImportError:
        tp_version = "not installed"
    import torchvision

    title = "Benchmarks (QUICK settings: a smoke test of the machinery, not results)" if args.quick else "Benchmarks"
    L = [f"# {title}", "",
         f"Generated by `python -m benchmarks.all{' --quick' if args.quick else ''}` from the results files in this "
         f"folder ({', '.join(f for f in RESULTS if (out / f).exists())}); "
         "every number below is in one of them.", "",
         f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, {args.threads} threads; Python "
         f"{sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
         f"Torch-Pruning {tp_version}. CPU protocol (no GPU): short fine-tunes on subsets, labelled in each section.",
         "", "Commands (from the repository root, after `pip install -e '.[test,bench]'`; `../shared/data` beside it):",
         "", "```",
         "python -m benchmarks.all                          # every section, then this file; finished rows are kept",
         "python -m benchmarks.all --sections engine speedup # some sections only (the report uses every results file)",
         "python -m benchmarks.all --report-only            # this file and its plots from the results files",
         "python -m benchmarks.all --quick                  # the same machinery on tiny settings (CI), runs/bench-quick",
         "python -m benchmarks.compare --help               # sections 1, 3, 4 and the segmentation curves, options",
         "python -m benchmarks.engine_speed --help          # section 2",
         "python -m benchmarks.segmentation --help          # method 4 with its error tolerance",
         "python -m benchmarks.reconstruct --help           # section 4's reconstruction table (docs/reconstruct.md)",
         "python -m benchmarks.plan_noise --help            # section 3's table-noise sentence (docs/plan_noise.md)",
         "```", ""]
    if not args.quick:
        L += _status(out, args)
    L += ["## 1. Coverage: torchvision models pruned to 50% of every group's channels", "",
          "Forward shape, finite outputs, a backward pass, MACs drop; the classifier / segmentation head kept.", "",
          "| model | secateurs | Torch-Pruning |", "|---|---|---|"]
    by = {}
    for r in cov:
        by.setdefault(r["model"], {})[r["tool"]] = r
    for model, rs in by.items():
        cells = []
        for tool in ("secateurs", "torch_pruning"):
            r = rs.get(tool)
            cells.append("-" if r is None else (f"ok, {float(r['kept_macs']):.0%} MACs" if r["status"] == "ok"
                                                 else f"**{r['status']}**: {r['note']}"))
        L.append(f"| {model} | {cells[0]} | {cells[1]} |")
    ok = {t: sum(1 for rs in by.values() if rs.get(t, {}).get("status") == "ok") for t in ("secateurs", "torch_pruning")}
    L += ["", f"Pruned correctly: secateurs {ok['secateurs']}/{len(by)}, Torch-Pruning {ok['torch_pruning']}/{len(by)}. "
          "The full torchvision sweep of our engine alone is docs/coverage.md.", ""]
    L += ["## 2. Engine time: `secateurs.prune` 50% as a user calls it (median, seconds; docs/engine_speed.md)", "",
          "| model | secateurs | Torch-Pruning | ratio (paired, median) | 95% interval |", "|---|---|---|---|---|"]
    L += [f"| {r['model']} | {r['secateurs_s']} | {r['torch_pruning_s']} | {r['ratio']} | "
          f"{r['ratio_lo'] + '-' + r['ratio_hi'] if r.get('ratio_lo') else ''} |" for r in eng]
    L += _speedup_section(speed) + _plan_noise_lines(out)
    L += ["## 4. Accuracy at equal MACs, CIFAR-10 (JPEG)", ""]
    if (out / "accuracy.csv").exists():  # the one-step-budget protocol (issue 18) supersedes the epoch-based rows
        L += _protocol_accuracy(out / "accuracy.csv")
    elif acc:
        a0 = acc[0]
        L += [f"Every row: the zoo model pruned to the target, then {a0['epochs']} fine-tuning epoch(s) on "
              f"{a0['train_images']} training images (SGD, the same recipe, `benchmarks/_protocol.py`), top-1 on "
              f"{a0['val_images']} test images; mean +- std over the seeds. Methods that train while "
              "pruning (hfp, importance-weights, Torch-Pruning's bn_scale / group_norm regularizers) spend one of those "
              "epochs doing so.", "",
              "| model | target | method | tool | MACs kept | top-1 before | top-1 after (mean +- std) | seeds |",
              "|---|---|---|---|---|---|---|---|"]
        for r in sorted(acc, key=lambda r: (r["model"], -r["target"], -r["mean"])):
            L.append(f"| {r['model']} | {r['target']:.0%} | {r['method']} | {r['tool']} | {r['kept_macs']:.1%} | "
                     f"{r['before']:.2f} | {r['mean']:.2f} +- {r['std']:.2f} | {r['seeds']} |")
        L.append("")
        for (model, target) in sorted({(r["model"], r["target"]) for r in acc}, key=lambda k: (k[0], -k[1])):
            L += _best_line(f"{model} at {target:.0%}",
                            [r for r in acc if r["model"] == model and r["target"] == target])
    if (out / "reconstruct.csv").exists():
        from benchmarks.reconstruct import table
        L += ["", "### Least-squares reconstruction before the cut: top-1 with no fine-tuning (docs/reconstruct.md)", "",
              *table(read_rows(out / "reconstruct.csv"))]
    L += ["", "## 5. Segmentation: MACs vs IoU per method (U-Net)", ""]
    if curves:
        c0 = curves[0]
        targets = sorted({r["target"] for r in curves}, reverse=True)
        L += [f"Every point: the zoo U-Net (`unet16`, trained here; docs/segmentation.md describes it and the data) "
              f"pruned to the MACs target (counted at 256x256), then {c0['epochs']} epochs on the training slices "
              "(AdamW lr 3e-4, the zoo recipe's crops), IoU of the foreground class on the validation slices; "
              f"mean +- std over {max(r['seeds'] for r in curves)} seed(s). Methods that train while pruning (hfp, "
              f"importance-weights, Torch-Pruning's bn_scale / group_norm regularizers) spend {SEG_PHASE_EPOCHS} of those "
              "epochs doing so and 1 fine-tuning right after "
              "the cut; `importance-weights` here cuts once to the target by |alpha| (fraction 1), the tolerance "
              "schedule is the next table. Cells: IoU mean +- std (MACs kept).", ""]
        for model in sorted({r["model"] for r in curves}):
            rows = [r for r in curves if r["model"] == model]
            L += [f"**{model}** (IoU before pruning {rows[0]['before']:.2f})", "",
                  "| method | tool | " + " | ".join(f"{t:.0%}" for t in targets) + " |",
                  "|---|---|" + "---|" * len(targets)]
            rank = {m: i for i, m in enumerate(OURS + THEIRS)}
            for method in sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: rank.get(m, len(rank))):
                cells = []
                for t in targets:
                    r = next((r for r in rows if r["method"] == method and r["target"] == t), None)
                    cells.append("-" if r is None else f"{r['mean']:.2f} +- {r['std']:.2f} ({r['kept_macs']:.1%})" if r["mean"] is not None
                                 else "error")
                L.append(f"| {method} | {next(r['tool'] for r in rows if r['method'] == method)} | "
                         + " | ".join(cells) + " |")
            L.append("")
            errors = {r["method"]: r["note"] for r in rows if r["mean"] is None}
            L += [f"- `{m}` failed: {note}" for m, note in errors.items()]
            for t in targets:
                L += _best_line(f"at {t:.0%}", [r for r in rows if r["target"] == t])
            L.append("")
        if "segmentation_iou_vs_macs.png" in made:
            L += ["![IoU vs MACs kept](segmentation_iou_vs_macs.png)", ""]
    if seg:
        from benchmarks.segmentation_report import seg_summary

        L += ["### Method 4 with its error tolerance beside L1 at the same MACs", "", *seg_summary(seg),
              "", "Details, curves and predictions: segmentation.md in this folder.", ""]
        L += _iw_change_lines(out) + _reconstruct_lines(out, seg)
    L += ["## The papers' claims next to what we measured", "", "| method | paper | measured here |", "|---|---|---|"]
    L += [f"| {a} | {b} | {c} |" for a, b, c in claims(ROOT / "docs")]  # every figure from a results file
    L += [""] + [f"![{p}]({p})" for p in made if p != "segmentation_iou_vs_macs.png"] + [""]
    path = out / "BENCHMARKS.md"
    path.write_text("\n".join(L) + "\n")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings, for CI: the machinery, not results")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default=None, help="default: docs/ (full) or runs/bench-quick (--quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS,
                   help="run only these (the report is always rebuilt from every results file present)")
    p.add_argument("--epochs", type=int, default=2, help="accuracy: fine-tuning epochs, the same for every row")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--subset", type=int, default=5000)
    p.add_argument("--val-subset", type=int, default=2000)
    args = p.parse_args(argv)
    args.out = args.out or str(ROOT / ("runs/bench-quick" if args.quick else "docs"))
    torch.set_num_threads(args.threads)
    if not args.report_only:
        run(args)
    print(f"wrote {write_report(args)}")


if __name__ == "__main__":
    main()
