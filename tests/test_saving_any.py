"""Any pruned model saves without pickle and reloads into a freshly built model of its class
(timm, ultralytics YOLO, a user's own class, a registry model) with the same outputs; a prune
of a model without a spec checkpoints and resumes."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs.data import load_dataset
from secateurs.models import create_model
from secateurs.testing import output_tensors, randomize_norms


class UserNet(nn.Module):
    """A user's own class: functional BN on its own parameters, a residual add, a size attribute."""

    def __init__(self, width: int = 12, classes: int = 10):
        super().__init__()
        self.width = width
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(width))
        self.beta = nn.Parameter(torch.zeros(width))
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("var", torch.ones(width))
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * width, width, 3, padding=1))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(nn.functional.batch_norm(self.stem(x), self.mean, self.var, self.gamma, self.beta,
                                                self.training))
        x = x + self.body(x)
        return self.head(x.mean((2, 3)))


def _timm():
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=10), torch.randn(1, 3, 64, 64)


def _yolo():
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DetectionModel("yolov8n.yaml", verbose=False)
    return build, torch.rand(1, 3, 128, 128)


CASES = {
    "user_class": lambda: (UserNet, torch.randn(2, 1, 8, 8)),
    "registry": lambda: (lambda: create_model("cifar_resnet20"), torch.randn(2, 3, 32, 32)),
    "timm": _timm,
    "yolo": _yolo,
}


def _outputs(model, x):
    with torch.no_grad():
        return output_tensors(model.eval()(x))


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_into_a_fresh_model(name, tmp_path):
    build, x = CASES[name]()
    torch.manual_seed(0)
    model = randomize_norms(build())
    if hasattr(model, "secateurs_spec"):
        del model.secateurs_spec  # saved as any model is: by sizes, not by name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secateurs.prune(model, x, target={"ratio": 0.4})
    ref = _outputs(model, x)
    secateurs.save(model, tmp_path, x)
    assert json.loads((tmp_path / "model.json").read_text())["relative_to"] == "nothing"
    torch.manual_seed(1)
    fresh = build()
    n_fresh = sum(p.numel() for p in fresh.parameters())
    loaded = secateurs.load(tmp_path, model=fresh)
    assert loaded is fresh and not loaded.training
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters()) < n_fresh
    out = _outputs(loaded, x)
    assert [t.shape for t in out] == [t.shape for t in ref]
    for a, b in zip(out, ref):
        assert (a - b).abs().max() <= 1e-6 * max(1.0, b.abs().max().item())
    assert secateurs.count(loaded, x).macs == secateurs.count(model, x).macs


def test_a_model_without_spec_checkpoints_and_resumes(tmp_path, monkeypatch):
    """The checkpointed steps of any model: a run killed in step 2 resumes to the same model."""
    data = load_dataset("digits", "train")
    x = torch.randn(1, 1, 8, 8)
    kw = dict(target={"params": 0.5}, steps=2, data=data, finetune={"epochs": 1, "batch_size": 64, "lr": 0.05})

    def fresh():
        torch.manual_seed(0)
        return UserNet()

    full, _ = secateurs.prune(fresh(), x, out_dir=tmp_path / "full", **kw)
    real_fit = secateurs.pipeline.fit
    calls = []

    def dies_in_step_two(model, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(model, *a, **k)

    monkeypatch.setattr(secateurs.pipeline, "fit", dies_in_step_two)
    with pytest.raises(KeyboardInterrupt):
        secateurs.prune(fresh(), x, out_dir=tmp_path / "cut", **kw)
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["completed_steps"] == 1
    monkeypatch.setattr(secateurs.pipeline, "fit", real_fit)
    resumed, report = secateurs.prune(fresh(), x, out_dir=tmp_path / "cut", resume=True, **kw)
    assert [r["step"] for r in report["steps"]] == [0, 1, 2]
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_spec_that_names_code_is_imported_only_when_trusted(tmp_path, monkeypatch):
    import sys

    model = create_model("tests.test_saving_any:UserNet", trust_code=True, width=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secateurs.prune(model, torch.randn(1, 1, 8, 8), target={"ratio": 0.5})
    secateurs.save(model, tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["spec"] == {"name": "tests.test_saving_any:UserNet",
                                                                          "kwargs": {"width": 8}}
    monkeypatch.delitem(sys.modules, "tests.test_saving_any")  # so that an import would show
    with pytest.raises(ValueError, match="runs code that model.json's author chose .* pass load\\(\\.\\.\\., trust_code=True\\)"):
        secateurs.load(tmp_path)
    assert "tests.test_saving_any" not in sys.modules, "an untrusted spec imported its module"
    loaded = secateurs.load(tmp_path, trust_code=True)
    x = torch.randn(2, 1, 8, 8)
    assert loaded.stem.out_channels == model.stem.out_channels == 4
    assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)


def _crafted(tmp_path, spec: dict):
    """A run folder whose model.json names ``spec`` (its weights file is empty: the build comes first)."""
    from safetensors.torch import save_file

    good = tmp_path / "good"
    secateurs.save(create_model("cifar_resnet20"), good)
    info = json.loads((good / "model.json").read_text())
    info["spec"], info["tensors"], info["aliases"] = spec, {}, {}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps(info))
    save_file({}, str(bad / "model.safetensors"))
    return bad


def test_a_crafted_ultralytics_yaml_path_runs_nothing_without_trust(tmp_path):
    """ultralytics evaluates a model yaml's `activation` as Python: a yaml beside a stranger's
    model.json is code, so it is refused before ultralytics reads it."""
    pytest.importorskip("ultralytics")
    flag = tmp_path / "PWNED"
    (tmp_path / "evil.yaml").write_text(
        f"nc: 2\nactivation: \"__import__('pathlib').Path({str(flag)!r}).write_text('x') or __import__('torch').nn.SiLU()\"\n"
        "backbone:\n  - [-1, 1, Conv, [8, 3, 2]]\nhead:\n  - [[0], 1, Detect, [nc]]\n")
    for name in (f"ultralytics:{tmp_path / 'evil.yaml'}", "ultralytics:evil.yaml"):
        with pytest.raises(ValueError, match="runs code that model.json's author chose"):
            secateurs.load(_crafted(tmp_path / name.replace("/", "_"), {"name": name, "kwargs": {}}))
    assert not flag.exists()


def test_a_crafted_spec_cannot_ask_for_downloaded_weights(tmp_path):
    with pytest.raises(ValueError, match="without downloading weights, got weights='DEFAULT'"):
        secateurs.load(_crafted(tmp_path, {"name": "torchvision:resnet18", "kwargs": {"weights": "DEFAULT"}}))
    with pytest.raises(ValueError, match="without downloading weights, got weights='DEFAULT'"):
        create_model("torchvision:resnet18", weights="DEFAULT")


@pytest.mark.slow
def test_torchrun_prunes_checkpoints_and_resumes_a_user_class(tmp_path):
    """Two CPU processes on the user's own class named module:callable: one writes the steps; a
    killed run (state.json rolled back to step 1) resumes under torchrun to the same model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "secateurs.cli",
           "prune", "--model", "tests.test_saving_any:UserNet", "--model-arg", "width=12", "--data", "digits",
           "--params", "0.5", "--steps", "2", "--finetune-epochs", "1", "--batch-size", "32", "--lr", "0.05",
           "--input-size", "1", "1", "8", "8", "--no-latency", "--no-onnx", "--quiet", "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=root, timeout=600)
    first = secateurs.load(out, trust_code=True)
    assert first.stem.out_channels < 12
    state = json.loads((out / "state.json").read_text())
    assert state["completed_steps"] == 2
    state.update(completed_steps=1, steps=state["steps"][:2])  # as if killed after step 1
    (out / "state.json").write_text(json.dumps(state))
    subprocess.run([*cmd, "--resume"], check=True, env=env, cwd=root, timeout=600)
    again = secateurs.load(out, trust_code=True)
    a, b = first.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _ScaledChannels(nn.Module):
    """A per-channel scale kept outside the state_dict (non-persistent), which pruning resizes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("scale", torch.linspace(0.5, 2, 8), persistent=False)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)) * self.scale.view(1, -1, 1, 1))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3.weight = self.c2.weight
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))))


