"""The timing harness's steady heap: a forward's freed buffers are not faulted in afresh every round.
Counted in page faults, not seconds: 64 MiB from fresh pages is about 16,000 minor faults.

Each measurement runs in a fresh process: in the test session's own, what earlier tests left in the
heap decides whether 64 MiB comes with its pages already in (the control below once saw 0 faults
after the whole suite and passed alone; the state that did it was not reproduced), and a heap that
happens to keep its pages would let the harness tests pass whatever the harness did."""
from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from secateurs import _heap
from secateurs._heap import steady_heap

pytestmark = pytest.mark.skipif(_heap._glibc() is None, reason="glibc's malloc, not configured by the environment")

CHILD = """
import json, resource, sys
import torch
from secateurs import latency
from secateurs._heap import steady_heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def activation():  # allocate, write and free 64 MiB, as a forward does with an activation
    before = faults()
    torch.empty(16 << 20).fill_(1.0)  # floats: above the largest mmap threshold glibc picks for itself
    return faults() - before

out = {}
exec(sys.argv[1])
print(json.dumps(out))
"""


def _fresh(body: str) -> dict:
    """Run ``body`` (the CHILD helpers in scope; it fills ``out``) in a new interpreter; its ``out``."""
    done = subprocess.run([sys.executable, "-c", CHILD, body], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_outside_the_harness_glibc_maps_such_a_buffer_afresh():
    """The control: without the steady heap the same buffer costs its pages every time (else the
    tests below could not fail), also after the harness has been used and left."""
    assert _heap._depth == 0  # and in this session, after the tests before it: no harness left entered
    got = _fresh("out['before'] = [activation() for _ in range(3)]\n"
                 "with steady_heap(): activation()\n"
                 "out['after'] = [activation() for _ in range(3)]")
    assert min(got["before"][1:]) > 8000 and min(got["after"]) > 8000, got


def test_rounds_reuse_the_pages_the_last_round_freed():
    """Most rounds after the warm-up fault nothing in (the heap settles within a few rounds; this VM's
    proactive reclaim may take a kept page now and then), where every round faults ~16,000 without it."""
    faults = _fresh("f = []\n"
                    "latency.time_callables({'f': lambda: f.append(activation())}, repeats=10, warmup=5)\n"
                    "out['f'] = f")["f"]  # the default warm-up
    timed = sorted(faults[5:])
    assert timed[len(timed) // 2] < 2000, faults


def test_a_nested_steady_heap_leaves_the_outer_one_steady():
    faults = _fresh("with steady_heap() as held:\n"
                    "    out['held'] = held\n"
                    "    with steady_heap(): pass\n"
                    "    [activation() for _ in range(5)]  # the heap settles in a few rounds, as the warm-up lets it\n"
                    "    out['f'] = sorted(activation() for _ in range(5))")
    assert faults["held"]
    assert faults["f"][2] < 2000, faults


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
