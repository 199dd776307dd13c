"""Top-1 right after a one-shot cut, before any fine-tuning: what least-squares reconstruction
(``secateurs.prune(..., reconstruct=512)``) buys over the plain cut, beside Torch-Pruning's magnitude
cut at the same MACs. The trained CIFAR-10 (JPEG) ResNet-20/56 of the zoo, L1 global to each target,
top-1 on the full test set; the reconstruction reads 512 training images (the held-out split excluded)
drawn with each of ``--draws`` seeds, so the spread shows how much the draw matters. Resumable: finished
rows are kept. Then the re-fit's cost at 224px (``--cost``): torchvision models with seeded random
weights (time only), the fit in one forward over all calibration images against a forward per layer.

    python -m benchmarks.reconstruct            # docs/reconstruct.csv, docs/reconstruct.md (about 20 min)
    python -m benchmarks.reconstruct --cost     # and docs/reconstruct_cost.csv (about 10 min)
    python -m benchmarks.reconstruct --segmentation  # docs/reconstruct_segmentation.csv: the zoo U-Net (about 2 min)
    python -m benchmarks.reconstruct --quick    # tiny settings that exercise every path (CI)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks._protocol import add_run_args, read_rows, write_rows

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["cifar_resnet20_cifar10", "cifar_resnet56_cifar10"]
COST_RUNS = [("resnet50", 64, "default"), ("resnet50", 64, "per layer"), ("resnet50", 256, "default"),
             ("mobilenet_v2", 64, "default"), ("mobilenet_v2", 64, "per layer"), ("mobilenet_v2", 256, "default")]


def one_row(base, name: str, method: str, target: float, draw: int, train, test, args) -> dict:
    import secateurs
    from secateurs.train import evaluate

    model, x = copy.deepcopy(base), torch.randn(1, 3, 32, 32)
    # the draw: a seeded shuffle of the training images, from which the calibration takes its first
    data = train.subset(len(train) - 1, draw) if method.endswith("reconstruct") else None
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the collapse guard's warning: the table shows the collapse
        if method == "tp_magnitude":
            from benchmarks.accuracy import _tp_pruner
            from benchmarks.compare import tp_ratio_for_macs

            _tp_pruner(model, x, method, tp_ratio_for_macs(model, x, method, target)).step()
        else:
            secateurs.prune(model, x, "l1", target, data=data, reconstruct=args.images if data is not None else 0,
                            latency_guard=False)
    seconds = time.perf_counter() - t
    row = {"model": name, "target": target, "method": method, "draw": draw,
           "kept_macs": round(secateurs.count(model, x).macs / secateurs.count(base, x).macs, 4),
           "top1": round(evaluate(model, test)["top1"], 2), "seconds": round(seconds, 1),
           "images": args.images if method.endswith("reconstruct") else 0, "test_images": len(test)}
    if args.finetune_steps and draw == 0:  # where a short fine-tuning leaves each start (one run: a first look)
        from secateurs.train import TrainConfig, fit

        fit(model, train, None, TrainConfig(steps=args.finetune_steps, batch_size=128, lr=0.02, weight_decay=5e-4,
                                            seed=0, channels_last=True, quiet=True))
        row.update(finetune_steps=args.finetune_steps, top1_finetuned=round(evaluate(model, test)["top1"], 2))
    return row


def run(args) -> Path:
    from secateurs.data import load_dataset
    from secateurs.models import load_pretrained
    from secateurs.train import evaluate

    torch.set_num_threads(args.threads)
    out = Path(args.out) / "reconstruct.csv"
    rows = read_rows(out) if out.exists() else []
    done = {(r["model"], float(r["target"]), r["method"], int(r["draw"])) for r in rows}
    train, _ = load_dataset("cifar10", "train", root=args.data_root).holdout(5000)
    test = load_dataset("cifar10", "test", root=args.data_root).subset(args.test_subset or None, 0)
    for name in args.models:
        base = load_pretrained(name).eval()
        if (name, 1.0, "unpruned", 0) not in done:
            rows.append({"model": name, "target": 1.0, "method": "unpruned", "draw": 0, "kept_macs": 1.0,
                         "top1": round(evaluate(base, test)["top1"], 2), "seconds": 0.0, "images": 0,
                         "test_images": len(test)})
            write_rows(out, rows)
        for target in args.targets:
            for method in ("l1", "l1+reconstruct", "tp_magnitude"):
                for draw in (range(args.draws) if method.endswith("reconstruct") else [0]):
                    if (name, target, method, draw) in done:
                        continue
                    rows.append(one_row(base, name, method, target, draw, train, test, args))
                    print(rows[-1], flush=True)
                    write_rows(out, rows)
    report(out)
    return out


SEGMENTATION = [("unet16_isbi2012", "isbi2012")]


def segmentation(args, targets: list[float]) -> Path:
    """The same right after the cut on the zoo's U-Net (``--segmentation``): membrane IoU and pixel
    accuracy on the 6 validation slices, the re-fit on the 24 training slices (all there are, at
    512x512), MACs at 256x256 as docs/segmentation.md counts them. One draw: the calibration is the
    whole training set."""
    import secateurs
    from secateurs.data import load_dataset
    from secateurs.models import load_pretrained
    from secateurs.train import evaluate

    torch.set_num_threads(args.threads)
    out = Path(args.out) / "reconstruct_segmentation.csv"
    rows = read_rows(out) if out.exists() else []
    done = {(r["model"], float(r["target"]), r["method"]) for r in rows}
    for name, data in SEGMENTATION:
        train, val = load_dataset(data, "train", root=args.data_root), load_dataset(data, "test", root=args.data_root)
        base = load_pretrained(name).eval()
        x = torch.randn(1, train.images.shape[1], 256, 256)
        macs = secateurs.count(base, x).macs
        for target, method in [(1.0, "unpruned")] + [(t, m) for t in targets for m in ("l1", "l1+reconstruct")]:
            if (name, target, method) in done:
                continue
            model, t = copy.deepcopy(base), time.perf_counter()
            images = len(train) if method.endswith("reconstruct") else 0
            if method != "unpruned":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model, _ = secateurs.prune(model, x, "l1", target, data=train, latency_guard=False,
                                               reconstruct=images)
            scores = evaluate(model, val)
            rows.append({"model": name, "target": target, "method": method,
                         "kept_macs": round(secateurs.count(model, x).macs / macs, 4),
                         "iou": round(scores["iou"], 2), "pixel_acc": round(scores["pixel_acc"], 2),
                         "seconds": round(time.perf_counter() - t, 1), "images": images,
                         "val_images": len(val)})
            print(rows[-1], flush=True)
            write_rows(out, rows)
    return out


def segmentation_table(rows: list[dict]) -> list[str]:
    lines = ["| model | MACs target | method | MACs kept | IoU | pixel accuracy | seconds |", "|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {float(r['target']):.0%} | {r['method']} | {float(r['kept_macs']):.1%} | {r['iou']} | "
              f"{r['pixel_acc']} | {r['seconds']} |" for r in rows]
    return lines


def cost(args, runs: list[tuple], size: int) -> Path:
    """Seconds of ``prune(..., reconstruct=N)`` on ``size``-px models, as a user calls it (``default``: one
    pass when it fits ``ONE_PASS_BYTES``) or with a forward per layer forced (``ONE_PASS_BYTES=0``);
    the path it took is recorded."""
    from unittest import mock

    import torchvision

    import secateurs
    from secateurs import reconstruct

    torch.set_num_threads(args.threads)
    out = Path(args.out) / "reconstruct_cost.csv"
    rows = read_rows(out) if out.exists() else []
    done = {(r["model"], int(r["images"]), r["requested"]) for r in rows}
    for name, images, requested in runs:
        if (name, images, requested) in done:
            continue
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().eval()
        gen = torch.Generator().manual_seed(1)
        data = [(torch.randn(16, 3, size, size, generator=gen), torch.zeros(16, dtype=torch.long))
                for _ in range(images // 16)]
        limit = 0 if requested == "per layer" else reconstruct.ONE_PASS_BYTES
        with mock.patch.object(reconstruct, "ONE_PASS_BYTES", limit), \
                mock.patch.object(reconstruct, "_refit_in_one_pass", wraps=reconstruct._refit_in_one_pass) as spy:
            t = time.perf_counter()
            _, rep = secateurs.prune(model, torch.randn(1, 3, size, size), "l1", 0.5, data=data,
                                     reconstruct=images, latency_guard=False)
            seconds = time.perf_counter() - t
        fits = next(iter(rep["method_output"]["reconstruction"].values()))
        rows.append({"model": name, "size": size, "images": images, "requested": requested,
                     "path": "one pass" if spy.called else "per layer", "layers": len(fits),
                     "error_before": round(statistics.fmean(b for b, _ in fits.values()), 4),
                     "error_after": round(statistics.fmean(a for _, a in fits.values()), 4),
                     "seconds": round(seconds, 1), "threads": args.threads})
        print(rows[-1], flush=True)
        write_rows(out, rows)
    return out


def cost_table(rows: list[dict]) -> list[str]:
    """The cost section's table: one line per run, in the order they ran."""
    lines = ["| model | input | calibration images | run | path taken | layers re-fitted | relative error: plain cut, "
             "re-fitted | seconds |", "|---|---:|---:|---|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| torchvision:{r['model']} | {r['size']}px | {r['images']} | {r['requested']} | {r['path']} | "
                     f"{r['layers']} | {float(r['error_before']):.3f}, {float(r['error_after']):.3f} | {r['seconds']} |")
    return lines


