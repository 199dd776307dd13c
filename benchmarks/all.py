"""The whole benchmark report, secateurs beside Torch-Pruning, by one command.

Runs every section into ``--out`` (results files first, then ``BENCHMARKS.md`` and its plots
generated from them only), keeping finished rows so that a killed run continues:

1. coverage (``benchmarks.compare``), 2. engine time (``benchmarks.engine_speed``),
3. realized speed-up (``benchmarks.compare``), 4. accuracy at equal MACs (``benchmarks.compare``),
5. segmentation (``benchmarks.segmentation``, method 4 beside L1).

Usage::

    python -m benchmarks.all                    # the CPU protocol report: docs/BENCHMARKS.md (hours on 2 cores)
    python -m benchmarks.all --quick            # the same machinery on tiny settings (< 10 minutes), into runs/bench-quick
    python -m benchmarks.all --report-only      # regenerate the markdown and plots from the results files
    python -m benchmarks.all --sections accuracy --epochs 30 --subset 0 --val-subset 0   # paper-scale accuracy (GPU)
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["coverage", "engine", "speedup", "accuracy", "segmentation"]

CLAIMS = [  # ../shared/METHODS.md's headline claims, and where we measure the same thing
    ("1. heuristic", "VGG16/ImageNet MACs -77.47%, about 5x speed-up; ResNet34 MACs -41.94%",
     "docs/heuristic.md: small VGG on Fashion-MNIST -76.9% MACs at -2.5 top-1 (1 epoch per round, CPU)"),
    ("2. layer pruning", "ResNet-56/CIFAR-10: truncating stage 3 after its first block: MACs -30.02%, params -69.16%",
     "docs/layer_pruning.md: the same arithmetic exactly (-30.02% / -69.16%); rank mode -30.0% MACs at L1's accuracy"),
    ("3. HFP", "exact MACs/params targets reached by gradient descent during training",
     "docs/hfp.md: ResNet-20 49.75% for a 50% target; ResNet-50 39.9990% for 40%"),
    ("4. importance weights", "U-Net/TernausNet (Inria, AIRS): MACs -85% for a 0.32% accuracy drop, 6x smaller, ~7x faster",
     "docs/segmentation.md (quarter-width nets trained here; ISBI 2012, HeLa; 1 point of pixel accuracy): "
     "MACs -53%/-71% (U-Net), -80%/-89% (TernausNet); files 15-115x smaller; 1.6-2.5x faster at batch 1, 512px"),
]


def _csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def run(args) -> None:
    from benchmarks import compare, engine_speed, segmentation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--out", str(out), "--threads", str(args.threads)]
    if args.quick:
        compare.main(["--sections", "coverage", "--coverage-models", "resnet18", "mobilenet_v2", *common])
        engine_speed.main(["--models", "resnet18", "mobilenet_v2", "--repeats", "1", "--out", str(out)])
        compare.main(["--sections", "speedup", "--speedup-models", "cifar_resnet56", "--repeats", "3", *common])
        compare.main(["--sections", "accuracy", "--models", "cifar_resnet20_cifar10", "--targets", "0.5",
                      "--methods", "l1", "heuristic", "importance-weights", "tp_magnitude", "tp_bn_scale",
                      "--seeds", "0", "1", "--epochs", "1", "--subset", "256", "--val-subset", "200", *common])
        segmentation.main(["--models", "unet16_isbi2012", "--max-steps", "1", "--iw-epochs", "1", "--ft-epochs", "1",
                           "--fraction", "0.2", "--work", str(out / "seg_runs"), "--out", str(out),
                           "--threads", str(args.threads)])
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
            segmentation.main(["--out", str(out), "--work", str(ROOT / "runs" / "segmentation"),
                               "--threads", str(args.threads)])


def _plots(out: Path, acc: list[dict], speed: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    models = sorted({r["model"] for r in acc})
    if models:
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models):
            rows = [r for r in acc if r["model"] == model]
            for method in sorted({r["method"] for r in rows}):
                pts = sorted((r["kept_macs"], r["top1_mean"], r["top1_std"]) for r in rows if r["method"] == method)
                ax.errorbar([100 * p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            linestyle="--" if method.startswith("tp_") else "-", label=method, capsize=3)
            ax.axhline(rows[0]["top1_before"], color="gray", linewidth=0.8)
            ax.set_xlabel("MACs kept (%)")
            ax.set_ylabel("top-1 (%)")
            ax.set_title(model)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_macs.png", dpi=80)
        plt.close(fig)
        made.append("accuracy_vs_macs.png")
    if speed:
        fig, ax = plt.subplots(figsize=(6, 4))
        base = {r["model"]: r for r in speed if r["tool"] == "unpruned"}
        for tool, marker in (("secateurs", "o"), ("torch_pruning", "s")):
            pts = [(float(r["kept_macs"]), float(base[r["model"]]["torch_b8_ms"]) / float(r["torch_b8_ms"]))
                   for r in speed if r["tool"] == tool and r["model"] in base]
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


def write_report(args) -> Path:
    from benchmarks.compare import summarize_accuracy

    out = Path(args.out)
    cov = _csv(out / "compare_coverage.csv")
    eng = _csv(out / "engine_speed.csv")
    speed = _csv(out / "compare_speedup.csv")
    acc = summarize_accuracy(out / "compare_accuracy.csv")
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
         f"folder ({', '.join(f for f in ('compare_coverage.csv', 'engine_speed.csv', 'compare_speedup.csv', 'compare_accuracy.csv', 'segmentation.json') if (out / f).exists())}); "
         "every number below is in one of them.", "",
         f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, {args.threads} threads; Python "
         f"{sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
         f"Torch-Pruning {tp_version}. CPU protocol (no GPU): short fine-tunes on subsets, labelled in each section.",
         ""]
    if not args.quick:
        from benchmarks.compare import COVERAGE_MODELS, OURS, THEIRS

        n_acc = len(_csv(out / "compare_accuracy.csv"))
        want = 2 * 2 * len(OURS + THEIRS) * len(args.seeds)
        L += ["**Status.** "
              f"Coverage {len(_csv(out / 'compare_coverage.csv'))}/{2 * len(COVERAGE_MODELS)} rows; "
              f"accuracy {n_acc}/{want} runs (ResNet-20 and ResNet-56 x 2 targets x {len(OURS + THEIRS)} methods x "
              f"{len(args.seeds)} seeds); missing rows are filled by running the same command again (finished rows "
              "are kept). Engine times come from `engine_speed.csv` as last measured by `benchmarks.engine_speed`. "
              "Paper-scale accuracy needs a GPU: `python -m benchmarks.all --sections accuracy --epochs 30 "
              "--subset 0 --val-subset 0` (not run: no GPU was lent).", ""]
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
    L += ["## 2. Engine time: analyse + prune 50% (median, seconds)", "", "| model | secateurs | Torch-Pruning | ratio |",
          "|---|---|---|---|"]
    L += [f"| {r['model']} | {r['secateurs_s']} | {r['torch_pruning_s']} | {r['ratio']} |" for r in eng]
    L += ["", "## 3. Realized speed-up at 50% MACs (L2, global, widths multiples of 8)", "",
          "| model | tool | MACs kept | PyTorch b1 | PyTorch b8 | onnxruntime b1 | onnxruntime b8 |", "|---|---|---|---|---|---|---|"]
    base = {r["model"]: r for r in speed if r["tool"] == "unpruned"}
    for r in speed:
        b = base.get(r["model"])
        if r["tool"] == "unpruned" or b is None:
            continue
        sp = [f"{float(b[k]) / float(r[k]):.2f}x" for k in ("torch_b1_ms", "torch_b8_ms", "ort_b1_ms", "ort_b8_ms")]
        L.append(f"| {r['model']} | {r['tool']} | {float(r['kept_macs']):.1%} | " + " | ".join(sp) + " |")
    L += ["", "Speed-up = unpruned latency / pruned latency, median of the repeats; latency on this shared machine "
          "varies 20-30% between identical runs (docs/speedup.md).", ""]
    L += ["## 4. Accuracy at equal MACs, CIFAR-10 (JPEG)", ""]
    if acc:
        a0 = acc[0]
        L += [f"Every row: the zoo model pruned to the target, then {a0['epochs']} fine-tuning epoch(s) on "
              f"{a0['train_images']} training images (SGD, the same recipe, `benchmarks/_protocol.py`), top-1 on "
              f"{a0['val_images']} test images; mean +- std over the seeds. Methods that train while "
              "pruning (hfp, importance-weights, Torch-Pruning's bn_scale / group_norm regularizers) spend one of those "
              "epochs doing so.", "",
              "| model | target | method | tool | MACs kept | top-1 before | top-1 after (mean +- std) | seeds |",
              "|---|---|---|---|---|---|---|---|"]
        for r in sorted(acc, key=lambda r: (r["model"], -r["target"], -r["top1_mean"])):
            L.append(f"| {r['model']} | {r['target']:.0%} | {r['method']} | {r['tool']} | {r['kept_macs']:.1%} | "
                     f"{r['top1_before']:.2f} | {r['top1_mean']:.2f} +- {r['top1_std']:.2f} | {r['seeds']} |")
        L.append("")
        for (model, target) in sorted({(r["model"], r["target"]) for r in acc}, key=lambda k: (k[0], -k[1])):
            rows = [r for r in acc if r["model"] == model and r["target"] == target]
            best = {t: max((r for r in rows if r["tool"] == t), key=lambda r: r["top1_mean"], default=None)
                    for t in ("secateurs", "torch_pruning")}
            if all(best.values()):
                a, b = best["secateurs"], best["torch_pruning"]
                L.append(f"- {model} at {target:.0%}: best of ours `{a['method']}` {a['top1_mean']:.2f}, best of "
                         f"Torch-Pruning's `{b['method']}` {b['top1_mean']:.2f} ({a['top1_mean'] - b['top1_mean']:+.2f} points).")
    L += ["", "## 5. Segmentation: method 4 beside L1 at the same MACs", ""]
    if seg:
        L += ["| model | method | MACs kept | metric drop (pixel acc / IoU) | file smaller | latency b1 512 |",
              "|---|---|---|---|---|---|"]
        for name, r in seg.items():
            b = r["base"]
            for tag in ("iw", "l1"):
                p = r[tag]
                lat = (f"{b['latency_b1_512_ms'] / p['latency_b1_512_ms']:.2f}x" if "latency_b1_512_ms" in p else "-")
                L.append(f"| {name} | {'importance weights' if tag == 'iw' else 'L1'} | {p['macs_256'] / b['macs_256']:.1%} | "
                         f"{b['pixel_acc'] - p['pixel_acc']:+.2f} / {b['iou'] - p['iou']:+.2f} | "
                         f"{b['file_bytes'] / p['file_bytes']:.1f}x | {lat} |")
        L += ["", "Details, curves and predictions: segmentation.md in this folder.", ""]
    L += ["## The papers' claims next to what we measured", "", "| method | paper | measured here |", "|---|---|---|"]
    L += [f"| {a} | {b} | {c} |" for a, b, c in CLAIMS]
    L += [""] + [f"![{p}]({p})" for p in _plots(out, acc, speed)] + [""]
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
