"""The latency harness: interleaved rounds, the median's interval, runtimes, the dense/pruned guard.
No assertion on how fast anything is: the clock is replaced where a number is checked."""
from __future__ import annotations

import copy
import itertools
import math
import json

import pytest
import torch
import torch.nn as nn

from secateurs import latency
from secateurs.latency import time_models


class Tagged(nn.Module):
    """Appends its tag to a shared log on every forward: the order the harness ran them in."""

    def __init__(self, tag, log):
        super().__init__()
        self.tag, self.log = tag, log
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        self.log.append(self.tag)
        return self.conv(x)


def test_models_run_interleaved_with_a_rotating_order():
    log = []
    models = {t: Tagged(t, log) for t in "abc"}
    out = time_models(models, torch.randn(1, 3, 8, 8), repeats=6, warmup=1)
    timed = log[3:]  # after one warm-up round of each
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert {r[0] for r in rounds} == {"a", "b", "c"}, "every model leads some rounds"
    assert set(out) == {"a", "b", "c"} and all(t.repeats == 6 and t.batch == 1 for t in out.values())


def test_median_and_its_interval_from_order_statistics(monkeypatch):
    ticks = itertools.count()
    durations = iter([5, 1, 4, 2, 6, 3] * 10)
    clock = [0.0]

    def fake_clock():  # start/stop pairs: each forward "takes" the next duration
        if next(ticks) % 2 == 0:
            return clock[0]
        clock[0] += next(durations)
        return clock[0]

    monkeypatch.setattr(latency.time, "perf_counter", fake_clock)
    t = time_models({"m": nn.Identity()}, torch.randn(1, 3), repeats=6, warmup=0)["m"]
    assert t.median_s == 3.5 and t.low_s == 1 and t.high_s == 6  # n=6: only the whole range covers 95%
    med, lo, hi = latency._median_interval(list(range(100)))
    assert (med, lo, hi) == (49.5, 39, 60)  # exact binomial ranks: 96.5% coverage, 94.3% one rank narrower
    assert latency._median_interval(list(range(30)))[1:] == (9, 20)
    with pytest.raises(ValueError, match="`repeats` must be"):  # 5 rounds bound no 95% interval
        time_models({"m": nn.Identity()}, torch.randn(1, 3), repeats=5)


def test_modes_and_threads_are_restored():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    m[1].eval()
    threads = torch.get_num_threads()
    t = time_models({"m": m}, torch.randn(1, 3, 8, 8), repeats=6, warmup=0, threads=1)["m"]
    assert t.threads == 1 and torch.get_num_threads() == threads
    assert m.training and not m[1].training


@pytest.mark.parametrize("runtime", ["channels_last", "onnxruntime"])
def test_other_runtimes(runtime):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    t = time_models({"m": nn.Conv2d(3, 4, 3)}, torch.randn(2, 3, 8, 8), repeats=6, warmup=1, runtime=runtime)["m"]
    assert t.runtime == runtime and t.batch == 2 and 0 < t.low_s <= t.median_s <= t.high_s


def test_onnxruntime_is_timed_in_its_own_process_and_leaves_this_one_free(tmp_path):
    """The timer's shared thread pool binds every later session of its process; the user's own
    sessions (per-session threads, the default) must still work afterwards, in this process."""
    ort = pytest.importorskip("onnxruntime")
    from secateurs.export import export_onnx

    dense, pruned, x = nn.Conv2d(3, 16, 3), nn.Conv2d(3, 4, 3), torch.randn(1, 3, 16, 16)
    t = time_models({"dense": dense, "pruned": pruned}, x, repeats=6, warmup=1, threads=1, runtime="onnxruntime")
    assert set(t) == {"dense", "pruned"} and t["pruned"].repeats == 6 and t["dense"].threads == 1
    path = tmp_path / "m.onnx"
    export_onnx(dense, x, path, check=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].shape == (1, 16, 14, 14)


def test_bad_arguments_name_themselves():
    m = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="runtime"):
        time_models({"m": m}, torch.randn(1, 3, 8, 8), runtime="tensorrt")
    with pytest.raises(ValueError, match="repeats"):
        time_models({"m": m}, torch.randn(1, 3, 8, 8), repeats=1)
    with pytest.raises(TypeError, match="example_inputs"):
        time_models({"m": m}, "image")
    with pytest.raises(TypeError, match="models"):
        time_models({"m": "resnet"}, torch.randn(1, 3, 8, 8))


