"""Command line: ``secateurs analyze``, ``secateurs prune`` and ``secateurs train``.

Models are registry names (``secateurs.models.list_models()``) or ``torchvision:NAME``
(weights=None); datasets are ``secateurs.data.list_datasets()`` names.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from .pipeline import prune
from .cost import count
from .graph import analyze


def load_model(spec: str, **kwargs) -> torch.nn.Module:
    from .models import create_model

    try:
        return create_model(spec, **kwargs).eval()
    except ValueError as err:
        raise SystemExit(f"--model: {err}") from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("secateurs", description="Structured pruning for PyTorch CNNs.", add_help=add_help)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("analyze", "list the prunable channel groups"),
                        ("prune", "remove a fraction of every group and report MACs/params")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model", default="torchvision:resnet50", help="e.g. torchvision:resnet50 or cifar_resnet56")
        s.add_argument("--input-size", type=int, nargs="+", default=[1, 3, 224, 224], help="example input shape")
        if name == "prune":
            s.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed per group")
            s.add_argument("--criterion", default="l2", help="importance criterion (l1, l2)")
    t = sub.add_parser("train", help="train (or fine-tune) a model on a dataset; torchrun-ready")
    t.add_argument("--model", required=True, help="registry name (cifar_resnet56, unet...) or torchvision:NAME")
    t.add_argument("--data", required=True, help="cifar10, cifar100, fashion-mnist, digits, isbi2012, hela, imagefolder:PATH")
    t.add_argument("--data-root", default=None, help="folder holding the datasets (else $SECATEURS_DATA, ../shared/data)")
    t.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    t.add_argument("--subset", type=int, default=None, help="train on this many samples (CPU protocol)")
    t.add_argument("--val-subset", type=int, default=None, help="evaluate on this many samples")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128, help="global batch size (split across processes)")
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--optimizer", default="sgd", help="sgd or adamw")
    t.add_argument("--schedule", default="cosine", help="cosine, step or constant")
    t.add_argument("--milestones", type=int, nargs="*", default=[], help="step schedule epochs")
    t.add_argument("--warmup-epochs", type=int, default=0)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--pad", type=int, default=4, help="zero padding before the random crop (classification)")
    t.add_argument("--crop", type=int, default=None, help="random crop size (segmentation)")
    t.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    t.add_argument("--channels-last", action="store_true", help="channels-last memory format (GPU)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--norm", default=None, help="normalisation layer for models that offer a choice (tiny_cnn: bn, gn, none)")
    t.add_argument("--model-arg", action="append", default=[], metavar="KEY=INT",
                   help="extra integer constructor argument, e.g. --model-arg base=16 (repeatable)")
    t.add_argument("--out", default=None, help="run folder: checkpoint.pt, log.csv")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--tensorboard", action="store_true", help="also log to OUT/tb (pip install tensorboard)")
    t.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def train_main(args) -> int:
    from .data import load_dataset
    from .train import TrainConfig, fit, is_main_process

    train_ds = load_dataset(args.data, "train", root=args.data_root, download=args.download).subset(args.subset, args.seed)
    val_ds = load_dataset(args.data, "test", root=args.data_root, download=args.download).subset(args.val_subset, args.seed)
    torch.manual_seed(args.seed)
    kw = {"num_classes": max(2, train_ds.num_classes)}
    if not args.model.startswith("torchvision:"):
        kw["in_chans"] = train_ds.images.shape[1]
    if args.norm:
        kw["norm"] = args.norm
    for item in args.model_arg:
        key, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise SystemExit(f"--model-arg must look like KEY=INT, got {item!r}")
        kw[key] = int(value)
    model = load_model(args.model, **kw)
    try:
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          optimizer=args.optimizer, schedule=args.schedule, milestones=tuple(args.milestones),
                          warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, amp=args.amp,
                          channels_last=args.channels_last, seed=args.seed, pad=args.pad, crop=args.crop, out_dir=args.out,
                          resume=args.resume, quiet=args.quiet, tensorboard=args.tensorboard, step_delay=args.step_delay)
    except ValueError as err:
        raise SystemExit(f"secateurs train: {err}") from None
    history = fit(model, train_ds, val_ds, cfg)
    if is_main_process() and history:
        last = history[-1]
        print("final", " ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith("val_")))
    return 0


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "train":
        return train_main(args)
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
    prune(model, x, args.criterion, ratio=args.ratio)
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
