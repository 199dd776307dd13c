"""Run a model in one train/eval mode and give every module its own mode back afterwards."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["in_mode"]


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool | None = False) -> Iterator[nn.Module]:
    """Restores per module, not ``model.train(was)``: a user's frozen BatchNorm (eval inside a model
    in training mode) must come back frozen from a check forward, a criterion or an evaluation.
    ``training=None`` changes nothing on entry (the caller sets modes) and still restores them."""
    was = [(m, m.training) for m in model.modules()]
    try:  # an overridden train() that raises part-way is undone too
        if training is not None:
            model.train(training)
        yield model
    finally:
        for m, t in was:
            m.training = t
