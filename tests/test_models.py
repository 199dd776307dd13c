"""Model registry: every registered model builds, runs, gets gradients and is prunable."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import secateurs
from secateurs.models import create_model, list_models, load_pretrained, register_model
from secateurs.testing import check_equivalence, randomize_norms

INPUT = {"unet": (1, 1, 32, 32), "ternausnet": (1, 3, 64, 64), "tiny_cnn": (1, 1, 8, 8),
         "vgg_small_cifar": (1, 3, 32, 32)}
SMALL = {"unet": {"base": 8, "depth": 2}, "ternausnet": {"base": 4}}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_trains_and_prunes(name):
    torch.manual_seed(0)
    kw = dict(SMALL.get(name, {}))
    shape = INPUT.get(name, (1, 3, 32, 32))
    if name != "tiny_cnn":
        kw["in_chans"] = shape[1]
    m = randomize_norms(create_model(name, **kw))
    x = torch.randn(*shape)
    m.train()
    out = m(torch.cat([x, x + 1]))
    out.float().sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    check_equivalence(m, x)
    before = secateurs.count(m, x).macs
    secateurs.prune(m, x, target={"ratio": 0.5})
    assert m(x).shape == out[:1].shape and secateurs.count(m, x).macs < before


def test_registry_is_strict():
    with pytest.raises(ValueError, match="already registered"):
        register_model("cifar_resnet20")(lambda: None)
    with pytest.raises(ValueError, match="unknown model 'resnet9'; available: alexnet_cifar"):
        create_model("resnet9")
    with pytest.raises(ValueError, match="unknown torchvision model"):
        create_model("torchvision:nope")
    assert create_model("torchvision:resnet18", num_classes=7).fc.out_features == 7


def test_pretrained_round_trip_checks_the_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_ZOO", str(tmp_path))
    torch.manual_seed(0)
    m = create_model("tiny_cnn")
    save_file(m.state_dict(), str(tmp_path / "t.safetensors"))
    entry = {"model": "tiny_cnn", "kwargs": {}, "file": "t.safetensors",
             "sha256": hashlib.sha256((tmp_path / "t.safetensors").read_bytes()).hexdigest()}
    (tmp_path / "manifest.json").write_text(json.dumps({"t": entry}))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(load_pretrained("t")(x), m.eval()(x))
    entry["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps({"t": entry}))
    with pytest.raises(ValueError, match="sha256"):
        load_pretrained("t")
    with pytest.raises(ValueError, match="no pretrained 'u'"):
        load_pretrained("u")
