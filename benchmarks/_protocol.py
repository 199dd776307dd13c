"""The CPU protocol the accuracy benchmarks share: which CIFAR-10 subsets, lr, threads, output folder."""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subset", type=int, default=10000, help="training images for fine-tuning (0: all)")
    p.add_argument("--val-subset", type=int, default=2000, help="test images for top-1 (0: all)")
    p.add_argument("--lr", type=float, default=0.02, help="fine-tuning learning rate (SGD, cosine)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(DOCS))


def add_run_args(p: argparse.ArgumentParser, out: Path) -> None:
    """The flags of the resumable results benchmarks (accuracy, reconstruct)."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=str(out))
    p.add_argument("--quick", action="store_true", help="tiny settings that exercise every path (CI)")
    p.add_argument("--report-only", action="store_true")


def start(args) -> Path:
    """Threads set, output folder made."""
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def cifar10(args, name: str = "cifar10"):
    """(train subset, test subset) as the protocol says; the same seed everywhere, so runs compare."""
    from secateurs.data import load_dataset

    return (load_dataset(name, "train").subset(args.subset or None, 0),
            load_dataset(name, "test").subset(args.val_subset or None, 0))


def finetune_config(args, epochs: int):
    """The protocol's fine-tuning recipe: SGD (Nesterov) lr ``--lr``, wd 5e-4, cosine, batch 128, seed 0."""
    from secateurs.train import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=128, lr=args.lr, weight_decay=5e-4, quiet=True, seed=0)


def source_commit() -> str:
    """The commit a results row was made at (``-dirty``: with uncommitted edits to the code or new files;
    the results files under docs/ do not count, a grid appends its rows there as it goes), so a row can be traced
    to the code that made it when a grid spans several changes; blank outside a git checkout."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], check=False, cwd=DOCS.parent, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return ""
    # no optional lock: a commit made while a grid runs must not find the index locked
    edits = git("--no-optional-locks", "status", "--porcelain", "--", ".", f":(exclude){DOCS.name}")
    return head + ("-unknown" if edits is None else "-dirty" if edits else "")


def read_rows(path: Path) -> list[dict]:
    """The rows of a results CSV (none if it does not exist yet)."""
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict]) -> None:
    """A whole results CSV, replaced atomically (a kill leaves the previous one); the columns are every
    row's keys in first-seen order, blank where a row lacks one."""
    from secateurs._io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)

    def dump(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, dump)


def append_row(path: Path, row: dict, fields: list[str] | None = None) -> None:
    """One finished row, appended at once: a killed run keeps every row before it."""
    new = not path.exists()
    if not new:  # a run killed mid-write leaves a partial last line: drop it, or the next row joins it
        text = path.read_bytes()
        if text and not text.endswith(b"\n"):
            path.write_bytes(text[:text.rfind(b"\n") + 1])
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(row))
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (Student t; 0 for one value)."""
    from scipy.stats import t

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    return m, float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def latency_columns(dense, pruned, x, threads: int, batches: tuple[int, ...] = (1, 8), repeats: int = 30) -> dict:
    """A results row's latency: dense and pruned timed interleaved by the library's one harness
    (``secateurs.latency.compare_dense_pruned``), so both figures come from the same minutes of a
    shared machine; the speed-up is the median of the per-round ratios with its 95% interval."""
    from secateurs.latency import compare_dense_pruned

    cmp = compare_dense_pruned(dense, pruned, x, batches=batches, repeats=repeats, threads=threads)
    row = {}
    for r in cmp["rows"]:
        b = r["batch"]
        row.update({f"lat_b{b}_before": round(r["dense_ms"], 2), f"lat_b{b}_after": round(r["pruned_ms"], 2),
                    f"b{b}_speedup": round(r["speedup"], 2), f"b{b}_speedup_low": round(r["speedup_interval"][0], 2),
                    f"b{b}_speedup_high": round(r["speedup_interval"][1], 2)})
    return row


def speedup_cell(row: dict, b: int) -> str:
    """``1.34x (1.30-1.37)`` from a row :func:`latency_columns` wrote (a row timed before the
    interval was kept has none to show)."""
    low, high = row.get(f"b{b}_speedup_low"), row.get(f"b{b}_speedup_high")
    return f"{row[f'b{b}_speedup']}x" + (f" ({low}-{high})" if low not in (None, "") else "")