def test_latency_ratio_times_the_layout_the_dense_model_is_stored_in(monkeypatch):
    """The ratio every latency search stops on: the median of the rounds' pruned / dense, in the dense
    model's layout unless a runtime is given."""
    seen = []

    def fake(models, x, repeats, warmup, threads, runtime):
        seen.append(runtime)
        drift = [1 + r % 4 for r in range(repeats)]  # the machine's slow spells: in both models' rounds
        return {"dense": [2.0 * d for d in drift], "pruned": [0.5 * d for d in drift]}, 1, 1

    monkeypatch.setattr(latency, "_timed", fake)
    plain = nn.Conv2d(3, 8, 3)
    stored_cl = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 8, 8)
    assert latency.latency_ratio(plain, plain, x) == 0.25
    assert latency.latency_ratio(stored_cl, plain, x) == 0.25
    assert latency.latency_ratio(plain, plain, x, runtime="onnxruntime") == 0.25
    assert seen == ["eager", "channels_last", "onnxruntime"]


def _linear_tables(monkeypatch) -> None:
    """Stand-in tables: a layer's time proportional to its width (the clock here is noisy)."""
    from secateurs import latency_table

    monkeypatch.setattr(latency_table.LatencyModel, "_measure", lambda self, layer: {
        axis: [[w, 1e-3 * w] for w in latency_table._grid(layer.cin if axis == "in" else layer.cout, 4)]
        for axis in (("dw",) if layer.depthwise else ("out", "in"))})


def test_latency_tables_are_measured_once_per_machine_and_predict_the_measured_model(tmp_path, monkeypatch):
    from secateurs import analyze
    from secateurs import latency_table
    from secateurs.budget import Allocator
    from secateurs.criteria import group_scores

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.Conv2d(16, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = analyze(model, x)
    lm = latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path / "real", grid=4, repeats=3)
    assert [l.name for l in lm.layers] == ["0", "2", "3", "6"] and lm.layers[1].depthwise
    assert lm.full() == pytest.approx(lm.measured_s)  # by construction: the rest is what the layers miss
    table = json.loads(lm.path.read_text())
    assert [sorted(t) for t in table.values()] == [["in", "out"], ["dw"], ["in", "out"], ["in", "out"]]
    assert [[w for w, _ in t["in"]] for t in table.values() if "in" in t] == [[1, 2, 3], [4, 8, 12, 16], [6, 12, 18, 24]]
    # predictions, on a stand-in table where time is proportional to width (the clock here is noisy)
    _linear_tables(monkeypatch)
    lm = latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path, grid=4, repeats=3)
    alloc = Allocator(graph, group_scores(model, graph, "l2"), "global")
    keep = [g.size for g in graph.groups]
    predicted = [lm(alloc.removed([max(1, round(k * f)) for k in keep])) for f in (1.0, 0.5)]
    assert predicted[0] == pytest.approx(lm.full()) and predicted[1] < predicted[0]

    def never(self, layer):
        raise AssertionError("the cached table was measured again")

    monkeypatch.setattr(latency_table.LatencyModel, "_measure", never)
    again = latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path, grid=4, repeats=3)
    assert again.tables == lm.tables


def test_layer_descriptions_follow_what_the_layer_really_runs():
    """Unbatched inputs are one sample; a conv padded by F.pad (padding_mode other than zeros) is
    recorded on its padded input, so the table's conv must not pad again; the dtype is the layer's."""
    from secateurs.latency_table import _Layer

    conv = _Layer("c", nn.Conv2d(3, 8, 3), (3, 16, 16), (8, 14, 14))
    assert (conv.batch, conv.cin, conv.cout, conv.spatial) == (1, 3, 8, (16, 16))
    m, x = conv.build(3, 8, torch.device("cpu"))
    assert m(x).shape == (1, 8, 14, 14)
    lin = _Layer("l", nn.Linear(10, 4), (10,), (4,))
    assert (lin.batch, lin.cin, lin.cout, lin.spatial) == (1, 10, 4, ())
    refl = nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect")
    x = torch.randn(2, 4, 20)
    layer = _Layer("r", refl, (2, 4, 22), tuple(refl(x).shape))  # what count records: the padded input
    m, xb = layer.build(4, 6, torch.device("cpu"))
    assert layer.spec["padding"] == 0 and m(xb).shape == refl(x).shape
    half = _Layer("h", nn.Conv2d(3, 8, 3).to(torch.bfloat16), (1, 3, 8, 8), (1, 8, 6, 6))
    m, xb = half.build(3, 8, torch.device("cpu"))
    assert half.spec["dtype"] == "bfloat16" and m.weight.dtype == xb.dtype == torch.bfloat16
    assert "dtype" not in conv.spec  # float32 keys stay as they were


