"""Importance weights, ours beyond the paper: rank="norm" (|alpha| sets each layer's width, the
filters' norms its channels) and the gradient-scaled penalty's floor for a layer no gradient reaches."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs import ImportanceWeights, analyze
from tests.conftest import FT


def test_norm_order_hands_a_groups_scores_out_again_by_the_norms():
    from secateurs.methods.importance import norm_order

    out = norm_order([torch.tensor([0.3, 0.1, 0.2]), torch.tensor([2.0])], [torch.tensor([5.0, 1.0, 9.0]),
                                                                             torch.tensor([0.0])])
    assert out[0].tolist() == pytest.approx([0.2, 0.1, 0.3]) and out[1].tolist() == [2.0]
    # alpha that never moved: the tie is broken by the norms, not left to the allocator's index order
    tied = norm_order([torch.ones(4)], [torch.tensor([3.1, 2.9, 3.2, 3.7])])[0]
    assert torch.equal(torch.argsort(tied), torch.tensor([1, 0, 2, 3])) and torch.allclose(tied, torch.ones(4))


def test_norm_rank_keeps_alphas_widths_and_the_highest_norm_filters(trained, digits, monkeypatch):
    """rank='norm': each layer loses as many channels as under the paper's |alpha| ranking, but the
    ones with the lowest L1 norms. Alpha is set against the norms, so the two pick opposite filters."""
    from secateurs.criteria import group_scores

    x = torch.randn(1, 1, 8, 8)
    g = analyze(trained, x)
    norms = group_scores(trained, g, "l1")
    comp = torch.ones(g.n_components)
    for i, (grp, n) in enumerate(zip(g.groups, norms)):  # highest norm, lowest alpha; layers on different levels
        comp[grp.components] = (1.0, 0.8, 0.9)[i] * (1 + torch.argsort(torch.argsort(-n)).float() / grp.size)
    monkeypatch.setattr(ImportanceWeights, "importance", lambda self: comp.clone())
    models = {}
    for rank in ("alpha", "norm"):
        models[rank], rep = secateurs.prune(copy.deepcopy(trained), x, "importance-weights", 0.6, data=digits[0],
                                            steps=1, method_options={"epochs": 0, "fraction": 1.0, "rank": rank})
        assert rep["kept"]["macs"] <= 0.6
    sizes = {r: {grp.name: grp.size for grp in analyze(m, x).groups} for r, m in models.items()}
    assert sizes["alpha"] == sizes["norm"] and 1 < sizes["norm"]["0"] < g.groups[0].size
    k = sizes["norm"]["0"]
    best = torch.sort(torch.argsort(norms[0], descending=True)[:k]).values
    worst = torch.sort(torch.argsort(norms[0])[:k]).values
    assert torch.equal(models["norm"][0].weight, trained[0].weight[best])
    assert torch.equal(models["alpha"][0].weight, trained[0].weight[worst])


def test_norm_rank_reads_the_norms_of_the_model_each_step_cuts(trained, digits, monkeypatch):
    """Fine-tuning between steps moves the filters: every step orders by the model it cuts, not by
    the network as it was when alpha was folded."""
    from secateurs.methods import importance

    seen, real = [], importance.group_scores

    def spy(model, graph, criterion, **kw):
        seen.append((criterion, [g.size for g in graph.groups], float(model[0].weight.abs().sum())))
        return real(model, graph, criterion, **kw)

    monkeypatch.setattr(importance, "group_scores", spy)
    m, rep = secateurs.prune(copy.deepcopy(trained), torch.randn(1, 1, 8, 8), "importance-weights", 0.3,
                             data=digits[0], steps=2, finetune=FT,
                             method_options={"epochs": 1, "fraction": 0.2, "rank": "norm"})
    kept = [s for s in rep["steps"][1:] if not s.get("reverted")]
    assert len(kept) == 2 and len(seen) == 2 and all(c == "l1" for c, _, _ in seen)
    assert sum(seen[1][1]) < sum(seen[0][1])  # read on the model step 1 cut
    assert float(m[0].weight.abs().sum()) != pytest.approx(seen[1][2])  # and fine-tuned since


def test_norm_rank_with_alpha_untrained_keeps_the_highest_norm_filters(trained, digits):
    """epochs=0: every alpha is 1, a tie in every layer, which the filters' norms must break."""
    from secateurs.criteria import group_scores

    x = torch.randn(1, 1, 8, 8)
    m, _ = secateurs.prune(copy.deepcopy(trained), x, "importance-weights", 0.6, data=digits[0], steps=1,
                           method_options={"epochs": 0, "fraction": 1.0, "rank": "norm"})
    n = group_scores(trained, analyze(trained, x), "l1")[0]
    k = m[0].out_channels
    assert k < len(n)
    assert torch.equal(m[0].weight, trained[0].weight[torch.sort(torch.argsort(n, descending=True)[:k]).values])


def test_gradient_penalty_gives_a_layer_the_loss_does_not_reach_the_weakest_pull_not_none(trained, digits):
    """A layer whose alphas get no gradient (here its reader's weights are zero; an untrained timm
    ResNet's blocks end in a BN at 0) would get no penalty and keep alpha at 1, ranked above every
    channel the loss uses; it gets the smallest weight any layer got instead."""
    from secateurs.methods.importance import gradient_weights

    g = analyze(trained, torch.randn(1, 1, 8, 8))
    m = copy.deepcopy(trained)
    nn.init.zeros_(m[3].weight)  # the only reader of group 0's channels
    w = gradient_weights(m, g, digits[0], secateurs.train.TrainConfig(**FT), batches=2)
    per = [w[grp.components] for grp in g.groups]
    assert all(torch.all(p == p[0]) for p in per)
    live = [float(p[0]) for p in per[1:]]
    assert live[0] != pytest.approx(live[1]) and float(per[0][0]) == pytest.approx(min(live))
