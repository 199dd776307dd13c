"""Baseline accuracy table: every criterion x allocation, pruned to 50% MACs, fine-tuned alike.

Starts from the zoo's trained CIFAR-10 (JPEG) checkpoints, prunes with each registered criterion
and both allocations, fine-tunes every pruned model with the same budget, and reports top-1 on
the test set before pruning, right after the cut, and after fine-tuning. Rows are appended to
the CSV as they finish, so a killed run resumes where it stopped.

CPU protocol (default): fine-tune ``--epochs`` epoch(s) on a ``--subset`` of the training set,
evaluate on ``--val-subset`` test images. Paper-scale: ``--subset 0 --val-subset 0 --epochs 40``
on a GPU.

Usage::

    python -m benchmarks.criteria_accuracy                     # docs/criteria_accuracy.{md,csv}
    python -m benchmarks.criteria_accuracy --models cifar_resnet20_cifar10 --criteria l1 random
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import time
import warnings
from pathlib import Path

import torch

from benchmarks._protocol import add_protocol_args, cifar10, finetune_config, start

PRETRAINED = ["cifar_resnet20_cifar10", "cifar_resnet56_cifar10"]
FIELDS = ["model", "train_images", "criterion", "allocation", "macs_kept", "params_kept", "top1_before", "top1_pruned", "top1_finetuned",
          "prune_s", "finetune_s"]


def main(argv=None) -> None:
    import secateurs
    from secateurs.models import load_pretrained
    from secateurs.train import evaluate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=PRETRAINED)
    p.add_argument("--criteria", nargs="+", default=secateurs.list_criteria())
    p.add_argument("--allocations", nargs="+", default=["uniform", "global"])
    p.add_argument("--macs", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=1)
    add_protocol_args(p)
    args = p.parse_args(argv)
    out = start(args)
    csv_path = out / "criteria_accuracy.csv"
    done = set()
    if csv_path.exists():
        with open(csv_path) as f:
            done = {(r["model"], r["criterion"], r["allocation"]) for r in csv.DictReader(f)}
    train, val = cifar10(args)
    x = torch.randn(1, 3, 32, 32)
    ft = finetune_config(args, args.epochs)
    for name in args.models:
        base = load_pretrained(name)
        top1_before = evaluate(base, val)["top1"]
        for criterion in args.criteria:
            for allocation in args.allocations:
                if (name, criterion, allocation) in done:
                    continue
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model, report = secateurs.prune(model, x, criterion, args.macs, allocation=allocation, data=train)
                t1 = time.perf_counter()
                top1_pruned = evaluate(model, val)["top1"]
                secateurs.train.fit(model, train, None, ft)
                t2 = time.perf_counter()
                row = {"model": name, "train_images": len(train), "criterion": criterion, "allocation": allocation,
                       "macs_kept": round(report["kept"]["macs"], 4), "params_kept": round(report["kept"]["params"], 4),
                       "top1_before": round(top1_before, 2), "top1_pruned": round(top1_pruned, 2),
                       "top1_finetuned": round(evaluate(model, val)["top1"], 2),
                       "prune_s": round(t1 - t0, 2), "finetune_s": round(t2 - t1, 1)}
                new = not csv_path.exists()
                with open(csv_path, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=FIELDS)
                    if new:
                        w.writeheader()
                    w.writerow(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    write_md(csv_path, out / "criteria_accuracy.md", args)


def write_md(csv_path: Path, md_path: Path, args) -> None:
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    protocol = (f"CPU protocol: fine-tune {args.epochs} epoch(s) on a class-balanced subset of the training images "
                "(its size per row in the table) "
                f"(SGD lr {args.lr}, cosine, batch 128), top-1 on {args.val_subset or 'all 10000'} test images")
    lines = ["# Criteria on CIFAR-10 (JPEG): pruned to 50% MACs, fine-tuned with the same budget", "",
             f"`python -m benchmarks.criteria_accuracy` on {platform.machine()}, {os.cpu_count()} cores, "
             f"{args.threads} threads, torch {torch.__version__}. {protocol}. Starting points: the zoo checkpoints "
             "when this was run (their top-1 in *top-1 before*; docs/baselines.md lists the current ones). Every model is pruned to at most 50% of its MACs (achieved value in the table), "
             "`taylor` uses 8 training batches of 64, `vip` 50 training images per class. Raw data: `criteria_accuracy.csv`.", "",
             "| model | fine-tune images | criterion | allocation | MACs kept | params kept | top-1 before | after cut | after fine-tune |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('train_images') or 10000} | {r['criterion']} | {r['allocation']} | {float(r['macs_kept']):.1%} | "
                     f"{float(r['params_kept']):.1%} | {r['top1_before']} | {r['top1_pruned']} | {r['top1_finetuned']} |")
    md_path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