def test_a_grouped_conv_reads_the_inputs_its_own_group_keeps(tmp_path, monkeypatch):
    """Conv(8, 16) -> grouped Conv(16, 32, groups=4) -> Conv(32, 8): cutting half of the first conv's
    outputs leaves the grouped conv 8 inputs whatever its outputs keep (they were taken to shrink
    with its outputs)."""
    from secateurs import analyze, apply_plan
    from secateurs import latency_table

    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.ReLU(),
                          nn.Conv2d(32, 8, 1)).eval()
    x = torch.randn(1, 8, 8, 8)
    graph = analyze(model, x)
    _linear_tables(monkeypatch)
    lm = latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path, grid=4, repeats=3)
    seen = {}
    real = lm._layer_time
    monkeypatch.setattr(lm, "_layer_time", lambda layer, cin, cout: seen.setdefault(layer.name, (cin, cout)) and
                        real(layer, cin, cout))
    (first,) = graph.groups_of("0")
    removed = torch.zeros(graph.n_components, dtype=torch.bool)
    assert first.size == 4  # 16 channels in units of 4: one position of each of the grouped conv's groups
    removed[first.components[:2]] = True
    lm(removed)
    cut = apply_plan(copy.deepcopy(model), graph, {first.index: [0, 1]})
    assert seen["2"] == (cut[2].in_channels, cut[2].out_channels) == (8, 32)


def test_a_cache_file_cut_short_is_measured_again_and_a_model_off_the_cpu_is_refused(tmp_path, monkeypatch):
    from secateurs import analyze
    from secateurs import latency_table

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = analyze(model, x)
    _linear_tables(monkeypatch)
    lm = latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path, grid=4, repeats=3)
    lm.path.write_text(lm.path.read_text()[:20])  # a run killed mid-write by hand, or an edit
    again = latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path, grid=4, repeats=3)
    assert again.tables == lm.tables and json.loads(lm.path.read_text()).keys() == lm.tables.keys()
    with pytest.raises(ValueError, match="latency tables time layers on the CPU or a CUDA GPU, but the model is on meta"):
        latency_table.LatencyModel(copy.deepcopy(model).to("meta"), graph, x, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="latency tables time layers on the CPU or a CUDA GPU, but the model is on meta"):
        latency_table.auto_round_to(copy.deepcopy(model).to("meta"), x, cache_dir=tmp_path)


def test_a_gpus_tables_are_cached_apart_from_the_cpus_and_from_other_gpus(tmp_path, monkeypatch):
    """Layers are timed where the model runs: a GPU's tables must never be read for the CPU or for
    another GPU model (their kernels step at other widths), and the key names no CPU thread count
    that does not matter there."""
    from secateurs import latency_table

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    h200 = latency_table._cache_file(tmp_path, 2, "eager", gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    a100 = latency_table._cache_file(tmp_path, 2, "eager", gpu)
    assert len({h200, a100, latency_table._cache_file(tmp_path, 2, "eager", cpu)}) == 3
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert latency_table._cache_file(tmp_path, 2, "eager", gpu) == h200
    on_cpu = latency_table._cache_file(tmp_path, 2, "eager", cpu)
    monkeypatch.setattr(latency_table.os, "cpu_count", lambda: 999)  # the host's cores: the CPU's key only
    assert latency_table._cache_file(tmp_path, 2, "eager", gpu) == h200
    assert latency_table._cache_file(tmp_path, 2, "eager", cpu) != on_cpu
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not torch.backends.cudnn.benchmark)  # other kernels picked
    assert latency_table._cache_file(tmp_path, 2, "eager", gpu) != h200
    # a graphed table is timed in the model's own layout: NCHW and channels-last tables never share a file
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    nchw = latency_table._table_runtime(model, "cuda_graph")
    assert nchw != latency_table._table_runtime(model.to(memory_format=torch.channels_last), "cuda_graph")
    assert latency_table._table_runtime(model, "eager") == "eager"  # CPU caches keep their files
    with pytest.raises(ValueError, match="runtime 'cuda_graph' times layers on a CUDA GPU, but the model is on cpu"):
        latency_table.auto_round_to(model, torch.randn(1, 3, 8, 8), runtime="cuda_graph", cache_dir=tmp_path)


