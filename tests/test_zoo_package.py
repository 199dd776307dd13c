"""The zoo ships inside the package (``secateurs/zoo/``, package data read through
``importlib.resources``), so a non-editable install finds it."""
from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import torch

from secateurs.models import list_pretrained, load_pretrained, zoo_dir

ROOT = Path(__file__).resolve().parents[1]


def _declared_patterns() -> list[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return cfg["tool"]["setuptools"]["package-data"]["secateurs"]


def test_zoo_is_package_data_found_through_importlib_resources(monkeypatch):
    monkeypatch.delenv("SECATEURS_ZOO", raising=False)
    zoo = resources.files("secateurs") / "zoo"
    manifest = json.loads((zoo / "manifest.json").read_text())
    assert str(zoo_dir()) == str(zoo) and list_pretrained() == manifest and "cifar_resnet20_cifar10" in manifest
    patterns = _declared_patterns()
    files = ["zoo/manifest.json"] + [f"zoo/{e['file']}" for e in manifest.values()]
    for f in files:  # every file the zoo needs is there and matched by a declared package-data pattern
        assert (zoo / f.partition("/")[2]).is_file(), f
        assert any(fnmatch.fnmatch(f, p) for p in patterns), f"{f} is not declared as package data: {patterns}"
    assert not (ROOT / "zoo").exists(), "the zoo moved to secateurs/zoo/"
    x = torch.randn(1, 3, 32, 32)
    assert load_pretrained("cifar_resnet20_cifar10")(x).shape == (1, 10)


@pytest.mark.slow
def test_the_wheel_carries_the_zoo(tmp_path):
    """A non-editable build: the wheel holds the manifest and every checkpoint it names (built from a
    copy, since setuptools writes build/ and *.egg-info beside the sources)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "secateurs", src / "secateurs", ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path)
    wheel, = tmp_path.glob("secateurs-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    manifest = json.loads(zipfile.ZipFile(wheel).read("secateurs/zoo/manifest.json"))
    assert {f"secateurs/zoo/{e['file']}" for e in manifest.values()} <= names
