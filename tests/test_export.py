"""Pickle-free save/load of pruned models rebuilds them exactly; ONNX export matches PyTorch."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from secateurs import analyze, apply_plan
from secateurs.export import export_onnx
from secateurs.saving import FORMAT, load, save
from secateurs.models import create_model
from secateurs.testing import randomize_norms


def pruned(name, x, every=2, **kw):
    """A model with non-trivial BN stats and every other channel of every group removed."""
    torch.manual_seed(0)
    model = randomize_norms(create_model(name, **kw)).eval()
    return cut(model, x, every)


def cut(model, x, every=2):
    graph = analyze(model, x)
    apply_plan(model, graph, {g.index: list(range(0, g.size, every)) for g in graph.groups if g.size > 1})
    return model.eval()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def assert_same_model(a, b, x):
    assert shapes(a) == shapes(b)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b(x))


X32 = torch.randn(2, 3, 32, 32)
X64 = torch.randn(1, 1, 64, 64)


@pytest.fixture(scope="module")
def resnet():
    return pruned("cifar_resnet20", X32[:1])


@pytest.fixture(scope="module")
def unet():
    return pruned("unet", X64, in_chans=1, num_classes=2, base=8)


def test_pruned_resnet_round_trip(resnet, tmp_path):
    assert save(resnet, tmp_path, X32[:1], extra={"top1": 91.2}) == tmp_path
    loaded = load(tmp_path)
    assert_same_model(resnet, loaded, X32)
    assert not loaded.training
    assert loaded.secateurs_spec == {"name": "cifar_resnet20", "kwargs": {}}
    assert n_params(loaded) < n_params(create_model("cifar_resnet20")) / 3
    assert loaded.conv1.out_channels == resnet.conv1.out_channels == 8
    assert isinstance(loaded.conv1.weight, nn.Parameter) and loaded.conv1.weight.requires_grad
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["format"] == FORMAT and info["input_shape"] == [1, 3, 32, 32] and info["extra"] == {"top1": 91.2}
    assert info["modules"]["layer3.0.bn2"] == {"attrs": {"num_features": 32}}
    assert info["tensors"]["fc.weight"] == [10, 32]


def test_identity_block_and_pruning_round_trip(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(create_model("cifar_resnet20")).eval()
    model.layer1[1] = nn.Identity()
    model.layer3[2] = nn.Identity()
    model.conv1.stride = (2, 2)  # a changed tuple attribute
    cut(model, X32[:1], every=3)
    save(model, tmp_path)
    loaded = load(tmp_path)
    assert isinstance(loaded.layer1[1], nn.Identity) and isinstance(loaded.layer3[2], nn.Identity)
    assert not isinstance(loaded.layer2[1], nn.Identity)
    assert type(loaded.conv1.stride) is tuple and loaded.conv1.stride == (2, 2)  # JSON has only lists
    assert_same_model(model, loaded, X32)
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["modules"]["layer1.1"] == {"class": "torch.nn.modules.linear.Identity"}
    assert info["modules"]["conv1"]["attrs"]["stride"] == [2, 2]
    assert not any(k.startswith("layer1.1.") for k in info["modules"]), "children of a replaced block are not recorded"


def test_tiny_cnn_round_trip_keeps_spec_kwargs(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    model = pruned("tiny_cnn", x, norm="gn", width=16)  # GroupNorm: num_channels/num_groups change too
    save(model, tmp_path, x)
    loaded = load(tmp_path)
    assert loaded.secateurs_spec == {"name": "tiny_cnn", "kwargs": {"norm": "gn", "width": 16}}
    assert isinstance(loaded[1], nn.GroupNorm) and loaded[1].num_channels == model[1].num_channels < 16
    assert_same_model(model, loaded, x)


def test_unet_round_trip(unet, tmp_path):
    save(unet, tmp_path, X64)
    loaded = load(tmp_path)
    assert_same_model(unet, loaded, X64)
    assert n_params(loaded) < n_params(create_model("unet", in_chans=1, num_classes=2, base=8)) / 3


def test_run_dir_holds_json_and_safetensors_only(resnet, tmp_path):
    save(resnet, tmp_path / "run" / "nested")
    run = tmp_path / "run" / "nested"
    assert sorted(p.name for p in run.iterdir()) == ["model.json", "model.safetensors"]  # no temp files left
    json.loads((run / "model.json").read_text())
    raw = (run / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")  # safetensors: header length, JSON header, raw tensor bytes
    header = json.loads(raw[8:8 + n])
    assert header["conv1.weight"]["shape"] == [8, 3, 3, 3] and not raw.startswith(b"\x80")  # no pickle protocol
    save(resnet, run)  # overwriting an existing run works
    assert_same_model(resnet, load(str(run)), X32)


def test_load_never_unpickles(resnet, tmp_path, monkeypatch):
    save(resnet, tmp_path)

    def boom(*a, **k):
        raise AssertionError("load used pickle")

    monkeypatch.setattr(torch, "load", boom)
    import pickle

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    assert_same_model(resnet, load(tmp_path), X32)


def test_a_model_without_spec_loads_into_a_fresh_one_of_its_class(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(create_model("cifar_resnet20"))
    del model.secateurs_spec
    model.layer2[1] = nn.Identity()
    cut(model, X32[:1], every=3)
    save(model, tmp_path, X32[:1])
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["spec"] is None and info["relative_to"] == "nothing"
    assert info["class"] == "secateurs.models.cifar_resnet.CifarResNet"
    assert info["modules"]["layer1.0.conv1"]["attrs"]["out_channels"] == model.layer1[0].conv1.out_channels < 16
    with pytest.raises(ValueError, match="CifarResNet.*no spec.*model="):
        load(tmp_path)
    fresh = create_model("cifar_resnet20")
    loaded = load(tmp_path, model=fresh)
    assert loaded is fresh and isinstance(fresh.layer2[1], nn.Identity)
    assert_same_model(model.eval(), loaded, X32)
    # an explicit spec makes load() alone work for a model built without create_model
    save(model, tmp_path, spec={"name": "cifar_resnet20", "kwargs": {}})
    assert_same_model(model, load(tmp_path), X32)


def test_loading_into_a_model_of_another_class_leaves_it_unchanged(tmp_path):
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)))
    cut(model, X32[:1])
    save(model, tmp_path)
    for other, msg in [(create_model("tiny_cnn"), r"has module\(s\) \['4', '5'"),
                       (nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Linear(8, 4)),
                        r"module '3' was a torch.nn.modules.conv.Conv2d when saved but is a .*Linear"),
                       (nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU()),
                        r"has module\(s\) \['4'\]")]:
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match=msg):
            load(tmp_path, model=other)
        assert {k: v.shape for k, v in other.state_dict().items()} == {k: v.shape for k, v in before.items()}
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    assert_same_model(model.eval(), load(tmp_path, model=fresh), X32)
    assert fresh[0].out_channels == fresh[1].num_features == 4 and fresh[3].in_channels == 4


def test_cached_forward_state_is_not_taken_for_a_size(tmp_path):
    """A value a forward caches (YOLO's Detect.shape) is None when built: recorded, but never set."""
    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.shape = None

        def forward(self, x):
            self.shape = tuple(x.shape)
            return self.conv(x)

    m = Cached()
    m(X32)
    save(m, tmp_path)
    assert load(tmp_path, model=Cached()).shape is None


def test_unsaveable_changes_fail_before_writing(tmp_path):
    model = create_model("cifar_resnet20")
    model.layer1[1] = nn.Conv2d(16, 16, 1)
    with pytest.raises(ValueError, match=r"'layer1\.1' is a Conv2d but a BasicBlock"):
        save(model, tmp_path)
    model = create_model("cifar_resnet20")
    model.extra_head = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="extra_head"):
        save(model, tmp_path)
    with pytest.raises(TypeError, match="`extra`"):
        save(create_model("tiny_cnn"), tmp_path, extra={"f": object()})
    assert list(tmp_path.iterdir()) == []