def test_a_cuda_timing_waits_for_its_kernels(monkeypatch):
    """CUDA kernels are asynchronous: a timed call that did not synchronise would time the launch."""
    from secateurs.latency import synchronised

    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: seen.append("sync"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: seen.append(("sync", d)))
    gpu1 = torch.device("cuda", 1)
    assert synchronised(lambda: seen.append("run") or 7, gpu1)() == 7 and seen == ["run", ("sync", gpu1)]
    assert synchronised(lambda: seen.append("cpu") or 8, torch.device("cpu"))() == 8 and seen[-1] == "cpu"
    assert synchronised(lambda: seen.append("none") or 9, None)() == 9 and seen[-1] == "none"


def test_interpolation_through_the_measured_points():
    from secateurs.latency_table import _grid, _interp

    curve = [[4, 1.0], [8, 1.0], [12, 3.0], [16, 4.0]]
    assert _interp(curve, 2) == 0.5 and _interp(curve, 8) == 1.0 and _interp(curve, 10) == 2.0
    assert _interp(curve, 16) == 4.0 and _grid(16, 4) == [4, 8, 12, 16] and _grid(3, 8) == [1, 2, 3]


def test_latency_tables_read_the_widths_a_rounded_plan_can_have(tmp_path, monkeypatch):
    """With round_to 16 a depthwise conv that runs 16 channels at a time is timed at multiples of 16
    (from 16 itself to its full width), so the table's time at 64 is the staircase's, not a slope through
    72's step, and its time at 16 is measured, not a line down to zero that drops the fixed cost."""
    from secateurs import analyze, latency_table

    assert latency_table._grid(144, 6, 16) == [16, 32, 48, 64, 96, 128, 144] and latency_table._grid(12, 4, 16) == [3, 6, 9, 12]
    seen = []

    def clock(calls, repeats, warmup):
        seen.extend(calls)
        return {k: [1e-6 * (10 + math.ceil(k[1] / 16) * 16)] * repeats for k in calls}  # a fixed cost, then steps

    monkeypatch.setattr(latency_table, "time_callables", clock)
    model = nn.Sequential(nn.Conv2d(3, 144, 1), nn.Conv2d(144, 144, 3, padding=1, groups=144)).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = analyze(model, x)
    stepped = latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path, step=16)
    assert {w for axis, w in seen if axis == "dw"} == {16, 32, 48, 64, 96, 128, 144}  # 16 too: no slope down to 0
    assert stepped._layer_time(stepped.layers[1], 64, 64) == pytest.approx(74e-6)
    assert stepped._layer_time(stepped.layers[1], 16, 16) == pytest.approx(26e-6)  # measured, not 42 x 16/32
    seen.clear()
    plain = latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path)  # its own grid: measured, not read
    assert {w for axis, w in seen if axis == "dw"} == {24, 48, 72, 96, 120, 144}
    assert plain._layer_time(plain.layers[1], 64, 64) > 76e-6


def test_a_grouped_convs_table_is_timed_at_the_widths_its_groups_allow(tmp_path, monkeypatch):
    """A conv of 4 groups moves 4 channels at a time: round_to 16 is a step of 4 of its units, so its
    table is timed at multiples of 16 channels, under its own key; round_to 4 leaves its units no step
    (every count of them is a multiple of 4 channels), so the plain table serves it, measured once."""
    from secateurs import analyze, latency_table

    timed = {}  # layer (told apart by its widest input) -> the output widths timed

    def clock(calls, repeats, warmup):
        layer = "grouped" if max(w for axis, w in calls if axis == "in") == 64 else "dense"
        timed.setdefault(layer, []).append(sorted(w for axis, w in calls if axis == "out"))
        return {k: [1e-6 * k[1]] * repeats for k in calls}

    monkeypatch.setattr(latency_table, "time_callables", clock)
    model = nn.Sequential(nn.Conv2d(8, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, groups=4)).eval()
    x = torch.randn(1, 8, 8, 8)
    graph = analyze(model, x)
    latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path, step=16)
    assert timed["grouped"] == timed["dense"] == [[16, 32, 48, 64]]  # not 12, 20, 32, 44, 52, 64
    keys = list(json.loads(next(tmp_path.glob("*.json")).read_text()))
    assert sum(k.endswith("|multiples=4") for k in keys) == 1 and sum(k.endswith("|multiples=16") for k in keys) == 1
    latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path, step=4)  # each layer: a table it had not
    latency_table.LatencyModel(model, graph, x, cache_dir=tmp_path)  # the dense one's plain table only
    assert timed["grouped"][1] == [12, 20, 32, 44, 52, 64] and len(timed["grouped"]) == 2
    assert timed["dense"][1:] == [[4, 12, 20, 32, 44, 52, 64], [11, 21, 32, 43, 53, 64]]


