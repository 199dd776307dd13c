"""Method 4 (importance weights + error tolerance) on U-Net segmentation, beside L1 at the same MACs.

The protocol of the accuracy benchmark, on the zoo U-Nets: for each model and seed,

- ``tol``: importance-weight pruning stopped by ``--tolerance`` points of ``--metric`` read on a
  held-out split (the last validation slices/frames, never trained on and never reported); then
  L1 (global) cut one-shot to the MACs it reached and fine-tuned for the same number of epochs;
- ``fixed``: importance weights run to a fixed MACs target (``--fixed``, 0.15: the paper's -85%)
  and L1 at the same target and epochs: how much IoU the paper's cut costs here.

Every metric is reported on the remaining validation images (the test split), as a mean and 95%
interval over ``--seeds``, with the paired difference importance weights - L1. Latency: the seed-0
models, timed interleaved at batch 1. Resumable: each finished (model, seed, run) is kept in the
JSON, and a killed pruning run resumes from its steps.

Usage::

    python -m benchmarks.segmentation              # docs/segmentation.{md,json,png}, segmentation_curves.png
    python -m benchmarks.segmentation --report-only
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

from benchmarks._protocol import DOCS, interval

SETUPS = {  # the zoo model, its data, the training crops it was trained with, held-out images for the tolerance
    "unet16_isbi2012": {"data": "isbi2012", "crop": 128, "batch": 8, "tol_images": 2},
    "unet16_hela": {"data": "hela", "crop": 192, "batch": 4, "tol_images": 1},
    "ternausnet8_isbi2012": {"data": "isbi2012", "crop": 128, "batch": 8, "tol_images": 2},
    "ternausnet8_hela": {"data": "hela", "crop": 192, "batch": 4, "tol_images": 1},
}
METRICS = ("pixel_acc", "iou", "dice")
SETTINGS = ("tolerance", "metric", "fixed", "iw_epochs", "ft_epochs", "fraction", "max_steps", "init", "rank", "l1", "lr",
            "refinements", "cost_aware")  # what changes a result: a resumed file must have been made with the same
RUNS = ("tol", "fixed")


def finetune_config(setup: dict, args, epochs: int, seed: int = 0):
    from secateurs.train import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=setup["batch"], lr=args.lr, optimizer="adamw", weight_decay=1e-4,
                       crop=setup["crop"], quiet=True, seed=seed)


def splits(setup: dict):
    """(train, held-out, test): the validation images split in two, the held-out ones last."""
    from secateurs.data import load_dataset

    test, held = load_dataset(setup["data"], "test").holdout(setup["tol_images"])
    return load_dataset(setup["data"], "train"), held, test


def _measure(model, test, held, metric: str, folder: Path | None) -> dict:
    import secateurs
    from secateurs.train import evaluate

    row = {k: round(v, 3) for k, v in evaluate(model, test).items() if k in METRICS}
    row["held_" + metric] = round(evaluate(model, held)[metric], 3)
    c = secateurs.count(model, torch.randn(1, 1, 256, 256))
    row.update(macs_256=c.macs, params=c.params)
    if folder is not None:  # seed 0's models: the latency, file size and predictions figure read them
        secateurs.save(model, folder, torch.randn(1, 1, 256, 256))
        row["file_bytes"] = (folder / "model.safetensors").stat().st_size
    return row


def _iw(base, x, target, train, held, setup: dict, args, seed: int, folder: Path) -> tuple:
    """Importance weights to ``target`` (fixed) or until the tolerance breaks (target None)."""
    import secateurs

    tol = args.tolerance if target is None else None
    return secateurs.prune(copy.deepcopy(base), x, "importance-weights", target, data=train, val_data=held,
                           tolerance=tol, metric=args.metric, steps=args.max_steps,
                           finetune=finetune_config(setup, args, args.ft_epochs, seed), out_dir=folder, resume=True,
                           method_options={"epochs": args.iw_epochs, "fraction": args.fraction, "init": args.init,
                                           "l1": args.l1, "rank": args.rank, "cost_aware": args.cost_aware,
                                           "refinements": args.refinements}, latency_guard=False)


def run_pair(name: str, kind: str, base, data: tuple, seed: int, args, work: Path) -> dict:
    """Importance weights, then L1 at the MACs it reached with the same epochs (optimizer steps);
    ``data`` is the model's (train, held-out, test) from :func:`splits`."""
    import secateurs

    setup = SETUPS[name]
    train, held, test = data
    x = torch.randn(1, 1, 256, 256)
    save = (lambda tag: work / name / tag) if seed == 0 else (lambda tag: None)
    t0 = time.perf_counter()
    iw, rep = _iw(base, x, None if kind == "tol" else args.fixed, train, held, setup, args, seed,
                  work / name / f"s{seed}_{kind}_iw")
    kept_steps = [r for r in rep["steps"][1:] if not r.get("reverted")]
    epochs = args.iw_epochs + args.ft_epochs * len(kept_steps)
    out = {"iw": _measure(iw, test, held, args.metric, save(f"{kind}_iw"))}
    # the collapse guard's verdict (secateurs.report.collapse_guard): one class for every labelled pixel
    out["iw"].update(steps=len(kept_steps), stopped=rep.get("stopped") or ("" if kept_steps else "no step kept"),
                     epochs=epochs, collapsed="collapsed" in rep,
                     time_s=round(time.perf_counter() - t0, 1),
                     held_after_alpha=round(rep["method_output"].get("iw_metric_trained") or float("nan"), 3),
                     curve=[{"step": r["step"], "macs": r["macs"] / rep["before"]["macs"], "metric": r["metric"],
                             "reverted": bool(r.get("reverted"))} for r in rep["steps"]])
    t0 = time.perf_counter()
    kept = rep["after"]["macs"] / rep["before"]["macs"]
    l1, rep_l1 = secateurs.prune(copy.deepcopy(base), x, "l1", {"macs": kept}, data=train,
                                 finetune=finetune_config(setup, args, epochs, seed),
                                 out_dir=work / name / f"s{seed}_{kind}_l1", resume=True, latency_guard=False)
    out["l1"] = _measure(l1, test, held, args.metric, save(f"{kind}_l1"))
    out["l1"].update(epochs=epochs, time_s=round(time.perf_counter() - t0, 1), collapsed="collapsed" in rep_l1)
    return out


