"""Allocation or ranking? L1 cut to the per-layer widths importance weights chose, on a finished
:mod:`benchmarks.segmentation` run.

Importance weights decide two things at once: how many channels each layer keeps (the allocation)
and which ones (the ranking within a layer, with alpha's training before it). At the same MACs, L1
(global) decides both from filter norms. This run keeps importance weights' widths and lets L1 pick
the channels inside each layer, from the unpruned model, fine-tuned for the same epochs with the
same re-fit; paired by seed:

- L1 at importance weights' widths - L1 global: what importance weights' allocation costs;
- importance weights - L1 at their widths: what their choice of channels (and alpha's phase) costs.

Reads ``--from``'s segmentation.json (its settings, its rows) and the pruning runs in ``--work``
(each seed's ``state.json``: the channels every step removed per layer). Resumable per seed.

Usage::

    python -m benchmarks.segmentation_widths --from docs/segmentation_penalty --work runs/segmentation_penalty \\
        --out docs/segmentation_widths
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.segmentation import LATER, SETUPS, _measure, finetune_config, splits
from benchmarks.segmentation_report import SHOWN, _stat

KIND = "fixed"


def removed_per_layer(state: dict) -> dict[str, int]:
    """Channels removed from each layer over a run's kept steps (each step counts from the model it cut)."""
    total: dict[str, int] = {}
    for step in state["steps"][1:]:
        if step.get("reverted"):
            continue
        for name, n in step["removed"].items():
            total[name] = total.get(name, 0) + int(n)
    return total


def widths(model: torch.nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))}


def l1_at_widths(base, removed: dict[str, int], x: torch.Tensor, **prune_kw):
    """L1 within each layer to exactly ``removed`` channels (a per-layer ratio budget); ``prune_kw``:
    the re-fit and fine-tuning the segmentation benchmark gives L1."""
    import secateurs

    sizes = widths(base)
    ratios = {name: n / sizes[name] for name, n in removed.items()}
    model, rep = secateurs.prune(copy.deepcopy(base), x, "l1", {"layers": ratios}, latency_guard=False, **prune_kw)
    got = {n: sizes[n] - w for n, w in widths(model).items() if w != sizes[n]}
    if got != {n: k for n, k in removed.items() if k}:
        raise RuntimeError(f"L1 did not land on importance weights' widths: {got} against {removed}")
    return model, rep


def run(args) -> dict:
    from secateurs.models import load_pretrained

    source = json.loads((Path(args.source) / "segmentation.json").read_text())
    settings = argparse.Namespace(**{**LATER, **source["args"]})
    path = Path(args.out) / "widths.json"
    results = json.loads(path.read_text())["results"] if path.exists() else {}
    for name in args.models or list(source["results"]):
        setup, base = SETUPS[name], load_pretrained(name)
        train, held, test = splits(setup)
        got = results.setdefault(name, {})
        for seed, row in source["results"][name]["runs"].items():
            if seed in got or KIND not in row:
                continue
            state = json.loads((Path(args.work) / name / f"s{seed}_{KIND}_iw" / "state.json").read_text())
            t0, epochs = time.perf_counter(), row[KIND]["iw"]["epochs"]
            model, _ = l1_at_widths(base, removed_per_layer(state), torch.randn(1, 1, 256, 256), data=train,
                                    finetune=finetune_config(setup, settings, epochs, int(seed)), resume=True,
                                    out_dir=Path(args.work) / name / f"s{seed}_{KIND}_l1w",
                                    reconstruct=settings.reconstruct)
            got[seed] = {"iw": row[KIND]["iw"], "l1": row[KIND]["l1"], "l1w": _measure(model, test, held,
                                                                                       settings.metric, None)}
            got[seed]["l1w"].update(epochs=epochs, time_s=round(time.perf_counter() - t0, 1))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"from": args.source, "args": source["args"], "results": results}, indent=1))
            print(name, seed, {k: v["iou"] for k, v in got[seed].items()}, flush=True)
    return results


