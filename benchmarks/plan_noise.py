"""How far does the latency tables' timing noise move a latency-driven plan, and does the move matter?

A latency budget and ``allocation="latency"`` spend per-layer latency tables measured on this
machine (``secateurs.latency_table``). The tables are timings, so two measurements differ, and a
plan built from one can differ from a plan built from the other. Here each draw measures its own
tables (a fresh, empty cache) and prunes the same seeded model (``benchmarks.speedup``'s seeded random
weights, L2, ``round_to=8``); then

- the plans are compared conv by conv: the share of the model's channels whose count differs between
  two draws (|width_a - width_b| summed over layers / the unpruned widths summed), and the share of
  layers left at the same width;
- every draw's model is timed interleaved with the unpruned one (30 rounds, eager, batch 1, the
  search's batch; one draw after the other, in one process), its latency the median of its per-round
  ratios to the unpruned model, beside the search's own confirming timing.

If the draws' latencies agree to within the timing's own interval, table noise moves channels between
layers of about equal cost, and a plan is as good as any other the same tables could have given.

Usage::

    python -m benchmarks.plan_noise                     # docs/plan_noise.csv and docs/plan_noise.md
    python -m benchmarks.plan_noise --report-only
    python -m benchmarks.plan_noise --quick --out /tmp/pn   # CI: cifar_resnet20, 2 draws, 8 rounds
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import tempfile
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn

from benchmarks._protocol import DOCS, read_rows, write_rows
from benchmarks.speedup import MODELS, _prune, seeded_model

VARIANTS = ("latency 50% (tables)", "macs 50% latency-allocated")


def widths(model: nn.Module) -> dict[str, int]:
    """Every conv's and linear's output width: the plan a prune left."""
    return {n: (m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


@contextlib.contextmanager
def fresh_cache(table_repeats: int):
    """A new, empty latency-table cache for one draw (``SECATEURS_CACHE``), removed afterwards; the
    tables timed with ``table_repeats`` rounds per width (the library's default, 5, unless asked)."""
    from secateurs.latency_table import LatencyModel

    with tempfile.TemporaryDirectory() as d, mock.patch.dict(os.environ, {"SECATEURS_CACHE": d}), \
            mock.patch.dict(LatencyModel.__init__.__kwdefaults__, repeats=table_repeats):
        yield


def run_model(name: str, variant: str, draws: int, repeats: int, threads: int, table_repeats: int = 5) -> list[dict]:
    """One row per draw: its plan, MACs, prune time, and latency against the unpruned model."""
    from secateurs import PruningError
    from secateurs.latency import _paired, _timed, cpu_name

    dense, x = seeded_model(name, MODELS.get(name, 224))
    models, rows = {}, []
    for d in range(draws):
        row = {"model": name, "variant": variant, "draw": d, "repeats": repeats, "table_repeats": table_repeats,
               "threads": threads, "cpu": cpu_name()}
        try:
            with fresh_cache(table_repeats):
                model, report, seconds = _prune(dense, x, variant, threads)
        except PruningError as err:  # a latency target no plan met within the search's tries: a row that says so
            rows.append({**row, "note": str(err)})
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
            continue
        models[f"draw{d}"] = model
        rows.append({**row, "macs_kept": round(report["kept"]["macs"], 4), "prune_s": round(seconds, 2),
                     "search_ratio": search_ratio(report), "widths": json.dumps(widths(model)),
                     "full_widths": json.dumps(widths(dense))})
    # each with the unpruned model alone, as the search's confirming timing is (four models interleaved
    # share the caches differently: a 32px ResNet-56 read 10% slower than alone); every draw twice, in
    # two passes, so the draws' spread can be set against one plan's own from one timing to the next
    for rep, suffix in enumerate(("", "_2")):
        for row in (r for r in rows if not r.get("note")):
            key = f"draw{row['draw']}"
            times, _, _ = _timed({"dense": dense, key: models[key]}, x, repeats, 5, threads, "eager")
            ratio, lo, hi = _paired(times[key], times["dense"])
            row.update({f"latency_ratio{suffix}": round(ratio, 4), f"latency_lo{suffix}": round(lo, 4),
                        f"latency_hi{suffix}": round(hi, 4)})
            if rep:
                print(" ".join(f"{k}={v}" for k, v in row.items() if "widths" not in k), flush=True)
    return rows


def search_ratio(report: dict) -> float | str:
    """The latency budget's confirming timing (pruned / unpruned); blank for a MACs budget."""
    ratio = report["method_output"].get("latency_ratio")
    return round(ratio, 3) if ratio is not None else ""


def moved(a: dict[str, int], b: dict[str, int], full: dict[str, int]) -> tuple[float, float]:
    """(share of the channels whose count differs between two plans, share of layers at one width)."""
    diff = sum(abs(a[k] - b[k]) for k in full)
    return diff / sum(full.values()), sum(a[k] == b[k] for k in full) / len(full)


def summary(rows: list[dict]) -> list[dict]:
    """Per (model, variant): the pairwise plan distances and the spread of the draws' latencies."""
    out = []
    planned = [r for r in rows if not r.get("note")]  # draws whose search met its target
    for (name, variant), group in itertools.groupby(planned, key=lambda r: (r["model"], r["variant"])):
        group = list(group)
        if len(group) < 2:  # no pair to compare
            continue
        full = json.loads(group[0]["full_widths"])
        plans = [json.loads(r["widths"]) for r in group]
        pairs = [moved(a, b, full) for a, b in itertools.combinations(plans, 2)]
        ratios = [float(r["latency_ratio"]) for r in group]
        again = [float(r["latency_ratio_2"]) for r in group if r.get("latency_ratio_2") not in (None, "")]
        out.append({"model": name, "variant": variant, "draws": len(group),
                    "moved_mean": statistics.fmean(p[0] for p in pairs), "moved_max": max(p[0] for p in pairs),
                    "same_layers": statistics.fmean(p[1] for p in pairs),
                    "macs": [float(r["macs_kept"]) for r in group], "ratios": ratios, "again": again,
                    # one plan's own change between its two timings, the largest over the draws
                    "retime": max((abs(b / a - 1) for a, b in zip(ratios, again)), default=None),
                    "intervals": [(float(r["latency_lo"]), float(r["latency_hi"])) for r in group],
                    "search": [r["search_ratio"] for r in group]})
    return out


def write_report(rows: list[dict], out: Path) -> None:
    first = rows[0]
    lines = ["# Latency tables' timing noise and the plans they give", "",
             f"`python -m benchmarks.plan_noise` on {first['cpu']}, {first['threads']} threads, torch {torch.__version__}. "
             f"Each draw measured its own per-layer latency tables (an empty cache; {first.get('table_repeats') or 5} rounds "
             "per width) and pruned the same seeded model "
             "(L2, `round_to=8`); then each draw's model was timed interleaved with the unpruned one, one draw after "
             f"the other in one process ({first['repeats']} rounds, eager NCHW, batch 1). *channels moved*: the share of the unpruned model's "
             "conv/linear channels whose count differs between two draws' plans (mean and largest over the pairs); "
             "*same width*: the share of layers two draws left at the same width. *latency*: each draw's median "
             "per-round ratio to the unpruned model, with its 95% interval; *search*: the latency budget's own "
             "confirming timing; *again*: every draw timed a second time after all of them; *spread*: the draws' "
             "largest latency over their smallest, minus 1, against *re-timed*: the largest change of one draw "
             "between its two timings (the noise floor of the spread). Raw data: `plan_noise.csv`.", "",
             "| model | variant | draws | MACs kept | channels moved (mean, max) | same width | latency per draw | "
             "again | spread | re-timed | search |", "|---|---|---:|---|---|---:|---|---|---:|---:|---|"]
    for s in summary(rows):
        spread = max(s["ratios"]) / min(s["ratios"]) - 1
        lat = ", ".join(f"{r:.3f} ({lo:.3f}-{hi:.3f})" for r, (lo, hi) in zip(s["ratios"], s["intervals"]))
        search = ", ".join(str(v) for v in s["search"] if v != "") or "-"
        again = ", ".join(f"{r:.3f}" for r in s["again"]) or "-"
        retime = "-" if s["retime"] is None else f"{s['retime']:.1%}"
        lines.append(f"| {s['model']} | {s['variant']} | {s['draws']} | {', '.join(f'{m:.1%}' for m in s['macs'])} | "
                     f"{s['moved_mean']:.1%}, {s['moved_max']:.1%} | {s['same_layers']:.0%} | {lat} | "
                     f"{again} | {spread:.1%} | {retime} | {search} |")
    overlap = [s for s in summary(rows) if max(lo for lo, _ in s["intervals"]) <= min(hi for _, hi in s["intervals"])]
    named = ", ".join(f"{s['model']} {s['variant']}" for s in overlap) or "none"
    lines += ["", f"Draws whose latency intervals all overlap (the plans' differences are within the timing's own "
              f"noise): {named}.", ""]
    lines += [f"- Not planned: {r['model']} {r['variant']} draw {r['draw']}: {r['note']}" for r in rows if r.get("note")]
    (out / "plan_noise.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["torchvision:resnet50", "torchvision:mobilenet_v2", "cifar_resnet56"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--table-repeats", type=int, default=5, help="rounds per width in the tables (library default 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(DOCS))
    p.add_argument("--quick", action="store_true", help="cifar_resnet20, 2 draws, 8 rounds (CI)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.draws, args.repeats = ["cifar_resnet20"], 2, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "plan_noise.csv"
    rows = read_rows(path)
    if not args.report_only:
        torch.set_num_threads(args.threads)
        done = {(r["model"], r["variant"]) for r in rows}
        for name, variant in itertools.product(args.models, args.variants):
            if (name, variant) not in done:  # a killed run goes on at the next (model, variant)
                rows += run_model(name, variant, args.draws, args.repeats, args.threads, args.table_repeats)
                write_rows(path, rows)
    if rows:
        write_report(rows, out)


if __name__ == "__main__":
    main()