@pytest.mark.parametrize("build", [_ScaledChannels, _Tied], ids=["non-persistent buffer", "tied weight"])
def test_pruned_models_with_buffers_outside_the_state_dict_or_tied_weights_round_trip(build, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        secateurs.prune(model, x, target={"ratio": 0.4})
    if build is _Tied:  # every owner of the tied weight says its new size
        assert model.c3.weight is model.c2.weight and model.c3.out_channels == model.c2.weight.shape[0] < 8
    secateurs.save(model, tmp_path)
    loaded = secateurs.load(tmp_path, model=build())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_load_honours_map_location_and_json_strings_stay_as_written(tmp_path):
    model = create_model("cifar_resnet20")
    secateurs.save(model, tmp_path, extra={"cmd": "a[  b , c  ]", "shape": [1, 2]})
    assert json.loads((tmp_path / "model.json").read_text())["extra"] == {"cmd": "a[  b , c  ]", "shape": [1, 2]}
    assert all(p.is_meta for p in secateurs.load(tmp_path, map_location="meta").parameters())
    with pytest.raises(ValueError, match="`map_location` must name a device"):
        secateurs.load(tmp_path, map_location="nowhere")


def test_a_crafted_size_description_cannot_set_dunder_attributes(tmp_path):
    model = create_model("cifar_resnet20")
    secateurs.save(model, tmp_path)
    info = json.loads((tmp_path / "model.json").read_text())
    info["modules"] = {"conv1": {"class": "torch.nn.modules.conv.Conv2d", "attrs": {"__dict__": {}}}}
    (tmp_path / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="'__dict__' is not an attribute name"):
        secateurs.load(tmp_path)


def _legacy_weight_norm() -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated, still in use
        wn = nn.utils.weight_norm(nn.Conv2d(8, 8, 3, padding=1))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), wn, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_a_legacy_weight_norm_model_is_copied_pruned_in_steps_and_loaded_into(tmp_path):
    """Its computed ``weight`` attribute is no graph leaf: a plain deepcopy raises, so loading into a
    given model (edited aside) and a multi-step prune (which keeps the original) failed."""
    import copy

    from secateurs._state import copy_model

    m, x = _legacy_weight_norm(), torch.randn(2, 3, 16, 16)
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(m)
    twin = copy_model(m)
    assert torch.equal(twin(x), m(x)) and twin[3].weight_g is not m[3].weight_g
    m[0].cached = m[0].weight * 1.0  # any other non-leaf attribute: still refused, not silently unaliased
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy_model(m)
    del m[0].cached
    pruned, report = secateurs.prune(m, x, "l1", 0.85, steps=2, quiet=True)
    assert 0.75 < report["kept"]["macs"] <= 0.85  # the weight-normed conv's MACs shrink with weight_v
    run = tmp_path / "run"
    secateurs.save(pruned, run, x)
    fresh = _legacy_weight_norm()
    loaded = secateurs.load(run, fresh)
    assert loaded is fresh and torch.equal(loaded(x), pruned(x))