def test_latency_allocation_spends_a_macs_budget_where_it_buys_time(tmp_path, monkeypatch):
    """allocation="latency" divides each group's scores by the time its channels save per MAC:
    with a stand-in table where the depthwise conv is slow, the channels feeding it go first,
    and the MACs budget is met exactly as with "global"."""
    import secateurs
    from secateurs import latency_table
    from secateurs.budget import Allocator, latency_weights
    from secateurs.cost import PlanCost

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    monkeypatch.setattr(latency_table.LatencyModel, "_measure", lambda self, layer: {
        axis: [[w, (1e-2 if layer.depthwise else 1e-5) * w] for w in latency_table._grid(
            layer.cin if axis == "in" else layer.cout, 4)] for axis in (("dw",) if layer.depthwise else ("out", "in"))})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    x = torch.randn(1, 3, 16, 16)
    graph = secateurs.analyze(model, x)
    alloc = Allocator(graph, secateurs.group_scores(model, graph, "l2"), "latency")
    lm = latency_table.LatencyModel(model, graph, x, grid=4, repeats=3)
    weights = latency_weights(alloc, lm, PlanCost(model, graph, x))
    sizes = [g.size for g in graph.groups]
    assert sorted(sizes) == [8, 16, 32] and sum(weights) == pytest.approx(len(weights))
    assert weights[sizes.index(16)] > 2 * max(weights[sizes.index(32)], weights[sizes.index(8)])

    widths = {}
    for allocation in ("global", "latency"):
        m, report = secateurs.prune(copy.deepcopy(model), x, target={"macs": 0.6}, allocation=allocation)
        assert report["after"]["macs"] <= 0.6 * report["before"]["macs"]
        widths[allocation] = [m[i].out_channels for i in (0, 3, 5)]
    assert widths["latency"][0] < widths["global"][0]
    # no group below the floor: a share of the width the importance-only plan gives it
    from secateurs.budget import LATENCY_FLOOR
    assert all(lat >= math.ceil(LATENCY_FLOOR * glob) for lat, glob in zip(widths["latency"], widths["global"]))


def test_latency_search_brackets_the_target_instead_of_swinging_across_it():
    """On vgg16 here the measured ratio ran about 0.32 + 1.5 (aim - 0.5) over the aims the search
    tried: scaling the aim by target / measured alone swings 0.5 -> 0.78 -> 0.52 -> 0.76 and never
    lands; once one aim is below and one above, interpolating between them does within 4 tries."""
    from secateurs.budget import _next_aim

    measured = lambda aim: 0.32 + 1.5 * (aim - 0.5)  # noqa: E731
    target, tried, aim = 0.5, [], 0.5
    for _ in range(4):
        tried.append({"aim": aim, "latency_ratio": measured(aim)})
        if abs(measured(aim) - target) <= 0.05 * target:
            break
        aim = _next_aim(tried, target)
    assert abs(tried[-1]["latency_ratio"] - target) <= 0.05 * target and len(tried) <= 4
    scaled, aim = [], 0.5
    for _ in range(6):  # the old rule, for contrast: it never gets within 5%
        scaled.append(measured(aim))
        aim *= target / measured(aim)
    assert all(abs(r - target) > 0.05 * target for r in scaled)
    # the interpolated aim stays strictly inside the bracket, even when the two ratios are equal
    assert _next_aim([{"aim": 0.4, "latency_ratio": 0.45}, {"aim": 0.6, "latency_ratio": 0.55}], 0.5) == \
        pytest.approx(0.5)
    assert 0.4 < _next_aim([{"aim": 0.4, "latency_ratio": 0.5}, {"aim": 0.6, "latency_ratio": 0.55}], 0.5) < 0.6


