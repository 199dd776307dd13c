"""Random architectures (tests/archgen.py): zeroed channels cut with outputs unchanged, and a 40% prune
that still runs forward and backward. A refusal must be a PruningError that names what failed;
anything else is a silently broken model. The default run takes 40 seeds, ``-m slow`` 500."""
from __future__ import annotations

import warnings

import pytest
import torch

import secateurs
from secateurs.testing import check_equivalence, output_tensors

from .archgen import random_net

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def fuzz_one(seed: int) -> str:
    """'ok' or 'refused: ...'; raises AssertionError on a broken model."""
    m = random_net(seed)
    with torch.no_grad():
        ref = output_tensors(m(X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            check_equivalence(m, X, fraction=0.5, seed=seed, tol=1e-5)
            secateurs.prune(m, X, target={"ratio": 0.4})
        except secateurs.PruningError as err:
            assert str(err), "a refusal must say why"
            return f"refused: {err}"
    with torch.no_grad():
        out = output_tensors(m(X))
    assert [t.shape for t in out] == [t.shape for t in ref], f"seed {seed}: output shape changed"
    assert all(torch.isfinite(t).all() for t in out)
    m.train()
    sum(t.sum() for t in output_tensors(m(torch.cat([X, X])))).backward()
    assert all(p.grad is None or p.grad.shape == p.shape for p in m.parameters())
    return "ok"


@pytest.mark.parametrize("seed", range(40))
def test_random_architecture(seed):
    result = fuzz_one(seed)
    assert result == "ok" or result.startswith("refused")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(40, 540))
def test_random_architecture_slow(seed):
    fuzz_one(seed)


def test_random_nets_actually_get_pruned():
    """The fuzzer is only worth something if most nets really lose channels."""
    pruned = 0
    for seed in range(10):
        m = random_net(seed)
        before = secateurs.count(m, X).macs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            secateurs.prune(m, X, target={"ratio": 0.4})
        pruned += secateurs.count(m, X).macs < before
    assert pruned >= 8
