"""One torch thread for the engine's own tensor work (capture, grouping, checks, scores, the cut)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["one_thread"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """The engine's bookkeeping is thousands of tiny ops: on one thread they cost a fraction of
    what they cost when the thread pool has to wake, and on a busy machine a parallel op waits for
    a descheduled worker (milliseconds each). Only exact work runs here (copies, integer
    bookkeeping, finiteness checks) or reductions whose result does not depend on the thread count
    (per-row norms and sums: tests/test_registry.py checks it)."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)
