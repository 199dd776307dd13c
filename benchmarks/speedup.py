"""Does a 50%-MACs model run 2x faster? CPU latency before and after pruning, PyTorch and onnxruntime.

For each model: prune to 50% of the MACs (L2, ``round_to`` 8, uniform and global allocation),
then time batch 1 and batch 8 forwards, median of ``--repeats`` runs after warm-up, with
``--threads`` threads in PyTorch and in onnxruntime (intra-op). The goal (issue 4): a measured
speed-up of at least 0.9x the MACs ratio at batch 8, and never slower than the unpruned model.

Usage::

    python -m benchmarks.speedup                    # writes docs/speedup.md and docs/speedup.csv
    python -m benchmarks.speedup --models cifar_resnet56 --repeats 5 --out /tmp
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

MODELS = {"torchvision:resnet50": 224, "torchvision:vgg16": 224, "torchvision:mobilenet_v2": 224, "cifar_resnet56": 32}


def ort_latency(path: str, x: torch.Tensor, repeats: int, threads: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    times = []
    for i in range(repeats + 3):
        t = time.perf_counter()
        sess.run(None, feed)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(model, size: int, repeats: int, threads: int, tmp: Path, tag: str) -> dict[str, float]:
    import secateurs

    out = {}
    batches = (1, 8, 128) if size <= 64 else (1, 8)  # small inputs: also a batch big enough to be compute-bound
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        out[f"torch_b{batch}_ms"] = 1e3 * secateurs.measure_latency(model, x, repeats=repeats, threads=threads)
    path = tmp / f"{tag}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secateurs.export_onnx(model, torch.randn(1, 3, size, size), path)
    for batch in batches:
        out[f"ort_b{batch}_ms"] = 1e3 * ort_latency(str(path), torch.randn(batch, 3, size, size), repeats, threads)
    return out


def run(models: list[str], repeats: int, threads: int, allocations: list[str]) -> list[dict]:
    import secateurs
    from secateurs.models import create_model

    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            size = MODELS.get(name, 224)
            torch.manual_seed(0)
            base_model = create_model(name).eval()
            x = torch.randn(1, 3, size, size)
            before = measure(base_model, size, repeats, threads, Path(tmp), "base")
            for allocation in allocations:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model, report = secateurs.prune(copy.deepcopy(base_model), x, "l2", 0.5, allocation=allocation, round_to=8)
                after = measure(model, size, repeats, threads, Path(tmp), "pruned")
                row = {"model": name, "input": size, "allocation": allocation, "macs_kept": round(report["kept"]["macs"], 4),
                       "params_kept": round(report["kept"]["params"], 4)}
                macs_speedup = 1 / report["kept"]["macs"]
                for k in before:
                    row[f"{k}_before"] = round(before[k], 2)
                    row[f"{k}_after"] = round(after[k], 2)
                    row[f"{k[:-3]}_speedup"] = round(before[k] / after[k], 2)
                    row[f"{k[:-3]}_vs_macs"] = round(before[k] / after[k] / macs_speedup, 2)
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def write(rows: list[dict], out: Path, repeats: int, threads: int) -> None:
    import torchvision

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "speedup.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    import onnxruntime

    lines = ["# Speed-up of 50%-MACs models on this CPU", "",
             f"`python -m benchmarks.speedup --repeats {repeats} --threads {threads}` on {platform.machine()}, "
             f"{os.cpu_count()} cores, {threads} threads, torch {torch.__version__}, torchvision {torchvision.__version__}, "
             f"onnxruntime {onnxruntime.__version__}. Random weights (latency does not depend on them), L2 criterion, "
             "`round_to=8`. Median of repeated forwards after 3 warm-up runs. "
             "Speed-up = latency before / after; *vs MACs* = speed-up / (MACs before / MACs after): 1.0 means the "
             "time fell exactly as the MACs did; the goal is >= 0.9 at batch 8. Raw data: `speedup.csv`.", ""]
    for engine, label in (("torch", "PyTorch (eager)"), ("ort", "onnxruntime")):
        lines += [f"## {label}", "", "| model | allocation | MACs kept | b1 before (ms) | b1 after | b1 speed-up | "
                  "b8 before (ms) | b8 after | b8 speed-up | b8 vs MACs |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['model']} ({r['input']}px) | {r['allocation']} | {r['macs_kept']:.1%} | "
                         f"{r[f'{engine}_b1_ms_before']} | {r[f'{engine}_b1_ms_after']} | {r[f'{engine}_b1_speedup']}x | "
                         f"{r[f'{engine}_b8_ms_before']} | {r[f'{engine}_b8_ms_after']} | {r[f'{engine}_b8_speedup']}x | "
                         f"{r[f'{engine}_b8_vs_macs']} |")
        lines.append("")
    big = [r for r in rows if "torch_b128_ms_before" in r]
    if big:
        lines += ["## Small inputs at batch 128", "",
                  "At 32x32 a batch of 8 is a few MFLOPs per layer: per-operator overhead, not arithmetic, sets the "
                  "time, and halving the MACs cannot halve it. A batch large enough to be compute-bound shows "
                  "what the smaller layers buy.", "",
                  "| model | allocation | MACs kept | PyTorch b128 before / after (ms) | speed-up | vs MACs | "
                  "onnxruntime b128 before / after (ms) | speed-up | vs MACs |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in big:
            lines.append(f"| {r['model']} | {r['allocation']} | {r['macs_kept']:.1%} | {r['torch_b128_ms_before']} / "
                         f"{r['torch_b128_ms_after']} | {r['torch_b128_speedup']}x | {r['torch_b128_vs_macs']} | "
                         f"{r['ort_b128_ms_before']} / {r['ort_b128_ms_after']} | {r['ort_b128_speedup']}x | {r['ort_b128_vs_macs']} |")
        lines.append("")
    goal = [f"{r['model']} ({r['allocation']})" for r in rows
            if r["torch_b8_vs_macs"] < 0.9 or r["ort_b8_vs_macs"] < 0.9]
    slower = [f"{r['model']} ({r['allocation']})" for r in rows
              if any(r[f"{e}_b{b}_speedup"] < 1.0 for e in ("torch", "ort") for b in (1, 8))]
    lines += ["## Against the goal", "",
              f"- Speed-up >= 0.9x the MACs ratio at batch 8 in both runtimes: "
              f"{'all rows' if not goal else 'all rows but ' + ', '.join(goal)}.",
              f"- Slower than the unpruned model anywhere: {'none' if not slower else ', '.join(slower)}.", ""]
    (out / "speedup.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--allocations", nargs="+", default=["uniform", "global"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    args = p.parse_args(argv)
    rows = run(args.models, args.repeats, args.threads, args.allocations)
    write(rows, Path(args.out), args.repeats, args.threads)


if __name__ == "__main__":
    main()
