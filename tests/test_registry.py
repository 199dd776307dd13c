"""Generic checks run over every registered criterion and method (scikit-learn's
``check_param_validation`` habit): each declared option refuses a bad value naming itself, each
method prunes a tiny model to a budget and meets it, and the report has the same keys every time.
A new criterion or method is tested here without writing a test: register it, add its cheap
settings to ``SETTINGS`` (the test below fails until then)."""
from __future__ import annotations

import copy

import pytest
import torch

import secateurs
from secateurs.criteria import group_scores, list_criteria
from secateurs.data import load_dataset
from secateurs.methods import get_method, list_methods, method_class
from secateurs.models import create_model
from secateurs.testing import randomize_norms

X = torch.randn(1, 1, 8, 8)
METHODS = [m for m in list_methods() if m not in list_criteria()]
# options that keep each method to a few seconds on an 8x8 ResNet-20, and the budget it meets
SETTINGS = {
    "heuristic": ({}, {"macs": 0.8}, 3),
    "dlp": ({"per_class": 8, "n_components": 2}, {"macs": 0.9}, 1),
    "dlp+filters": ({"per_class": 8, "n_components": 2}, {"macs": 0.9}, 1),
    "hfp": ({"epochs": 1, "warmup_steps": 1, "lam": 20.0}, {"macs": 0.7}, 1),
    "importance-weights": ({"epochs": 0, "fraction": 1.0}, {"macs": 0.7}, 1),
}
REPORT_KEYS = {"method", "method_options", "budget", "allocation", "round_to", "min_width", "steps_requested",
               "tolerance", "metric_name", "reconstruct", "before", "steps", "after", "kept", "layers", "timings",
               "method_output", "original_widths", "model"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train").subset(256, 0)


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    return randomize_norms(create_model("cifar_resnet20", in_chans=1)).eval()  # BN scales that rank


def _bad_values(o):
    """Values the option's declared constraint must refuse."""
    if o.choices is not None:
        return ["no-such-choice", 3]
    bad = []
    if o.kind in (int, float):
        bad.append("1")  # a string is never a number
        if o.kind is int:
            bad.append(1.5)
        if o.low is not None:
            bad.append(o.low if o.open_low else o.low - 1)
        if o.high is not None:
            bad.append(o.high if o.open_high else o.high + 1)
    return bad


def test_every_method_is_covered_here():
    assert set(SETTINGS) == set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_every_option_refuses_bad_values_by_name(name):
    cls = method_class(name)
    assert cls.options, f"{name} declares no options"
    checked = 0
    for o in cls.options:
        assert get_method(name, **{o.name: o.default}) is not None  # the declared default is valid
        for bad in _bad_values(o):
            with pytest.raises(ValueError, match=f"`{o.name}` must be"):
                get_method(name, **{o.name: bad})
            checked += 1
    assert checked >= 3
    with pytest.raises(ValueError, match="unexpected keyword argument 'no_such_option'"):
        get_method(name, no_such_option=1)


@pytest.mark.parametrize("name", list_criteria())
def test_every_criterion_scores_every_channel(name, r20, digits):
    graph = secateurs.analyze(r20, X)
    fn = secateurs.get_criterion(name)
    scores = group_scores(r20, graph, name, data=digits if getattr(fn, "needs_data", False) else None)
    assert [len(s) for s in scores] == [g.size for g in graph.groups]
    assert all(torch.isfinite(s).all() for s in scores)
    assert any((s != s[0]).any() for s in scores), "a criterion that ranks nothing"


@pytest.mark.parametrize("name", list_criteria())
def test_every_criterion_prunes_to_a_macs_budget(name, r20, digits):
    m = copy.deepcopy(r20)
    fn = secateurs.get_criterion(name)
    m, report = secateurs.prune(m, X, name, {"macs": 0.6}, data=digits if getattr(fn, "needs_data", False) else None)
    assert 0.59 <= report["kept"]["macs"] <= 0.6
    assert report["kept"]["macs"] == secateurs.count(m, X).macs / report["before"]["macs"]
    assert set(report) == REPORT_KEYS and report["method_output"] == {}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_prunes_to_its_budget(name, r20, digits):
    options, target, steps = SETTINGS[name]
    m = copy.deepcopy(r20)
    m, report = secateurs.prune(m, X, name, target, data=digits, steps=steps, method_options=options)
    (kind, value), = target.items()
    assert report["kept"][kind] <= value and report["kept"][kind] >= value - 0.15
    assert report["after"]["macs"] == secateurs.count(m, X).macs  # measured on the model handed back
    # "warnings" appears when the latency guard times this 8x8 model slower than dense: a noisy timing, not a defect
    assert set(report) - {"stopped", "latency", "warnings"} == REPORT_KEYS and "_state" not in report["method_output"]
    assert all("SLOWER" in w or "latency guard" in w for w in report.get("warnings", []))
    how = get_method(name, **options)
    assert report["method"] == how.name and report["method_options"] == options
    assert ("latency" in report) == how.trains  # the guard times what trains anyway, a bare cut stays fast


@pytest.mark.parametrize("name", METHODS)
def test_a_bad_option_fails_before_the_model_is_touched(name, r20, digits):
    m = copy.deepcopy(r20)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = next((o, b) for o in method_class(name).options for b in _bad_values(o))
    with pytest.raises(ValueError, match=f"`{bad[0].name}`"):
        secateurs.prune(m, X, name, {"macs": 0.5}, data=digits, method_options={bad[0].name: bad[1]})
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_target_forms_agree_and_old_keywords_warn(r20):
    plans = []
    for target in (0.5, {"macs": 0.5}, secateurs.Budget("macs", 0.5)):
        _, rep = secateurs.prune(copy.deepcopy(r20), X, "l1", target)
        plans.append(rep["layers"])
    with pytest.warns(DeprecationWarning, match="target="):
        _, rep = secateurs.prune(copy.deepcopy(r20), X, "l1", 0.5, budget="macs")
    plans.append(rep["layers"])
    assert all(p == plans[0] for p in plans)
    with pytest.warns(DeprecationWarning):
        _, old = secateurs.prune(copy.deepcopy(r20), X, "l1", ratio=0.3)
    _, new = secateurs.prune(copy.deepcopy(r20), X, "l1", {"ratio": 0.3})
    assert old["layers"] == new["layers"] and new["budget"] == {"kind": "ratio", "target": 0.3}


def test_moved_names_still_import_for_one_release():
    import importlib
    import sys

    import secateurs.depth
    from secateurs.methods import LayerPlan
    from secateurs.pipeline import Allocator, Budget

    sys.modules.pop("secateurs.blocks", None)
    with pytest.warns(DeprecationWarning, match="secateurs.depth"):
        blocks = importlib.import_module("secateurs.blocks")
    assert blocks.find_blocks is secateurs.depth.find_blocks and blocks.LayerPlan is LayerPlan
    assert (Budget, Allocator) == (secateurs.Budget, secateurs.Allocator)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_norm_scores_do_not_depend_on_the_thread_count(name):
    """per_channel_sum runs on one thread (tiny ops); its per-row norms and sums must be the
    bits every thread count gives, large tensors (parallel kernels) included."""
    import torchvision

    from secateurs.criteria import per_channel_sum

    m = torchvision.models.get_model(name, weights=None).eval()
    randomize_norms(m)
    graph = secateurs.analyze(m, torch.randn(1, 3, 64, 64))
    ours = [per_channel_sum(m, graph, p=p) for p in (1, 2)]
    threads = torch.get_num_threads()
    try:
        for n in (2, 4):
            torch.set_num_threads(n)
            theirs = [per_channel_sum.__wrapped__(m, graph, p=p) for p in (1, 2)]
            assert all(torch.equal(a, b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
    finally:
        torch.set_num_threads(threads)


def test_squares_are_the_bits_of_abs_pow():
    """per_channel_sum squares with one multiply; torch's |x|^2 must give the same bits for every
    float (random bit patterns: subnormals, huge values, infinities; NaN stays NaN)."""
    from secateurs.criteria import _abs_pow

    gen = torch.Generator().manual_seed(0)
    v = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    for p in (2, 1):
        torch.testing.assert_close(_abs_pow(v, p), v.abs().pow(p), rtol=0, atol=0, equal_nan=True)
