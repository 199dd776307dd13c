"""Coverage of the engine over every torchvision classification and segmentation model.

For each model (weights=None, BN statistics randomised so that zeroed channels are not trivially
zero downstream):

1. analyse it;
2. equivalence: zero a random half of the channels of every *exact* group, remove them, and
   compare outputs with the zeroed dense model (max abs difference / max abs output);
3. prune 50% of every prunable group by L2 magnitude, run forward (shape must match) and a
   backward pass in training mode, and count MACs before/after.

Writes docs/coverage.md and docs/coverage.csv. Usage::

    python -m benchmarks.coverage                 # every model (about an hour on 2 cores)
    python -m benchmarks.coverage resnet18 swin_t # a few
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision

import secateurs
from secateurs import analyze, apply_plan, count, zero_channels

FIELDS = ["model", "family", "status", "groups", "exact_groups", "channels", "rel_err", "macs_before",
          "macs_after", "params_before", "params_after", "analyze_s", "warnings", "reason"]
TOL = 1e-5


def model_list() -> list[tuple[str, str]]:
    cls = [(n, "classification") for n in torchvision.models.list_models(module=torchvision.models)]
    seg = [(n, "segmentation") for n in torchvision.models.list_models(module=torchvision.models.segmentation)]
    return cls + seg


def _build(name: str, family: str) -> torch.nn.Module:
    kw = {"weights": None}
    if family == "segmentation":
        kw["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kw["init_weights"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torchvision.models.get_model(name, **kw)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                    mod.bias.copy_(torch.rand(mod.bias.shape, generator=gen) * 0.4 - 0.2)
    return m.eval()


def _input_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def _main_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["out"]
    return out[0]


def check_model(name: str, family: str) -> dict:
    row = {"model": name, "family": family, "status": "fail", "reason": ""}
    m = _build(name, family)
    s = _input_size(name)
    x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        graph = analyze(m, x)
        row["analyze_s"] = f"{time.perf_counter() - t0:.3f}"
    row["warnings"] = len(graph.warnings)
    row["groups"] = len(graph.groups)
    row["exact_groups"] = sum(g.exact for g in graph.groups)
    row["channels"] = sum(g.size for g in graph.groups)
    if not graph.groups:
        row["reason"] = "no prunable group"
        return row

    # 2. equivalence on exact groups
    dense = copy.deepcopy(m)
    plan, gen = {}, torch.Generator().manual_seed(2)
    for g in graph.groups:
        if g.exact and g.size > 1:
            plan[g.index] = torch.randperm(g.size, generator=gen)[: g.size // 2].tolist()
            zero_channels(dense, graph, g, plan[g.index])
    with torch.no_grad():
        ref = _main_output(dense(x))
    apply_plan(dense, graph, plan)
    with torch.no_grad():
        out = _main_output(dense(x))
    if out.shape != ref.shape:
        row["reason"] = f"equivalence: output shape {tuple(out.shape)} != {tuple(ref.shape)}"
        return row
    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    row["rel_err"] = f"{err:.1e}"
    del dense
    gc.collect()

    # 3. 50% prune, forward, backward, MACs
    c0 = count(m, x)
    secateurs.prune(m, x, 0.5)
    with torch.no_grad():
        out = _main_output(m(x))
    c1 = count(m, x)
    row.update(macs_before=c0.macs, macs_after=c1.macs, params_before=c0.params, params_after=c1.params)
    m.train()
    xb = torch.randn(2, 3, s, s)
    _main_output(m(xb)).float().sum().backward()
    if out.shape != ref.shape:
        row["reason"] = f"pruned output shape {tuple(out.shape)} != {tuple(ref.shape)}"
    elif err > TOL:
        row["reason"] = f"zeroed channels changed outputs by {err:.1e} (> {TOL})"
    elif c1.macs >= c0.macs:
        row["reason"] = "MACs did not drop"
    else:
        row["status"] = "ok"
    return row


def write_report(rows: list[dict], out_dir: Path, elapsed: float) -> None:
    with open(out_dir / "coverage.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    lines = ["# Engine coverage over torchvision", "",
             f"Generated by `python -m benchmarks.coverage` ({elapsed / 60:.0f} min) on {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, torchvision {torchvision.__version__}, "
             f"secateurs {secateurs.__version__}. Raw data: `coverage.csv`.", "",
             "Each model: analyse; zero a random half of every exact group's channels and remove them "
             f"(outputs must match to {TOL:g} relative); prune 50% of every prunable group by L2 magnitude, "
             "then forward (same output shape), backward in training mode, and count MACs. Input 224x224 "
             "(299 for inception_v3), batch 1, weights=None with randomised BN statistics.", ""]
    for family in ("classification", "segmentation"):
        fam = [r for r in rows if r["family"] == family]
        ok = sum(r["status"] == "ok" for r in fam)
        lines += [f"## {family.capitalize()}: {ok}/{len(fam)} pruned correctly", "",
                  "| model | status | groups (exact) | channels | equivalence err | MACs before -> after (G) | params before -> after (M) | analyse s | reason |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in fam:
            macs = (f"{int(r['macs_before']) / 1e9:.3f} -> {int(r['macs_after']) / 1e9:.3f}"
                    if r.get("macs_after") not in (None, "") else "")
            params = (f"{int(r['params_before']) / 1e6:.2f} -> {int(r['params_after']) / 1e6:.2f}"
                      if r.get("params_after") not in (None, "") else "")
            lines.append(f"| {r['model']} | {r['status']} | {r.get('groups', '')} ({r.get('exact_groups', '')}) | "
                         f"{r.get('channels', '')} | {r.get('rel_err', '')} | {macs} | {params} | "
                         f"{r.get('analyze_s', '')} | {r.get('reason', '')} |")
        lines.append("")
    (out_dir / "coverage.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="model names (default: all)")
    p.add_argument("--out", default="docs", help="folder for coverage.md / coverage.csv")
    p.add_argument("--resume", action="store_true", help="keep rows already in coverage.csv")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("SECATEURS_THREADS", torch.get_num_threads())))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(n, f) for n, f in model_list() if not args.models or n in args.models]
    rows: list[dict] = []
    if args.resume and (out_dir / "coverage.csv").exists():
        with open(out_dir / "coverage.csv") as f:
            rows = [r for r in csv.DictReader(f)]
        done = {r["model"] for r in rows}
        todo = [t for t in todo if t[0] not in done]
    t0 = time.perf_counter()
    for name, family in todo:
        t = time.perf_counter()
        try:
            row = check_model(name, family)
        except Exception as err:  # report, never stop the sweep
            row = {"model": name, "family": family, "status": "fail",
                   "reason": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            traceback.print_exc(file=sys.stderr)
        rows.append(row)
        print(f"{name:28s} {row['status']:4s} {time.perf_counter() - t:6.1f}s {row.get('reason', '')}", flush=True)
        write_report(rows, out_dir, time.perf_counter() - t0)
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
