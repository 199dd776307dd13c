"""Does a pruned model run as much faster as its MACs say? Dense and pruned timed interleaved, on CPU.

Every row comes from one run: the dense model and its pruned copy are timed together by
``secateurs.latency.compare_dense_pruned`` (one forward of each in turn, rotating order, warm-up;
medians with 95% intervals, and the median of the per-round speed-ups), at batch 1 and 8, with
``--threads`` threads, in eager NCHW, eager channels-last (the model pruned in that layout) and
onnxruntime (its own process, one shared thread pool). Models are built from seeded random
weights, so a MACs variant's pruned architecture is the same in every run (a latency-driven one
follows this machine's measured tables). ``--processes K`` repeats it all in K fresh processes
and reports their median: between processes this machine moves more than within one.
Variants: 50% of the MACs by L2 with global and uniform allocation (``round_to`` 8), and
the latency budget (``target={"latency": 0.5}``: per-layer latency tables, one confirming timing),
whose search time is recorded; and 50% of the MACs with ``allocation="latency"`` (each group's
scores divided by the time its channels save per MAC, read off the same tables), with ``round_to``
8 and with ``round_to="auto"`` (the step measured on the model's own largest 1x1 and depthwise
layers); and residual blocks first (``dlp``, PLS-VIP on CIFAR-10 images resized to the input, to 80%
of the MACs; the CSV's ``blocks_macs_kept``; and to 70% with no block kept per stage), then that
allocation to 50%: a block takes its layers' fixed per-op costs along. Goals (issue 19):
at 50% MACs, speed-up / MACs ratio >= 0.9 at batch 8 and >= 0.8 at batch 1; no model slower than
its dense version.

Usage::

    python -m benchmarks.speedup                          # writes docs/speedup.md and docs/speedup.csv
    python -m benchmarks.speedup --models cifar_resnet20 --repeats 10 --out /tmp/s
    python -m benchmarks.speedup --models torchvision:mobilenet_v2 --processes 3 --resume --out docs/speedup_mbv2
    python -m benchmarks.speedup --models cifar_resnet20 cifar_resnet56 --processes 3 --out docs/speedup_cifar
    python -m benchmarks.speedup --models torchvision:resnet50 torchvision:vgg16 --variants "macs 50% global" \
        "macs 50% latency-allocated" "macs 50% latency-allocated, round_to auto" --runtimes eager onnxruntime \
        --processes 3 --fresh-tables --out docs/speedup_r50_vgg16
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

from benchmarks._protocol import read_rows, write_rows

MODELS = {"torchvision:resnet50": 224, "torchvision:vgg16": 224, "torchvision:mobilenet_v2": 224,
          "cifar_resnet20": 32, "cifar_resnet56": 32}
VARIANTS = {"macs 50% global": dict(target={"macs": 0.5}, allocation="global", round_to=8),
            "macs 50% uniform": dict(target={"macs": 0.5}, allocation="uniform", round_to=8),
            "macs 50% latency-allocated": dict(target={"macs": 0.5}, allocation="latency", round_to=8),
            "latency 50% (tables)": dict(target={"latency": 0.5}, allocation="global", round_to=8),
            "macs 50% latency-allocated, round_to auto": dict(target={"macs": 0.5}, allocation="latency",
                                                              round_to="auto"),
            # residual blocks first (PLS-VIP, to 80% of the MACs, as the accuracy grid's dlp+l2@latency), then channels:
            # a removed block takes its per-layer costs with it, which narrower channels never shrink
            "macs 50% blocks to 80% then latency-allocated, round_to auto": dict(
                target={"macs": 0.5}, allocation="latency", round_to="auto", blocks=0.8),
            # the same with every removable block of a stage allowed to go: dlp keeps one per stage by default,
            # which stopped mobilenet_v2 at 77% of the MACs (5 of its 10 residual blocks). 70% was picked from one
            # exploratory eager timing: to 70% / 60% with none kept per stage read b1 0.84 / 0.85, b8 0.94 / 0.92
            # of the MACs ratio (the row above, timed just before: 0.78 / 0.89)
            "macs 50% blocks to 70% (min_per_stage 0) then latency-allocated, round_to auto": dict(
                target={"macs": 0.5}, allocation="latency", round_to="auto", blocks=0.7,
                block_options={"min_per_stage": 0})}
BLOCK_IMAGES = 20  # per CIFAR-10 class, resized to the model's input: what dlp's PLS scores the blocks on


def removes_blocks(variant: str) -> bool:
    """A row that removed whole blocks (read off its name, so rows of a CSV are judged alike): it took
    its layers' fixed costs along, so it is no point of the channels' fixed-share line."""
    return "blocks" in variant
RUNTIMES = ("eager", "channels_last", "onnxruntime")
TITLES = {"eager": "PyTorch (eager, NCHW)", "channels_last": "PyTorch (eager, channels-last)",
          "onnxruntime": "onnxruntime"}


# a runtime's layout (the model is pruned in it) and the harness runtime that times it; onnxruntime
# runs the eager model's export, and on a GPU the graphed rows replay the forward from a CUDA graph
HARNESS = {"eager": ("eager", "eager"), "channels_last": ("channels_last", "channels_last"),
           "onnxruntime": ("eager", "onnxruntime"), "cuda_graph": ("eager", "cuda_graph"),
           "fp16_channels_last_graph": ("fp16_channels_last", "cuda_graph")}


def in_layout(model, x, layout: str):
    """The model and its inputs as they will run: ``channels_last``, or ``fp16_channels_last`` (half
    precision, the GPU's Tensor Core path); eager is NCHW float32."""
    if layout == "eager":
        return model, x
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if not layout.startswith("fp16"):
        return model, x  # the CPU harness's channels_last runtime lays the input out itself
    # a graph replays the model as it is: the input comes channels-last too, or the first conv converts it
    return model.half(), x.half().contiguous(memory_format=torch.channels_last)


def _prune(base, x, variant: str, threads: int):
    """Pruned in the layout it will run in (``base`` and ``x`` already are): the latency tables and
    ``round_to="auto"`` time that layout, on the model's device."""
    import secateurs

    spec = dict(VARIANTS[variant])
    blocks, block_options = spec.pop("blocks", None), spec.pop("block_options", {})
    data = _block_data(x) if blocks is not None else None  # loading images is no part of the prune's time
    t0 = time.perf_counter()
    model, macs0 = copy.deepcopy(base), secateurs.count(base, x).macs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if blocks is not None:
            secateurs.prune(model, x, "dlp", blocks, data=data,
                            method_options={"per_class": BLOCK_IMAGES, **block_options}, latency_guard=False)
            left = secateurs.count(model, x).macs / macs0
            if left == 1.0:  # else the row would be a plain channel prune under a blocks name
                raise secateurs.PruningError("no residual block could be removed")
            spec["target"] = {"macs": min(1.0, spec["target"]["macs"] / left)}  # the rest of the way, in channels
        model, report = secateurs.prune(model, x, "l2", latency_threads=threads, **spec, latency_guard=False)
    if blocks is not None:  # kept against the dense model, as every other row's
        report["kept"] = {**report["kept"], "macs": secateurs.count(model, x).macs / macs0}
        report["blocks_macs_kept"] = round(left, 4)
    return model, report, time.perf_counter() - t0


def _block_data(x):
    """CIFAR-10 training images (``../shared/data`` or torchvision's download), resized to the model's
    input: the seeded random weights still give PLS-VIP features to rank the blocks by."""
    return _cifar_at(tuple(x.shape[-2:]))


@functools.lru_cache(maxsize=2)  # once per input size, not once per runtime
def _cifar_at(size: tuple[int, ...]):
    from dataclasses import replace

    from secateurs import PruningError
    from secateurs.data import load_dataset

    try:
        data = load_dataset("cifar10", "train").subset(10 * BLOCK_IMAGES)
    except (FileNotFoundError, OSError, RuntimeError) as err:  # a row that says why, not a crash
        raise PruningError(f"no CIFAR-10 to score the blocks on: {err}") from err
    images = torch.nn.functional.interpolate(data.images.float(), size=size, mode="bilinear").round().to(torch.uint8)
    return replace(data, images=images)


def run(models: list[str], variants: list[str], repeats: int, threads: int, rows: list[dict] | None = None,
        runtimes: tuple[str, ...] = RUNTIMES, out: Path | None = None, device: str = "cpu",
        batches: tuple[int, ...] = (1, 8), deadline: float = float("inf"), tags: dict | None = None) -> list[dict]:
    """Every (model, variant, runtime) not already in ``rows``: each row holds a dense and a pruned time
    measured together. With ``out``, OUT/speedup.csv is rewritten after every runtime's rows (--resume
    goes on from it); no new prune starts after ``deadline`` (``time.time()``), so a lease's rows come back."""
    from secateurs import PruningError
    from secateurs.latency import compare_dense_pruned, cpu_name, device_name, runtime_of

    # in every row: a report rewritten later, or on another machine, still says where it was timed
    where = {"cpu": cpu_name(), **({"device": device_name(device), "torch": torch.__version__} if device != "cpu" else {}),
             **(tags or {})}  # e.g. {"tables": "fresh"}: how this run measured

    torch.set_num_threads(threads)
    rows = list(rows or [])
    done = {(r["model"], r["variant"], r["runtime"]) for r in rows}
    for name in models:
        size = MODELS.get(name, 224)
        base, x = seeded_model(name, size, device)
        for variant in variants:
            pruned: dict[str, tuple] = {}  # layout -> (dense, x, model, report, seconds): one prune serves eager and onnxruntime
            for runtime in (rt for rt in runtimes if (name, variant, rt) not in done and (name, variant, "-") not in done):
                layout, harness = HARNESS[runtime]
                if layout not in pruned:
                    if time.time() > deadline:
                        print(f"deadline: {name} {variant} {runtime} not timed", flush=True)
                        continue
                    try:
                        dense, xl = in_layout(base, x, layout)
                        pruned[layout] = (dense, xl, *_prune(dense, xl, variant, threads))
                    except PruningError as err:  # e.g. a latency target the model cannot reach: a row that says so
                        row = {"model": name, "input": size, "variant": variant, "runtime": "-", "batch": "-",
                               "note": str(err)}
                        rows.append(row)
                        done.add((name, variant, "-"))
                        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                        break
                dense, xl, model, report, seconds = pruned[layout]
                macs_speedup = 1 / report["kept"]["macs"]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cmp = compare_dense_pruned(dense, model, xl, batches=batches, repeats=repeats, threads=threads,
                                               runtime=harness)
                for r in cmp["rows"]:
                    row = {"model": name, "input": size, "variant": variant, "runtime": runtime, "batch": r["batch"],
                           "macs_kept": round(report["kept"]["macs"], 4), "prune_s": round(seconds, 2),
                           "dense_ms": round(r["dense_ms"], 3), "pruned_ms": round(r["pruned_ms"], 3),
                           "dense_ci_ms": "-".join(f"{v:.3f}" for v in r["dense_interval_ms"]),
                           "pruned_ci_ms": "-".join(f"{v:.3f}" for v in r["pruned_interval_ms"]),
                           "speedup": round(r["speedup"], 3),
                           "speedup_ci": "-".join(f"{v:.3f}" for v in r["speedup_interval"]), "vs_macs": round(r["speedup"] / macs_speedup, 3),
                           "slower": r["batch"] in cmp["slower"], "repeats": repeats, "threads": threads,
                           "round_to": report.get("round_to", ""), **where}
                    if "blocks_macs_kept" in report:  # what the blocks step alone left
                        row["blocks_macs_kept"] = report["blocks_macs_kept"]
                    if "timing_speedups" in r:  # the guard timed it twice (the first read slower): both rounds pooled
                        row["timing_speedups"] = " ".join(f"{v:.3f}" for v in r["timing_speedups"])
                    if device != "cpu":  # a graph replays the input's layout as it is given
                        row["input_layout"] = "channels_last" if xl.dim() == 4 and not xl.is_contiguous() else "NCHW"
                    if "latency" in variant and harness == runtime_of(dense):  # what the search timed, not another runtime
                        row["latency_target_met"] = round(report["method_output"].get("latency_ratio", float("nan")), 3)
                        row["latency_timings"] = len(report["method_output"].get("latency_search", []))
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                if out is not None:
                    write_csv(rows, out)
    return rows


def seeded_model(name: str, size: int, device: str = "cpu"):
    """The benchmark's model from seeded random weights and its input: the same architecture after
    every prune, in every run."""
    from secateurs.models import create_model

    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return create_model(name).eval().to(device), x.to(device)


def merged(rows: list[dict]) -> list[dict]:
    """One row per (model, variant, runtime, batch) over the processes that timed it: the median of
    their speed-ups, dense and pruned times, each process's speed-up listed, and slower if any found it so."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["variant"], r["runtime"], r["batch"]), []).append(r)
    out = []
    for same in groups.values():
        if len(same) == 1 or same[0].get("note"):
            out.append(same[0])
            continue
        row = dict(same[0])
        for k in ("speedup", "vs_macs", "dense_ms", "pruned_ms", "macs_kept", "prune_s", "latency_target_met"):
            if all(isinstance(r.get(k), (int, float)) for r in same):
                row[k] = round(statistics.median(r[k] for r in same), 4 if k == "macs_kept" else 3)
        row["speedup_ci"] = f"{len(same)} processes: " + ", ".join(str(r["speedup"]) for r in same)
        row["dense_ci_ms"] = f"{min(r['dense_ms'] for r in same)}-{max(r['dense_ms'] for r in same)}"
        row["pruned_ci_ms"] = f"{min(r['pruned_ms'] for r in same)}-{max(r['pruned_ms'] for r in same)}"
        row["slower"] = any(r["slower"] for r in same)
        if len({str(r.get("round_to", "")) for r in same}) > 1:  # round_to auto measured apart in each process
            row["round_to"] = "/".join(str(r.get("round_to", "")) for r in same)
        out.append(row)
    return out


def write_csv(rows: list[dict], out: Path) -> None:
    """OUT/speedup.csv, replaced atomically (a kill leaves the previous one)."""
    write_rows(out / "speedup.csv", rows)


def _fresh_note(fresh: list[dict], total: int) -> str:
    what = ("measured its own latency tables and `round_to='auto'` step (`--fresh-tables`: an empty cache), so the "
            "spread includes the latency allocation's plan moving with the tables' timing noise")
    if not fresh:
        return ""
    if len(fresh) == total:
        return f" Each process {what}; without it the processes share one cached measurement."
    variants = ", ".join(sorted({r["variant"] for r in fresh}))
    return (f" {len(fresh)} of {total} rows ({variants}) were timed so that each process {what}; the others "
            "come from a run whose processes shared one cached measurement.")


def write(rows: list[dict], out: Path, repeats: int, threads: int) -> None:
    import onnxruntime
    import torchvision

    write_csv(rows, out)
    cpus = ", ".join(sorted({str(r["cpu"]) for r in rows if r.get("cpu")})) or "an unrecorded CPU"
    processes = len({r.get("process", 0) for r in rows})
    timed = [r for r in rows if not r.get("note")]  # a row that says why nothing was timed measured no tables
    fresh, total = [r for r in timed if r.get("tables") == "fresh"], len(timed)
    rows = merged(rows)
    lines = ["# Speed-up of pruned models on this CPU", "",
             f"`python -m benchmarks.speedup --repeats {repeats} --threads {threads}"
             f"{f' --processes {processes}' if processes > 1 else ''}"
             f"{' --fresh-tables' if fresh and len(fresh) == total else ''}` on {cpus} "
             f"({platform.machine()}, {os.cpu_count()} cores), {threads} threads, torch {torch.__version__}, "
             f"torchvision {torchvision.__version__}, onnxruntime {onnxruntime.__version__}. Seeded random weights, "
             "L2 criterion, `round_to=8` unless the variant says `auto` (the step measured on this machine by "
             "`secateurs.latency_table.auto_round_to`, in the CSV's `round_to` column); a channels-last row's model is "
             "pruned in that layout, so its tables and step are the channels-last ones. Dense and pruned timed interleaved in one run (rotating order, warm-up, "
             f"{repeats} rounds, on a heap that keeps its pages: `secateurs._heap`), median and 95% interval of the "
             "median; the speed-up is the median of the "
             "per-round ratios dense / pruned (the two ran back to back, so a slow spell of this shared machine "
             "falls on both), with its 95% interval; onnxruntime timed in a fresh process "
             "whose sessions share one spinning intra-op pool, as a deployed session runs (`secateurs._ort_timer`: "
             "a pool per session lets the idle one's spinning workers steal the cores, and workers that sleep make "
             "every op at batch 1 pay a wake-up). *vs MACs* = speed-up / (MACs before / MACs "
             "after): 1.0 means time fell exactly as the MACs did. The latency rows spend `target={'latency': 0.5}` "
             "with per-layer latency tables; *prune (s)* includes building the tables when they were not cached. "
             "Raw data: `speedup.csv`."
             + (f" Every row was timed in {processes} separate processes one after the other (on this shared VM the "
                "same measurement moves by more between processes than within one): the table gives the median over "
                "the processes, each one's paired speed-up, and the range of their dense and pruned medians."
                if processes > 1 else "")
             + _fresh_note(fresh, total), ""]
    lines += runtime_tables(rows, TITLES)
    unreachable = [r for r in rows if r.get("note")]
    rows = [r for r in rows if not r.get("note")]
    macs_rows = [r for r in rows if r["variant"].startswith("macs")]
    slower = slower_rows(rows)
    lat = [r for r in rows if r["variant"].startswith("latency") and r["runtime"] == "eager" and r["batch"] == 1]
    best = best_allocation(rows)
    judged = [r for r in macs_rows if in_goal(r)]
    miss = sorted({_ratio(r) for r in judged if r["vs_macs"] < _floor(r)})
    best_miss = sorted(_ratio(r) for r in best.values() if in_goal(r) and r["vs_macs"] < _floor(r))
    beyond = sorted(_ratio(r) for r in best.values() if not in_goal(r) and r["vs_macs"] < _floor(r))
    lines += ["## Against the goals", "",
              f"The ratio goal is judged on {', '.join(GOAL_MODELS)} in {' and '.join(GOAL_RUNTIMES)} (the issue's "
              "models and runtimes); the other rows are measured and listed, not judged. \"No model slower\" is judged on "
              "every row, the 32px CIFAR ResNets included.", "",
              f"- Speed-up / MACs ratio >= 0.9 at batch 8 and >= 0.8 at batch 1 (every 50%-MACs row of those models "
              f"and runtimes): {'all rows' if not miss else 'missed by ' + '; '.join(miss)}.",
              f"- The same goal for the best 50%-MACs allocation of each model, runtime and batch (`allocation='latency'` "
              f"spends the MACs where this machine's tables say they buy time): "
              f"{'met everywhere' if not best_miss else 'missed by ' + '; '.join(best_miss)}.",
              f"- Outside the goal's models and runtimes, the best allocation under the same floors: "
              f"{'every one above them' if not beyond else 'below them: ' + '; '.join(beyond)}.",
              f"- Pruned model measurably slower than dense (its paired speed-up interval below 1 in two timings, "
              "the CSV's `timing_speedups`): "
              f"{'none' if not slower else ', '.join(slower)}.",
              "- Latency budget 0.5 (goal: within 5%, under a minute on resnet50), the ratio measured by the search's "
              "confirming timing (eager, the user's batch 1), and the prune's wall time including building the tables: "
              + (", ".join(f"{r['model']} {r['latency_target_met']} in {r['prune_s']} s"
                           + (f" ({r['latency_timings']} timings)" if r.get("latency_timings") else "") for r in lat)
                 or "not run") + "."]
    lines += [f"- Not reached: {r['model']} {r['variant']}: {r['note']}" for r in unreachable] + [""]
    lines += fixed_share_table(rows)
    (out / "speedup.md").write_text("\n".join(lines))


def best_allocation(rows: list[dict]) -> dict[tuple, dict]:
    """Per (model, runtime, batch), the 50%-MACs row with the best speed-up / MACs ratio: the
    allocation a user after speed would pick."""
    best: dict[tuple, dict] = {}
    for r in (r for r in rows if r["variant"].startswith("macs")):
        key = (r["model"], r["runtime"], r["batch"])
        if key not in best or r["vs_macs"] > best[key]["vs_macs"]:
            best[key] = r
    return best


def slower_rows(rows: list[dict]) -> list[str]:
    """The rows whose pruned model was measurably slower than dense, named."""
    return sorted({f"{r['model']} {r['variant']} {r['runtime']} b{r['batch']}" for r in rows if r["slower"]})


def runtime_tables(rows: list[dict], titles: dict[str, str]) -> list[str]:
    """One table per runtime (in ``titles``' order) of every timed row: dense and pruned, speed-up, vs MACs."""
    lines = []
    for runtime in (rt for rt in titles if any(r["runtime"] == rt for r in rows)):
        lines += [f"## {titles[runtime]}", "",
                  "| model | variant | MACs kept | prune (s) | batch | dense (ms) | pruned (ms) | speed-up (paired) | vs MACs |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["runtime"] == runtime and not r.get("note")):
            flag = " **slower**" if r["slower"] else ""
            step = f" ({r['round_to']})" if r["variant"].endswith("round_to auto") and r.get("round_to") else ""
            lines.append(f"| {r['model']} ({r['input']}px) | {r['variant']}{step} | {r['macs_kept']:.1%} | {r['prune_s']} | "
                         f"{r['batch']} | {r['dense_ms']} ({r['dense_ci_ms']}) | {r['pruned_ms']} ({r['pruned_ci_ms']}) | "
                         f"{r['speedup']}x ({r.get('speedup_ci') or 'not recorded'}){flag} | {r['vs_macs']} |")
        lines.append("")
    return lines


GOAL_MODELS = ("torchvision:resnet50", "torchvision:vgg16", "torchvision:mobilenet_v2")
GOAL_RUNTIMES = ("eager", "onnxruntime")


def in_goal(row: dict) -> bool:
    """Issue 19 sets the ratio floors on these models and runtimes; the 32px CIFAR ResNets only must not be slower."""
    return row["model"] in GOAL_MODELS and row["runtime"] in GOAL_RUNTIMES


def _floor(row: dict) -> float:
    return 0.9 if row["batch"] == 8 else 0.8


def _ratio(row: dict) -> str:
    return f"{row['model']} {row['runtime']} b{row['batch']} ({row['vs_macs']}, {row['variant']})"


def fixed_share(points: list[tuple[float, float]]) -> float:
    """The share ``f`` of the dense time that no channel removal shrinks (per-op dispatch, thread
    wake-ups, kernels with a floor), fitted by least squares to ``1 / speed-up = f + (1 - f) m`` over
    ``(MACs kept m, speed-up)`` points: at 50% of the MACs the speed-up / MACs ratio is then at most 1 / (1 + f)."""
    num = sum((1 - m) * (1 / s - m) for m, s in points)
    den = sum((1 - m) ** 2 for m, _ in points)
    return min(max(num / den, 0.0), 1.0) if den > 0 else float("nan")


def fixed_share_table(rows: list[dict]) -> list[str]:
    channels = [r for r in rows if not removes_blocks(r["variant"])]
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for r in channels:
        groups.setdefault((r["model"], r["runtime"], r["batch"]), []).append((r["macs_kept"], r["speedup"]))
    # a line needs two MACs points; where the channel rows share one (a latency row that said it could not
    # reach its target) the row still shows the best of each kind, with no share
    table = [(key, fixed_share(pts) if len({round(m, 2) for m, _ in pts}) > 1 else None) for key, pts in groups.items()]
    if not any(f is not None for _, f in table):
        return []
    best_channels = best_allocation(channels)
    best_blocks = best_allocation([r for r in rows if removes_blocks(r["variant"])])
    lines = ["## Time that does not shrink with the MACs", "",
             "Fitted by least squares over the channel-only variants of a model, runtime and batch (their MACs kept and "
             "speed-ups, the latency rows far below 50% included): `1 / speed-up = f + (1 - f) x MACs kept`, i.e. an "
             "estimated share `f` of the dense time that removing channels does not shrink; at 50% of the MACs the "
             "fitted line reads a speed-up / MACs ratio of 1 / (1 + f). One share for every layer is a rough model: "
             "an allocation that spends the MACs where the time is can read above the line (best channel-only row), "
             "and removing whole blocks takes their layers' fixed costs along (best row with blocks, left out of the "
             "fit).", "",
             "| model | runtime | batch | fitted share f | fitted ratio at 50% MACs, 1/(1+f) | best channel-only | "
             "best with blocks |", "|---|---|---:|---:|---:|---:|---:|"]
    for (model, runtime, batch), f in table:
        c, b = (found.get((model, runtime, batch)) for found in (best_channels, best_blocks))
        share = "- | -" if f is None else f"{f:.2f} | {1 / (1 + f):.2f}"
        lines.append(f"| {model} | {runtime} | {batch} | {share} | {c['vs_macs'] if c else '-'} | "
                     f"{b['vs_macs'] if b else '-'} |")
    return lines + [""]


def typed(row: dict) -> dict:
    """A CSV row back to numbers and booleans."""
    out = {}
    for k, v in row.items():
        if v in ("True", "False"):
            out[k] = v == "True"
        else:
            try:
                out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
            except ValueError:
                out[k] = v
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    p.add_argument("--resume", action="store_true", help="keep the (model, variant) rows already in OUT/speedup.csv")
    p.add_argument("--report-only", action="store_true", help="rewrite OUT/speedup.md from OUT/speedup.csv")
    p.add_argument("--processes", type=int, default=1,
                   help="time everything in this many fresh processes, one after the other, and report their median")
    p.add_argument("--fresh-tables", action="store_true",
                   help="measure the latency tables and round_to='auto' anew (an empty cache) in every process")
    args = p.parse_args(argv)
    if args.processes > 1 and not args.report_only:
        return _in_processes(args)
    kept = [typed(r) for r in read_rows(Path(args.out) / "speedup.csv")] if args.resume or args.report_only else []
    with _fresh_cache(args.fresh_tables and not args.report_only):
        rows = kept if args.report_only else run(args.models, args.variants, args.repeats, args.threads, kept,
                                                        tuple(args.runtimes), Path(args.out),
                                                        tags={"tables": "fresh"} if args.fresh_tables else None)
    write(rows, Path(args.out), args.repeats, args.threads)


@contextlib.contextmanager
def _fresh_cache(on: bool):
    """``--fresh-tables``: an empty latency cache for this run, then the environment as it was."""
    if not on:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="secateurs-tables-") as cache, \
            mock.patch.dict(os.environ, {"SECATEURS_CACHE": cache}):
        yield


def _in_processes(args) -> None:
    """Each process writes OUT/processes/pK/speedup.csv (with --resume it keeps the rows it has and
    times only the missing ones); OUT gets them all."""
    out, rows = Path(args.out), []
    for k in range(args.processes):
        sub = out / "processes" / f"p{k}"
        cmd = [sys.executable, "-m", "benchmarks.speedup", "--models", *args.models, "--variants", *args.variants,
               "--runtimes", *args.runtimes, "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--out", str(sub), *(["--resume"] if args.resume else []), *(["--fresh-tables"] if args.fresh_tables else [])]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
        rows += [{**typed(r), "process": k} for r in read_rows(sub / "speedup.csv")]
    write(rows, out, args.repeats, args.threads)


if __name__ == "__main__":
    main()
