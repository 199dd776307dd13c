"""The random-architecture fuzzer's counts: how many generated networks were pruned correctly, refused
with a clear error, or broken (the last must be zero).

Each seed builds a network from tests/archgen.py and runs tests/test_fuzz.py's check: zeroed
channels of every exact group cut with every output unchanged (1e-5), then a 40% prune that keeps
the output shapes, finite values and a working backward pass. Writes docs/fuzz.md. Usage::

    python -m benchmarks.fuzz                 # seeds 0..539 (the default and slow test suites)
    python -m benchmarks.fuzz --seeds 0 40    # the default suite's seeds
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

import secateurs
from tests.archgen import random_net
from tests.test_fuzz import fuzz_one


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs=2, type=int, default=[0, 540], metavar=("FIRST", "END"))
    p.add_argument("--out", default="docs")
    args = p.parse_args(argv)
    counts: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    problems = []
    t0 = time.perf_counter()
    for seed in range(*args.seeds):
        net = random_net(seed)
        kinds.update(b.kind for b in net.blocks)
        kinds[f"head: {net.task}"] += 1
        try:
            result = fuzz_one(seed)
        except AssertionError as err:
            result = "broken"
            problems.append(f"seed {seed}: broken: {err}")
        except Exception as err:  # a crash that is not a clear refusal counts as broken too
            result = "broken"
            problems.append(f"seed {seed}: {type(err).__name__}: {err}")
        counts["refused" if result.startswith("refused") else result] += 1
    n = args.seeds[1] - args.seeds[0]
    lines = ["# Random architectures", "",
             f"`python -m benchmarks.fuzz --seeds {args.seeds[0]} {args.seeds[1]}` ({time.perf_counter() - t0:.0f} s, "
             f"torch {torch.__version__}, secateurs {secateurs.__version__}): {n} networks from `tests/archgen.py`, each "
             "checked as `tests/test_fuzz.py` does (zeroed channels of every exact group cut with every output "
             "unchanged to 1e-5; a 40% prune keeps output shapes, finite values and a working backward pass).", "",
             "| result | networks |", "|---|---|"]
    lines += [f"| {k} | {counts.get(k, 0)} |" for k in ("ok", "refused", "broken")]
    lines += ["", "Blocks drawn (a network has 2 to 6):", "", "| block | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(kinds.items())]
    if problems:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.md").write_text("\n".join(lines) + "\n")
    print(dict(counts))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
