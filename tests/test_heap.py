"""The timing harness's steady heap: a forward's freed buffers are not faulted in afresh every round.
Counted in page faults, not seconds: 64 MiB from fresh pages is about 16,000 minor faults."""
from __future__ import annotations

import platform
import resource

import pytest
import torch

from secateurs import _heap, latency
from secateurs._heap import steady_heap

pytestmark = pytest.mark.skipif(_heap._glibc() is None, reason="glibc's malloc, not configured by the environment")
BUFFER = 16 << 20  # floats: 64 MiB, above the largest mmap threshold glibc picks for itself


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _activation() -> int:
    """Minor page faults of allocating, writing and freeing 64 MiB, as a forward does with an activation."""
    before = _faults()
    torch.empty(BUFFER).fill_(1.0)
    return _faults() - before


def test_rounds_reuse_the_pages_the_last_round_freed():
    """Most rounds after the warm-up fault nothing in (the heap settles within a few rounds; this VM's
    proactive reclaim may take a kept page now and then), where every round faults ~16,000 without it."""
    faults = []
    latency.time_callables({"f": lambda: faults.append(_activation())}, repeats=10, warmup=5)  # the default warm-up
    timed = sorted(faults[5:])
    assert timed[len(timed) // 2] < 2000, faults


def test_outside_the_harness_glibc_maps_such_a_buffer_afresh():
    """The control: without the steady heap the same buffer costs its pages every time (else the
    test above could not fail)."""
    _activation()
    assert _activation() > 8000


def test_a_nested_steady_heap_leaves_the_outer_one_steady():
    with steady_heap() as held:
        assert held
        with steady_heap():
            pass
        for _ in range(5):  # the heap settles in a few rounds, as the harness's warm-up lets it
            _activation()
        faults = sorted(_activation() for _ in range(5))
        assert faults[2] < 2000, faults


def test_a_heap_the_user_configured_is_left_alone(monkeypatch):
    monkeypatch.setattr(_heap, "_libc", False)  # looked up again under the new environment
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    with steady_heap() as held:
        assert not held
    monkeypatch.setattr(_heap, "_libc", False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))  # musl, macOS, Windows
    with steady_heap() as held:
        assert not held
