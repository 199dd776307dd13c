"""secateurs beside Torch-Pruning on the same machine, models, targets and fine-tuning budget.

Four sections, each written to its own results file under ``--out`` (rows are appended and kept,
so a killed run continues where it stopped):

- ``coverage``: torchvision models pruned by each tool at 50% of every prunable group's channels
  (L2 magnitude; the classifier / segmentation head kept): output shape, forward, backward, MACs
  drop (``compare_coverage.csv``).
- ``speedup``: each tool prunes to 50% of the MACs (L2, global, widths multiples of 8; Torch-Pruning's
  global ratio is bisected until its MACs fit; and ours latency-allocated with ``round_to="auto"``),
  then the paired speed-up over the unpruned model at batch 1 and 8 in PyTorch and onnxruntime
  (``compare_speedup.csv``).
- ``accuracy``: CIFAR-10 (JPEG) ResNet-20/56 from the zoo, pruned to each MACs target by our
  criteria and methods and by Torch-Pruning's magnitude, BN-scale and group-norm pruners, then
  fine-tuned for the same epochs with the same recipe, over several seeds
  (``compare_accuracy.csv``). Torch-Pruning's BN-scale and group-norm pruners use their sparse
  regularizer for the first fine-tuning epoch before the cut (their intended use), the others cut
  first; every row gets the same number of epochs in total.
- ``segmentation``: the zoo U-Nets on ISBI 2012 and HeLa pruned to each MACs target by the same
  methods (less the layer-pruning cascade: it removes residual blocks, a U-Net has none), fine-tuned for
  the same epochs with the zoo recipe, IoU on the validation slices (``compare_segmentation.csv``);
  a method that fails on a model is a row with its error.

Usage::

    python -m benchmarks.compare --sections accuracy --models cifar_resnet20_cifar10 --targets 0.5 0.3
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks._protocol import append_row, read_rows

OURS = ["l1", "bn_scale", "taylor", "heuristic", "dlp+filters", "hfp", "importance-weights"]
THEIRS = ["tp_magnitude", "tp_bn_scale", "tp_group_norm"]
COVERAGE_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
                   "regnet_y_400mf", "convnext_tiny", "shufflenet_v2_x1_0", "googlenet", "vgg11_bn", "squeezenet1_1",
                   "fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
SPEEDUP_MODELS = {"torchvision:resnet50": 224, "torchvision:mobilenet_v2": 224, "cifar_resnet56": 32}


# -- helpers -----------------------------------------------------------------------------------
def _head(model) -> list:
    """Modules whose outputs are the model's: Torch-Pruning must be told to keep them."""
    import torch.nn as nn

    keep = []
    for name in ("fc", "classifier", "head", "linear", "aux_classifier"):
        m = getattr(model, name, None)
        if isinstance(m, nn.Sequential):
            keep += [mm for mm in m.modules() if isinstance(mm, (nn.Linear, nn.Conv2d))][-1:]
            if name == "classifier":  # segmentation heads: the last conv of the classifier
                continue
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            keep.append(m)
    if not keep:
        keep = [mm for mm in model.modules() if isinstance(mm, (nn.Linear, nn.Conv2d))][-1:]
    return keep


def _tp_importance(kind: str):
    import torch_pruning as tp

    if kind == "tp_bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupMagnitudeImportance(p=2)


def _tp_pruner(model, x, kind: str, ratio: float, round_to: int | None = None, global_pruning: bool = True):
    import torch_pruning as tp

    cls = {"tp_magnitude": tp.pruner.MagnitudePruner, "tp_bn_scale": tp.pruner.BNScalePruner,
           "tp_group_norm": tp.pruner.GroupNormPruner}[kind]
    return cls(model, x, importance=_tp_importance(kind), pruning_ratio=ratio, global_pruning=global_pruning,
               ignored_layers=_head(model), round_to=round_to)


def _main_out(out):
    from secateurs.testing import main_output

    return main_output(out)


def tp_prune_to_macs(model, x, kind: str, target: float, round_to: int | None = None, pruner=None):
    """Torch-Pruning has no MACs target: bisect its global ratio until the MACs fit (kept <= target)."""
    ratio = tp_ratio_for_macs(model, x, kind, target, round_to)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (pruner or _tp_pruner(model, x, kind, ratio, round_to)).step()
    return model


