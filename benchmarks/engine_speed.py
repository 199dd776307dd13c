"""Wall time of one 50% L2 prune as a user calls it, secateurs beside Torch-Pruning, on this machine.

secateurs is timed through its front door, ``secateurs.prune(model, x, target={"ratio": 0.5})`` (checks,
capture, groups, scores, plan, cut, the check forward of the cut model and the MACs it counts before and
after for its report), and separately as the bare engine (``analyze`` + scores + ``apply_plan``).
Each (tool, model) pair runs in its own subprocess (fresh imports, a time limit), does one
warm-up prune on a separate model instance, then times ``--repeats`` prunes of fresh instances
(building the model is not timed) and reports the median. Torch-Pruning is the benchmark-only
extra ``pip install torch-pruning``; its ``BasePruner`` with ``GroupMagnitudeImportance(p=2)`` at
``pruning_ratio=0.5``, the classifier ignored (our engine never shrinks model outputs).

Usage::

    python -m benchmarks.engine_speed                # default model list, writes docs/engine_speed.md
    python -m benchmarks.engine_speed --models resnet50 --repeats 5
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

MODELS = ["resnet50", "convnext_tiny", "densenet121", "efficientnet_b0", "mobilenet_v3_large",
          "regnet_y_400mf", "swin_t", "shufflenet_v2_x1_0", "resnet18", "resnet34", "resnet101", "resnet152"]
DEPTH = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _build(name):
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None).eval()


def _classifier(model):
    import torch.nn as nn

    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    return last


def _secateurs_once(name, x):
    import secateurs

    m = _build(name)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secateurs.prune(m, x, target={"ratio": 0.5})
    return time.perf_counter() - t, m


def _engine_once(name, x):
    import secateurs

    m = _build(name)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = secateurs.analyze(m, x)
        scores = secateurs.group_scores(m, graph, "l2")
        secateurs.apply_plan(m, graph, secateurs.uniform_plan(graph, scores, 0.5))
    return time.perf_counter() - t, m


def _tp_once(name, x):
    import torch_pruning as tp

    m = _build(name)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=[_classifier(m)])
        pruner.step()
    return time.perf_counter() - t, m


def worker(tool: str, name: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("SECATEURS_THREADS", "2")))
    x = torch.randn(1, 3, 224, 224)
    once = {"secateurs": _secateurs_once, "engine": _engine_once, "tp": _tp_once}[tool]
    warm = "resnet18" if name != "resnet18" else "resnet34"
    once(warm, x)  # imports, first capture, kernel caches
    times, m = [], None
    for _ in range(repeats):
        t, m = once(name, x)
        times.append(t)
    with torch.no_grad():
        out = m(x)
    return {"median_s": statistics.median(times), "times": times, "out_shape": list(out.shape)}


def run_one(tool: str, name: str, repeats: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.engine_speed", "--worker", tool, name, "--repeats", str(repeats)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"> {timeout:.0f} s (stopped)"}
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "note": last[:160]}
    return {"status": "ok", **json.loads(r.stdout.strip().splitlines()[-1])}


def _fmt(res: dict) -> str:
    return f"{res['median_s']:.3f}" if res.get("status") == "ok" else res.get("note", res.get("status"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per (tool, model) subprocess")
    p.add_argument("--out", default="docs")
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--report-only", action="store_true", help="rebuild engine_speed.md from engine_speed.csv")
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.repeats)))
        return 0

    try:
        import torch_pruning as tp
        tp_version = tp.__version__
    except ImportError:
        tp_version, args.no_tp = None, True
    if args.report_only:
        with open(Path(args.out) / "engine_speed.csv") as f:
            write_report(list(csv.DictReader(f)), Path(args.out), args.repeats, tp_version)
        return 0
    rows = []
    for name in args.models:
        ours = run_one("secateurs", name, args.repeats, args.timeout)
        engine = run_one("engine", name, args.repeats, args.timeout)
        theirs = {"status": "skipped", "note": "not installed"} if args.no_tp else run_one("tp", name, 1 if name.startswith("swin") else args.repeats, args.timeout)
        ratio = (ours["median_s"] / theirs["median_s"]) if ours.get("status") == "ok" and theirs.get("status") == "ok" else None
        rows.append({"model": name, "secateurs_s": _fmt(ours), "engine_s": _fmt(engine), "torch_pruning_s": _fmt(theirs),
                     "ratio": f"{ratio:.2f}" if ratio is not None else "",
                     "secateurs_times": ours.get("times", ""), "tp_times": theirs.get("times", "")})
        print(f"{name:22s} secateurs {_fmt(ours):>10}  torch-pruning {_fmt(theirs):>24}  ratio {rows[-1]['ratio']}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "engine_speed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_report(rows, out, args.repeats, tp_version)
    return 0


def write_report(rows: list[dict], out: Path, repeats: int, tp_version: str | None) -> None:
    import torch
    import torchvision

    import secateurs

    lines = ["# Engine speed: one 50% prune as a user calls it", "",
             f"`python -m benchmarks.engine_speed --repeats {repeats}` on {platform.machine()}, "
             f"{os.cpu_count()} cores, {os.environ.get('SECATEURS_THREADS', '2')} torch threads, torch {torch.__version__}, "
             f"torchvision {torchvision.__version__}, secateurs {secateurs.__version__}, Torch-Pruning {tp_version}. "
             "Input 1x3x224x224, weights=None. Median wall seconds of fresh model instances after one warm-up "
             "prune in the same process; model construction not timed. Raw data: `engine_speed.csv`.", "",
             "secateurs: `secateurs.prune(model, x, target={'ratio': 0.5})` (weight and input checks, capture, groups, "
             "L2 scores, plan, cut, the check forward of the cut model, MACs counted before and after for the report: "
             "the capture counts the MACs before too when only BN, dropout and stochastic depth read `training`, and "
             "the check forward is the count after); engine alone: "
             "`analyze` + `group_scores(\"l2\")` + `uniform_plan(0.5)` + `apply_plan`. "
             "Torch-Pruning: `BasePruner(model, x, GroupMagnitudeImportance(p=2), pruning_ratio=0.5, "
             "ignored_layers=[classifier]).step()`. The ratio is `secateurs.prune` over Torch-Pruning.", "",
             "| model | secateurs.prune (s) | engine alone (s) | Torch-Pruning (s) | secateurs.prune / TP |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['secateurs_s']} | {r.get('engine_s', '')} | {r['torch_pruning_s']} | {r['ratio']} |")
    depth = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}
    growth = [(r["model"], depth[r["model"]], float(r["secateurs_s"])) for r in rows
              if r["model"] in depth and r["secateurs_s"].replace(".", "", 1).isdigit()]
    if len(growth) > 1:
        lines += ["", "Growth with depth (ResNet family): time per layer stays flat, i.e. linear in depth.", "",
                  "| model | layers | secateurs (s) | ms per layer |", "|---|---|---|---|"]
        lines += [f"| {m} | {d} | {t:.3f} | {1000 * t / d:.1f} |" for m, d, t in sorted(growth, key=lambda g: g[1])]
    (out / "engine_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
