"""``round_to="auto"``: the width step measured on the fast side of this machine's staircase.
No real timing: the clock is a stand-in machine whose seconds are a function of the output width."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn


@pytest.mark.parametrize("shape,floor,cap,expected", [
    ("staircase of 8", 8, 16, 8), ("staircase of 4", 1, 16, 4), ("smooth", 1, 16, 1), ("smooth", 8, 16, 8),
    ("staircase of 16", 8, 16, 16), ("staircase of 16", 8, 32, 16),
    # steps up to 32 (a GPU's range): the 1.5x rule
    ("staircase of 16, a little faster at 32", 8, 32, 16), ("staircase of 16, 4 ms faster at 32", 8, 32, 16),
    ("staircase of 16, 9 ms faster at 32", 8, 32, 16), ("staircase of 32", 8, 32, 32),
    ("staircase of 32", 8, 16, 16)])  # a CPU's cap
def test_round_to_auto_lands_on_the_fast_side_of_the_steps(shape, floor, cap, expected, tmp_path, monkeypatch):
    """A coarser step wins only for a real saving: where 16 saves 91%, 86% or 77% of what 32 does,
    16 is kept (a 90% or 80% rule would take 32 in the last two), where it saves 58% (a staircase of
    32) 32 wins. None below ``floor`` is chosen, smooth curve or not, and on a CPU none above 16, even
    under a staircase of 32 (the model pruned at 32 ran no faster: its narrow layers were left too few widths)."""
    from secateurs import latency_table

    def clock(calls, repeats, warmup):  # a stand-in machine: seconds as a function of the output width
        step = {"staircase of 8": 8, "staircase of 4": 4, "staircase of 32": 32, "smooth": 1}.get(shape, 16)
        extra = int(shape.split(" ms")[0].rsplit(" ", 1)[1]) if " ms" in shape else 2 if "32" in shape else 0
        return {w: [1e-3 * (10 + math.ceil(w / step) * step - extra * (w % 32 == 0))] * repeats for w in calls}

    monkeypatch.setattr(latency_table, "time_callables", clock)
    monkeypatch.setattr(latency_table, "_CPU_MAX_STEP", cap)
    model = nn.Sequential(nn.Conv2d(3, 256, 3), nn.ReLU(), nn.Conv2d(256, 256, 3))
    assert latency_table.auto_round_to(model, torch.randn(1, 3, 12, 12), cache_dir=tmp_path, floor=floor) == expected

    def never(*a):
        raise AssertionError("measured again")

    monkeypatch.setattr(latency_table, "time_callables", never)  # cached per machine and layer shapes
    assert latency_table.auto_round_to(model, torch.randn(1, 3, 12, 12), cache_dir=tmp_path, floor=floor) == expected


def test_round_to_auto_hears_the_depthwise_staircase(tmp_path, monkeypatch):
    """The 1x1 convs run smooth, the depthwise one in steps of 16 and slower: its step wins."""
    from secateurs import latency_table

    def clock(calls, repeats, warmup):
        out = {}
        for w, call in calls.items():
            if call.__defaults__[0].groups > 1:
                out[w] = [1e-3 * (50 + 10 * math.ceil(w / 16) * 16)] * repeats
            else:
                out[w] = [1e-3 * (10 + w)] * repeats
        return out

    monkeypatch.setattr(latency_table, "time_callables", clock)
    model = nn.Sequential(nn.Conv2d(3, 256, 1), nn.Conv2d(256, 256, 3, padding=1, groups=256), nn.Conv2d(256, 256, 1))
    assert latency_table.auto_round_to(model, torch.randn(1, 3, 12, 12), cache_dir=tmp_path) == 16


def test_round_to_auto_is_not_capped_by_a_narrow_layer(tmp_path, monkeypatch):
    """A 32-wide depthwise conv (band 16: steps up to 8) among 256-wide ones that run 16 at a time:
    the wide ones decide, on every step they can tell apart."""
    from secateurs import latency_table

    def clock(calls, repeats, warmup):
        assert max(calls) > 32, "the narrow layer was timed"
        return {w: [1e-3 * (50 + 10 * math.ceil(w / 16) * 16)] * repeats for w in calls}

    monkeypatch.setattr(latency_table, "time_callables", clock)
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 256, 1),
                          nn.Conv2d(256, 256, 3, padding=1, groups=256), nn.Conv2d(256, 256, 1))
    assert latency_table.auto_round_to(model, torch.randn(1, 3, 24, 24), cache_dir=tmp_path) == 16


def test_round_to_auto_on_narrow_models(tmp_path, monkeypatch):
    """A CIFAR ResNet's 64-wide layers are timed in a narrower band (16..48: steps up to 16 have two
    multiples there); a model too narrow to tell gets the floor, untimed."""
    from secateurs import latency_table

    def clock(calls, repeats, warmup):
        assert min(calls) == 16 and max(calls) == 48
        return {w: [1e-3 * (10 + math.ceil(w / 16) * 16)] * repeats for w in calls}

    monkeypatch.setattr(latency_table, "time_callables", clock)
    cifar = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
    assert latency_table.auto_round_to(cifar, torch.randn(1, 3, 12, 12), cache_dir=tmp_path) == 16
    monkeypatch.setattr(latency_table, "time_callables", None)
    tiny = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    assert latency_table.auto_round_to(tiny, torch.randn(1, 3, 12, 12), cache_dir=tmp_path) == 8


def test_prune_round_to_auto_uses_the_measured_step(monkeypatch):
    import secateurs
    from secateurs.models import create_model

    monkeypatch.setattr(secateurs.pipeline, "auto_round_to", lambda model, x, threads=None: 4)
    m, report = secateurs.prune(create_model("cifar_resnet20"), torch.randn(1, 3, 32, 32), target={"macs": 0.5},
                                round_to="auto")
    widths = [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert report["round_to"] == 4 and all(w % 4 == 0 for w in widths) and any(w < 16 for w in widths)


def test_round_to_auto_times_the_dense_layers_when_the_widest_are_grouped(tmp_path, monkeypatch):
    """A grouped conv (not depthwise) 256 wide between 64-wide dense convs: its units step on their
    own, so the dense convs are the ones timed (they were left out for the wide one, then it was
    dropped too, and the floor came back untimed)."""
    from secateurs import latency_table

    def clock(calls, repeats, warmup):
        assert max(calls) == 48
        return {w: [1e-3 * (10 + math.ceil(w / 16) * 16)] * repeats for w in calls}

    monkeypatch.setattr(latency_table, "time_callables", clock)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 256, 3, padding=1, groups=4), nn.Conv2d(256, 64, 1))
    assert latency_table.auto_round_to(model, torch.randn(1, 3, 12, 12), cache_dir=tmp_path) == 16
