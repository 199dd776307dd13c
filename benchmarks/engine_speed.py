"""Wall time of one 50% L2 prune as a user calls it, secateurs beside Torch-Pruning, on this machine.

secateurs is timed through its front door, ``secateurs.prune(model, x, target={"ratio": 0.5})`` (checks,
capture, groups, scores, plan, cut, the check forward of the cut model and the MACs it counts before and
after for its report), and separately as the bare engine (``analyze`` + scores + ``apply_plan``).
Each model runs in its own subprocess (fresh imports, a time limit) holding every tool: one
warm-up prune each on a separate model, then ``--repeats`` rounds in which every tool prunes a fresh
instance (building it is not timed), the order rotated each round. The tools thus share each slow
spell of this machine, and each round gives a paired ratio: the report gives the median ratio with a
95% distribution-free interval. Torch-Pruning is the benchmark-only
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

from benchmarks._protocol import write_rows

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


TOOLS = {"secateurs": _secateurs_once, "engine": _engine_once, "tp": _tp_once}


def worker(name: str, repeats: int, tools: list[str]) -> dict:
    """All tools in one process, interleaved: repeat i runs them in an order rotated by i, so a
    slow spell of this shared machine lands on every tool alike and each repeat gives a paired ratio."""
    import torch

    torch.set_num_threads(int(os.environ.get("SECATEURS_THREADS", "2")))
    x = torch.randn(1, 3, 224, 224)
    warm = "resnet18" if name != "resnet18" else "resnet34"
    for tool in tools:
        TOOLS[tool](warm, x)  # imports, first capture, kernel caches
    times: dict[str, list[float]] = {t: [] for t in tools}
    shapes = {}
    for i in range(repeats):
        for tool in tools[i % len(tools):] + tools[:i % len(tools)]:
            t, m = TOOLS[tool](name, x)
            times[tool].append(t)
            if tool not in shapes:
                with torch.no_grad():
                    shapes[tool] = list(m(x).shape)
    return {"times": times, "out_shape": shapes}


def run_one(name: str, repeats: int, tools: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.engine_speed", "--worker", name, "--repeats", str(repeats), "--tools", *tools]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"> {timeout:.0f} s (stopped)"}
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "error", "note": last[:160]}
    return {"status": "ok", **json.loads(r.stdout.strip().splitlines()[-1])}


def row(name: str, res: dict) -> dict:
    from secateurs.latency import _median_interval  # the interval every latency in the project reports

    if res["status"] != "ok":
        return {"model": name, "secateurs_s": res["note"], "engine_s": "", "torch_pruning_s": "", "ratio": "",
                "ratio_lo": "", "ratio_hi": "", "secateurs_times": "", "tp_times": ""}
    times = res["times"]
    med = {t: f"{statistics.median(v):.3f}" for t, v in times.items()}
    out = {"model": name, "secateurs_s": med.get("secateurs", ""), "engine_s": med.get("engine", ""),
           "torch_pruning_s": med.get("tp", "not run"), "ratio": "", "ratio_lo": "", "ratio_hi": "",
           "secateurs_times": json.dumps([round(t, 4) for t in times.get("secateurs", [])]),
           "tp_times": json.dumps([round(t, 4) for t in times.get("tp", [])])}
    if "secateurs" in times and "tp" in times:
        ratios = [a / b for a, b in zip(times["secateurs"], times["tp"])]
        out.update(zip(("ratio", "ratio_lo", "ratio_hi"), (f"{r:.2f}" for r in _median_interval(ratios))))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per tool in a model's subprocess")
    p.add_argument("--out", default="docs")
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--report-only", action="store_true", help="rebuild engine_speed.md from engine_speed.csv")
    p.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--tools", nargs="+", default=list(TOOLS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.tools)))
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
    tools = [t for t in TOOLS if not (t == "tp" and args.no_tp)]
    rows = []
    for name in args.models:
        repeats = 3 if name.startswith("swin") else args.repeats  # Torch-Pruning takes minutes on swin_t
        rows.append(row(name, run_one(name, repeats, tools, args.timeout * len(tools))))
        r = rows[-1]
        print(f"{name:22s} secateurs {r['secateurs_s']:>8}  torch-pruning {r['torch_pruning_s']:>8}  "
              f"ratio {r['ratio']} [{r['ratio_lo']}, {r['ratio_hi']}]", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "engine_speed.csv", rows)
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
             "Input 1x3x224x224, weights=None. Each model in one process: one warm-up prune per tool, then "
             f"{repeats} rounds in which every tool prunes a fresh instance, in an order rotated each round "
             "(model construction not timed). Times are medians; the ratio is the median of the rounds' paired "
             "ratios with its 95% interval (binomial order statistics, as `secateurs.latency`). Raw data: `engine_speed.csv`.", "",
             "secateurs: `secateurs.prune(model, x, target={'ratio': 0.5})` (weight and input checks, capture, groups, "
             "L2 scores, plan, cut, the check forward of the cut model, MACs counted before and after for the report: "
             "the capture counts the MACs before too when only BN, dropout and stochastic depth read `training`, and "
             "the check forward is the count after); engine alone: "
             "`analyze` + `group_scores(\"l2\")` + `uniform_plan(0.5)` + `apply_plan`. "
             "Torch-Pruning: `BasePruner(model, x, GroupMagnitudeImportance(p=2), pruning_ratio=0.5, "
             "ignored_layers=[classifier]).step()`. The ratio is `secateurs.prune` over Torch-Pruning.", "",
             "| model | secateurs.prune (s) | engine alone (s) | Torch-Pruning (s) | secateurs.prune / TP | 95% interval |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"{r['ratio_lo']}-{r['ratio_hi']}" if r.get("ratio_lo") else ""
        lines.append(f"| {r['model']} | {r['secateurs_s']} | {r.get('engine_s', '')} | {r['torch_pruning_s']} "
                     f"| {r['ratio']} | {ci} |")
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
