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
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from benchmarks._protocol import DOCS
from benchmarks.segmentation_report import METRICS, RUNS, _kinds, plot, write_markdown

SETUPS = {  # the zoo model, its data, the training crops it was trained with, held-out images for the tolerance
    "unet16_isbi2012": {"data": "isbi2012", "crop": 128, "batch": 8, "tol_images": 2},
    "unet16_hela": {"data": "hela", "crop": 192, "batch": 4, "tol_images": 1},
    "ternausnet8_isbi2012": {"data": "isbi2012", "crop": 128, "batch": 8, "tol_images": 2},
    "ternausnet8_hela": {"data": "hela", "crop": 192, "batch": 4, "tol_images": 1},
}
SETTINGS = ("tolerance", "metric", "fixed", "iw_epochs", "ft_epochs", "fraction", "max_steps", "init", "rank", "l1", "lr",
            "refinements", "cost_aware", "reconstruct", "alpha_lr", "min_keep", "penalty", "final_epochs")  # what changes a result: a resumed file must have been made with the same
LATER = {"reconstruct": 0, "runs": list(RUNS), "alpha_lr": None, "min_keep": 0.05, "penalty": "uniform", "final_epochs": 0}  # options added after results were made: what those were made with


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
                                           "refinements": args.refinements, "alpha_lr": args.alpha_lr,
                                           "min_keep": args.min_keep, "penalty": args.penalty},
                           latency_guard=False,
                           reconstruct=args.reconstruct)


def kept_steps(report: dict) -> list[dict]:
    """A pruning report's steps that stayed (the first entry is the unpruned model; an undone one did not)."""
    return [r for r in report["steps"][1:] if not r.get("reverted")]


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
    done = kept_steps(rep)
    final = args.final_epochs if done else 0  # the last cut's recovery: the one-shot cut it is compared with gets all its epochs after it
    if final:
        from secateurs.train import fit

        fit(iw, train, None, dataclasses.replace(finetune_config(setup, args, final, seed), resume=True,
                                                 out_dir=str(work / name / f"s{seed}_{kind}_final{final}")))
    epochs = args.iw_epochs + args.ft_epochs * len(done) + final
    out = {"iw": _measure(iw, test, held, args.metric, save(f"{kind}_iw"))}
    # the collapse guard's verdict (secateurs.report.collapse_guard): one class for every labelled pixel
    out["iw"].update(steps=len(done), stopped=rep.get("stopped") or ("" if done else "no step kept"),
                     epochs=epochs, collapsed="collapsed" in rep,
                     time_s=round(time.perf_counter() - t0, 1),
                     held_after_alpha=round(rep["method_output"].get("iw_metric_trained") or float("nan"), 3),
                     curve=[{"step": r["step"], "macs": r["macs"] / rep["before"]["macs"], "metric": r["metric"],
                             "reverted": bool(r.get("reverted"))} for r in rep["steps"]])
    t0 = time.perf_counter()
    kept = rep["after"]["macs"] / rep["before"]["macs"]
    l1, rep_l1 = secateurs.prune(copy.deepcopy(base), x, "l1", {"macs": kept}, data=train,
                                 finetune=finetune_config(setup, args, epochs, seed),
                                 out_dir=work / name / f"s{seed}_{kind}_l1", resume=True, latency_guard=False,
                                 reconstruct=args.reconstruct)
    out["l1"] = _measure(l1, test, held, args.metric, save(f"{kind}_l1"))
    out["l1"].update(epochs=epochs, time_s=round(time.perf_counter() - t0, 1), collapsed="collapsed" in rep_l1)
    return out


