"""A pruning run's checkpoints: every finished step saved with the request that made it, so a
killed run resumes where it stopped and a different request is refused rather than mixed in."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from ._io import atomic_write
from .saving import save as save_model
from .distributed import barrier, is_main_process

__all__ = ["RunCheckpoints", "drop_stale_training"]


class RunCheckpoints:
    """Every finished step saved under ``out_dir`` (model + state.json), so a killed run resumes
    where it stopped; a fresh run first clears what an earlier one left. The request records every
    method option's value; one missing from a saved request (an option added since, or a run saved
    when only the options passed were recorded) is read as its ``option_defaults`` value, so such a
    run resumes, while a default that has changed since a run was saved is another request."""

    def __init__(self, model: nn.Module, out_dir: str | Path | None, request: dict,
                 option_defaults: Mapping[str, Any] | None = None) -> None:
        self.out = Path(out_dir) if out_dir is not None else None
        self.enabled = self.out is not None
        self.request = request
        self.defaults = _as_json(dict(option_defaults or {}))
        self.state_path = self.out / "state.json" if self.out is not None else None

    def clear(self) -> None:
        """A fresh run must not pick up the checkpoints of an earlier one."""
        if not self.enabled:
            return
        if is_main_process():
            for stale in (self.out / "steps", self.out / "importance"):
                if stale.exists():
                    shutil.rmtree(stale)
            if self.state_path.exists():
                self.state_path.unlink()
        barrier()

    def load(self) -> dict | None:
        """The saved state of an earlier run of the same request, if any."""
        if not (self.enabled and self.state_path.exists()):
            return None
        try:
            state = json.loads(self.state_path.read_text())
            state["request"], state["completed_steps"]  # noqa: B018 (the keys a resume needs)
            if not isinstance(state["request"], dict) or not isinstance(state["request"].get("method_options", {}), dict):
                raise TypeError("`request` is not a mapping of settings")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{self.state_path} is damaged ({type(err).__name__}: {err}); remove it to start "
                             "afresh, or resume from a copy of the run folder") from err
        now, was = self._flat(_as_json(self.request)), self._flat(state["request"])
        if was != now:
            diff = ", ".join(f"{k}: {was.get(k, '(not set)')!r} then, {now.get(k, '(not set)')!r} now"
                             for k in sorted(set(was) | set(now), key=str) if was.get(k) != now.get(k))
            raise ValueError(f"{self.state_path} was written by a different request ({diff}); use another out_dir "
                             "or the same arguments")
        return state

    def _flat(self, request: dict) -> dict:
        """The request with each method option a key of its own (``method_options.<name>``), the
        missing ones at their defaults: a refusal then names the option that differs."""
        opts = {**self.defaults, **(request.get("method_options") or {})}
        return {**{k: v for k, v in request.items() if k != "method_options"},
                **{f"method_options.{k}": v for k, v in opts.items()}}

    def step_dir(self, k: int) -> Path:
        return self.out / "steps" / f"step{k}"

    def save(self, model: nn.Module, example_inputs: Any, k: int, steps: list, extra: dict) -> None:
        if self.enabled and is_main_process():  # under torchrun every process prunes alike; one writes
            save_model(model, self.step_dir(k), example_inputs)
            state = {"request": self.request, "completed_steps": k, "steps": steps, "extra": extra}
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.state_path, lambda tmp: Path(tmp).write_text(json.dumps(_as_json(state))))


def _as_json(value: Any) -> Any:
    """``value`` as JSON reads it back: tuples as lists, a function or class as its module and
    qualified name (the same in every process, unlike its text), other objects as their text."""
    def name(o: Any) -> str:
        return f"{o.__module__}.{o.__qualname__}" if hasattr(o, "__qualname__") and hasattr(o, "__module__") else str(o)
    return json.loads(json.dumps(value, default=name))


def drop_stale_training(model: nn.Module, folder: Path, log: Callable[..., None]) -> None:
    """A killed step's fine-tuning checkpoint continues only the same cut: a step planned again
    with other widths (a timed latency plan) would fail to load it, so it starts afresh."""
    ckpt = folder / "checkpoint.pt"
    if not ckpt.exists():
        return
    saved = torch.load(ckpt, map_location="meta", weights_only=True).get("model", {})
    now = model.state_dict()
    if saved.keys() != now.keys() or any(tuple(saved[k].shape) != tuple(v.shape) for k, v in now.items()):
        log(f"{folder}: the fine-tuning checkpoint is of another cut of this step; starting it afresh")
        for f in ("checkpoint.pt", "log.csv"):
            (folder / f).unlink(missing_ok=True)
