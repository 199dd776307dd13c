"""A steady heap while something is timed: no buffer handed back to the operating system between rounds.

glibc's malloc returns the free top of its heap to the kernel once it passes ``M_TRIM_THRESHOLD``
(128 KiB until a large free raises it), and serves buffers above ``M_MMAP_THRESHOLD`` from fresh
mappings, so an eager forward pays a page fault and a zeroing per 4 KiB of activations every call:
a 3->32 convolution at 224px took 1.1-1.5 ms that way and 0.18 ms on recycled pages, and the same
dense mobilenet_v2 at batch 8 took 123-150 ms or 67-70 ms depending only on what the process had
freed before. Which of two compared models got recycled pages was luck. Timing on a heap that keeps
its pages measures what a served model runs at (a process that keeps serving, or jemalloc/tcmalloc,
which PyTorch's CPU deployment guides recommend, keeps them too).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from typing import Iterator

__all__ = ["steady_heap"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HOLD = 1 << 30  # while timing: keep up to 1 GiB of free heap, and serve every buffer from the heap
_HOLD_OLD = 32 << 20  # glibc before 2.35 refuses an mmap threshold above 32 MiB (64-bit)
# afterwards: the ceilings glibc's own dynamic thresholds reach (32 MiB mmap, twice that to trim),
# since setting either turns the dynamic adjustment off for the rest of the process
_AFTER_MMAP, _AFTER_TRIM = 32 << 20, 64 << 20
_USER_SET = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    """glibc's malloc when it is the one in use and nobody configured it: not under a preloaded
    jemalloc/tcmalloc, nor when the user set its thresholds (environment or tunables) themselves."""
    global _libc
    if _libc is False:
        _libc = None
        preload = os.environ.get("LD_PRELOAD", "")
        configured = any(k in os.environ for k in _USER_SET) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
        if platform.libc_ver()[0] == "glibc" and "malloc" not in preload and not configured:
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc


@contextlib.contextmanager
def steady_heap() -> Iterator[bool]:
    """Keep freed memory in the heap for the block; yields whether it could (glibc's malloc, not
    configured by the user; elsewhere a no-op). Blocks nest and may run in several threads: the
    first in sets the thresholds, the last out sets glibc's ceilings (for the rest of the process)
    and trims the heap back."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            # the mmap threshold first: setting either turns glibc's dynamic thresholds off, and an
            # mmap threshold left at its start value (128 KiB) would map every activation afresh
            if not libc.mallopt(_M_MMAP_THRESHOLD, _HOLD):
                libc.mallopt(_M_MMAP_THRESHOLD, _HOLD_OLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _HOLD)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
                libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
                libc.malloc_trim(0)