def measure_latency(results: dict, work: Path, threads: int, repeats: int) -> None:
    """Batch-1 speed-up of seed 0's saved models over the unpruned one: each pruned model timed in
    turn with the unpruned (`compare_dense_pruned`, the median of the per-round ratios and its interval)."""
    import secateurs
    from secateurs.latency import compare_dense_pruned

    for name, r in results.items():
        if any("speedup" in cell for cell in r.get("latency", {}).values()) or not r["runs"].get("0"):
            continue  # measured already (an earlier harness's medians are measured again)
        tags = [f"{k}_{m}" for k in RUNS if k in r["runs"]["0"] for m in ("iw", "l1")]
        if not all((work / name / t).exists() for t in ["base", *tags]):
            continue
        base = secateurs.load(work / name / "base").eval()
        r["latency"] = {}
        for size in (256, 512):
            x, cell = torch.randn(1, 1, size, size), {}
            for t in tags:
                row = compare_dense_pruned(base, secateurs.load(work / name / t).eval(), x, batches=(1,),
                                           repeats=repeats, threads=threads)["rows"][0]
                cell[t] = [round(row["speedup"], 3), *(round(v, 3) for v in row["speedup_interval"])]
            r["latency"][str(size)] = {"speedup": cell}


def _speedup(cell: dict, tag: str) -> str:
    """A latency cell: the paired speed-up with its interval, or (results of the earlier harness, which
    stored each model's median in ms) the ratio of the medians."""
    if "speedup" in cell:
        v = cell["speedup"].get(tag)
        return f"{v[0]:.2f}x ({v[1]:.2f}-{v[2]:.2f})" if v else "-"
    return f"{cell['base'] / cell[tag]:.2f}x" if cell.get(tag) else "-"


def _save(path: Path, args, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "report_only"},
                               "results": results}, indent=1))
    os.replace(tmp, path)


