"""Command line: ``secateurs analyze`` and ``secateurs prune``.

Models are named ``torchvision:NAME`` (any ``torchvision.models.get_model`` name, weights=None).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from .api import prune
from .cost import count
from .graph import analyze


def load_model(spec: str) -> torch.nn.Module:
    source, _, name = spec.partition(":")
    if source != "torchvision" or not name:
        raise SystemExit(f"--model must look like 'torchvision:resnet50', got {spec!r}")
    import torchvision

    if name not in torchvision.models.list_models():
        raise SystemExit(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
    return torchvision.models.get_model(name, weights=None).eval()


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("secateurs", description="Structured pruning for PyTorch CNNs.", add_help=add_help)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("analyze", "list the prunable channel groups"),
                        ("prune", "remove a fraction of every group and report MACs/params")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model", default="torchvision:resnet50", help="e.g. torchvision:resnet50")
        s.add_argument("--input-size", type=int, nargs="+", default=[1, 3, 224, 224], help="example input shape")
        if name == "prune":
            s.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed per group")
            s.add_argument("--criterion", default="l2", help="importance criterion (l1, l2)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    model = load_model(args.model)
    x = torch.randn(*args.input_size)
    if args.command == "analyze":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = analyze(model, x)
        print(graph.describe())
        for w in graph.warnings:
            print("warning:", w)
        return 0
    before = count(model, x)
    t0 = time.perf_counter()
    prune(model, x, ratio=args.ratio, criterion=args.criterion)
    elapsed = time.perf_counter() - t0
    after = count(model, x)
    with torch.no_grad():
        model(x)
    print(f"{args.model}: analyse + prune {args.ratio:.0%} of every group by {args.criterion} in {elapsed:.2f} s")
    print(f"{'':8} {'MACs':>12} {'params':>12}")
    print(f"{'before':8} {before.macs / 1e9:>10.3f} G {before.params / 1e6:>10.3f} M")
    print(f"{'after':8} {after.macs / 1e9:>10.3f} G {after.params / 1e6:>10.3f} M")
    print(f"{'kept':8} {after.macs / before.macs:>11.1%} {after.params / before.params:>11.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