def tp_ratio_for_macs(model, x, kind: str, target: float, round_to: int | None = None) -> float:
    """The smallest global channel ratio of Torch-Pruning whose MACs fit ``target`` (12 bisection probes)."""
    import secateurs

    base = secateurs.count(model, x).macs
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        trial = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _tp_pruner(trial, x, kind, mid, round_to).step()
        kept = secateurs.count(trial, x).macs / base
        if kept <= target:
            hi, best = mid, (mid, kept)
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f"Torch-Pruning ({kind}) cannot reach {target:.0%} of the MACs")
    return best[0]


# -- coverage ----------------------------------------------------------------------------------
def _coverage_one(tool: str, name: str) -> dict:
    import secateurs
    from secateurs.models import create_model
    from secateurs.testing import randomize_norms

    model = randomize_norms(create_model(f"torchvision:{name}"), seed=0).eval()
    size = 224 if name not in ("googlenet",) else 224
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = _main_out(model(x))
    base = secateurs.count(model, x).macs
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if tool == "secateurs":
                g = secateurs.analyze(model, x)
                secateurs.apply_plan(model, g, secateurs.uniform_plan(g, secateurs.group_scores(model, g, "l2"), 0.5))
            else:
                _tp_pruner(model, x, "tp_magnitude", 0.5, global_pruning=False).step()
        secs = time.perf_counter() - t
        with torch.no_grad():
            out = _main_out(model(x))
        model.train()
        _main_out(model(torch.randn(2, 3, size, size))).float().sum().backward()
        macs = secateurs.count(model.eval(), x).macs
        ok = tuple(out.shape) == tuple(ref.shape) and bool(torch.isfinite(out).all()) and macs < base
        return {"status": "ok" if ok else "wrong", "kept_macs": round(macs / base, 4), "seconds": round(secs, 3),
                "note": "" if ok else f"shape {tuple(out.shape)} vs {tuple(ref.shape)}, MACs {macs / base:.2f}"}
    except Exception as err:  # a tool that fails on a model is a row, not a crash
        return {"status": "error", "kept_macs": "", "seconds": "", "note": f"{type(err).__name__}: {str(err)[:120]}"}


def coverage(models: list[str], out: Path) -> None:
    path = out / "compare_coverage.csv"
    done = {(r["model"], r["tool"]) for r in read_rows(path)}
    for name in models:
        for tool in ("secateurs", "torch_pruning"):
            if (name, tool) in done:
                continue
            r = _coverage_one(tool, name)
            append_row(path, {"model": name, "tool": tool, **r})
            print(f"coverage {name} {tool}: {r['status']} {r['note']}", flush=True)


# -- speed-up ----------------------------------------------------------------------------------
SPEEDUP_TOOLS = {"secateurs": dict(allocation="global", round_to=8),  # the same settings as Torch-Pruning's row
                 "secateurs_latency": dict(allocation="latency", round_to="auto"),  # what a user after speed runs
                 "torch_pruning": None}


