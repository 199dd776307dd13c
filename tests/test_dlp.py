"""Method 2 (discriminative layer pruning) and its filter cascade, on the shared pipeline."""
from __future__ import annotations

import copy

import pytest
import torch

import secateurs
from secateurs import count
from secateurs.depth import find_blocks
from secateurs.pls import block_scores
from secateurs.data import ArrayDataset
from secateurs.methods import get_method
from secateurs.models import create_model

X = torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(80) % 4
    # class-dependent colour shifts: a signal the PLS can find
    images = (torch.rand(80, 3, 32, 32, generator=gen) * 120 + (y.view(-1, 1, 1, 1) * 30)).to(torch.uint8)
    return ArrayDataset("synthetic", images, y, ["a", "b", "c", "d"])


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    return create_model("cifar_resnet20").eval()


def test_rank_removes_the_lowest_scoring_blocks_and_keeps_one_per_stage(r20, data, tmp_path):
    removable = [b for b in find_blocks(r20, X) if b.removable]
    scores = block_scores(r20, removable, data, per_class=20)
    m, report = secateurs.prune(copy.deepcopy(r20), X, "dlp", data=data, method_options={"count": 3, "per_class": 20})
    gone = list(report["steps"][1]["removed"])
    stages = {}
    for b in removable:
        stages.setdefault(b.stage, []).append(b.name)
    # walk the ranking as the method must: lowest first, never the last removable block of a stage
    expect, left = [], {s: len(v) for s, v in stages.items()}
    for name in sorted(scores, key=scores.get):
        stage = next(s for s, v in stages.items() if name in v)
        if len(expect) < 3 and left[stage] > 1:
            expect.append(name)
            left[stage] -= 1
    assert sorted(gone) == sorted(expect)
    assert all(isinstance(m.get_submodule(n), torch.nn.Identity) for n in gone)
    assert count(m, X).macs == count(r20, X).macs - sum(b.macs for b in removable if b.name in gone)
    assert report["method_output"]["block_scores"] == pytest.approx(scores)
    secateurs.save(m, tmp_path / "m", X)
    assert torch.equal(secateurs.load(tmp_path / "m")(X), m(X))


def test_macs_target_and_min_per_stage(r20, data):
    base = count(r20, X).macs
    m, report = secateurs.prune(copy.deepcopy(r20), X, "dlp", 0.8, data=data, method_options={"per_class": 10})
    kept = count(m, X).macs / base
    assert kept <= 0.8
    # everything allowed: all but one removable block per stage goes, and no more
    m2, rep2 = secateurs.prune(copy.deepcopy(r20), X, "dlp", data=data, method_options={"fraction": 1.0, "per_class": 10})
    gone = set(rep2["steps"][1]["removed"])
    stages = {}
    for b in find_blocks(r20, X):
        if b.removable:
            stages.setdefault(b.stage, []).append(b.name)
    assert [sum(n not in gone for n in names) for names in stages.values()] == [1] * len(stages)


def test_latency_target_removes_the_fewest_lowest_blocks_that_meet_it(r20, data, monkeypatch):
    """Each block count timed against the model (a stand-in clock: time ~ blocks left): the first
    count under the target goes, lowest scores first; an unreachable target leaves the model as it was."""
    n0 = len(find_blocks(r20, X))
    seen = []

    def clock(models, x, repeats, warmup, threads, runtime):
        seen.append(runtime)
        return {k: [len(find_blocks(m, X)) / n0] * repeats for k, m in models.items()}, 1, 1

    monkeypatch.setattr(secateurs.latency, "_timed", clock)
    opts = {"per_class": 20, "min_per_stage": 0}
    m, report = secateurs.prune(copy.deepcopy(r20), X, "dlp", {"latency": 0.75}, data=data, method_options=opts)
    out = report["method_output"]
    gone = list(report["steps"][1]["removed"])
    k = 3  # (n0 - 3) / n0 = 0.67 <= 0.75 < (n0 - 2) / n0
    assert len(gone) == k and len(find_blocks(m, X)) == n0 - k and out["latency_ratio"] == pytest.approx((n0 - k) / n0)
    assert [t["blocks"] for t in out["latency_search"]] == [1, 2, 3] and set(seen) == {"eager"}
    scores = out["block_scores"]
    assert sorted(gone) == sorted(sorted(scores, key=scores.get)[:k])
    before = copy.deepcopy(r20)
    with pytest.raises(secateurs.PruningError, match="removing all 2 blocks that may go measured"):
        secateurs.prune(before, X, "dlp", {"latency": 0.1}, data=data, method_options={"per_class": 20, "count": 2})
    assert len(find_blocks(before, X)) == n0
    for bad in ({"mode": "truncate"}, {"filters": True}):
        with pytest.raises(ValueError, match="latency target with mode='rank' and no filter steps"):
            secateurs.prune(copy.deepcopy(r20), X, "dlp", {"latency": 0.5}, data=data, method_options=bad)


def test_truncate_cuts_where_the_scores_stop_rising(r20, data, monkeypatch):
    fake = {"layer3.0": 0.5, "layer3.1": 0.7, "layer3.2": 0.6}
    monkeypatch.setattr(secateurs.methods.dlp, "block_scores", lambda model, blocks, *a, **k: {b.name: fake[b.name] for b in blocks})
    m, report = secateurs.prune(copy.deepcopy(r20), X, "dlp", data=data, method_options={"mode": "truncate"})
    assert list(report["steps"][1]["removed"]) == ["layer3.2"]
    assert isinstance(m.layer3[2], torch.nn.Identity) and m(X).shape == (1, 10)
    fake.update({"layer3.2": 0.9})  # rising to the end: nothing to cut
    m, report = secateurs.prune(copy.deepcopy(r20), X, "dlp", data=data, method_options={"mode": "truncate"})
    assert report["stopped"] == "block scores rise to the end: nothing to truncate"


