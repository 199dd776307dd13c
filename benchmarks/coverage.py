"""Coverage of the engine over the models users bring, beside Torch-Pruning in the same run.

For each model (no pretrained weights, BN statistics randomised so that zeroed channels are not
trivially zero downstream) and each tool:

1. secateurs only: analyse, then zero a random half of the channels of every *exact* group, remove
   them, and compare every output tensor with the zeroed dense model (max abs difference / max
   abs output must stay under 1e-5; for detectors, the raw outputs of their heads, before NMS);
2. both tools: prune 50% of every group's channels (L2 magnitude; classifier / segmentation /
   detection heads kept), run forward (same output structure and shapes, finite values), one
   training step (forward + backward in training mode), and count MACs with the same counter.

"Pruned correctly" = all of that, and MACs kept <= 70% (a model that only "passes" because
everything was frozen does not count). Writes docs/coverage.md and docs/coverage.csv; finished
rows are kept (``--resume``), so a killed run picks up where it stopped. Usage::

    python -m benchmarks.coverage                       # every family (timm, smp, ultralytics, ...)
    python -m benchmarks.coverage --families timm smp   # some families
    python -m benchmarks.coverage --quick --out /tmp/c  # a few models per family (CI)
"""
from __future__ import annotations

import argparse
import csv
import gc
import platform
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import secateurs
from secateurs import analyze, count
from secateurs.testing import check_equivalence, output_tensors

from . import zoo

FIELDS = ["family", "model", "tool", "status", "groups", "exact_groups", "channels", "rel_err", "macs_before",
          "macs_after", "kept", "params_before", "params_after", "analyze_s", "prune_s", "warnings", "capture",
          "reason"]
TOL = 1e-5
MAX_KEPT = 0.7
FAMILIES = ["timm", "smp", "ultralytics", "detection", "video", "conv1d", "torchvision"]
TIMEOUT_S = 150


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"stopped after {TIMEOUT_S} s")


def _shapes(family: str, tensors: list[torch.Tensor]) -> list:
    # a detector's number of boxes depends on its scores; the rest of each shape must hold
    return [tuple(t.shape[1:]) if family == "detection" else tuple(t.shape) for t in tensors]


def _finish(row: dict, case: zoo.Case, c0, ref: list) -> dict:
    m = case.model
    try:
        with torch.no_grad():
            out = output_tensors(m(*case.inputs))
    except Exception as err:  # the pruned model no longer runs
        row["reason"] = f"pruned model fails: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return row
    c1 = count(m, case.inputs)
    row.update(macs_before=c0.macs, macs_after=c1.macs, kept=f"{c1.macs / c0.macs:.3f}", params_before=c0.params,
               params_after=c1.params)
    m.train()
    case.train_step(m).backward()
    if len(out) != len(ref) or _shapes(case.family, out) != _shapes(case.family, ref):
        row["reason"] = f"output shapes changed: {_shapes(case.family, ref)[:3]} -> {_shapes(case.family, out)[:3]}"
    elif not all(torch.isfinite(t).all() for t in out if t.is_floating_point()):
        row["reason"] = "non-finite outputs"
    elif c1.macs > MAX_KEPT * c0.macs:
        row["reason"] = f"MACs kept {c1.macs / c0.macs:.1%} > {MAX_KEPT:.0%} (channels frozen)"
    else:
        row["status"] = "ok"
    return row


def check_ours(case: zoo.Case) -> dict:
    row = {"family": case.family, "model": case.name, "tool": "secateurs", "status": "fail", "reason": ""}
    m, x = case.model, case.inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        graph = analyze(m, x)
        row["analyze_s"] = f"{time.perf_counter() - t0:.3f}"
    row.update(warnings=len(graph.warnings), groups=len(graph.groups), capture=graph.capture_mode,
               exact_groups=sum(g.exact for g in graph.groups), channels=sum(g.size for g in graph.groups))
    if not graph.groups:
        row["reason"] = "no prunable group" + (f": {graph.warnings[0]}" if graph.warnings else "")
        return row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _, err, _ = check_equivalence(zoo.equivalence_view(case), x, tol=float("inf"))
        except AssertionError as e:
            row["reason"] = f"equivalence: {e}"
            return row
    row["rel_err"] = f"{err:.1e}"
    if err > TOL:
        row["reason"] = f"zeroed channels changed outputs by {err:.1e} (> {TOL:g})"
        return row
    return _timed_prune(row, case, lambda: secateurs.prune(m, x, target={"ratio": 0.5}))


def check_tp(case: zoo.Case) -> dict:
    import torch_pruning as tp

    row = {"family": case.family, "model": case.name, "tool": "torch-pruning", "status": "fail", "reason": ""}

    def step():
        tp.pruner.MagnitudePruner(case.model, case.inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=case.head).step()
        case.model.eval()

    return _timed_prune(row, case, step)


