"""Fixtures shared by the importance-weights test modules (a module's own fixture of the same name wins),
and the one skip for tests that read ../shared/data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import secateurs
from secateurs.data import load_dataset
from secateurs.models import create_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "shared_data(path): skipped unless ../shared/data (path inside it) is beside "
                                       "the checkout")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("shared_data"):
        path = mark.args[0] if mark.args else ""
        if not (SHARED / path).exists():
            pytest.skip(f"../shared/data/{path} is not beside the checkout")


FT = {"epochs": 1, "batch_size": 32, "lr": 0.05, "pad": 1, "quiet": True}  # tests/test_importance.py's fine-tuning


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def trained(digits):
    """tiny_cnn trained 15 epochs on digits (94.2% top-1)."""
    torch.manual_seed(0)
    m = create_model("tiny_cnn")
    secateurs.train.fit(m, digits[0], None, secateurs.train.TrainConfig(**dict(FT, epochs=15)))
    return m.eval()
