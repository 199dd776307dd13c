"""Method 3 (HFP) beside L1 uniform and L1 global at the same MACs and the same total epochs.

HFP trains with the budget loss until the hard count meets ``--macs`` (at most ``--hfp-epochs``),
cuts, and fine-tunes ``--epochs``; the baselines are pruned one-shot to the MACs HFP reached and
fine-tuned for HFP's total number of epochs. Also a structural check: HFP drives a torchvision
ResNet-50 (random init, 10 classes) to 40% of its MACs on CIFAR-10 images resized to 64x64.

Usage::

    python -m benchmarks.hfp                       # docs/hfp.{md,csv}, docs/hfp_curves.png
    python -m benchmarks.hfp --models cifar_resnet56_cifar10 --subset 0 --val-subset 0 --hfp-epochs 30 --epochs 30  # GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import warnings
from dataclasses import replace

import torch

from benchmarks._protocol import add_protocol_args, cifar10, finetune_config, start, write_rows
import torch.nn.functional as F


def _resized(ds, size):
    from secateurs.data import ArrayDataset

    x = F.interpolate(ds.images.float(), size=(size, size), mode="bilinear", align_corners=False)
    return ArrayDataset(ds.name + f" at {size}px", x.round().clamp(0, 255).to(torch.uint8), ds.targets, ds.classes,
                        mean=ds.mean, std=ds.std)


def main(argv=None) -> None:
    import secateurs
    from secateurs.models import create_model, load_pretrained
    from secateurs.train import TrainConfig, evaluate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cifar_resnet20_cifar10"])
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--hfp-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs after the cut")
    p.add_argument("--lam", type=float, default=5.0)
    p.add_argument("--resnet50-check", type=int, default=0, metavar="N",
                   help="also prune a random-init torchvision ResNet-50 (64px) to 40%% MACs on N images (0: skip)")
    add_protocol_args(p)
    args = p.parse_args(argv)
    out = start(args)
    train, val = cifar10(args)
    x = torch.randn(1, 3, 32, 32)
    ft = finetune_config(args, args.epochs)
    rows, curves, widths = [], {}, {}
    for name in args.models:
        base = load_pretrained(name)
        top1 = evaluate(base, val)["top1"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            h, rep = secateurs.prune(copy.deepcopy(base), x, "hfp", args.macs, data=train, val_data=val, finetune=ft,
                                     method_options={"epochs": args.hfp_epochs, "lam": args.lam}, latency_guard=False)
        steps_per_epoch = len(train) // ft.batch_size
        hfp_epochs = math.ceil(rep["method_output"]["hfp_steps"] / steps_per_epoch)
        total = hfp_epochs + args.epochs
        curves[name] = rep["method_output"]["hfp_history"]
        widths[name] = {"hfp": [l["width_after"] for l in rep["layers"]], "before": [l["width_before"] for l in rep["layers"]]}
        rows.append(_row(name, "HFP", rep, top1, total, f"converged at step {rep['method_output']['hfp_steps']}" if rep["method_output"]["hfp_converged"]
                         else "not converged: lowest gates cut"))
        for allocation in ("uniform", "global"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m, r = secateurs.prune(copy.deepcopy(base), x, "l1", rep["kept"]["macs"], allocation=allocation,
                                       data=train, val_data=val, finetune=replace(ft, epochs=total), latency_guard=False)
            widths[name][allocation] = [l["width_after"] for l in r["layers"]]
            rows.append(_row(name, f"L1 {allocation}, same MACs", r, top1, total, "one shot"))
    check = None
    if args.resnet50_check:
        small = _resized(train.subset(args.resnet50_check, 0), 64)
        torch.manual_seed(0)
        r50 = create_model("torchvision:resnet50", num_classes=10)
        x64 = torch.randn(1, 3, 64, 64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r50, rep = secateurs.prune(r50, x64, "hfp", 0.4, data=small,
                                       finetune=TrainConfig(batch_size=32, lr=0.05, quiet=True),
                                       method_options={"epochs": 5, "lam": 20.0, "warmup_steps": 10}, latency_guard=False)
        check = {"kept_macs": rep["kept"]["macs"], "kept_params": rep["kept"]["params"], "steps": rep["method_output"]["hfp_steps"],
                 "converged": rep["method_output"]["hfp_converged"], "curve": [h["hfp_macs"] for h in rep["method_output"]["hfp_history"]]}
        print("resnet50 check", check, flush=True)
        check["images"] = args.resnet50_check
        (out / "hfp_resnet50.json").write_text(json.dumps(check, indent=1) + "\n")
    elif (out / "hfp_resnet50.json").exists():  # the check from an earlier run, kept with its results file
        check = json.loads((out / "hfp_resnet50.json").read_text())
    write_rows(out / "hfp.csv", rows)
    _plot(curves, widths, out / "hfp_curves.png")
    write_doc(out, args, rows, check)


def write_doc(out, args, rows: list[dict], check: dict | None) -> None:
    """hfp.md from the rows (hfp.csv) and the ResNet-50 check (hfp_resnet50.json)."""
    lines = ["# Method 3: Holistic Filter Pruning vs L1 at the same MACs and epochs", "",
             f"`python -m benchmarks.hfp --macs {args.macs} --hfp-epochs {args.hfp_epochs} --epochs {args.epochs} --lam {args.lam}` "
             f"on {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}. "
             f"CPU protocol: {args.subset or 'all'} CIFAR-10 (JPEG) training images (SGD lr {args.lr}, batch 128; constant "
             "lr while HFP prunes, cosine while fine-tuning), top-1 on "
             f"{args.val_subset or 'all'} test images. Baselines are fine-tuned for HFP's total epochs (pruning phase "
             "rounded up to whole epochs, plus fine-tuning). Raw data: `hfp.csv`; curves and widths: `hfp_curves.png`.", "",
             "| model | method | MACs kept | params kept | top-1 before | top-1 after | epochs | note |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['macs_kept']:.2%} | {r['params_kept']:.2%} | {r['top1_before']} | "
                     f"{r['top1_after']} | {r['epochs']} | {r['note']} |")
    if check:
        lines += ["", "## Structural check: torchvision ResNet-50 to 40% MACs", "",
                  f"Random-init ResNet-50 (10 classes), {check['images']} CIFAR-10 images resized to 64x64, batch 32, "
                  f"lr 0.05, lambda 20: HFP's hard count met the target after {check['steps']} steps "
                  f"(converged: {check['converged']}); the physically pruned model keeps {check['kept_macs']:.2%} of "
                  f"the MACs (target 40%, so {abs(check['kept_macs'] - 0.4) * 100:.2f} points from it) and "
                  f"{check['kept_params']:.2%} of the params. MACs fraction per epoch: "
                  + ", ".join(f"{c:.3f}" for c in check["curve"]) + ". This checks that the budget is met on a "
                  "large network; it says nothing about ImageNet accuracy, which cannot be run here. Raw data: "
                  "`hfp_resnet50.json` (`--resnet50-check N` runs it again)."]
    (out / "hfp.md").write_text("\n".join(lines) + "\n")


def _row(name, method, rep, top1, epochs, note):
    row = {"model": name, "method": method, "macs_kept": round(rep["kept"]["macs"], 4),
           "params_kept": round(rep["kept"]["params"], 4), "top1_before": round(top1, 2),
           "top1_after": round(rep["after"]["metric"], 2), "epochs": epochs, "note": note}
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def _plot(curves, widths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, hist in curves.items():
        ep = [h["epoch"] for h in hist]
        axes[0].plot(ep, [h["hfp_macs"] for h in hist], "o-", label=f"{name}: MACs kept")
        if hist and "val_top1" in hist[0]:
            ax2 = axes[0].twinx()
            ax2.plot(ep, [h["val_top1"] for h in hist], "s--", color="#b03a2e", label="top-1")
            ax2.set_ylabel("top-1 (%)")
    axes[0].set_xlabel("HFP epoch")
    axes[0].set_ylabel("MACs kept (hard count)")
    axes[0].set_title("HFP: budget and accuracy while training")
    for name, w in widths.items():
        xs = range(len(w["before"]))
        axes[1].plot(xs, w["before"], color="#c8d3e0", label="before")
        for key, style in (("hfp", "o-"), ("uniform", "x--"), ("global", "^:")):
            if key in w:
                axes[1].plot(xs, [v or 0 for v in w[key]], style, label=key, markersize=3)
    axes[1].set_xlabel("layer (network order)")
    axes[1].set_ylabel("output channels")
    axes[1].set_title("Per-layer widths: HFP vs uniform vs global")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