def _load(path: Path, args) -> dict:
    """Finished runs to resume from: none for the one-seed layout of an earlier protocol; an error
    if they were made with other settings (mixing them would put two protocols under one label)."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if any("runs" not in r for r in saved["results"].values()):
        return {}
    differ = {k: (saved["args"].get(k), getattr(args, k)) for k in SETTINGS if saved["args"].get(k) != getattr(args, k)}
    if differ and any(r["runs"] for r in saved["results"].values()):
        what = ", ".join(f"{k}: {a} there, {b} now" for k, (a, b) in differ.items())
        raise SystemExit(f"{path} was made with other settings ({what}); pass another --out (and --work), or "
                         "delete it to start afresh")
    return saved["results"]


def run(args, path: Path, work: Path) -> dict:
    from secateurs.models import load_pretrained

    results = _load(path, args)
    for name in args.models:
        setup = SETUPS[name]
        base = load_pretrained(name)
        r = results.setdefault(name, {"model": name, "runs": {}})
        data = train, held, test = splits(setup)  # loaded once per model, not once per run
        if "base" not in r:
            r.update(dataset=test.name, train_images=len(train), held_images=len(held), test_images=len(test),
                     base=_measure(base, test, held, args.metric, work / name / "base"))
        for seed in args.seeds:
            for kind in RUNS:
                got = r["runs"].setdefault(str(seed), {})
                if kind in got:
                    continue
                got[kind] = run_pair(name, kind, base, data, seed, args, work)
                _save(path, args, results)
                print(name, seed, kind, {m: {k: v for k, v in got[kind][m].items() if k != "curve"}
                                         for m in ("iw", "l1")}, flush=True)
    measure_latency(results, work, args.threads, args.latency_repeats)
    _save(path, args, results)
    return results


# -- report --------------------------------------------------------------------------------------
def _stat(values: list[float], fmt: str = "{:.2f}") -> str:
    m, h = interval(values)
    return fmt.format(m) + (f" +- {fmt.format(h)}" if len(values) > 1 else "")


def _rows(name: str, r: dict, kind: str) -> list[str]:
    b, runs = r["base"], [v[kind] for v in r["runs"].values() if kind in v]
    if not runs:
        return []
    lat = r.get("latency", {})
    out = []
    for m, label in (("iw", "importance weights"), ("l1", "L1 (same MACs, epochs)")):
        ps = [run[m] for run in runs]
        speed = [_speedup(lat.get(s, {}), f"{kind}_{m}") for s in ("256", "512")]
        size = (f"{b['file_bytes'] / ps[0]['file_bytes']:.1f}x smaller" if "file_bytes" in ps[0] and "file_bytes" in b
                else "-")
        out.append(f"| | {'tolerance' if kind == 'tol' else 'fixed MACs'} | {_flagged(label, ps)} | "
                   f"{_stat([100 * p['macs_256'] / b['macs_256'] for p in ps], '{:.1f}')}% | "
                   f"{_stat([100 * p['params'] / b['params'] for p in ps], '{:.1f}')}% | {size} | {speed[0]} | {speed[1]} | "
                   + " | ".join(_stat([p[k] for p in ps]) for k in METRICS)
                   + f" | {_stat([b['iou'] - p['iou'] for p in ps])} | {_stat([p['epochs'] for p in ps], '{:.0f}')} | {len(ps)} |")
    d = [run["iw"]["iou"] - run["l1"]["iou"] for run in runs]
    out.append(f"| | | *importance weights - L1, IoU (paired)* | | | | | | | {_stat(d)} | | | | |")
    return out


def _collapsed(runs: list[dict]) -> str:
    """Runs the collapse guard flagged (one class for every labelled pixel); '' where it never fired
    or the results predate it."""
    n = sum(bool(r.get("collapsed")) for r in runs)
    return f"{n} of {len(runs)} collapsed" if n else ""


def _flagged(label: str, runs: list[dict]) -> str:
    """A method's table label, with the runs the collapse guard flagged counted beside it."""
    flagged = _collapsed(runs)
    return f"{label} (**{flagged}**)" if flagged else label


def _guarded(results: dict) -> bool:
    """Whether these results carry the collapse guard's verdicts (runs made before it do not)."""
    return any("collapsed" in pair[m] for r in results.values() for runs in r["runs"].values()
               for pair in runs.values() for m in ("iw", "l1"))


def _seeds(results: dict) -> list[int]:
    return sorted({int(seed) for r in results.values() for seed, runs in r["runs"].items() if runs})