def report(csv_path: Path) -> Path:
    rows = read_rows(csv_path)
    md = csv_path.with_suffix(".md")
    first = rows[0] if rows else {}
    lines = ["# Top-1 right after a one-shot cut, no fine-tuning",
             "",
             f"Generated by `python -m benchmarks.reconstruct` from {csv_path.name}. CIFAR-10 (JPEG), the zoo's "
             f"trained models, top-1 on {first.get('test_images', '?')} test images. `l1`: secateurs' L1 global cut "
             "(bias compensation included); `l1+reconstruct`: the same cut with every layer reading a removed "
             f"channel re-fitted by least squares on {next((r['images'] for r in rows if r['images'] != '0'), '?')} "
             "training images first (mean +- sd over calibration draws); `tp_magnitude`: Torch-Pruning's magnitude "
             "pruner, global, at the ratio that meets the same MACs. Seconds: the prune on the machine that ran it.",
             f" Then {next((r['finetune_steps'] for r in rows if r.get('finetune_steps')), 0)} steps of fine-tuning "
             "(SGD lr 0.02, batch 128, no distillation) from the first draw's cut: one run each, a first look at how "
             "much of the head start survives training.",
             "", *table(rows)]
    cost_path = csv_path.with_name("reconstruct_cost.csv")
    if cost_path.exists():
        costs = read_rows(cost_path)
        lines += ["", f"## The re-fit's cost at {'/'.join(sorted({r['size'] for r in costs}))}px",
                  "", f"Generated by `python -m benchmarks.reconstruct --cost` from {cost_path.name}: `secateurs.prune(model, "
                  "x, 'l1', 0.5, data=..., reconstruct=N)` on torchvision models with seeded random weights (the time "
                  "and the fit, not accuracy), N random images, "
                  f"{costs[0]['threads'] if costs else '?'} threads on this CPU. *one pass*: every layer re-fitted in "
                  "its pre-hook during one forward of the cut copy over all N images (the default while a few of its "
                  "largest activation for every image fit in `ONE_PASS_BYTES`, 4 GiB); *per layer*: a forward per "
                  "layer and batch as far as that layer (the path for larger calibration sets, forced in the runs "
                  "so labelled). Relative error: the squared error of the layer's kept outputs on the fitted rows "
                  "over their squared norm, mean over layers.",
                  "", *cost_table(costs)]
    seg_path = csv_path.with_name("reconstruct_segmentation.csv")
    if seg_path.exists():
        seg = read_rows(seg_path)
        lines += ["", "## The same on a U-Net (segmentation)", "",
                  f"Generated by `python -m benchmarks.reconstruct --segmentation` from {seg_path.name}: the zoo's "
                  "`unet16_isbi2012` (trained here, docs/baselines.md) cut by L1 global to each target, with and without "
                  f"the re-fit on its {next((r['images'] for r in seg if r['images'] != '0'), '?')} training slices "
                  f"(512x512), membrane IoU and pixel accuracy on the {seg[0]['val_images'] if seg else '?'} validation "
                  "slices, no fine-tuning; MACs at 256x256.", "", *segmentation_table(seg)]
    md.write_text("\n".join(lines) + "\n")
    return md