def measure_latency(results: dict, work: Path, threads: int, repeats: int) -> None:
    """Batch-1 speed-up of seed 0's saved models over the unpruned one: each pruned model timed in
    turn with the unpruned (`compare_dense_pruned`, the median of the per-round ratios and its interval)."""
    import secateurs
    from secateurs.latency import compare_dense_pruned

    for name, r in results.items():
        if not r["runs"].get("0"):
            continue
        tags = [f"{k}_{m}" for k in RUNS if k in r["runs"]["0"] for m in ("iw", "l1")]
        # an earlier harness's medians (no "speedup") are measured again; a run added later is measured alone
        done = {s: r.get("latency", {}).get(s, {}).get("speedup", {}) for s in ("256", "512")}
        todo = [t for t in tags if not all(t in cell for cell in done.values())]
        if not todo or not all((work / name / t).exists() for t in ["base", *todo]):
            continue
        base = secateurs.load(work / name / "base").eval()
        r["latency"] = {}
        for size in (256, 512):
            x, cell = torch.randn(1, 1, size, size), dict(done[str(size)])
            for t in todo:
                row = compare_dense_pruned(base, secateurs.load(work / name / t).eval(), x, batches=(1,),
                                           repeats=repeats, threads=threads)["rows"][0]
                cell[t] = [round(row["speedup"], 3), *(round(v, 3) for v in row["speedup_interval"])]
            r["latency"][str(size)] = {"speedup": cell}


def _first_test(name: str) -> tuple:
    """The first test image of ``name``'s data and its labels, as a batch of one."""
    from secateurs.data import Batches

    return next(iter(Batches(splits(SETUPS[name])[2], 1, train=False)))


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
    then = {k: saved["args"].get(k, LATER.get(k)) for k in SETTINGS}
    differ = {k: (then[k], getattr(args, k)) for k in SETTINGS if then[k] != getattr(args, k)}
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
            for kind in args.runs:
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
    from secateurs.methods.importance import RANKS

    p.add_argument("--rank", default="alpha", choices=RANKS,
                   help="alpha (the paper's), scale (ours: |alpha| x the channel's scale), layer (ours: |alpha| over its "
                        "layer's mean) or norm (ours: |alpha| sets each layer's width, the filters' L1 norms the channels)")
    p.add_argument("--versus", default=None, metavar="JSON",
                   help="another run's segmentation.json: its importance weights against these, paired by seed")
    p.add_argument("--cost-aware", action="store_true", help="ours: alpha's penalty and rank weighted by MACs")
    p.add_argument("--l1", type=float, default=1e-4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--alpha-lr", type=float, default=None, help="alpha's own learning rate (default: --lr)")
    p.add_argument("--min-keep", type=float, default=0.05,
                   help="importance weights: no layer below this share of its width (the method's default 0.05)")
    p.add_argument("--penalty", default="uniform", choices=("uniform", "gradient"),
                   help="importance weights: L1 penalty the same everywhere (the paper's) or scaled by each layer's "
                        "loss gradient on alpha (ours)")
    p.add_argument("--final-epochs", type=int, default=0,
                   help="importance weights: this many more fine-tuning epochs after its last step (L1 gets them too)")
    p.add_argument("--refinements", type=int, default=2, help="after an undone step, halve the step, at most N times")
    p.add_argument("--reconstruct", type=int, default=0, metavar="N",
                   help="both methods: the least-squares re-fit before every cut, on N training images")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS, help="tol, fixed or both")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-repeats", type=int, default=30)
    p.add_argument("--work", default="runs/segmentation", help="pruning runs (checkpoints) and seed 0's saved models")
    p.add_argument("--out", default=str(DOCS))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.min_keep <= 1:
        p.error(f"--min-keep must be in (0, 1], got {args.min_keep}")
    if args.final_epochs < 0:
        p.error(f"--final-epochs must be >= 0, got {args.final_epochs}")
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "segmentation.json"
    if args.report_only:  # the settings the results were made with, for the text
        saved = json.loads(path.read_text())
        versus = args.versus  # the comparison asked for now, not the one the run was made with
        results, args = saved["results"], argparse.Namespace(**{**vars(args), **LATER, **saved["args"]})
        args.versus = versus or getattr(args, "versus", None)
        if any("runs" not in r for r in results.values()):
            raise SystemExit(f"{path} holds the earlier one-seed protocol's results: run the benchmark to replace them")
    else:
        results = run(args, path, work)
    results = {n: results[n] for n in SETUPS if n in results}
    write_markdown(results, args, out / "segmentation.md", vars(p.parse_args([])))
    plot(results, work, out, args.metric, _first_test)
    curves = ", _curves.png" if "tol" in _kinds(results) else ""  # the curve is drawn from tolerance runs only
    print(f"wrote {out}/segmentation.md, .json, .png{curves}")


if __name__ == "__main__":
    main()