def test_cascade_then_removes_a_tenth_of_the_filters_per_step(r20, data):
    m, report = secateurs.prune(copy.deepcopy(r20), X, "dlp+filters", steps=3, data=data,
                                method_options={"count": 2, "per_class": 10})
    assert report["method"] == "dlp+filters" and len(report["steps"]) == 4
    widths = []
    for st in report["steps"][1:]:
        widths.append(st["removed"])
    assert len(widths[0]) == 2 and all(isinstance(v, int) for v in widths[1].values())
    # each filter step removes 10% (floored) of the channels still there, ranked on one joint VIP
    total = sum(g.size for g in secateurs.analyze(m, X).groups)
    assert sum(widths[2].values()) == pytest.approx(total / 0.9 * 0.1, abs=2)
    assert m(X).shape == (1, 10)


def test_the_cascade_stops_at_its_macs_target_and_cuts_the_last_step_to_it(r20, data):
    """10% of the filters a step would pass 0.8 of the MACs; the step that would is cut to meet it,
    and no step starts after (the filter steps ignored the target)."""
    base = secateurs.count(r20, X).macs
    m, report = secateurs.prune(copy.deepcopy(r20), X, "dlp+filters", {"macs": 0.8}, data=data,
                                method_options={"count": 1, "per_class": 10})
    kept = secateurs.count(m, X).macs / base
    assert 0.78 <= kept <= 0.8 and report["steps_requested"] == 7
    assert report["stopped"] == "macs target 0.8 met" and len(report["steps"]) < 8  # the steps after it: none


def test_the_cascade_leaves_part_of_a_reachable_target_to_its_filter_steps(r20, data):
    """Blocks alone can reach 0.7 here: they spend its square root, so the filter steps still run
    (blocks took the whole target and the cascade was the same as dlp)."""
    base = secateurs.count(r20, X).macs
    m, report = secateurs.prune(copy.deepcopy(r20), X, "dlp+filters", {"macs": 0.7}, data=data,
                                method_options={"per_class": 10})
    blocks, filters = report["steps"][1], [r for r in report["steps"][2:] if not r.get("reverted")]
    assert 0.7 < blocks["macs"] / base <= 0.7 ** 0.5 + 0.05 and filters
    assert 0.68 <= secateurs.count(m, X).macs / base <= 0.7 and report["stopped"] == "macs target 0.7 met"


def test_vip_criterion_ranks_a_dead_filter_last(r20, data):
    m = copy.deepcopy(r20)
    g = secateurs.analyze(m, X)
    grp = g.groups_of("layer1.0.conv1")[0]
    with torch.no_grad():
        m.layer1[0].conv1.weight[5].zero_()  # its max-pooled output is a constant 0 + BN shift
        m.layer1[0].bn1.weight[5] = 0.0
        m.layer1[0].bn1.bias[5] = 0.0
    s = secateurs.group_scores(m, g, "vip", data=data, per_class=10)[grp.index]
    assert s[5] == 0 and (s[torch.arange(len(s)) != 5] > 0).all()


def test_bad_options_and_missing_data():
    with pytest.raises(ValueError, match="`mode` must be 'rank' or 'truncate'"):
        get_method("dlp", mode="cut")
    with pytest.raises(ValueError, match="needs a stop"):
        secateurs.prune(create_model("cifar_resnet20"), X, "dlp", data=[(X, torch.tensor([0]))])
    with pytest.raises(ValueError, match="method 'dlp' needs data"):
        secateurs.prune(create_model("cifar_resnet20"), X, "dlp", method_options={"count": 1})


def test_the_cascade_ranks_its_filters_by_the_filter_criterion_it_is_given(r20, data):
    """A criterion that scores one marked filter of a down-sampling block (never removed) lowest:
    the cascade's first filter step removes exactly that filter; the paper's VIP is the default."""
    m0 = copy.deepcopy(r20)
    with torch.no_grad():
        m0.layer2[0].conv1.weight[3].fill_(7.0)  # marked: no other filter holds this value
    calls = []

    def marked_last(model, graph):
        calls.append(len(graph.groups))
        scores = [torch.ones(g.size) for g in graph.groups]
        conv = model.layer2[0].conv1.weight
        hit = (conv == 7.0).flatten(1).all(1).nonzero().flatten()
        if len(hit):
            scores[graph.groups_of("layer2.0.conv1")[0].index][hit] = 0.0
        return scores

    m, report = secateurs.prune(copy.deepcopy(m0), X, "dlp+filters", steps=2, data=data,
                                method_options={"count": 1, "per_class": 10, "filter_ratio": 0.01,
                                                "filter_criterion": marked_last})
    assert len(calls) == 1 and report["steps"][2]["removed"] == {"layer2.0.conv1": 1}
    assert m.layer2[0].conv1.weight.shape[0] == 31 and not (m.layer2[0].conv1.weight == 7.0).flatten(1).all(1).any()
    assert get_method("dlp+filters").filter_criterion == "vip"


def test_an_unknown_filter_criterion_is_named_and_the_model_left_as_it_was(r20, data):
    m = copy.deepcopy(r20)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"option `filter_criterion`: unknown criterion 'l3'; available: .*l1"):
        secateurs.prune(m, X, "dlp+filters", {"macs": 0.8}, data=data, method_options={"filter_criterion": "l3"})
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