def test_load_errors(resnet, tmp_path):
    with pytest.raises(FileNotFoundError, match="run_dir"):
        load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model.json"):
        load(tmp_path)
    save(resnet, tmp_path)
    cfg = tmp_path / "model.json"
    good = json.loads(cfg.read_text())

    bad = json.loads(cfg.read_text())
    bad["format"] = "secateurs/99"
    cfg.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="secateurs/99"):
        load(tmp_path)

    bad = json.loads(json.dumps(good))
    bad["tensors"]["layer2.0.conv1.weight"][0] += 1
    cfg.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"layer2\.0\.conv1\.weight"):
        load(tmp_path)

    bad = json.loads(json.dumps(good))
    bad["modules"]["layer1.0"] = {"class": "torch.nn.modules.linear.Identity"}  # its layers' sizes are still recorded
    cfg.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"module 'layer1\.0\.\w+', which the model it is loaded into does not have"):
        load(tmp_path)

    bad = json.loads(json.dumps(good))
    del bad["tensors"]["fc.bias"]
    cfg.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"fc\.bias"):
        load(tmp_path)

    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    cfg.write_text(json.dumps(good))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(tmp_path)


class _Tied(nn.Module):
    """Tied weights and a non-persistent buffer: the paths that cannot be assigned on meta."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, x):
        return self.b(self.a(x)) * self.scale


def test_tied_weights_and_non_persistent_buffers(tmp_path, monkeypatch):
    import secateurs.models._factory as factory

    monkeypatch.setattr(factory, "_build", lambda name, kw: _Tied())
    model = factory.create_model("tied")
    save(model, tmp_path)
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["aliases"] == {"b.weight": "a.weight"}
    loaded = load(tmp_path)
    assert loaded.a.weight is loaded.b.weight and torch.equal(loaded.scale, model.scale)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_onnx_pruned_resnet(resnet, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    was_training = resnet.training
    res = export_onnx(resnet, X32[:1], tmp_path / "r.onnx")
    assert res["path"] == str(tmp_path / "r.onnx") and res["max_rel_diff"] < 1e-4 and res["seconds"] > 0
    assert resnet.training == was_training
    # the batch dimension is dynamic: a batch of two runs too
    sess = ort.InferenceSession(res["path"], providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: X32.numpy()})[0]
    with torch.no_grad():
        ref = resnet(X32)
    assert out.shape == (2, 10) and torch.allclose(torch.from_numpy(out), ref, atol=1e-4)


def test_onnx_pruned_unet_restores_train_mode(unet, tmp_path):
    pytest.importorskip("onnxruntime")
    unet.train()
    try:
        res = export_onnx(unet, X64, tmp_path / "u.onnx")
        assert unet.training and all(m.training for m in unet.modules())
    finally:
        unet.eval()
    assert res["max_rel_diff"] < 1e-4 and res["max_abs_diff"] >= 0


def test_onnx_detects_a_mismatch(tmp_path):
    pytest.importorskip("onnxruntime")

    class Noisy(nn.Module):  # not a function of its input: PyTorch and onnxruntime must disagree
        def forward(self, x):
            return x + torch.rand_like(x)

    with pytest.raises(RuntimeError, match="differ"):
        export_onnx(Noisy(), torch.zeros(1, 4), tmp_path / "n.onnx")
    with pytest.raises(TypeError, match="example_inputs"):
        export_onnx(nn.Identity(), "x", tmp_path / "n.onnx")


def test_onnx_check_sees_a_nan_only_one_side_has():
    """max(0.0, nan) is 0.0: a NaN difference used to vanish from the check."""
    from secateurs.export import _compare

    class Session:  # what onnxruntime would return
        def __init__(self, out):
            self.out = out

        def get_inputs(self):
            return [type("I", (), {"name": "input"})()]

        def run(self, names, feeds):
            return [self.out]

    ref = [torch.ones(4)]
    x = (torch.zeros(1),)
    assert _compare(Session(torch.ones(4).numpy()), x, ref, "m", ["input"]) == (0.0, 0.0)
    bad = torch.tensor([1.0, 1.0, 1.0, float("nan")]).numpy()
    assert _compare(Session(bad), x, ref, "m", ["input"])[1] == float("inf")
    assert _compare(Session(torch.ones(4).numpy()), x, [torch.tensor([1.0, 1, 1, float("inf")])], "m",
                    ["input"])[1] == float("inf")


def test_onnx_feeds_inputs_by_name_and_checks_its_arguments(tmp_path):
    pytest.importorskip("onnxruntime")

    class SecondOnly(nn.Module):  # the exporter drops the unused first input from the graph
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, a, b):
            return self.conv(b)

    res = export_onnx(SecondOnly(), (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)), tmp_path / "s.onnx")
    assert res["max_rel_diff"] < 1e-5  # a fed to input1 failed the check
    for kwargs, msg in (({"opset": 99}, "`opset` must be an int"), ({"opset": "17"}, "`opset` must be an int"),
                        ({"tol": -1.0}, "`tol` must be a number")):
        with pytest.raises(ValueError, match=msg):
            export_onnx(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 4, 4), tmp_path / "c.onnx", **kwargs)
    with pytest.raises(ValueError, match="`path` .* is a directory"):
        export_onnx(nn.Conv2d(3, 4, 1), torch.randn(1, 3, 4, 4), tmp_path)


def test_onnx_falls_back_to_the_torch_export_exporter(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    real = torch.onnx.export

    def no_torchscript(*a, dynamo=True, **k):
        if not dynamo:
            raise RuntimeError("TorchScript exporter removed")
        return real(*a, dynamo=dynamo, **k)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    x = torch.randn(2, 1, 8, 8)
    model = pruned("tiny_cnn", x)
    res = export_onnx(model, x, tmp_path / "t.onnx")
    assert res["exporter"] == "dynamo" and res["max_rel_diff"] < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.onnx"]  # weights inside, no t.onnx.data
    with pytest.raises(RuntimeError, match="TorchScript exporter removed"):
        export_onnx(model, x, tmp_path / "t2.onnx", dynamo=False)
