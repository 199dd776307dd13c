"""Allocation or ranking? L1 cut to the per-layer widths importance weights chose, on a finished
:mod:`benchmarks.segmentation` run.

Importance weights decide two things at once: how many channels each layer keeps (the allocation)
and which ones (the ranking within a layer, with alpha's training before it). At the same MACs, L1
(global) decides both from filter norms. This run keeps importance weights' widths and lets L1 pick
the channels inside each layer, from the unpruned model, fine-tuned for the same epochs with the
same re-fit; paired by seed:

- L1 at importance weights' widths - L1 global: what importance weights' allocation costs;
- importance weights - L1 at their widths: what their choice of channels (and alpha's phase) costs;
- with ``--schedule``, L1 on importance weights' schedule (as many steps, each fine-tuned, the same
  epochs in all) - L1 one-shot: what the step-by-step schedule costs L1, whose global ranking,
  read again after every fine-tuning, also ends at other widths than its one-shot cut.

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

from benchmarks.segmentation import LATER, SETUPS, _measure, finetune_config, kept_steps, splits
from benchmarks.segmentation_report import SHOWN, _stat

KIND = "fixed"


def removed_per_layer(state: dict) -> dict[str, int]:
    """Channels removed from each layer over a run's kept steps (each step counts from the model it cut)."""
    total: dict[str, int] = {}
    for step in kept_steps(state):
        for name, n in step["removed"].items():
            total[name] = total.get(name, 0) + int(n)
    return total


def widths(model: torch.nn.Module) -> dict[str, int]:
    """Output channels of every conv (the U-Nets' prunable layers, transposed convs included)."""
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


def l1_on_schedule(base, row: dict, base_macs: float, train, setup: dict, settings, seed: int, folder: Path):
    """L1 (global) to the same MACs on importance weights' schedule: as many steps, each fine-tuned for
    ``ft_epochs``, then alpha's epochs and any final ones as plain fine-tuning (the same optimizer steps in all)."""
    import secateurs
    from secateurs.train import fit

    model, rep = secateurs.prune(copy.deepcopy(base), torch.randn(1, 1, 256, 256), "l1",
                                 {"macs": row["iw"]["macs_256"] / base_macs}, steps=row["iw"]["steps"], data=train,
                                 finetune=finetune_config(setup, settings, settings.ft_epochs, seed), out_dir=folder,
                                 resume=True, latency_guard=False, reconstruct=settings.reconstruct)
    steps = len(kept_steps(rep))  # `steps` is at most that many
    # alpha's epochs, and the last cut's recovery where importance weights kept a step (benchmarks.segmentation)
    tail = settings.iw_epochs + (settings.final_epochs if row["iw"]["steps"] else 0)
    if tail + settings.ft_epochs * steps != row["iw"]["epochs"]:
        raise RuntimeError(f"L1 took {steps} steps, importance weights {row['iw']['steps']}: not the same epochs")
    if tail:
        fit(model, train, None, finetune_config(setup, settings, tail, seed))
    return model


def run(args) -> dict:
    from secateurs.models import load_pretrained

    source = json.loads((Path(args.source) / "segmentation.json").read_text())
    settings = argparse.Namespace(**{**LATER, **source["args"]})
    path = Path(args.out) / "widths.json"
    saved = json.loads(path.read_text()) if path.exists() else {"args": source["args"], "results": {}}
    if saved["args"] != source["args"]:
        raise SystemExit(f"{path} was made from other runs than {args.source}'s: --out another folder")
    results = saved["results"]
    for name in args.models or list(source["results"]):
        setup, base = SETUPS[name], load_pretrained(name)
        train, held, test = splits(setup)
        got, work = results.setdefault(name, {}), Path(args.work) / name
        for seed, row in source["results"][name]["runs"].items():
            if KIND not in row or all(k in got.get(seed, {}) for k in ("l1w", "l1s")[:1 + args.schedule]):
                continue
            row, cell = row[KIND], got.setdefault(seed, {})
            cell.update(iw=row["iw"], l1=row["l1"])
            t0, epochs = time.perf_counter(), row["iw"]["epochs"]
            if "l1w" not in cell:
                state = json.loads((work / f"s{seed}_{KIND}_iw" / "state.json").read_text())
                model, _ = l1_at_widths(base, removed_per_layer(state), torch.randn(1, 1, 256, 256), data=train,
                                        finetune=finetune_config(setup, settings, epochs, int(seed)), resume=True,
                                        out_dir=work / f"s{seed}_{KIND}_l1w", reconstruct=settings.reconstruct)
                cell["l1w"] = dict(_measure(model, test, held, settings.metric, None), epochs=epochs,
                                   time_s=round(time.perf_counter() - t0, 1))
            if args.schedule and "l1s" not in cell:
                t0 = time.perf_counter()
                model = l1_on_schedule(base, row, source["results"][name]["base"]["macs_256"], train, setup,
                                       settings, int(seed), work / f"s{seed}_{KIND}_l1s")
                cell["l1s"] = dict(_measure(model, test, held, settings.metric, None), epochs=epochs,
                                   time_s=round(time.perf_counter() - t0, 1))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"from": args.source, "args": source["args"], "results": results}, indent=1))
            print(name, seed, {k: v["iou"] for k, v in cell.items()}, flush=True)
    return results


