"""Method 1 (heuristic estimator) beside L1-norm uniform pruning at the same MACs and fine-tuning.

For each setting: run the heuristic for ``--rounds`` prune -> fine-tune rounds (it may stop
earlier), read the MACs it reached, then prune the same starting model with L1 uniform to that
MACs fraction in one shot and fine-tune it for the same total number of epochs. Top-1 on the
validation subset, MACs/params kept, and CPU latency (batch 8, ``--threads`` threads, median).

CPU protocol (default; labelled in the output): ResNet-20 on CIFAR-10 (JPEG) and a small VGG on
Fashion-MNIST, fine-tuning on training subsets. Paper scale (GPU): ``--settings vgg16_cifar10
resnet56_cifar10 --subset 0 --val-subset 0 --epochs 10``.

Usage::

    python -m benchmarks.heuristic                   # docs/heuristic.{md,csv}
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import warnings
from dataclasses import replace

import torch

from benchmarks._protocol import (add_protocol_args, cifar10, finetune_config, latency_columns, speedup_cell, start,
                                  write_rows)

SETTINGS = {
    "resnet20_cifar10": {"pretrained": "cifar_resnet20_cifar10", "data": "cifar10"},
    "vgg_small_fmnist": {"pretrained": "vgg_small_fmnist", "data": "fashion-mnist"},
    "resnet56_cifar10": {"pretrained": "cifar_resnet56_cifar10", "data": "cifar10"},
}


def run_setting(name, args):
    import secateurs
    from secateurs.models import load_pretrained
    from secateurs.train import evaluate

    cfg = SETTINGS[name]
    train, val = cifar10(args, cfg["data"])
    base = load_pretrained(cfg["pretrained"])
    x = torch.randn(1, *val.images.shape[1:])
    top1 = evaluate(base, val)["top1"]
    ft = finetune_config(args, args.epochs)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h, rep = secateurs.prune(copy.deepcopy(base), x, "heuristic", args.macs, steps=args.rounds, data=train,
                                 val_data=val, finetune=ft, tolerance=args.tolerance,
                                 method_options={"kappa": args.kappa, "min_keep": args.min_keep, "scope": args.scope}, latency_guard=False)
    rounds = len([s for s in rep["steps"][1:] if not s.get("reverted")])
    rows.append(_row(name, f"heuristic (kappa {args.kappa}, {args.scope})", rep, top1, latency_columns(base, h, x, args.threads),
                     rounds * args.epochs, rep.get("stopped", f"{rounds} rounds")))
    same = replace(ft, epochs=max(1, rounds * args.epochs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        l1, rep1 = secateurs.prune(copy.deepcopy(base), x, "l1", rep["kept"]["macs"], allocation="uniform", data=train,
                                   val_data=val, finetune=same, latency_guard=False)
    rows.append(_row(name, "L1 uniform, same MACs", rep1, top1, latency_columns(base, l1, x, args.threads), same.epochs,
                     "one shot"))
    return rows


def _row(setting, method, rep, top1, latency, epochs, stop):
    row = {"setting": setting, "method": method, "macs_reduction": round(1 - rep["kept"]["macs"], 4),
           "params_reduction": round(1 - rep["kept"]["params"], 4), "top1_before": round(top1, 2),
           "top1_after": round(rep["after"]["metric"], 2), **latency, "finetune_epochs": epochs,
           "stop": stop}
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["resnet20_cifar10", "vgg_small_fmnist"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per heuristic round")
    p.add_argument("--kappa", type=float, default=0.5)
    p.add_argument("--min-keep", type=float, default=0.1)
    p.add_argument("--scope", default="layer")
    p.add_argument("--macs", type=float, default=None, help="optional MACs target (a stop rule)")
    p.add_argument("--tolerance", type=float, default=None)
    add_protocol_args(p)
    args = p.parse_args(argv)
    out = start(args)
    rows = [r for s in args.settings for r in run_setting(s, args)]
    write_rows(out / "heuristic.csv", rows)
    protocol = (f"CPU protocol: fine-tuning on {args.subset or 'all'} training images, {args.epochs} epoch(s) per "
                f"heuristic round (SGD lr {args.lr}, cosine, batch 128), top-1 on {args.val_subset or 'all'} test images")
    lines = ["# Method 1: heuristic estimator vs L1 uniform at the same MACs", "",
             f"`python -m benchmarks.heuristic --rounds {args.rounds} --epochs {args.epochs} --kappa {args.kappa}` on {platform.machine()}, "
             f"{os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}. {protocol}. "
             "The L1 baseline is pruned in one shot to the MACs the heuristic reached and fine-tuned for the same "
             "total epochs. Latency: unpruned and pruned timed interleaved, 30 rounds "
             "(`secateurs.latency.compare_dense_pruned`): the median per model, and the median of the per-round speed-ups "
             "with its 95% interval. Raw data: `heuristic.csv`.", "",
             "| setting | method | MACs | params | top-1 before | top-1 after | latency b1 (ms) | b1 speed-up | "
             "latency b8 (ms) | b8 speed-up | fine-tune epochs | stop |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['method']} | -{r['macs_reduction']:.1%} | -{r['params_reduction']:.1%} | "
                     f"{r['top1_before']} | {r['top1_after']} | {r['lat_b1_before']} -> {r['lat_b1_after']} | {speedup_cell(r, 1)} | "
                     f"{r['lat_b8_before']} -> {r['lat_b8_after']} | {speedup_cell(r, 8)} | {r['finetune_epochs']} | {r['stop']} |")
    (out / "heuristic.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
