"""Method 2 (discriminative layer pruning) and its cascade, beside filter-only pruning at the same MACs.

For each zoo model: (1) ``dlp`` removes blocks (``--mode``, by default rank to ``--macs``),
(2) ``dlp+filters`` adds ``--filter-steps`` PLS-VIP filter steps; every pruned model is fine-tuned
for ``--epochs`` per step, and L1 filter pruning (uniform) is run to the *same* MACs with the *same*
total epochs. Reports MACs/params reduction, top-1 and measured CPU latency at batch 1 and 8
(depth should cut batch-1 latency more than its MACs share suggests).

Usage::

    python -m benchmarks.layer_pruning                       # docs/layer_pruning.{md,csv}
    python -m benchmarks.layer_pruning --models cifar_resnet56_cifar10 --epochs 40 --subset 0 --val-subset 0   # GPU
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import warnings
from dataclasses import replace

import torch

from benchmarks._protocol import (add_protocol_args, cifar10, finetune_config, latency_columns, read_rows, speedup_cell,
                                  start, write_rows)


def main(argv=None) -> None:
    import secateurs
    from secateurs.models import load_pretrained
    from secateurs.train import evaluate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cifar_resnet20_cifar10", "cifar_resnet56_cifar10"])
    p.add_argument("--mode", default="rank")
    p.add_argument("--macs", type=float, default=0.7, help="rank mode: kept MACs target of the layer step")
    p.add_argument("--filter-steps", type=int, default=2)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs after every step")
    add_protocol_args(p)
    args = p.parse_args(argv)
    out = start(args)
    train, val = cifar10(args)
    x = torch.randn(1, 3, 32, 32)
    ft = finetune_config(args, args.epochs)
    csv_path = out / "layer_pruning.csv"
    rows = read_rows(csv_path)  # finished models are kept
    for name in args.models:
        if any(r["model"] == name for r in rows):
            continue
        base = load_pretrained(name)
        top1 = evaluate(base, val)["top1"]
        runs = [("dlp", 1, {"mode": args.mode, "per_class": args.per_class}),
                ("dlp+filters", 1 + args.filter_steps, {"mode": args.mode, "per_class": args.per_class})]
        for method, steps, opts in runs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                target = args.macs if args.mode == "rank" else None
                m, rep = secateurs.prune(copy.deepcopy(base), x, method, target, steps=steps, data=train, val_data=val,
                                         finetune=ft, method_options=opts, latency_guard=False)
                done = len(rep["steps"]) - 1
                blocks = [n for n in rep["steps"][1]["removed"]] if done else []
                rows.append(_row(name, method, rep, top1, base, m, x, args, done * args.epochs, ", ".join(blocks)))
                l1, rep1 = secateurs.prune(copy.deepcopy(base), x, "l1", rep["kept"]["macs"], allocation="uniform",
                                           data=train, val_data=val, finetune=replace(ft, epochs=max(1, done * args.epochs)), latency_guard=False)
                rows.append(_row(name, f"L1 uniform (same MACs as {method})", rep1, top1, base, l1, x, args,
                                 max(1, done * args.epochs), ""))
        write_rows(csv_path, rows)
    lines = ["# Method 2: layer pruning (PLS-VIP) and the cascade vs filter-only pruning at the same MACs", "",
             f"`python -m benchmarks.layer_pruning --mode {args.mode} --macs {args.macs} --filter-steps {args.filter_steps} "
             f"--epochs {args.epochs}` on {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
             f"torch {torch.__version__}. CPU protocol: fine-tuning {args.epochs} epoch(s) per step on a subset of "
             f"CIFAR-10 (JPEG) training images (size per row) (SGD lr {args.lr}, cosine), top-1 on "
             f"{args.val_subset or 'all'} test images, PLS on {args.per_class} images per class. Latency: unpruned and pruned "
             "timed interleaved, 30 rounds (`secateurs.latency.compare_dense_pruned`): the median per model, and the median "
             "of the per-round speed-ups with its 95% interval. Raw data: `layer_pruning.csv`.", "",
             "| model | fine-tune images | method | MACs | params | top-1 before | top-1 after | latency b1 (ms) | "
             "b1 speed-up | latency b8 (ms) | b8 speed-up | fine-tune epochs | blocks removed |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('train_images') or 10000} | {r['method']} | -{float(r['macs_reduction']):.1%} | -{float(r['params_reduction']):.1%} | "
                     f"{r['top1_before']} | {r['top1_after']} | {r['lat_b1_before']} -> {r['lat_b1_after']} | "
                     f"{speedup_cell(r, 1)} | {r['lat_b8_before']} -> {r['lat_b8_after']} | {speedup_cell(r, 8)} | "
                     f"{r['epochs']} | {r['blocks']} |")
    (out / "layer_pruning.md").write_text("\n".join(lines) + "\n")


def _row(name, method, rep, top1, base, model, x, args, epochs, blocks):
    row = {"model": name, "train_images": args.subset or 50000, "method": method, "macs_reduction": round(1 - rep["kept"]["macs"], 4),
           "params_reduction": round(1 - rep["kept"]["params"], 4), "top1_before": round(top1, 2),
           "top1_after": round(rep["after"]["metric"], 2), **latency_columns(base, model, x, args.threads),
           "epochs": epochs, "blocks": blocks}
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return row


if __name__ == "__main__":
    main()