def _timed_prune(row: dict, case: zoo.Case, prune: Callable[[], Any]) -> dict:
    """Outputs and MACs before, the prune timed, then the checks of :func:`_finish`."""
    c0 = count(case.model, case.inputs)
    with torch.no_grad():
        ref = output_tensors(case.model(*case.inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        prune()
        row["prune_s"] = f"{time.perf_counter() - t0:.3f}"
    return _finish(row, case, c0, ref)


def run_one(family: str, name: str, tool: str) -> dict:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        torch.manual_seed(0)
        case = zoo.build(family, name)
        return check_ours(case) if tool == "secateurs" else check_tp(case)
    except Exception as err:  # report, never stop the sweep
        if not isinstance(err, _Timeout):
            traceback.print_exc(limit=-2, file=sys.stderr)
        msg = str(err).splitlines()[0][:240] if str(err) else ""
        return {"family": family, "model": name, "tool": tool, "status": "fail", "reason": f"{type(err).__name__}: {msg}"}
    finally:
        signal.alarm(0)


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return rows if rows and "tool" in rows[0] else []


def _write(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    tmp.replace(path)


def write_report(rows: list[dict], out_dir: Path, quick: bool) -> None:
    import torch_pruning as tp

    versions = [f"torch {torch.__version__}", f"secateurs {secateurs.__version__}", f"torch-pruning {tp.__version__}"]
    for mod in ("torchvision", "timm", "segmentation_models_pytorch", "ultralytics"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    lines = ["# Engine coverage: the models users bring", "",
             f"Generated by `python -m benchmarks.coverage{' --quick' if quick else ''}` from `coverage.csv` on "
             f"{platform.machine()}, {torch.get_num_threads()} threads; {', '.join(versions)}.", "",
             "Each model is built without pretrained weights, BN statistics randomised. **secateurs**: analyse; "
             f"zero a random half of every exact group's channels and remove them (every output tensor must match to "
             f"{TOL:g} relative); then for both tools: remove 50% of every group's channels by L2 magnitude "
             "(heads kept: `ignored_layers` for Torch-Pruning, the model's outputs for secateurs), forward (same "
             "output structure and shapes, finite), one training step (forward + backward in training mode), MACs "
             f"counted by the same counter. **Pruned correctly** = all of that with MACs kept <= {MAX_KEPT:.0%}. "
             "Torch-Pruning runs `MagnitudePruner(pruning_ratio=0.5, ignored_layers=heads)` in the same process, "
             f"stopped after {TIMEOUT_S} s. Times are wall seconds on this machine as it was (other jobs may have been "
             "running); docs/engine_speed.md is the controlled speed comparison.", ""]
    fams = list(dict.fromkeys(r["family"] for r in rows))
    lines += ["| family | models | secateurs pruned correctly | Torch-Pruning pruned correctly |", "|---|---|---|---|"]
    for fam in fams:
        names = list(dict.fromkeys(r["model"] for r in rows if r["family"] == fam))
        cnt = {t: sum(r["status"] == "ok" for r in rows if r["family"] == fam and r["tool"] == t)
               for t in ("secateurs", "torch-pruning")}
        has_tp = any(r["tool"] == "torch-pruning" for r in rows if r["family"] == fam)
        theirs = f"{cnt['torch-pruning']}/{len(names)}" if has_tp else "not run"
        lines.append(f"| {fam} | {len(names)} | {cnt['secateurs']}/{len(names)} | {theirs} |")
    lines.append("")
    for fam in fams:
        lines += [f"## {fam}", "", "| model | secateurs | kept MACs | groups (exact) | equivalence err | analyse s | "
                  "prune s | capture | Torch-Pruning | kept MACs | prune s | reasons |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in dict.fromkeys(r["model"] for r in rows if r["family"] == fam):
            ours = next((r for r in rows if r["family"] == fam and r["model"] == name and r["tool"] == "secateurs"), {})
            tpr = next((r for r in rows if r["family"] == fam and r["model"] == name and r["tool"] == "torch-pruning"), {})
            why = "; ".join(f"{t}: {r['reason']}" for t, r in (("ours", ours), ("TP", tpr)) if r.get("reason"))
            lines.append(f"| {name} | {ours.get('status', '')} | {ours.get('kept', '')} | {ours.get('groups', '')} "
                         f"({ours.get('exact_groups', '')}) | {ours.get('rel_err', '')} | {ours.get('analyze_s', '')} | "
                         f"{ours.get('prune_s', '')} | {ours.get('capture', '')} | {tpr.get('status', 'not run')} | "
                         f"{tpr.get('kept', '')} | {tpr.get('prune_s', '')} | {why.replace('|', '/')} |")
        lines.append("")
    (out_dir / "coverage.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="model names (default: every model of the chosen families)")
    p.add_argument("--families", nargs="*", default=FAMILIES[:-1], choices=FAMILIES,
                   help="families to run (torchvision, 86 models at 224x224, takes about an hour)")
    p.add_argument("--tools", nargs="*", default=["secateurs", "torch-pruning"], choices=["secateurs", "torch-pruning"])
    p.add_argument("--out", default="docs", help="folder for coverage.md / coverage.csv")
    p.add_argument("--quick", action="store_true", help="a few models per family (the CI smoke run)")
    p.add_argument("--resume", action="store_true", help="keep rows already in coverage.csv")
    args = p.parse_args(argv)
    global TIMEOUT_S
    if args.quick:
        TIMEOUT_S = 60  # Torch-Pruning does not finish on YOLO; the smoke run only needs to see that
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "coverage.csv"
    rows = _read(path) if args.resume else []
    done = {(r["family"], r["model"], r["tool"]) for r in rows}
    for fam in args.families:
        names = zoo.QUICK.get(fam, []) if args.quick else zoo.model_names(fam)
        for name in names:
            if args.models and name not in args.models:
                continue
            for tool in args.tools:
                if (fam, name, tool) in done:
                    continue
                t = time.perf_counter()
                row = run_one(fam, name, tool)
                rows = [r for r in rows if (r["family"], r["model"], r["tool"]) != (fam, name, tool)] + [row]
                print(f"{fam:12s} {name:36s} {tool:14s} {row['status']:4s} {time.perf_counter() - t:6.1f}s "
                      f"{row.get('kept', '')} {row.get('reason', '')}", flush=True)
                _write(rows, path)
                write_report(rows, out_dir, args.quick)
                gc.collect()
    write_report(rows, out_dir, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