def write_markdown(results: dict, args, path: Path) -> None:
    m = args.metric
    paired = any("speedup" in cell for r in results.values() for cell in r.get("latency", {}).values())
    setups = "; ".join(f"{n}: {r.get('train_images')} training / {r.get('held_images')} held-out / {r.get('test_images')} "
                       "test images" for n, r in results.items())
    lines = [
        "# Method 4: importance-weight filter pruning with an error tolerance (U-Net segmentation)", "",
        f"Generated by `python -m benchmarks.segmentation` ({platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} CPU threads) from `segmentation.json`.", "",
        "**CPU protocol, not the paper's setting.** Zoo models trained here from scratch on the shared data "
        "(`secateurs/zoo/manifest.json` has each recipe): `unet16` is the standard U-Net (4 levels, two 3x3 conv+BN+ReLU per "
        "level, transposed-conv up-sampling, skip concatenations) at a quarter of the widths (16-256 channels); "
        "`ternausnet8` is the VGG-11-encoder U-Net (TernausNet, no BN, transposed-conv decoder) at a quarter of the "
        "widths (16-128), trained from scratch (no ImageNet weights offline). ISBI 2012 slices 0-23 and HeLa frames "
        "0-15 train (the zoo models were trained on them); the validation images are split: the last "
        "ones are **held out** for the tolerance (and never reported), the others are the test split every metric "
        f"below is read on ({setups}).", "",
        f"Importance weights: alpha after every BN (after the conv where there is none), init `{args.init}`, "
        f"ranked by `{args.rank}`, L1 penalty {args.l1}, trained {args.iw_epochs} epochs with the network (AdamW lr "
        f"{args.lr}); then {args.fraction:.0%} of the remaining removable filters per step, {args.ft_epochs} "
        f"fine-tuning epochs per step. **tolerance**: until `{m}` on the held-out images falls more than "
        f"{args.tolerance} point(s) below the unpruned model's (that step undone, then the step halved at most "
        f"{args.refinements} times). **fixed MACs**: to {args.fixed:.0%} of the MACs (the paper's "
        f"-{1 - args.fixed:.0%}), no tolerance. L1: global L1-norm ranking cut one-shot to the MACs importance "
        "weights reached, fine-tuned for the same number of epochs (alpha epochs + kept steps x epochs per step; "
        f"the same batches, so the same optimizer steps). Mean +- 95% interval over seeds {_seeds(results)}. MACs at "
        "256x256; latency: seed 0's models' speed-up over the unpruned model, batch 1, PyTorch eager on this CPU, "
        + (f"the median of {args.latency_repeats} per-round ratios (each round times both back to back) and its 95% "
           "interval." if paired else f"the ratio of the medians of {args.latency_repeats} interleaved rounds (an "
           "earlier harness; a re-run with the seed-0 models measures the paired ratio).")
        + (" A method's row counts the runs the collapse guard flagged (the pruned model predicts one class for "
           "every labelled pixel of its few guard images, where the unpruned one did clearly better): their IoU "
           "is in the mean." if _guarded(results)
           else " (These results predate the collapse guard: a collapsed run shows as an IoU near 0.)"), "",
        "| model | run | method | MACs | params | file | latency b1 256 | latency b1 512 | pixel acc | IoU | Dice "
        "| IoU drop | epochs | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        b = r["base"]
        lines.append(f"| {name} | | unpruned | {b['macs_256'] / 1e9:.2f} G | {b['params'] / 1e6:.2f} M | "
                     f"{b.get('file_bytes', 0) / 1e6:.2f} MB | | | " + " | ".join(f"{b[k]:.2f}" for k in METRICS) + " | | | |")
        for kind in RUNS:
            lines += _rows(name, r, kind)
    lines += ["", "Speed-ups and size ratios are unpruned / pruned; a drop is unpruned minus pruned (points).", "",
              "![inputs, ground truth, unpruned and pruned predictions](segmentation.png)", "",
              "![held-out metric vs MACs along the importance-weight schedule (seed 0)](segmentation_curves.png)", ""]
    lines += [claim_line(results, args.fixed)]
    if getattr(args, "versus", None):
        other = json.loads(Path(args.versus).read_text())
        lines += versus_lines(results, other["results"], f"`{args.versus}` (ranked by `{other['args'].get('rank')}`)") + [""]
    for name, r in results.items():
        for seed, runs in r["runs"].items():
            if "tol" in runs:
                p = runs["tol"]["iw"]
                lines.append(f"- `{name}` seed {seed}: stopped: {p['stopped'] or 'at its last step'}; held-out {m} after learning alpha "
                             f"{p['held_after_alpha']}; importance weights {p['time_s']:.0f} s, L1 {runs['tol']['l1']['time_s']:.0f} s.")
    path.write_text("\n".join(lines) + "\n")


def seg_summary(results: dict) -> list[str]:
    """BENCHMARKS.md's short table: MACs and IoU per run and method, mean +- 95% interval over seeds."""
    if any("runs" not in r for r in results.values()):
        return ["segmentation.json holds the earlier one-seed protocol's results: run `python -m benchmarks.segmentation`."]
    L = ["| model | run | method | MACs kept | IoU | IoU drop | importance weights - L1 (paired) | seeds |",
         "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        b = r["base"]
        for kind in RUNS:
            runs = [v[kind] for v in r["runs"].values() if kind in v]
            if not runs:
                continue
            d = _stat([run["iw"]["iou"] - run["l1"]["iou"] for run in runs])
            for m, label in (("iw", "importance weights"), ("l1", "L1")):
                ps = [run[m] for run in runs]
                L.append(f"| {name} | {'tolerance' if kind == 'tol' else 'fixed MACs'} | {_flagged(label, ps)} | "
                         f"{_stat([100 * p['macs_256'] / b['macs_256'] for p in ps], '{:.1f}')}% | "
                         f"{_stat([p['iou'] for p in ps])} | {_stat([b['iou'] - p['iou'] for p in ps])} | "
                         f"{d if m == 'iw' else ''} | {len(ps)} |")
    return L


def versus_lines(results: dict, other: dict, label: str, title: str | None = None) -> list[str]:
    """A change to importance weights measured: this run's importance weights against ``other``'s
    (the same models, seeds, data and epochs), paired by seed."""
    L = ["", title or f"## Importance weights here - importance weights in {label} (paired by seed)", "",
         "| model | run | MACs kept here | MACs kept there | IoU here | IoU there | IoU difference (paired) | seeds |",
         "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name not in other:
            continue
        b = r["base"]
        for kind in RUNS:
            seeds = [s for s, v in r["runs"].items() if kind in v and kind in other[name]["runs"].get(s, {})]
            if not seeds:
                continue
            here = [r["runs"][s][kind]["iw"] for s in seeds]
            there = [other[name]["runs"][s][kind]["iw"] for s in seeds]
            mean, half = interval([a["iou"] - o["iou"] for a, o in zip(here, there)])
            L.append(f"| {name} | {'tolerance' if kind == 'tol' else 'fixed MACs'} | "
                     f"{_stat([100 * p['macs_256'] / b['macs_256'] for p in here], '{:.1f}')}% | "
                     f"{_stat([100 * p['macs_256'] / b['macs_256'] for p in there], '{:.1f}')}% | "
                     f"{_stat([p['iou'] for p in here])} | {_stat([p['iou'] for p in there])} | "
                     f"{mean:+.2f} +- {half:.2f} | {len(seeds)} |")
    return L if len(L) > 5 else []


def claim_line(results: dict, fixed: float) -> str:
    """The paper's -85% MACs claim checked: importance weights' drops at the fixed target, with the
    MACs each run really kept (the paper: a 0.32-point accuracy drop; the issue: IoU within 1 point)."""
    parts = []
    for name, r in results.items():
        runs = [v["fixed"]["iw"] for v in r["runs"].values() if "fixed" in v]
        if not runs:
            continue
        b = r["base"]
        kept = _stat([100 * p["macs_256"] / b["macs_256"] for p in runs], "{:.1f}")
        iou, acc = interval([b["iou"] - p["iou"] for p in runs]), interval([b["pixel_acc"] - p["pixel_acc"] for p in runs])
        verdict = ("within 1 point" if iou[0] + iou[1] <= 1.0 else "within 1 point on average only" if iou[0] <= 1.0
                   else "more than 1 point")
        parts.append(f"{name} at {kept}% MACs: IoU {iou[0]:+.2f} +- {iou[1]:.2f} ({verdict}), pixel accuracy "
                     f"{acc[0]:+.2f} +- {acc[1]:.2f} ({', '.join(filter(None, (f'{len(runs)} seeds', _collapsed(runs))))})")
    return (f"**At {fixed:.0%} of the MACs (the paper's -{1 - fixed:.0%}), importance weights' drops (unpruned - "
            "pruned, points):** " + ("; ".join(parts) if parts else "not run yet") + ".")


def _predictions(results: dict, work: Path, out: Path) -> None:
    """Input, ground truth and seed 0's predictions on the first test image."""
    import matplotlib.pyplot as plt

    import secateurs
    from secateurs.data import Batches
    from secateurs.train import predict_padded

    names = list(results)
    tags = [("base", "unpruned"), ("tol_iw", "importance weights, tolerance"), ("tol_l1", "L1, same MACs"),
            ("fixed_iw", "importance weights, fixed"), ("fixed_l1", "L1, fixed")]
    fig, axes = plt.subplots(len(names), 2 + len(tags), figsize=(3 * (2 + len(tags)), 3.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        x, y = next(iter(Batches(splits(SETUPS[name])[2], 1, train=False)))
        h, w = (256, 256) if "isbi" in name else (320, 480)
        x, y = x[..., :h, :w], y[..., :h, :w]
        imgs, titles = [x[0, 0], y[0]], ["input", "ground truth"]
        b = results[name]["base"]
        for tag, label in tags:
            model = secateurs.load(work / name / tag).eval()
            with torch.no_grad():
                imgs.append(predict_padded(model, x).argmax(1)[0])
            macs = secateurs.count(model, torch.randn(1, 1, 256, 256)).macs
            titles.append(f"{label} ({100 * macs / b['macs_256']:.0f}% MACs)")
        for ax, img, t in zip(row, imgs, titles):
            ax.imshow(img, cmap="gray")
            ax.set_title(t, fontsize=8)
            ax.axis("off")
        row[0].text(-0.08, 0.5, name, transform=row[0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "segmentation.png", dpi=70)
    plt.close(fig)


def plot(results: dict, work: Path, out: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in results.items() if "tol" in r["runs"].get("0", {})]
    tags = ("base", "tol_iw", "tol_l1", "fixed_iw", "fixed_l1")
    missing = [work / n / t for n in names for t in tags if not (work / n / t).exists()]
    if missing:  # results made in another checkout: their predictions figure stays as it is
        print(f"kept {out}/segmentation.png: its saved models are not in {work} ({missing[0]}, ...)")
    elif names:
        _predictions({n: results[n] for n in names}, work, out)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        c = results[name]["runs"]["0"]["tol"]["iw"]["curve"]
        ax.plot([100 * p["macs"] for p in c], [p["metric"] for p in c], marker="o", label=name)
        ax.plot([100 * p["macs"] for p in c if p["reverted"]], [p["metric"] for p in c if p["reverted"]], "rx")
    ax.set_xlabel("MACs kept (%)")
    ax.set_ylabel(f"{metric}, held-out images")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax.set_title("importance-weight schedule, seed 0 (x: step undone)")
    fig.tight_layout()
    fig.savefig(out / "segmentation_curves.png", dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tolerance", type=float, default=1.0)
    p.add_argument("--metric", default="pixel_acc", help="pixel_acc (the paper's), iou or dice")
    p.add_argument("--fixed", type=float, default=0.15, help="MACs kept in the fixed-target run (the paper's -85%%)")
    p.add_argument("--iw-epochs", type=int, default=5)
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.1, help="CPU protocol: 10%% per step (method default 5%%)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--init", default="ones")
    p.add_argument("--rank", default="alpha", help="alpha (the paper's) or scale (ours: |alpha| x the channel's scale)")
    p.add_argument("--versus", default=None, metavar="JSON",
                   help="another run's segmentation.json: its importance weights against these, paired by seed")
    p.add_argument("--cost-aware", action="store_true", help="ours: alpha's penalty and rank weighted by MACs")
    p.add_argument("--l1", type=float, default=1e-4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--refinements", type=int, default=2, help="after an undone step, halve the step, at most N times")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-repeats", type=int, default=30)
    p.add_argument("--work", default="runs/segmentation", help="pruning runs (checkpoints) and seed 0's saved models")
    p.add_argument("--out", default=str(DOCS))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "segmentation.json"
    if args.report_only:  # the settings the results were made with, for the text
        saved = json.loads(path.read_text())
        versus = args.versus  # the comparison asked for now, not the one the run was made with
        results, args = saved["results"], argparse.Namespace(**{**vars(args), **saved["args"]})
        args.versus = versus or getattr(args, "versus", None)
        if any("runs" not in r for r in results.values()):
            raise SystemExit(f"{path} holds the earlier one-seed protocol's results: run the benchmark to replace them")
    else:
        results = run(args, path, work)
    results = {n: results[n] for n in SETUPS if n in results}
    write_markdown(results, args, out / "segmentation.md")
    plot(results, work, out, args.metric)
    print(f"wrote {out}/segmentation.md, .json, .png, _curves.png")


if __name__ == "__main__":
    main()
