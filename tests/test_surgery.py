"""Surgery: plans are validated whole, the model is unchanged on error, empty plans change nothing."""
from __future__ import annotations

import copy

import pytest
import torch

import secateurs
from secateurs import PruningError, PruningPlan, analyze, apply_plan
from secateurs.models import create_model
from secateurs.testing import check_equivalence, randomize_norms


def state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return randomize_norms(create_model("cifar_resnet20")).eval()


X = torch.randn(2, 3, 32, 32)


def test_empty_plan_is_bit_identical(resnet):
    ref = resnet(X)
    g = analyze(resnet, X)
    apply_plan(resnet, g, {})
    apply_plan(resnet, g, {0: []})
    assert torch.equal(resnet(X), ref)


@pytest.mark.parametrize("plan, match", [
    ({99: [0]}, "plan names group 99"),
    ({0: [16]}, r"has channels 0..15; plan asks for \[16\]"),
    ({0: [-1]}, r"plan asks for \[-1\]"),
    ({0: list(range(16))}, "removes all 16 channels"),
    ({0: ["a"]}, "channel indices must be integers"),
])
def test_bad_plans_raise_and_leave_the_model_unchanged(resnet, plan, match):
    g = analyze(resnet, X)
    before = state(resnet)
    with pytest.raises(PruningError, match=match):
        apply_plan(resnet, g, {1: [0, 1], **plan})  # a valid entry first: it must not be applied
    assert same(before, state(resnet))


def test_a_plan_checked_at_once_matches_the_per_group_check(resnet):
    """The vectorised check of an allocator's plan (ints in lists) removes what the per-group loop
    removes; anything it cannot vouch for (duplicates emptying a group, tensors) goes to the loop."""
    from secateurs.surgery import _removed_at_once, _removed_per_group

    g = analyze(resnet, X)
    gen = torch.Generator().manual_seed(0)
    plans = [PruningPlan({i: torch.randperm(gr.size, generator=gen)[: k % gr.size].tolist()
                          for i, gr in enumerate(g.groups)}) for k in (1, 3, 7)]
    plans.append(PruningPlan({0: [1, 1, 2], 2: []}))  # duplicates and an empty entry
    for plan in plans:
        fast, slow = _removed_at_once(g, plan), _removed_per_group(g, plan)
        assert torch.equal(fast[0], slow[0]) and fast[1] == slow[1]
    size = g.groups[0].size
    assert _removed_at_once(g, PruningPlan({0: list(range(size)) + [0]})) is None  # all channels, once repeated
    assert _removed_at_once(g, PruningPlan({0: torch.tensor([1])})) is None


def test_stale_graph_is_refused(resnet):
    g = analyze(resnet, X)
    apply_plan(resnet, g, {1: [0]})
    before = state(resnet)
    with pytest.raises(PruningError, match="analyse the model again"):
        apply_plan(resnet, g, {1: [1]})
    assert same(before, state(resnet))


def test_plan_json_round_trip():
    p = PruningPlan({3: [1, 2], 0: [5]})
    assert PruningPlan.from_json(p.to_json()).remove == {3: [1, 2], 0: [5]}
    with pytest.raises(TypeError, match="PruningPlan or a dict"):
        PruningPlan.coerce([1, 2])


def test_resnet56_residual_groups_and_equivalence():
    m = randomize_norms(create_model("cifar_resnet56")).eval()
    g = analyze(m, X)
    # one group per residual stage (stem + all conv2 outputs + projection) and one per block's conv1
    assert sorted(gr.size for gr in g.groups if len(gr.modules) > 10) == [16, 32, 64]
    assert sum(1 for gr in g.groups) == 3 + 27
    check_equivalence(m, X)


def test_iterative_prune_reanalyses(resnet):
    before = secateurs.count(resnet, X)
    for _ in range(3):
        secateurs.prune(resnet, X, target={"ratio": 0.2})
    after = secateurs.count(resnet, X)
    assert after.macs < 0.5 * before.macs and resnet(X).shape == (2, 10)


def test_gradients_flow_after_pruning(resnet):
    secateurs.prune(resnet, X, target={"ratio": 0.5})
    resnet.train()
    resnet(X).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in resnet.parameters())


def test_a_channels_last_model_stays_channels_last_and_prunes_the_same():
    """Sliced tensors keep the layout they replace: a half-converted model runs layout conversions
    between layers, so its latency is neither layout's (the latency search times the model's own)."""
    torch.manual_seed(0)
    plain = create_model("cifar_resnet20").eval()
    randomize_norms(plain)
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    for m in (plain, cl):
        secateurs.prune(m, x, "l1", 0.5)
    convs = [(a, b) for a, b in zip(plain.modules(), cl.modules()) if isinstance(a, torch.nn.Conv2d)]
    assert [a.out_channels for a, _ in convs] == [b.out_channels for _, b in convs]
    wide = [b.weight for _, b in convs if b.kernel_size != (1, 1)]
    assert wide and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in wide)
    assert all(a.weight.is_contiguous() for a, _ in convs)
    torch.testing.assert_close(cl(x), plain(x), atol=1e-5, rtol=1e-5)
