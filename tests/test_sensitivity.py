"""Sensitivity analysis: each group cut alone, on copies, with drops and MACs that a hand cut reproduces."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from secateurs import analyze, apply_plan, count, group_scores
from secateurs.data import load_dataset
from secateurs.models import create_model
from secateurs.sensitivity import plot_sensitivity, sensitivity
from secateurs.train import TrainConfig, evaluate, fit

X = torch.randn(1, 1, 8, 8)
RATIOS = (0.25, 0.5, 0.75)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # a tiny model gains nothing from threads, and on a shared CPU two threads ran ~50x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    m = create_model("tiny_cnn")
    fit(m, load_dataset("digits", "train"), None, TrainConfig(epochs=4, batch_size=32, lr=0.05, pad=1, quiet=True))
    return m.eval()


@pytest.fixture(scope="module")
def val():
    return load_dataset("digits", "test")


@pytest.fixture(scope="module")
def result(trained, val):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    res = sensitivity(trained, X, val, ratios=RATIOS, method="l1", progress=False)
    after = trained.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "sensitivity changed the user's model"
    assert not trained.training
    return res


def _hand_drop(model, val, group, ratio, baseline):
    """Cut the lowest-L1 channels of one group of a copy by hand and measure it."""
    m = copy.deepcopy(model)
    graph = analyze(m, X)
    g = graph.groups[group]
    s = group_scores(m, graph, "l1")[group]
    n = math.floor(g.size * ratio)
    plan = {group: torch.argsort(s, stable=True)[:n].tolist()}
    base = count(m, X).macs
    apply_plan(m, graph, plan)
    return baseline - evaluate(m, val)["top1"], 1 - count(m, X).macs / base


def test_result_shape_and_json(result, trained):
    graph = analyze(trained, X)
    assert result["metric"] == "top1"
    assert result["ratios"] == list(RATIOS)
    assert result["baseline"] > 50, "the fixture model should have learnt digits"
    assert [r["index"] for r in result["groups"]] == [g.index for g in graph.groups]
    assert [r["name"] for r in result["groups"]] == [g.name for g in graph.groups]
    for row, g in zip(result["groups"], graph.groups):
        assert row["size"] == g.size
        assert len(row["drops"]) == len(row["macs_saved"]) == len(row["removed"]) == len(RATIOS)
        assert row["removed"] == [math.floor(g.size * r) for r in RATIOS]
    assert json.loads(json.dumps(result)) == result


def test_macs_saved_grow_strictly_with_ratio(result):
    for row in result["groups"]:
        saved = row["macs_saved"]
        assert all(0 < a < b < 1 for a, b in zip(saved, saved[1:])), (row["name"], saved)


def test_drops_and_macs_match_a_hand_cut(result, trained, val):
    for row in result["groups"]:
        for j, r in enumerate(RATIOS):
            drop, saved = _hand_drop(trained, val, row["index"], r, result["baseline"])
            assert row["drops"][j] == pytest.approx(drop, abs=1e-9), (row["name"], r)
            assert row["macs_saved"][j] == pytest.approx(saved, abs=1e-12), (row["name"], r)
    assert max(row["drops"][-1] for row in result["groups"]) > 1, "cutting 75% of a layer should cost accuracy"


def _embed(narrow, wide):
    """Copy ``narrow`` into the leading channels of ``wide``; the rest carry exact zeros, so ``wide``
    computes what ``narrow`` does and every group is half dead (L1 score 0)."""
    state = {}
    for k, w in wide.state_dict().items():
        n = narrow.state_dict()[k]
        t = torch.ones_like(w) if k.endswith("running_var") else torch.zeros_like(w)
        t[tuple(slice(0, s) for s in n.shape)] = n
        state[k] = t
    wide.load_state_dict(state)
    return wide.eval()


def test_dead_channels_are_cut_first_and_cost_nothing(trained, val):
    wide = _embed(trained, create_model("tiny_cnn", width=32))
    res = sensitivity(wide, X, val, ratios=(0.25, 0.5, 0.75), groups=["0", 1, "6"], progress=False)
    assert res["baseline"] == pytest.approx(evaluate(trained, val)["top1"])
    assert [row["index"] for row in res["groups"]] == [0, 1, 2]
    for row in res["groups"]:
        assert row["drops"][:2] == [0.0, 0.0], row  # only dead channels went
        assert 0 < row["macs_saved"][0] < row["macs_saved"][1]
    # past the dead half, live channels go (the same cut of the narrow model costs ~25-70 points)
    assert max(row["drops"][2] for row in res["groups"]) > 5


def test_progress_bar_can_be_silenced(trained, val, capsys):
    sensitivity(trained, X, val, ratios=(0.5,), groups=[0], progress=False)
    assert capsys.readouterr().err == ""
    sensitivity(trained, X, val, ratios=(0.5,), groups=[0], progress=True)
    assert "sensitivity" in capsys.readouterr().err


def test_plot_writes_a_png(result, tmp_path):
    out = plot_sensitivity(result, tmp_path / "sub" / "sens.png")
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    many = dict(result, groups=[dict(result["groups"][0], index=i, name=f"g{i}") for i in range(20)])
    assert plot_sensitivity(many, tmp_path / "many.png").stat().st_size > 1000


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"ratios": (0.0, 0.5)}, ValueError, "ratios"),
    ({"ratios": (0.5, 1.0)}, ValueError, "ratios"),
    ({"ratios": ()}, ValueError, "ratios"),
    ({"ratios": 0.5}, TypeError, "ratios"),
    ({"groups": ["no_such_layer"]}, ValueError, "groups"),
    ({"groups": [3]}, ValueError, "groups"),
    ({"groups": [True]}, TypeError, "groups"),
    ({"metric": "top7"}, ValueError, "metric"),
    ({"method": "no_such_criterion"}, ValueError, "method"),
])
def test_bad_arguments_name_the_argument(trained, val, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        sensitivity(trained, X, val, progress=False, **kwargs)


def test_empty_val_data_is_refused(trained, val):
    with pytest.raises(ValueError, match="val_data"):
        sensitivity(trained, X, val.subset(0), progress=False)
    with pytest.raises(ValueError, match="val_data"):
        sensitivity(trained, X, None, progress=False)