ARMS = (("iw", "importance weights"), ("l1w", "L1 at importance weights' widths"), ("l1", "L1 (global, same MACs)"))
PAIRS = (("l1w", "l1", "L1 at importance weights' widths - L1 global (the allocation)"),
         ("iw", "l1w", "importance weights - L1 at their widths (the channels chosen inside each layer)"))


def paired(rows: list[dict], a: str, b: str) -> str:
    return _stat([r[a]["iou"] - r[b]["iou"] for r in rows])


def summary_lines(results: dict) -> list[str]:
    """BENCHMARKS.md's short form: the two paired differences per model."""
    lines = ["### Allocation or ranking: L1 cut to importance weights' own per-layer widths (`python -m "
             "benchmarks.segmentation_widths`), paired by seed", "",
             "| model | " + " | ".join(label for _, _, label in PAIRS) + " | seeds |", "|---|---|---|---|"]
    for name, runs in results.items():
        rows = list(runs.values())
        lines.append(f"| {name} | " + " | ".join(paired(rows, a, b) for a, b, _ in PAIRS) + f" | {len(rows)} |")
    return lines + ["", "Details: segmentation_widths/widths.md.", ""]


def write_markdown(results: dict, saved: dict, out: Path) -> None:
    made = saved["args"]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in made.items() if k in SHOWN and k != "runs"
                     and v not in (None, False))
    lines = ["# Importance weights on the U-Nets: allocation or ranking?", "",
             f"Generated by `python -m benchmarks.segmentation_widths --from {saved['from']}` "
             f"({platform.machine()}, torch {torch.__version__}) from `widths.json`.", "",
             f"**CPU protocol.** The importance-weights runs of `{saved['from']}` (made with `{flags}`, "
             f"the fixed-MACs run, {made['fixed']:.0%} of the MACs) and L1 at the same MACs are read from "
             "there; the new arm is L1 cut, from the unpruned model, to exactly the number of channels importance "
             "weights removed from each layer (read from each seed's saved steps), re-fitted and fine-tuned "
             "for the same epochs as the other two. IoU on the test split, mean +- 95% interval over seeds, "
             "differences paired by seed.", "",
             "| model | arm | MACs | params | pixel acc | IoU | Dice | seeds |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        rows = list(runs.values())
        for i, (key, label) in enumerate(ARMS):
            vals = [r[key] for r in rows]
            lines.append(f"| {name if i == 0 else ''} | {label} | {_stat([v['macs_256'] / 1e9 for v in vals])} G "
                         f"| {_stat([v['params'] / 1e3 for v in vals], '{:.0f}')} k "
                         f"| {_stat([v['pixel_acc'] for v in vals])} | {_stat([v['iou'] for v in vals])} "
                         f"| {_stat([v['dice'] for v in vals])} | {len(vals)} |")
        for a, b, label in PAIRS:
            lines.append(f"| | *{label}, IoU* | | | | {paired(rows, a, b)} | | |")
    lines += ["", "Per seed (IoU): " + "; ".join(
        f"{name} seed {s}: " + ", ".join(f"{k} {r[k]['iou']:.2f}" for k, _ in ARMS)
        for name, runs in results.items() for s, r in runs.items()), ""]
    out.write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", default="docs/segmentation_penalty",
                   help="a benchmarks.segmentation output folder with fixed-MACs runs")
    p.add_argument("--work", default="runs/segmentation_penalty", help="that run's --work (the pruning runs)")
    p.add_argument("--models", nargs="*", default=None, choices=list(SETUPS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/segmentation_widths")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.report_only:
        run(args)
    saved = json.loads((out / "widths.json").read_text())
    write_markdown(saved["results"], saved, out / "widths.md")
    print(f"wrote {out}/widths.md")


if __name__ == "__main__":
    main()
