"""A steady heap while something is timed: no buffer handed back to the operating system between rounds.

glibc's malloc returns the free top of its heap to the kernel once it passes ``M_TRIM_THRESHOLD``
(128 KiB until a large free raises it), so an eager forward whose activations outgrow that gets
fresh pages every call and pays a page fault and a zeroing per 4 KiB: a 3->32 convolution at 224px
took 1.1-1.5 ms that way and 0.18 ms on recycled pages, and the same dense mobilenet_v2 at batch 8
took 123-150 ms or 67-70 ms depending only on what the process had freed before. Which of two
compared models got recycled pages was luck. Timing on a heap that keeps its pages measures what a
served model runs at (a process that keeps serving, or jemalloc/tcmalloc, which PyTorch's CPU
deployment guides recommend, keeps them too).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
from typing import Iterator

__all__ = ["steady_heap"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HOLD = 1 << 30  # while timing: keep up to 1 GiB of free heap, and serve every buffer from the heap
# afterwards: the ceilings glibc's own dynamic thresholds reach (32 MiB mmap, twice that to trim),
# since setting either turns the dynamic adjustment off for the rest of the process
_AFTER_MMAP, _AFTER_TRIM = 32 << 20, 64 << 20


def _libc():
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
_depth = 0


@contextlib.contextmanager
def steady_heap() -> Iterator[bool]:
    """Keep freed memory in the heap for the block (yields whether it could: glibc only; elsewhere a
    no-op), then hand what it held back to the kernel."""
    global _depth
    if _LIBC is None:
        yield False
        return
    if _depth == 0:
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _HOLD)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _HOLD)
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:  # a nested block leaves the outer one's rounds on the steady heap
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
            _LIBC.malloc_trim(0)