def table(rows: list[dict]) -> list[str]:
    """The report's table: one line per model, target and method, the draws' mean +- sd."""
    lines = ["| model | MACs target | method | MACs kept | top-1 | draws | seconds | top-1 after the fine-tuning |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["model"], float(r["target"]), r["method"]), []).append(r)
    order = ["unpruned", "l1", "l1+reconstruct", "tp_magnitude"]
    for (model, target, method), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1], order.index(kv[0][2])
                                                                           if kv[0][2] in order else len(order))):
        tops = [float(r["top1"]) for r in rs]
        top = f"{statistics.fmean(tops):.2f}" + (f" +- {statistics.stdev(tops):.2f}" if len(tops) > 1 else "")
        secs = statistics.fmean(float(r["seconds"]) for r in rs)
        tuned = next((r["top1_finetuned"] for r in rs if r.get("top1_finetuned")), "")
        lines.append(f"| {model} | {target:.0%} | {method} | {float(rs[0]['kept_macs']):.1%} | {top} | {len(rs)} | "
                     f"{secs:.1f} | {tuned} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--draws", type=int, default=3, help="calibration draws (seeds) per reconstructed row")
    p.add_argument("--images", type=int, default=512, help="calibration images of the reconstruction")
    p.add_argument("--test-subset", type=int, default=0, help="test images (0: all 10,000)")
    p.add_argument("--finetune-steps", type=int, default=100,
                   help="then fine-tune each draw-0 row this many steps (lr 0.02, batch 128, no distillation; 0: off)")
    p.add_argument("--cost", action="store_true", help="then time the re-fit on 224px torchvision models")
    p.add_argument("--segmentation", action="store_true", help="then the zoo's U-Net on ISBI 2012 at 50%% and 15%% MACs")
    add_run_args(p, ROOT / "docs")
    args = p.parse_args(argv)
    runs, size = COST_RUNS, 224
    if args.quick:
        args.models, args.targets, args.draws, args.images, args.test_subset = MODELS[:1], [0.5], 2, 64, 200
        args.finetune_steps, args.cost = 2, True
        runs, size = [("resnet18", 32, "default"), ("resnet18", 32, "per layer")], 64
    if args.report_only:
        print(report(Path(args.out) / "reconstruct.csv"))
        return
    if args.segmentation:  # on its own: the classification rows need not run again
        segmentation(args, [0.5] if args.quick else [0.5, 0.15])
        print(report(Path(args.out) / "reconstruct.csv"))
        return
    print(run(args))
    if args.cost:
        cost(args, runs, size)
        print(report(Path(args.out) / "reconstruct.csv"))


if __name__ == "__main__":
    main()