def speedup(models: dict[str, int], out: Path, repeats: int, threads: int) -> None:
    """Each tool's 50% prune against the unpruned model, per runtime and batch: the paired speed-up of
    ``secateurs.latency.compare_dense_pruned`` (unpruned and pruned timed in turn, the median of the
    per-round ratios with its 95% interval), so a slow spell of the machine falls on both."""
    import secateurs
    from secateurs.latency import compare_dense_pruned
    from secateurs.models import create_model

    path = out / "compare_speedup.csv"
    done = {(r["model"], r["tool"]) for r in read_rows(path)}
    torch.set_num_threads(threads)
    for name, size in models.items():
        torch.manual_seed(0)
        base_model = create_model(name).eval()
        x1 = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        for tool, settings in SPEEDUP_TOOLS.items():
            if (name, tool) in done:
                continue
            m = copy.deepcopy(base_model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if settings is None:
                    tp_prune_to_macs(m, x1, "tp_magnitude", 0.5, round_to=8)
                else:
                    secateurs.prune(m, x1, "l2", 0.5, latency_threads=threads, **settings, latency_guard=False)
            row = {"model": name, "tool": tool, "kept_macs": round(secateurs.count(m, x1).macs
                                                                   / secateurs.count(base_model, x1).macs, 4)}
            for runtime, col in (("eager", "torch"), ("onnxruntime", "ort")):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cmp = compare_dense_pruned(base_model, m, x1, batches=(1, 8), repeats=repeats, threads=threads,
                                               runtime=runtime)
                for r in cmp["rows"]:
                    k = f"{col}_b{r['batch']}"
                    row.update({f"{k}_dense_ms": round(r["dense_ms"], 3), f"{k}_ms": round(r["pruned_ms"], 3),
                                f"{k}_speedup": round(r["speedup"], 3),
                                f"{k}_ci": "-".join(f"{v:.3f}" for v in r["speedup_interval"])})
            row.update(repeats=repeats, threads=threads)
            append_row(path, row)
            print(f"speedup {name} {tool}: {row}", flush=True)


# -- accuracy at equal MACs --------------------------------------------------------------------
def _tp_finetune_with_regularizer(model, x, kind, target, train, cfg, seed, epochs: int = 1):
    """``epochs`` of Torch-Pruning's sparse training (its regularizer after every backward), then the cut."""
    import torch.nn.functional as F

    from secateurs.data import Batches
    from secateurs.train import make_optimizer

    pruner = _tp_pruner(model, x, kind, 0.5)
    # SGD as the recorded CIFAR grid ran it (decay on every parameter); otherwise the recipe's optimizer
    opt = (torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
           if cfg.optimizer == "sgd" else make_optimizer(model, cfg))
    model.train()
    batches = Batches(train, cfg.batch_size, train=True, seed=seed, pad=cfg.pad if train.task == "classification" else 0,
                      crop=cfg.crop)
    if hasattr(pruner, "update_regularizer"):
        pruner.update_regularizer()
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            pruner.regularize(model)
            opt.step()
    model.eval()
    return tp_prune_to_macs(model, x, kind, target)


def prune_with(method: str, model, x, target: float, train, cfg, phase_epochs: int = 1, cut_epochs: int = 0,
               options: dict | None = None) -> int:
    """Prune ``model`` to ``target`` of its MACs with one of OURS + THEIRS; returns the epochs spent.

    Methods that train while pruning (hfp, importance-weights, Torch-Pruning's bn_scale and
    group_norm regularizers) spend ``phase_epochs`` doing so; ours also fine-tune ``cut_epochs``
    right after the cut, with ``cfg``'s recipe (their training phase uses it too; without it, the
    method's default config). ``options`` go to hfp's or importance-weights' method options. The
    caller fine-tunes for what is left of the common budget.
    """
    from dataclasses import replace

    import secateurs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method in ("tp_bn_scale", "tp_group_norm"):
            _tp_finetune_with_regularizer(model, x, method, target, train, cfg, cfg.seed, phase_epochs)
            return phase_epochs
        if method in ("hfp", "importance-weights"):  # the training phase is part of the budget
            secateurs.prune(model, x, method, target, data=train,
                            finetune=replace(cfg, epochs=cut_epochs) if cut_epochs else None,
                            method_options={"epochs": phase_epochs, "lr": cfg.lr, **(options or {})}, latency_guard=False)
            return phase_epochs + cut_epochs
        if method == "tp_magnitude":
            tp_prune_to_macs(model, x, method, target)
        elif method == "heuristic":  # rounds of its estimator until the MACs target
            secateurs.prune(model, x, method, target, steps=20, method_options={"kappa": 0.0}, latency_guard=False)
        elif method == "dlp+filters":  # the cascade: PLS-VIP blocks, then PLS-VIP filters to the target
            base_macs = secateurs.count(model, x).macs
            secateurs.prune(model, x, "dlp", max(target, 0.75), data=train, method_options={"per_class": 20}, latency_guard=False)
            secateurs.prune(model, x, "vip", target * base_macs / secateurs.count(model, x).macs, data=train,
                            allocation="uniform", latency_guard=False)
        else:
            secateurs.prune(model, x, method, target, data=train, latency_guard=False)
    return 0


def accuracy(models: list[str], targets: list[float], methods: list[str], seeds: list[int], args, out: Path) -> None:
    from dataclasses import replace

    import secateurs
    from benchmarks._protocol import cifar10, finetune_config
    from secateurs.models import load_pretrained
    from secateurs.train import evaluate, fit

    path = out / "compare_accuracy.csv"
    done = {(r["model"], r["target"], r["method"], r["seed"]) for r in read_rows(path)}
    train, val = cifar10(args)
    x = torch.randn(1, 3, 32, 32)
    for name in models:
        base = load_pretrained(name)
        top0 = evaluate(base, val)["top1"]
        base_macs = secateurs.count(base, x).macs
        for target in targets:
            for method in methods:
                for seed in seeds:
                    key = (name, str(target), method, str(seed))
                    if key in done:
                        continue
                    torch.manual_seed(seed)
                    m = copy.deepcopy(base)
                    cfg = replace(finetune_config(args, args.epochs), seed=seed)
                    t = time.perf_counter()
                    # one epoch of training phase where there is one; hfp: 50 warm-up steps, lam 5
                    used = prune_with(method, m, x, target, train, cfg,
                                      options={"hfp": {"lam": 5.0, "warmup_steps": 50},
                                               "importance-weights": {"fraction": 0.1}}.get(method))
                    kept = secateurs.count(m, x).macs / base_macs
                    if args.epochs - used > 0:
                        fit(m, train, None, replace(cfg, epochs=args.epochs - used))
                    row = {"model": name, "target": target, "method": method, "seed": seed,
                           "tool": "torch_pruning" if method.startswith("tp_") else "secateurs",
                           "kept_macs": round(kept, 4), "top1_before": round(top0, 2),
                           "top1": round(evaluate(m, val)["top1"], 2), "epochs": args.epochs,
                           "train_images": len(train), "val_images": len(val), "seconds": round(time.perf_counter() - t, 1)}
                    append_row(path, row)
                    print(f"accuracy {row}", flush=True)


# -- segmentation: MACs vs IoU per method ------------------------------------------------------
SEG_MODELS = ["unet16_isbi2012", "unet16_hela"]
SEG_METHODS = ["l1", "bn_scale", "taylor", "heuristic", "hfp", "importance-weights",
               "tp_magnitude", "tp_bn_scale", "tp_group_norm"]
SEG_TARGETS, SEG_SEEDS, SEG_PHASE_EPOCHS = [0.8, 0.6, 0.4, 0.2], [0, 1], 6


def seg_curves(models: list[str], targets: list[float], methods: list[str], seeds: list[int], args, out: Path) -> None:
    """Each U-Net pruned to each MACs target by each method, fine-tuned for the same epochs, IoU measured."""
    from dataclasses import replace

    import secateurs
    from benchmarks.segmentation import SETUPS, finetune_config
    from secateurs.data import load_dataset
    from secateurs.models import load_pretrained
    from secateurs.train import evaluate, fit

    path = out / "compare_segmentation.csv"
    done = {(r["model"], r["target"], r["method"], r["seed"]) for r in read_rows(path)}
    x = torch.randn(1, 1, 256, 256)  # MACs at 256x256, as in docs/segmentation.md
    for name in models:
        setup = SETUPS[name]
        train, val = load_dataset(setup["data"], "train"), load_dataset(setup["data"], "test")
        base = load_pretrained(name)
        before = evaluate(base, val)
        base_macs = secateurs.count(base, x).macs
        for target in targets:
            for method in methods:
                for seed in seeds:
                    if (name, str(target), method, str(seed)) in done:
                        continue
                    torch.manual_seed(seed)
                    m = copy.deepcopy(base)
                    cfg = replace(finetune_config(setup, argparse.Namespace(lr=args.seg_lr), args.seg_epochs), seed=seed)
                    t = time.perf_counter()
                    row = {"model": name, "target": target, "method": method, "seed": seed,
                           "tool": "torch_pruning" if method.startswith("tp_") else "secateurs"}
                    try:
                        # importance-weights: one cut to the target by |alpha| (fraction 1)
                        used = prune_with(method, m, x, target, train, cfg, args.seg_phase_epochs, cut_epochs=1,
                                          options={"hfp": {"warmup_steps": 10},
                                                   "importance-weights": {"fraction": 1.0}}.get(method))
                    except Exception as err:  # a method that cannot prune this model is a row, not a crash
                        append_row(path, {**row, "kept_macs": "", "pixel_acc": "", "iou": "", "dice": "",
                                       "iou_before": round(before["iou"], 2), "epochs": args.seg_epochs,
                                       "seconds": "", "note": f"{type(err).__name__}: {str(err)[:100]}"})
                        print(f"segmentation {name} {method} {target}: {type(err).__name__}: {err}", flush=True)
                        continue
                    kept = secateurs.count(m, x).macs / base_macs
                    if args.seg_epochs - used > 0:
                        fit(m, train, None, replace(cfg, epochs=args.seg_epochs - used))
                    after = evaluate(m, val)
                    row.update({"kept_macs": round(kept, 4), "pixel_acc": round(after["pixel_acc"], 2),
                                "iou": round(after["iou"], 2), "dice": round(after["dice"], 2),
                                "iou_before": round(before["iou"], 2), "epochs": args.seg_epochs,
                                "seconds": round(time.perf_counter() - t, 1), "note": ""})
                    append_row(path, row)
                    print(f"segmentation {row}", flush=True)


def summarize(path: Path, metric: str = "top1") -> list[dict]:
    """Mean and spread of ``metric`` over seeds per (model, target, method); a failed method keeps its note."""
    groups: dict[tuple, list[dict]] = {}
    for r in read_rows(path):
        groups.setdefault((r["model"], r["target"], r["method"]), []).append(r)
    out = []
    for (model, target, method), rs in groups.items():
        ok = [r for r in rs if r.get(metric) not in ("", None)]
        vals = [float(r[metric]) for r in ok]
        out.append({"model": model, "target": float(target), "method": method, "tool": rs[0]["tool"],
                    "kept_macs": statistics.mean(float(r["kept_macs"]) for r in ok) if ok else None,
                    "mean": statistics.mean(vals) if vals else None,
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "seeds": len(vals),
                    "before": float(rs[0][f"{metric}_before"]), "epochs": rs[0]["epochs"],
                    "train_images": rs[0].get("train_images"), "val_images": rs[0].get("val_images"),
                    "note": next((r["note"] for r in rs if r.get("note")), "")})
    return out


def main(argv=None) -> None:
    from benchmarks._protocol import DOCS, add_protocol_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(p)
    p.set_defaults(out=str(DOCS / "bench"))
    p.add_argument("--sections", nargs="+", default=["coverage", "speedup", "accuracy"])
    p.add_argument("--coverage-models", nargs="+", default=COVERAGE_MODELS)
    p.add_argument("--speedup-models", nargs="+", default=list(SPEEDUP_MODELS))
    p.add_argument("--models", nargs="+", default=["cifar_resnet20_cifar10", "cifar_resnet56_cifar10"])
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    p.add_argument("--methods", nargs="+", default=OURS + THEIRS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs, the same for every row")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--seg-models", nargs="+", default=SEG_MODELS)
    p.add_argument("--seg-targets", nargs="+", type=float, default=SEG_TARGETS)
    p.add_argument("--seg-methods", nargs="+", default=SEG_METHODS)
    p.add_argument("--seg-seeds", nargs="+", type=int, default=SEG_SEEDS)
    p.add_argument("--seg-epochs", type=int, default=20, help="segmentation: epochs per point, the same for every row")
    p.add_argument("--seg-phase-epochs", type=int, default=SEG_PHASE_EPOCHS,
                   help="segmentation: of those, the epochs that methods training while pruning spend doing so")
    p.add_argument("--seg-lr", type=float, default=3e-4, help="segmentation: AdamW lr (the zoo models' recipe)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "coverage" in args.sections:
        coverage(args.coverage_models, out)
    if "speedup" in args.sections:
        speedup({m: SPEEDUP_MODELS.get(m, 224) for m in args.speedup_models}, out, args.repeats, args.threads)
    if "accuracy" in args.sections:
        accuracy(args.models, args.targets, args.methods, args.seeds, args, out)
    if "segmentation" in args.sections:
        seg_curves(args.seg_models, args.seg_targets, args.seg_methods, args.seg_seeds, args, out)


if __name__ == "__main__":
    main()
