"""Method 4 (importance weights + error tolerance) on U-Net segmentation, beside L1 at the same MACs.

For each zoo model: importance-weight pruning with ``--tolerance`` points of ``--metric`` on the
validation slices (alpha trained ``--iw-epochs``, then ``--fraction`` of the remaining filters per
step, ``--ft-epochs`` of fine-tuning per step); then L1 (global) pruned one-shot to the MACs it
reached and fine-tuned for the same total number of epochs. Measures MACs, params, file size,
CPU latency at batch 1 (256x256 and 512x512), every segmentation metric, and draws predictions.
Resumable: finished models are kept in the JSON, a killed pruning run resumes from its steps.

Usage::

    python -m benchmarks.segmentation              # docs/segmentation.{md,json}, docs/segmentation.png
    python -m benchmarks.segmentation --models unet16_isbi2012 --tolerance 1.0 --metric pixel_acc
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks._protocol import DOCS

SETUPS = {  # the zoo model, its data and the training crops it was trained with
    "unet16_isbi2012": {"data": "isbi2012", "crop": 128, "batch": 8},
    "unet16_hela": {"data": "hela", "crop": 192, "batch": 4},
    "ternausnet8_isbi2012": {"data": "isbi2012", "crop": 128, "batch": 8},
    "ternausnet8_hela": {"data": "hela", "crop": 192, "batch": 4},
}


def finetune_config(setup: dict, args, epochs: int):
    from secateurs.train import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=setup["batch"], lr=args.lr, optimizer="adamw", weight_decay=1e-4,
                       crop=setup["crop"], quiet=True, seed=0)


def _measure(model, val, base_dir: Path, tag: str) -> dict:
    import secateurs
    from secateurs.train import evaluate

    row = {f"{k}": round(v, 3) for k, v in evaluate(model, val).items()}
    c = secateurs.count(model, torch.randn(1, 1, 256, 256))
    row.update(macs_256=c.macs, params=c.params)
    folder = base_dir / tag
    secateurs.save(model, folder, torch.randn(1, 1, 256, 256))
    row["file_bytes"] = (folder / "model.safetensors").stat().st_size
    return row


def run_model(name: str, args, work: Path) -> dict:
    import secateurs
    from secateurs.data import load_dataset
    from secateurs.models import load_pretrained

    setup = SETUPS[name]
    train, val = load_dataset(setup["data"], "train"), load_dataset(setup["data"], "test")
    x = torch.randn(1, 1, 256, 256)
    base = load_pretrained(name)
    result = {"model": name, "dataset": val.name, "train_images": len(train), "val_images": len(val),
              "base": _measure(base, val, work, "base")}
    t0 = time.perf_counter()
    iw, rep = secateurs.prune(copy.deepcopy(base), x, "importance-weights", data=train, val_data=val,
                              tolerance=args.tolerance, metric=args.metric, steps=args.max_steps,
                              finetune=finetune_config(setup, args, args.ft_epochs), out_dir=work / "iw_run", resume=True,
                              method_options={"epochs": args.iw_epochs, "fraction": args.fraction, "init": args.init,
                                              "l1": args.l1, "cost_aware": args.cost_aware,
                                              "refinements": args.refinements}, quiet=False)
    kept_steps = [r for r in rep["steps"][1:] if not r.get("reverted")]
    epochs = args.iw_epochs + args.ft_epochs * len(kept_steps)
    result["iw"] = _measure(iw, val, work, "iw")
    result["iw"].update(steps=len(kept_steps), stopped=rep.get("stopped"), epochs=epochs, refinements=args.refinements,
                        time_s=round(time.perf_counter() - t0, 1), metric_after_alpha=rep["method_output"].get("iw_metric_trained"),
                        curve=[{"step": r["step"], "macs": r["macs"] / rep["before"]["macs"], "metric": r["metric"],
                                "reverted": bool(r.get("reverted"))} for r in rep["steps"]])
    target = rep["after"]["macs"] / rep["before"]["macs"]
    t0 = time.perf_counter()
    l1, _ = secateurs.prune(copy.deepcopy(base), x, "l1", target, data=train, val_data=val,
                            finetune=finetune_config(setup, args, epochs), out_dir=work / "l1_run", resume=True)
    result["l1"] = _measure(l1, val, work, "l1")
    result["l1"].update(epochs=epochs, time_s=round(time.perf_counter() - t0, 1))
    return result


def measure_latency(results: dict, work: Path, threads: int) -> None:
    """Batch-1 latency of every saved model, measured back to back at the end (nothing else running)."""
    import secateurs

    for name, r in results.items():
        for tag in ("base", "iw", "l1"):
            if "latency_b1_512_ms" in r[tag]:
                continue
            model = secateurs.load(work / name / tag).eval()
            for size in (256, 512):
                r[tag][f"latency_b1_{size}_ms"] = round(1e3 * secateurs.measure_latency(
                    model, torch.randn(1, 1, size, size), repeats=10, warmup=2, threads=threads), 2)


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def write_markdown(results: dict, args, path: Path, sfx: str = "") -> None:
    m = args.metric
    lines = [
        "# Method 4: importance-weight filter pruning with an error tolerance (U-Net segmentation)",
        "",
        f"Generated by `python -m benchmarks.segmentation` ({platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} CPU threads{', --cost-aware' if sfx else ''}). Raw numbers: `segmentation{sfx}.json`.",
        "",
        "**CPU protocol, not the paper's setting.** Zoo models trained here from scratch on the shared data "
        "(`secateurs/zoo/manifest.json` has each recipe): `unet16` is the standard U-Net (4 levels, two 3x3 conv+BN+ReLU per "
        "level, transposed-conv up-sampling, skip concatenations) at a quarter of the widths (16-256 channels); "
        "`ternausnet8` is the VGG-11-encoder U-Net (TernausNet, no BN, transposed-conv decoder) at a quarter of the "
        "widths (16-128), trained from scratch (no ImageNet weights offline). ISBI 2012: 24 training / 6 validation "
        "slices of 512x512; HeLa: frames 0-15 train, 16-19 validation (700x1100). The tolerance is checked on "
        "those validation images.",
        "",
        f"Importance weights: alpha after every BN (after the conv where there is none), init `{args.init}`, "
        + ("**cost-aware variant (ours)**: the penalty on each alpha and its rank are weighted by the MACs its "
           "channel costs; " if sfx else "") + f"L1 penalty {args.l1}, trained {args.iw_epochs} epochs with the network (AdamW lr {args.lr}); then "
        f"{args.fraction:.0%} of the remaining removable filters per step, {args.ft_epochs} fine-tuning epochs per "
        f"step, until `{m}` falls more than **{args.tolerance} point(s)** below the unpruned model (that step "
        "undone). L1: global L1-norm ranking pruned one-shot to the same MACs, fine-tuned for the same total "
        "number of epochs (alpha epochs + kept steps x epochs per step). MACs at 256x256; latency: batch 1, "
        "median of 10, PyTorch eager on this CPU.",
        "",
        f"| model | data | method | MACs | params | file | latency b1 256 | latency b1 512 | pixel acc | IoU | Dice "
        f"| {m} drop | epochs | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        b = r["base"]
        data = "ISBI 2012" if "isbi" in name else "HeLa"
        lines.append(f"| {name} | {data} | unpruned | {b['macs_256'] / 1e9:.2f} G | {b['params'] / 1e6:.2f} M | "
                     f"{b['file_bytes'] / 1e6:.2f} MB | {b['latency_b1_256_ms']:.1f} ms | {b['latency_b1_512_ms']:.1f} ms | "
                     f"{b['pixel_acc']:.2f} | {b['iou']:.2f} | {b['dice']:.2f} | | | |")
        for tag, label in (("iw", "importance weights"), ("l1", "L1 (same MACs, epochs)")):
            p = r[tag]
            lines.append(
                f"| | | {label} | {_pct(p['macs_256'], b['macs_256'])} | {_pct(p['params'], b['params'])} | "
                f"{b['file_bytes'] / p['file_bytes']:.1f}x smaller | {b['latency_b1_256_ms'] / p['latency_b1_256_ms']:.2f}x | "
                f"{b['latency_b1_512_ms'] / p['latency_b1_512_ms']:.2f}x | {p['pixel_acc']:.2f} | {p['iou']:.2f} | "
                f"{p['dice']:.2f} | {b[m] - p[m]:+.2f} | {p['epochs']} | {p.get('steps', 1)} |")
    lines += ["", "Speed-ups and size ratios are unpruned / pruned; a drop is unpruned minus pruned (points).", ""]
    lines += [f"![inputs, ground truth, unpruned and pruned predictions](segmentation{sfx}.png)", "",
              f"![metric vs MACs along the importance-weight schedule](segmentation{sfx}_curves.png)", ""]
    for name, r in results.items():
        lines.append(f"- `{name}`: {r['iw'].get('refinements', 0)} step halving(s) allowed after an undone step; "
                     f"stopped: {r['iw']['stopped']}; {m} after learning alpha "
                     f"{r['iw']['metric_after_alpha']}; importance weights {r['iw']['time_s']:.0f} s, L1 "
                     f"{r['l1']['time_s']:.0f} s.")
    path.write_text("\n".join(lines) + "\n")


def _predictions(results: dict, work: Path, out: Path, sfx: str) -> None:
    """Input, ground truth and each saved model's prediction on the first validation image."""
    import matplotlib.pyplot as plt

    import secateurs
    from secateurs.data import Batches, load_dataset
    from secateurs.train import predict_padded

    names = list(results)
    fig, axes = plt.subplots(len(names), 5, figsize=(15, 3.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        val = load_dataset(SETUPS[name]["data"], "test")
        x, y = next(iter(Batches(val, 1, train=False)))
        h, w = (256, 256) if "isbi" in name else (320, 480)
        x, y = x[..., :h, :w], y[..., :h, :w]
        preds = []
        for tag in ("base", "iw", "l1"):
            model = secateurs.load(work / name / tag).eval()
            with torch.no_grad():
                preds.append(predict_padded(model, x).argmax(1)[0])
        b = results[name]["base"]
        titles = ["input", "ground truth", f"unpruned ({b['macs_256'] / 1e9:.2f} GMACs)",
                  f"importance weights ({_pct(results[name]['iw']['macs_256'], b['macs_256'])} MACs)",
                  f"L1 ({_pct(results[name]['l1']['macs_256'], b['macs_256'])} MACs)"]
        for ax, img, t in zip(row, [x[0, 0], y[0], *preds], titles):
            ax.imshow(img, cmap="gray")
            ax.set_title(t, fontsize=9)
            ax.axis("off")
        row[0].text(-0.08, 0.5, name, transform=row[0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"segmentation{sfx}.png", dpi=80)
    plt.close(fig)


def plot(results: dict, work: Path, out: Path, sfx: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    missing = [work / n / t for n in names for t in ("base", "iw", "l1") if not (work / n / t).exists()]
    if missing:  # results made in another checkout: their predictions figure stays as it is
        print(f"kept {out}/segmentation{sfx}.png: its saved models are not in {work} ({missing[0]}, ...)")
    else:
        _predictions(results, work, out, sfx)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        c = results[name]["iw"]["curve"]
        ax.plot([100 * p["macs"] for p in c], [p["metric"] for p in c], marker="o", label=name)
        ax.plot([100 * p["macs"] for p in c if p["reverted"]], [p["metric"] for p in c if p["reverted"]], "rx")
    ax.set_xlabel("MACs kept (%)")
    ax.set_ylabel(results[names[0]].get("metric_name", "metric"))
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax.set_title("importance-weight schedule (x: step undone)")
    fig.tight_layout()
    fig.savefig(out / f"segmentation{sfx}_curves.png", dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--tolerance", type=float, default=1.0)
    p.add_argument("--metric", default="pixel_acc", help="pixel_acc (the paper's), iou or dice")
    p.add_argument("--iw-epochs", type=int, default=5)
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.1, help="CPU protocol: 10%% per step (method default 5%%)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--init", default="ones")
    p.add_argument("--l1", type=float, default=1e-4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--refinements", type=int, default=2, help="after an undone step, halve the step, at most N times")
    p.add_argument("--cost-aware", action="store_true",
                   help="our variant: alpha's penalty and rank weighted by each channel's MACs (files *_cost_aware.*)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="pruning runs (checkpoints) and saved models (runs/segmentation[_cost_aware])")
    p.add_argument("--out", default=str(DOCS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sfx = "_cost_aware" if args.cost_aware else ""
    out, work = Path(args.out), Path(args.work or f"runs/segmentation{sfx}")
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / f"segmentation{sfx}.json"
    results = json.loads(res_path.read_text())["results"] if res_path.exists() else {}
    for name in args.models:
        if name in results:
            print(f"{name}: done already ({res_path})")
            continue
        results[name] = run_model(name, args, work / name)
        results[name]["metric_name"] = args.metric
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        os.replace(tmp, res_path)
        print(json.dumps({k: v for k, v in results[name].items() if k != "iw"}, default=str)[:400])
    results = {n: results[n] for n in SETUPS if n in results}
    measure_latency(results, work, args.threads)
    tmp = res_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    os.replace(tmp, res_path)
    write_markdown(results, args, out / f"segmentation{sfx}.md", sfx)
    plot(results, work, out, sfx)
    print(f"wrote {out}/segmentation{sfx}.md, .json, .png, _curves.png")


if __name__ == "__main__":
    main()
