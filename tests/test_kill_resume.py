"""A ``secateurs prune`` run killed with SIGKILL at any point (analysis, a cut, fine-tuning, each
file of a step's checkpoint, the final outputs) and then run with ``--resume`` loses no finished
step and ends with the same model, bit for bit, as a run that was never killed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import secateurs

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["prune", "--model", "tiny_cnn", "--data", "digits", "--batch-size", "64", "--lr", "0.05",
        "--params", "0.4", "--steps", "2", "--finetune-epochs", "2", "--no-onnx", "--no-latency", "--quiet"]

# (where the kill lands, the function wrapped, after (+N) or before (-N) its N-th call)
# (the slow suite takes the others: each point costs two CLI runs)
_SLOW = pytest.mark.slow
POINTS = [
    pytest.param("step 2 analysis", "secateurs.pipeline.analyze", 2, marks=_SLOW),
    # the 6th: before its own cut each step cuts two copies for the least-squares re-fit (on by default
    # in the CLI): one to fit in, one to check that the cut gives the fitted copy
    pytest.param("step 2 cut, model half-edited", "secateurs.surgery._commit", 6, marks=_SLOW),
    pytest.param("step 2 fine-tuning, after its first epoch", "secateurs.train.train_one_epoch", 3),
    pytest.param("step 2 weights written, model.json not", "secateurs.saving.atomic_write", -4),
    pytest.param("step 2 saved, state.json not", "secateurs.checkpoints.atomic_write", -2, marks=_SLOW),
    pytest.param("all steps done, final outputs not written", "secateurs.cli.save", -1, marks=_SLOW),
]


def _run(args, kill=None):
    cmd = [sys.executable, "-m", "tests.kill_driver", *(kill or ("secateurs.cli.main", 0)), "--", *args]
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    res = _run([*ARGS, "--out", out])
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("where,target,n", POINTS, ids=[p.values[0] for p in POINTS])
def test_kill_then_resume_ends_with_the_same_model(uninterrupted, tmp_path, where, target, n):
    killed = _run([*ARGS, "--out", tmp_path], kill=(target, n))
    assert killed.returncode == -signal.SIGKILL, f"the kill did not land ({where}): {killed.stderr[-2000:]}"
    state = json.loads((tmp_path / "state.json").read_text()) if (tmp_path / "state.json").exists() else None
    expected_done = {"step 2 saved, state.json not": 1, "all steps done, final outputs not written": 2}.get(where, 1)
    assert state is not None and state["completed_steps"] == expected_done, state
    resumed = _run([*ARGS, "--out", tmp_path, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = secateurs.load(uninterrupted), secateurs.load(tmp_path)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (uninterrupted, tmp_path))
    assert ra["steps"] == rb["steps"]