def test_latency_search_shrinks_its_bracket_when_two_aims_give_one_plan():
    """Seen on ResNet-20: aims 0.791 and 0.729 gave one plan (measured 0.829), and bracketing by
    measured ratio picked 0.791 again each time, so every later try repeated 0.729. Bracketed in aim,
    the next aim lies strictly inside (0.65, 0.729)."""
    from secateurs.budget import _next_aim

    tried = [{"aim": 0.65, "predicted_ratio": 0.65, "latency_ratio": 0.42},
             {"aim": 1.006, "predicted_ratio": 1.0, "latency_ratio": 1.0},
             {"aim": 0.791, "predicted_ratio": 0.687, "latency_ratio": 0.829},
             {"aim": 0.729, "predicted_ratio": 0.687, "latency_ratio": 0.829}]
    aim = _next_aim(tried, 0.65)
    assert 0.65 < aim < 0.729 and aim == pytest.approx((0.65 + 0.729) / 2)  # same plan twice: bisect
    assert 0.65 < _next_aim(tried[:3], 0.65) < 0.791


class _FakeCuda:
    """Enough of torch.cuda for cuda_graphed's flow on a machine without a GPU."""

    def __init__(self, monkeypatch, sync_error: bool = False):
        import contextlib

        self.mode, self.captures, self.sync_error = 0, 0, sync_error
        fake = self

        class Graph:
            def replay(self):
                fake.replays = getattr(fake, "replays", 0) + 1

        @contextlib.contextmanager
        def graph(g):
            fake.captures += 1
            yield

        class Stream:
            def wait_stream(self, other):
                pass

        for name, value in {"Stream": Stream, "CUDAGraph": Graph, "graph": graph, "synchronize": lambda *a: None,
                            "stream": lambda s: contextlib.nullcontext(), "current_stream": lambda: Stream(),
                            "device": lambda d: contextlib.nullcontext(),
                            "get_sync_debug_mode": lambda: fake.mode,
                            "set_sync_debug_mode": lambda m: setattr(fake, "mode", m)}.items():
            monkeypatch.setattr(torch.cuda, name, value, raising=False)

    def forward(self, x):
        def fn():
            if self.sync_error and self.mode == "error":
                raise RuntimeError("called a synchronizing CUDA operation")
            return x * 2
        return fn


def test_a_graphed_call_keeps_what_its_graph_reads_alive_and_returns_the_output(monkeypatch):
    """The graph reads its weights and inputs by address: if nothing held them after capture (a
    latency table's layer is built just for its timing), replays would read freed memory."""
    import gc
    import weakref

    from secateurs.latency import cuda_graphed

    fake = _FakeCuda(monkeypatch)
    x = torch.ones(3)
    fn = fake.forward(x)
    ref = weakref.ref(fn)
    run = cuda_graphed(fn, torch.device("cuda", 0))
    del fn
    gc.collect()
    assert ref() is not None and fake.captures == 1
    assert torch.equal(run(), 2 * x) and fake.replays == 1 and fake.mode == 0


def test_a_forward_that_syncs_with_the_host_is_never_captured(monkeypatch):
    """A failed capture can leave CUDA's state broken: a forward that synchronises is found before
    capture (sync debug mode 'error') and timed eager, with a warning; the mode is put back."""
    from secateurs.latency import cuda_graphed

    fake = _FakeCuda(monkeypatch, sync_error=True)
    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph"):
        run = cuda_graphed(fake.forward(torch.ones(2)), torch.device("cuda", 0))
    assert fake.captures == 0 and fake.mode == 0 and torch.equal(run(), torch.full((2,), 2.0))


def test_a_channels_last_input_stays_channels_last_at_every_batch(monkeypatch):
    """A CUDA graph replays the layout it was given: the guard's batched copies of a channels-last
    input must stay channels-last, or every timed forward would convert it (NCHW inputs stay NCHW)."""
    from secateurs import latency

    seen = []

    def timed(models, x, repeats, warmup, threads, runtime):
        seen.append((x.shape[0], x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)))
        return {"dense": [1.0] * 6, "pruned": [1.0] * 6}, 1, x.shape[0]

    monkeypatch.setattr(latency, "_timed", timed)
    m = nn.Conv2d(3, 8, 3)
    latency.compare_dense_pruned(m, m, torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last),
                                 batches=(1, 4), repeats=6)
    latency.compare_dense_pruned(m, m, torch.randn(1, 3, 8, 8), batches=(4,), repeats=6)
    assert seen == [(1, False, True), (4, False, True), (4, True, False)]