ARMS = (("iw", "importance weights"), ("l1w", "L1 at importance weights' widths"), ("l1", "L1 (global, same MACs)"),
        ("l1s", "L1 (global, same MACs) on importance weights' schedule"))
PAIRS = (("l1w", "l1", "L1 at importance weights' widths - L1 global (the allocation)"),
         ("iw", "l1w", "importance weights - L1 at their widths (the channels chosen inside each layer)"),
         ("l1s", "l1", "L1 on importance weights' schedule - L1 one-shot (the schedule, and the widths global L1 drifts to on it)"))


def _arms(rows: list[dict]) -> list[tuple[str, str]]:
    """The arms every seed has (the schedule arm only once it has run for all)."""
    return [(k, label) for k, label in ARMS if all(k in r for r in rows)]


def _pairs(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The paired differences whose two arms every seed has."""
    return [(a, b, label) for a, b, label in PAIRS if all(a in r and b in r for r in rows)]


def paired(rows: list[dict], a: str, b: str) -> str:
    """IoU of arm ``a`` minus arm ``b``, seed by seed, as mean +- 95% interval."""
    return _stat([r[a]["iou"] - r[b]["iou"] for r in rows])


def summary_lines(results: dict) -> list[str]:
    """BENCHMARKS.md's short form: the paired differences per model."""
    lines = ["### Allocation or ranking: L1 cut to importance weights' own per-layer widths (`python -m "
             "benchmarks.segmentation_widths`), paired by seed", ""]
    have = {name: _pairs(list(runs.values())) for name, runs in results.items()}
    pairs = [p for p in PAIRS if any(p in h for h in have.values())]  # a model without one shows "-"
    lines += ["| model | " + " | ".join(label for _, _, label in pairs) + " | seeds |",
              "|---|" + "---|" * (len(pairs) + 1)]
    for name, runs in results.items():
        rows = list(runs.values())
        lines.append(f"| {name} | " + " | ".join(paired(rows, a, b) if (a, b, label) in have[name] else "-"
                                                  for a, b, label in pairs) + f" | {len(rows)} |")
    return lines + ["", "Details: segmentation_widths/widths.md.", ""]


def write_markdown(results: dict, saved: dict, out: Path) -> None:
    made = saved["args"]
    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in made.items()
                     if k in SHOWN and k != "runs" and v is not None and v is not False and v != LATER.get(k))
    lines = ["# Importance weights on the U-Nets: allocation or ranking?", "",
             f"Generated by `python -m benchmarks.segmentation_widths --from {saved['from']}` "
             f"({platform.machine()}, torch {torch.__version__}) from `widths.json`.", "",
             f"**CPU protocol.** The importance-weights runs of `{saved['from']}` (made with `{flags}`, "
             f"the fixed-MACs run, {made['fixed']:.0%} of the MACs) and L1 at the same MACs are read from "
             "there; the new arm is L1 cut, from the unpruned model, to exactly the number of channels importance "
             "weights removed from each layer (read from each seed's saved steps), re-fitted and fine-tuned "
             "for the same epochs as the other two."
             + (" With `--schedule`, L1 (global) to the same MACs on importance weights' schedule: as many "
                f"steps, each re-fitted and fine-tuned {made.get('ft_epochs', 2)} epochs, then alpha's "
                f"{made.get('iw_epochs', 5)} epochs"
                + (f" and the {made['final_epochs']} after its last cut" if made.get("final_epochs") else "")
                + " as plain fine-tuning (the same epochs in all)."
                if ("l1s", ARMS[3][1]) in _arms([r for runs in results.values() for r in runs.values()]) else "")
             + " IoU on the test split, mean +- 95% interval over seeds, differences paired by seed.", "",
             "| model | arm | MACs | params | pixel acc | IoU | Dice | seeds |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        rows = list(runs.values())
        for i, (key, label) in enumerate(_arms(rows)):
            vals = [r[key] for r in rows]
            lines.append(f"| {name if i == 0 else ''} | {label} | {_stat([v['macs_256'] / 1e9 for v in vals])} G "
                         f"| {_stat([v['params'] / 1e3 for v in vals], '{:.0f}')} k "
                         f"| {_stat([v['pixel_acc'] for v in vals])} | {_stat([v['iou'] for v in vals])} "
                         f"| {_stat([v['dice'] for v in vals])} | {len(vals)} |")
        for a, b, label in _pairs(rows):
            lines.append(f"| | *{label}, IoU* | | | | {paired(rows, a, b)} | | |")
    lines += ["", "Per seed (IoU): " + "; ".join(
        f"{name} seed {s}: " + ", ".join(f"{k} {r[k]['iou']:.2f}" for k, _ in _arms([r]))
        for name, runs in results.items() for s, r in runs.items()), ""]
    out.write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", default="docs/segmentation_penalty",
                   help="a benchmarks.segmentation output folder with fixed-MACs runs")
    p.add_argument("--work", default="runs/segmentation_penalty", help="that run's --work (the pruning runs)")
    p.add_argument("--models", nargs="*", default=None, choices=list(SETUPS))
    p.add_argument("--schedule", action="store_true",
                   help="also L1 (global) on importance weights' schedule: as many steps, the same epochs")
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
