"""Every bad input gets a clear error of a standard type naming the argument or module, and the
user's model is left bit-for-bit unchanged (issue 17).

One table drives the test and the documentation: each :class:`Case` is what a user does, the
exception it must raise and a substring its message must contain. ``docs/bad_inputs.md`` is
generated from the table (``python -m tests.test_bad_inputs --write-doc``) and checked current.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import secateurs
from secateurs import PruningError
from secateurs.cli import main as cli
from secateurs.data import ArrayDataset, load_dataset
from secateurs.models import create_model
from secateurs.train import TrainConfig, evaluate, fit

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
X_NAN = X.clone().index_put_((torch.tensor([0]),) * 4, torch.tensor(float("nan")))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_cnn", in_chans=3, width=8).eval()


def with_value(where: str, value: float) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        m = tiny()
        with torch.no_grad():
            dict(m.named_parameters(), **dict(m.named_buffers()))[where].view(-1)[0] = value
        return m
    return build


def on_meta() -> nn.Module:
    with torch.device("meta"):
        return create_model("tiny_cnn", in_chans=3, width=8)


def toy(n: int = 8, chans: int = 3, classes: int = 2) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset("toy", torch.randint(0, 255, (n, chans, 32, 32), generator=g, dtype=torch.uint8),
                        torch.arange(n) % classes, [f"c{i}" for i in range(classes)])


@dataclass
class Env:
    """What a case's call gets: the model handed to the user's call, a scratch folder, monkeypatch."""

    model: Any
    tmp: Path
    monkeypatch: pytest.MonkeyPatch


@dataclass(frozen=True)
class Case:
    id: str
    does: str  # what the user does (the doc's first column)
    error: type
    match: str  # a substring of the message: it names the argument, module or file
    call: Callable[[Env], Any]
    model: Callable[[], Any] | None = tiny  # the model the call receives; None: no model involved
    was: str = ""  # what happened before issue 17 ("" : the guard was already there)
    after: Callable[[Env], None] | None = None  # further checks once it has raised (no half-written file...)
    model_kept: bool = True  # False only where the failure comes after the cut (the doc says so)
    xfail: str = ""  # not fixed here: why, and whose file it is in


# -- helpers for the files cases ---------------------------------------------------------------------
def saved(e: Env, tamper: Callable[[Path], None] | None = None) -> Path:
    run = e.tmp / "run"
    secateurs.save(tiny(), run, X)
    if tamper is not None:
        tamper(run)
    return run


def edit_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def tamper(run: Path) -> None:
        info = json.loads((run / "model.json").read_text())
        change(info)
        (run / "model.json").write_text(json.dumps(info))
    return tamper


def truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def tamper(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[:int(len(data) * keep)])
    return tamper


def flip_header(run: Path) -> None:
    data = bytearray((run / "model.safetensors").read_bytes())
    data[10:40] = b"\xff" * 30  # inside the JSON header
    (run / "model.safetensors").write_bytes(bytes(data))


def finished_run(e: Env, **kw) -> Path:
    """A run folder as a finished (or killed after step 1) run leaves it."""
    out = e.tmp / "out"
    secateurs.prune(tiny(), X, "l1", 0.5, out_dir=out, **kw)
    return out


def full_disk(e: Env) -> None:
    """Every rename onto a real file fails as on a full disk (the temporary file was written)."""
    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    e.monkeypatch.setattr(os, "replace", replace)


def disk_fills_in_weights(e: Env) -> None:
    """The weights file is half written when the disk fills up."""
    import safetensors.torch

    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    e.monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def read_only(e: Env) -> None:
    """A folder where no file can be created (as root, chmod would not stop the writes)."""
    import tempfile

    def mkstemp(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    e.monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def no_files_left(folder: str) -> Callable[[Env], None]:
    def check(e: Env) -> None:
        left = [p for p in (e.tmp / folder).rglob("*") if p.is_file()] if (e.tmp / folder).exists() else []
        assert not left, f"files left behind: {left}"
    return check


def no_partial_files(folder: str) -> Callable[[Env], None]:
    def check(e: Env) -> None:
        bad = [p for p in (e.tmp / folder).rglob("*") if p.suffix == ".tmp" or p.name == "model.safetensors"]
        assert not bad, f"half-written files left behind: {bad}"
    return check


def graph_of(model: nn.Module) -> Any:
    return secateurs.analyze(model, X)


P = secateurs.prune
CASES: list[Case] = [
    # -- the model ---------------------------------------------------------------------------------
    Case("prune-model-str", "`prune('resnet50', x, ...)`: a name instead of a module", TypeError, "`model` must be a torch.nn.Module",
         lambda e: P("resnet50", X, "l1", 0.5), model=None, was="AttributeError: 'str' object has no attribute 'modules'"),
    Case("prune-nan-weights", "`prune(model, ...)` on a model with a NaN weight", ValueError, "parameter '0.weight' holds 1 NaN",
         lambda e: P(e.model, X, "l1", 0.5), model=with_value("0.weight", float("nan")), was="accepted; the scores were NaN"),
    Case("prune-inf-buffer", "`prune(model, ...)` on a model with an infinite BN running_var", ValueError,
         "buffer '1.running_var' holds 1 infinite", lambda e: P(e.model, X, "l1", 0.5),
         model=with_value("1.running_var", float("inf")), was="accepted silently"),
    Case("prune-meta-model", "`prune(model, ...)` on a model built on the meta device (no weights)", ValueError,
         "'0.weight' is on the meta device", lambda e: P(e.model, X, "l1", 0.5), model=on_meta,
         was="NotImplementedError: Cannot copy out of meta tensor"),
    Case("count-model-str", "`count('resnet50', x)`", TypeError, "`model` must be a torch.nn.Module",
         lambda e: secateurs.count("resnet50", X), model=None, was="AttributeError: 'str' object has no attribute 'modules'"),
    Case("analyze-model-none", "`analyze(None, x)`", TypeError, "`model` must be a torch.nn.Module",
         lambda e: secateurs.analyze(None, X), model=None),
    # -- example_inputs ----------------------------------------------------------------------------
    Case("prune-inputs-str", "`prune(model, 'cat.jpg', ...)`: a string as example_inputs", TypeError,
         "`example_inputs` must be a tensor or a tuple of tensors", lambda e: P(e.model, "cat.jpg", "l1", 0.5),
         was="forward() takes 2 positional arguments but 8 were given (the string splatted)"),
    Case("prune-inputs-none", "`prune(model, None, ...)`", TypeError, "`example_inputs` must be a tensor",
         lambda e: P(e.model, None, "l1", 0.5), was="TypeError: 'NoneType' object is not iterable"),
    Case("prune-inputs-dict", "`prune(model, {'x': x}, ...)`", TypeError, "got a dict with keys ['x']",
         lambda e: P(e.model, {"x": X}, "l1", 0.5), was="conv2d() received an invalid combination of arguments"),
    Case("count-inputs-empty-tuple", "`count(model, ())`", TypeError, "`example_inputs` must be a tensor or a tuple of tensors",
         lambda e: secateurs.count(e.model, ()), was="forward() missing 1 required positional argument"),
    Case("analyze-inputs-flag", "`analyze(model, (x, 'train'))`: a non-tensor among the inputs", TypeError,
         "holding a str 'train'", lambda e: secateurs.analyze(e.model, (X, "train")),
         was="TypeError not saying which item"),
    Case("count-inputs-batch0", "`count(model, torch.randn(0, 3, 32, 32))`: no sample", ValueError,
         "`example_inputs` (tensor 0) is empty", lambda e: secateurs.count(e.model, torch.randn(0, 3, 32, 32)),
         was="counted as if it were a sample"),
    Case("prune-inputs-nan", "`prune(model, x_with_nan, ...)`", ValueError, "`example_inputs` (tensor 0) holds 1 NaN",
         lambda e: P(e.model, X_NAN, "l1", 0.5), was="accepted"),
    Case("prune-inputs-channels", "`prune(model, torch.randn(1, 5, 32, 32), ...)`: 5 channels for a 3-channel model",
         PruningError, "example_inputs failed in module '0': RuntimeError", lambda e: P(e.model, torch.randn(1, 5, 32, 32), "l1", 0.5)),
    Case("count-inputs-unbatched", "`count(model, torch.randn(3, 32, 32))`: no batch axis", PruningError,
         "example_inputs failed in module '1': ValueError: expected 4D input", lambda e: secateurs.count(e.model, torch.randn(3, 32, 32))),
    Case("analyze-inputs-int", "`analyze(model, torch.randint(0, 255, (1, 3, 32, 32)))`: integer pixels", PruningError,
         "example_inputs failed in module '0'", lambda e: secateurs.analyze(e.model, torch.randint(0, 255, (1, 3, 32, 32)))),
    # -- target, method and their options ----------------------------------------------------------
    *[Case(f"prune-target-{name}", f"`prune(model, x, 'l1', {value!r})`", ValueError, "target is the kept fraction, in (0, 1]",
           lambda e, v=value: P(e.model, X, "l1", v)) for name, value in
      (("0", 0), ("1.5", 1.5), ("neg", -1), ("half", "half"), ("macs-2", {"macs": 2}))],
    Case("prune-target-two-kinds", "`prune(..., target={'macs': 0.5, 'params': 0.5})`", ValueError,
         "a `target` dict takes one budget kind", lambda e: P(e.model, X, "l1", {"macs": 0.5, "params": 0.5}),
         was="PruningError: budget names module 'macs', which the model does not have"),
    Case("prune-target-layer", "`prune(..., target={'layer9': 0.5})`: a module that does not exist", PruningError,
         "budget names module 'layer9'", lambda e: P(e.model, X, "l1", {"layer9": 0.5})),
    Case("prune-method", "`prune(..., method='l7')`", ValueError, "unknown method 'l7'", lambda e: P(e.model, X, "l7", 0.5)),
    Case("prune-allocation", "`prune(..., allocation='greedy')`", ValueError, "`allocation` must be one of global, uniform, latency",
         lambda e: P(e.model, X, "l1", 0.5, allocation="greedy")),
    Case("prune-round-to", "`prune(..., round_to=-8)`", ValueError, "`round_to` must be a positive int",
         lambda e: P(e.model, X, "l1", 0.5, round_to=-8)),
    Case("prune-min-width", "`prune(..., min_width=-1)`", ValueError, "`min_width` must be a positive int",
         lambda e: P(e.model, X, "l1", 0.5, min_width=-1)),
    Case("prune-steps", "`prune(..., steps=0)`", ValueError, "`steps` must be a positive int", lambda e: P(e.model, X, "l1", 0.5, steps=0)),
    Case("prune-ignore-unknown", "`prune(..., ignore=['layer9'])`", PruningError, "`ignore` names module 'layer9'",
         lambda e: P(e.model, X, "l1", 0.5, ignore=["layer9"])),
    Case("prune-ignore-str", "`prune(..., ignore='conv1')`: one name, not a list", PruningError, "`ignore` names module 'conv1'",
         lambda e: P(e.model, X, "l1", 0.5, ignore="conv1"), was="read as the names 'c', 'o', 'n'... ('names module 'c'')"),
    Case("analyze-ignore-int", "`analyze(model, x, ignore=3)`", TypeError, "`ignore` takes a list of modules",
         lambda e: secateurs.analyze(e.model, X, ignore=3), was="TypeError: 'int' object is not iterable"),
    Case("prune-method-options", "`prune(..., 'heuristic', method_options={'foo': 1})`", ValueError,
         "method 'heuristic': HeuristicMethod() got an unexpected keyword argument 'foo'",
         lambda e: P(e.model, X, "heuristic", method_options={"foo": 1})),
    Case("prune-finetune-field", "`prune(..., finetune={'epochz': 1}, data=ds)`", TypeError,
         "`finetune` must hold TrainConfig fields", lambda e: P(e.model, X, "l1", 0.5, finetune={"epochz": 1}, data=toy()),
         was="TypeError: TrainConfig.__init__() got an unexpected keyword argument (no `finetune`)"),
    Case("prune-finetune-distill", "`prune(..., finetune={'distill': 1.5}, data=ds)`: a weight above 1", ValueError,
         "`distill` must be in [0, 1], got 1.5", lambda e: P(e.model, X, "l1", 0.5, finetune={"distill": 1.5}, data=toy())),
    Case("prune-finetune-temperature", "`prune(..., finetune={'distill': 0.5, 'distill_temperature': 0}, data=ds)`",
         ValueError, "`distill_temperature` must be a positive number, got 0",
         lambda e: P(e.model, X, "l1", 0.5, finetune={"distill": 0.5, "distill_temperature": 0}, data=toy())),
    Case("fit-distill-no-teacher", "`fit(model, ds, None, TrainConfig(distill=0.5))`: no teacher", ValueError,
         "`distill` is 0.5: pass `teacher`", lambda e: fit(e.model, toy(), None, TrainConfig(distill=0.5, quiet=True))),
    Case("fit-teacher-classes", "`fit(..., TrainConfig(distill=0.5), teacher=model_with_3_classes)` for a 10-class model",
         ValueError, "`teacher` outputs shape (3,) per sample but the model (10,)",
         lambda e: fit(e.model, toy(), None, TrainConfig(distill=0.5, quiet=True),
                       teacher=create_model("tiny_cnn", in_chans=3, width=8, num_classes=3))),
    Case("prune-tolerance-no-val", "`prune(..., tolerance=1.0)` without `val_data`", ValueError, "`tolerance` needs `val_data`",
         lambda e: P(e.model, X, "l1", 0.5, tolerance=1.0)),
    Case("prune-metric-no-val", "`prune(..., metric='top1')` without `val_data`", ValueError, "`metric` ('top1') needs `val_data`",
         lambda e: P(e.model, X, "l1", 0.5, metric="top1"), was="ignored silently"),
    Case("prune-latency-guard-str", "`prune(..., latency_guard='yes')`", ValueError,
         "`latency_guard` must be True, False or None, got 'yes'", lambda e: P(e.model, X, "l1", 0.5, latency_guard="yes")),
    Case("prune-latency-guard-nested", "`prune(model, ([image],), ..., latency_guard=True)`: inputs the guard cannot batch",
         ValueError, "`latency_guard=True` times batched tensor inputs only",
         lambda e: P(e.model, ([X[0]],), "l1", 0.5, latency_guard=True)),
    Case("time-cuda-graph-on-cpu", "`time_models(models, x, runtime='cuda_graph')` on the CPU", ValueError,
         "runtime 'cuda_graph' times a model on a CUDA GPU", lambda e: secateurs.time_models({"m": e.model}, X,
                                                                                             runtime="cuda_graph")),
    # -- data ----------------------------------------------------------------------------------------
    Case("prune-taylor-no-data", "`prune(..., 'taylor', 0.5)` without `data`", ValueError, "method 'taylor' needs data",
         lambda e: P(e.model, X, "taylor", 0.5)),
    Case("prune-data-channels", "`prune(..., 'taylor', 0.5, data=grey_ds)`: 1-channel images, 3-channel model", ValueError,
         "`data` (toy) has 1-channel images but `example_inputs` has 3", lambda e: P(e.model, X, "taylor", 0.5, data=toy(8, 1)),
         was="raw RuntimeError from a conv while scoring"),
    Case("prune-val-channels", "`prune(..., val_data=grey_ds, tolerance=1)`", ValueError, "`val_data` (toy) has 1-channel images",
         lambda e: P(e.model, X, "l1", 0.5, val_data=toy(8, 1), tolerance=1.0), was="raw RuntimeError from a conv while evaluating"),
    Case("prune-val-batches", "`prune(..., val_data=[(x, y)], tolerance=1)`: batches, not a dataset", TypeError,
         "`val_data` must be a secateurs.data.ArrayDataset", lambda e: P(e.model, X, "l1", 0.5, val_data=[(X, torch.zeros(1))], tolerance=1.0),
         was="AttributeError: 'list' object has no attribute 'task'"),
    Case("prune-data-labels", "`prune(..., 'taylor', 0.5, data=ds)`: 12 classes for a 10-class head", ValueError,
         "`data` (toy) has labels 0..11 but the model outputs 10 classes", lambda e: P(e.model, X, "taylor", 0.5, data=toy(12, classes=12)),
         was="IndexError: Target 10 is out of bounds (naming neither `data` nor the head)"),
    Case("fit-labels", "`fit(model, ds, None, cfg)`: 12 classes for a 10-class head", ValueError,
         "`train_ds` (toy) has labels 0..11 but the model outputs 10 classes",
         lambda e: fit(e.model, toy(12, classes=12), None, TrainConfig(batch_size=4, quiet=True)),
         was="IndexError: Target 10 is out of bounds"),
    Case("evaluate-labels", "`evaluate(model, ds)`: 12 classes for a 10-class head", ValueError,
         "`ds` (toy) has labels 0..11 but the model outputs 10 classes", lambda e: evaluate(e.model, toy(12, classes=12)),
         was="accepted; the labels past the head were counted as wrong"),
    Case("prune-data-empty", "`prune(..., 'taylor', data=ds.subset...)` on an empty dataset", ValueError, "`data` (toy) holds no samples",
         lambda e: P(e.model, X, "taylor", 0.5, data=toy(0)), was="ValueError: criterion 'taylor': `data` yielded no batches, after work"),
    Case("data-unknown", "`load_dataset('imagenet')`", ValueError, "unknown dataset 'imagenet'; available: cifar10",
         lambda e: load_dataset("imagenet"), model=None),
    Case("data-name-none", "`load_dataset(None)`", TypeError, "`name` must be a dataset name", lambda e: load_dataset(None),
         model=None, was="AttributeError: 'NoneType' object has no attribute 'partition'"),
    Case("data-split", "`load_dataset('digits', 'validation')`", ValueError, "`split` must be 'train' or 'test'",
         lambda e: load_dataset("digits", "validation"), model=None),
    Case("data-imagefolder-missing", "`load_dataset('imagefolder:/no/such/dir')`", FileNotFoundError,
         "imagefolder: '/no/such/dir' is not a folder", lambda e: load_dataset("imagefolder:/no/such/dir"), model=None,
         was="FileNotFoundError from iterdir, not saying imagefolder"),
    Case("data-subset-negative", "`ds.subset(-5)`", ValueError, "`n` must be a non-negative int", lambda e: toy().subset(-5),
         model=None, was="returned all but the last 5 samples"),
    # -- apply_plan -----------------------------------------------------------------------------------
    Case("plan-model-str", "`apply_plan('model', graph, plan)`", TypeError, "`model` must be a torch.nn.Module",
         lambda e: secateurs.apply_plan("model", graph_of(tiny()), {0: [0]}), model=None,
         was="AttributeError: 'str' object has no attribute 'named_modules'"),
    Case("plan-graph-str", "`apply_plan(model, 'graph', plan)`", TypeError, "`graph` must be the DependencyGraph",
         lambda e: secateurs.apply_plan(e.model, "graph", {0: [0]}), was="AttributeError: 'str' object has no attribute 'n_components'"),
    Case("plan-float-channels", "`apply_plan(model, graph, {0: [0.5]})`", PruningError, "channel indices must be integers, got [0.5]",
         lambda e: secateurs.apply_plan(e.model, graph_of(e.model), {0: [0.5]}), was="accepted: channel 0 removed"),
    Case("plan-key-str", "`apply_plan(model, graph, {'conv1': [0]})`", TypeError, "`plan` keys must be group indices",
         lambda e: secateurs.apply_plan(e.model, graph_of(e.model), {"conv1": [0]}),
         was="ValueError: invalid literal for int() with base 10: 'conv1'"),
    Case("plan-channels-int", "`apply_plan(model, graph, {0: 3})`", TypeError, "channel indices must be a list of ints",
         lambda e: secateurs.apply_plan(e.model, graph_of(e.model), {0: 3}), was="TypeError: 'int' object is not iterable"),
    Case("plan-unknown-group", "`apply_plan(model, graph, {99: [0]})`", PruningError, "plan names group 99",
         lambda e: secateurs.apply_plan(e.model, graph_of(e.model), {99: [0]})),
    Case("plan-out-of-range", "`apply_plan(model, graph, {0: [8]})`: channel 8 of 8", PruningError, "has channels 0..7; plan asks for [8]",
         lambda e: secateurs.apply_plan(e.model, graph_of(e.model), {0: [8]})),
    Case("plan-all-channels", "`apply_plan(model, graph, {0: range(8)})`", PruningError, "removes all 8 channels",
         lambda e: secateurs.apply_plan(e.model, graph_of(e.model), {0: range(8)})),
    Case("plan-other-graph", "`apply_plan(model, graph_of_another_model, plan)`", PruningError, "analyse",
         lambda e: secateurs.apply_plan(e.model, graph_of(create_model("tiny_cnn", in_chans=3, width=12)), {0: [0]})),
    # -- save / load ----------------------------------------------------------------------------------
    Case("load-no-dir", "`load('runs/typo')`", FileNotFoundError, "`run_dir`", lambda e: secateurs.load(e.tmp / "typo"), model=None),
    Case("load-no-weights", "`load(run)` with model.safetensors deleted", FileNotFoundError, "model.safetensors is missing",
         lambda e: secateurs.load(saved(e, lambda r: (r / "model.safetensors").unlink())), model=None),
    Case("load-truncated-weights", "`load(run)` with model.safetensors cut in half", ValueError, "model.safetensors could not be read",
         lambda e: secateurs.load(saved(e, truncate("model.safetensors"))), model=None),
    Case("load-corrupt-weights", "`load(run)` with bytes of the safetensors header overwritten", ValueError, "could not be read",
         lambda e: secateurs.load(saved(e, flip_header)), model=None),
    Case("load-truncated-json", "`load(run)` with model.json cut in half", ValueError, "model.json is not valid JSON",
         lambda e: secateurs.load(saved(e, truncate("model.json"))), model=None),
    Case("load-json-shape", "`load(run)` with a tensor's shape changed in model.json", ValueError, "'0.weight' has shape [4, 3, 3, 3]",
         lambda e: secateurs.load(saved(e, edit_json(lambda i: i["tensors"].__setitem__("0.weight", [4, 3, 3, 3])))), model=None),
    Case("load-json-model", "`load(run)` with an unknown model name in model.json", ValueError, "cannot rebuild model 'resnet9000'",
         lambda e: secateurs.load(saved(e, edit_json(lambda i: i["spec"].__setitem__("name", "resnet9000")))), model=None),
    Case("load-json-module", "`load(run)` with model.json naming a module the model lacks", ValueError, "names module 'layer9'",
         lambda e: secateurs.load(saved(e, edit_json(lambda i: i["modules"].__setitem__("layer9", {"attrs": {"x": 1}})))), model=None),
    Case("load-json-size-attr", "`load(run)` with a conv's out_channels changed in model.json", ValueError, "out_channels",
         lambda e: secateurs.load(saved(e, edit_json(lambda i: i["modules"].__setitem__("0", {"attrs": {"out_channels": 5}})))),
         model=None, was="loads a model whose conv says 5 channels and holds 8"),
    Case("save-model-str", "`save('model', run)`", TypeError, "`model` must be an nn.Module", lambda e: secateurs.save("m", e.tmp / "r"),
         model=None),
    Case("load-no-spec", "`load(run)` alone, for a model saved without a spec (not built by name)", ValueError,
         "pass `model=` a freshly built model", lambda e: secateurs.load(secateurs.save(e.model, e.tmp / "r")),
         model=lambda: nn.Sequential(nn.Conv2d(3, 4, 3))),
    Case("load-other-class", "`load(run, model=fresh)` with a fresh model of another architecture", ValueError,
         "has module(s) ['1']", lambda e: secateurs.load(secateurs.save(nn.Sequential(nn.Conv2d(3, 4, 3)), e.tmp / "r"),
                                                        model=e.model),
         model=lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())),
    Case("load-code-untrusted", "`load(run)` when model.json names `module:callable` code", ValueError, "trust_code=True",
         lambda e: secateurs.load(saved(e, edit_json(lambda i: i["spec"].__setitem__("name", "os:system")))), model=None),
    Case("save-onto-file", "`save(model, 'notes.txt')`: a file, not a folder", FileExistsError, "notes.txt",
         lambda e: (e.tmp / "notes.txt").write_text("") or secateurs.save(e.model, e.tmp / "notes.txt")),
    Case("save-disk-full", "`save(model, run)` when the disk fills while writing the weights", OSError,
         "No space left on device: '", lambda e: disk_fills_in_weights(e) or secateurs.save(e.model, e.tmp / "run"),
         after=no_partial_files("run"), was="OSError without the file's name"),
    Case("save-read-only", "`save(model, run)` in a folder that cannot be written", PermissionError, "model.safetensors",
         lambda e: read_only(e) or secateurs.save(e.model, e.tmp / "run"), after=no_partial_files("run"),
         was="PermissionError naming nothing"),
    Case("export-model-str", "`export_onnx('model', x, path)`", TypeError, "`model` must be an nn.Module",
         lambda e: secateurs.export_onnx("m", X, e.tmp / "m.onnx"), model=None),
    Case("export-inputs-channels", "`export_onnx(model, torch.randn(1, 5, 32, 32), path)`", ValueError, "example_inputs",
         lambda e: secateurs.export_onnx(e.model, torch.randn(1, 5, 32, 32), e.tmp / "m.onnx"),
         was="raw RuntimeError from the conv"),
    # -- run folders: out_dir and resume --------------------------------------------------------------
    Case("prune-resume-no-out", "`prune(..., resume=True)` without `out_dir`", ValueError, "`resume=True` needs `out_dir`",
         lambda e: P(e.model, X, "l1", 0.5, resume=True), was="ignored: a fresh run"),
    Case("prune-out-is-file", "`prune(..., out_dir='notes.txt')`: a file", ValueError, "`out_dir`",
         lambda e: (e.tmp / "notes.txt").write_text("") or P(e.model, X, "l1", 0.5, out_dir=e.tmp / "notes.txt"),
         was="NotADirectoryError after the model was cut"),
    Case("prune-out-disk-full", "`prune(..., out_dir=run)` on a full disk", OSError, "`out_dir`",
         lambda e: full_disk(e) or P(e.model, X, "l1", 0.5, out_dir=e.tmp / "out"), after=no_files_left("out"),
         was="OSError after the model was cut"),
    Case("prune-out-read-only", "`prune(..., out_dir=run)` in a folder that cannot be written", PermissionError, "`out_dir`",
         lambda e: read_only(e) or P(e.model, X, "l1", 0.5, out_dir=e.tmp / "out"), after=no_files_left("out"),
         was="PermissionError after the model was cut"),
    Case("prune-out-disk-fills", "`prune(..., out_dir=run)` when the disk fills during the step's checkpoint", OSError,
         "No space left on device: '", lambda e: disk_fills_in_weights(e) or P(e.model, X, "l1", 0.5, out_dir=e.tmp / "out"),
         after=no_partial_files("out"), model_kept=False, was="OSError not naming the file"),
    Case("prune-resume-other-args", "`prune(..., 0.7, out_dir=run, resume=True)` after a run with 0.5", ValueError,
         "different request (budget: {'kind': 'macs', 'target': 0.5} then, {'kind': 'macs', 'target': 0.7} now)",
         lambda e: finished_run(e) is None or P(e.model, X, "l1", 0.7, out_dir=e.tmp / "out", resume=True)),
    Case("prune-resume-truncated-step", "`prune(..., resume=True)` with the step's model.safetensors cut in half", ValueError,
         "could not be read", lambda e: (truncate("steps/step1/model.safetensors")(finished_run(e))
                                         or P(e.model, X, "l1", 0.5, out_dir=e.tmp / "out", resume=True))),
    Case("prune-resume-truncated-state", "`prune(..., resume=True)` with state.json cut in half", ValueError, "state.json",
         lambda e: (truncate("state.json")(finished_run(e)) or P(e.model, X, "l1", 0.5, out_dir=e.tmp / "out", resume=True)),
         was="JSONDecodeError not naming the file"),
    # -- the command line ----------------------------------------------------------------------------
    Case("cli-model", "`secateurs analyze --model resnet9000`", SystemExit, "--model: unknown model 'resnet9000'",
         lambda e: cli(["analyze", "--model", "resnet9000"]), model=None),
    Case("cli-data", "`secateurs prune --data imagenet --macs 0.5`", SystemExit, "--data: unknown dataset 'imagenet'",
         lambda e: cli(["prune", "--model", "tiny_cnn", "--data", "imagenet", "--macs", "0.5"]), model=None,
         was="ValueError traceback"),
    Case("cli-model-arg-form", "`secateurs analyze --model tiny_cnn --model-arg width`", SystemExit, "--model-arg must look like KEY=",
         lambda e: cli(["analyze", "--model", "tiny_cnn", "--model-arg", "width"]), model=None),
    Case("cli-model-arg-key", "`secateurs analyze --model tiny_cnn --model-arg wdith=8`", SystemExit, "unexpected keyword argument 'wdith'",
         lambda e: cli(["analyze", "--model", "tiny_cnn", "--model-arg", "wdith=8"]), model=None, was="TypeError traceback"),
    Case("cli-resume-no-out", "`secateurs prune --macs 0.5 --resume`", SystemExit, "--resume needs --out",
         lambda e: cli(["prune", "--model", "tiny_cnn", "--macs", "0.5", "--resume"]), model=None),
    Case("cli-macs", "`secateurs prune --macs 2`", SystemExit, "--macs: a macs target is the kept fraction",
         lambda e: cli(["prune", "--model", "tiny_cnn", "--macs", "2"]), model=None),
    Case("cli-no-budget", "`secateurs prune --model tiny_cnn`: no budget", SystemExit, "give exactly one budget",
         lambda e: cli(["prune", "--model", "tiny_cnn"]), model=None),
    Case("cli-input-size", "`secateurs analyze --input-size 1 -1 32 32`", SystemExit, "--input-size must be positive sizes",
         lambda e: cli(["analyze", "--model", "tiny_cnn", "--input-size", "1", "-1", "32", "32"]), model=None,
         was="RuntimeError: Trying to create tensor with negative dimension"),
    Case("cli-round-to", "`secateurs prune --macs 0.5 --round-to 0`", SystemExit, "--round-to: `round_to` must be a positive int",
         lambda e: cli(["prune", "--model", "tiny_cnn", "--macs", "0.5", "--round-to", "0"]), model=None,
         was="a traceback after the model was built and timed"),
    Case("cli-config", "`secateurs prune --config missing.yaml`", SystemExit, "--config",
         lambda e: cli(["prune", "--config", str(e.tmp / "missing.yaml")]), model=None),
    Case("cli-distill", "`secateurs prune --macs 0.5 --finetune-epochs 1 --distill 1.5`", SystemExit,
         "--distill: `distill` must be in [0, 1], got 1.5",
         lambda e: cli(["prune", "--model", "tiny_cnn", "--data", "digits", "--macs", "0.5", "--finetune-epochs", "1",
                        "--distill", "1.5"]), model=None),
    Case("cli-distill-no-finetune", "`secateurs prune --macs 0.5 --distill 0.5`: nothing to distil into", SystemExit,
         "--distill needs --finetune-epochs",
         lambda e: cli(["prune", "--model", "tiny_cnn", "--macs", "0.5", "--distill", "0.5"]), model=None),
    Case("cli-train-data", "`secateurs train --data bogus`", SystemExit, "secateurs train: unknown dataset 'bogus'",
         lambda e: cli(["train", "--model", "tiny_cnn", "--data", "bogus", "--epochs", "1"]), model=None,
         was="ValueError traceback"),
    Case("cli-train-lr", "`secateurs train --lr -1`", SystemExit, "secateurs train: `lr` must be a positive number",
         lambda e: cli(["train", "--model", "tiny_cnn", "--data", "digits", "--epochs", "1", "--lr", "-1"]), model=None,
         was="ValueError traceback from the optimizer"),
    Case("cli-prune-out-file", "`secateurs prune --out FILE` (a file, not a folder)", SystemExit,
         "secateurs prune: `out_dir`",
         lambda e: (e.tmp / "file").write_text("x") and cli(["prune", "--model", "tiny_cnn", "--macs", "0.5",
                                                             "--out", str(e.tmp / "file")]), model=None,
         was="ValueError traceback"),
    Case("cli-sensitivity-ratios", "`secateurs sensitivity --ratios 1.5`", SystemExit,
         "secateurs sensitivity: `ratios` must be in (0, 1)",
         lambda e: cli(["sensitivity", "--model", "tiny_cnn", "--data", "digits", "--ratios", "1.5"]), model=None,
         was="ValueError traceback"),
    Case("cli-unknown-flag", "`secateurs prune --macz 0.5`", SystemExit, "unrecognized arguments: --macz",
         lambda e: cli(["prune", "--model", "tiny_cnn", "--macz", "0.5"]), model=None),
]


# -- the model left as it was ---------------------------------------------------------------------
def fingerprint(model: Any) -> tuple:
    """The module tree (names, types, modes, simple attributes such as sizes) and every tensor."""
    if not isinstance(model, nn.Module):
        return (repr(model),)
    tree = [(name, type(m).__name__, {k: v for k, v in vars(m).items()
                                      if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple))})
            for name, m in model.named_modules()]
    return tree, {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_meta:
        return True
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def message(err: BaseException, captured: str) -> str:
    if isinstance(err, SystemExit) and not isinstance(err.code, str):
        return captured  # argparse printed it
    return str(err.code) if isinstance(err, SystemExit) else str(err)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [])
                                  for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch, capsys):
    model = case.model() if case.model is not None else None
    before = fingerprint(model)
    env = Env(model, tmp_path, monkeypatch)
    with warnings.catch_warnings(), pytest.raises(case.error) as info:
        warnings.simplefilter("ignore")
        case.call(env)
    assert case.match in message(info.value, capsys.readouterr().err), f"message: {info.value}"
    if case.after is not None:
        case.after(env)
    if model is not None and case.model_kept:
        tree, tensors = fingerprint(model)
        assert tree == before[0], "the module tree or a size attribute changed"
        assert tensors.keys() == before[1].keys()
        changed = [k for k in tensors if not same_bits(tensors[k], before[1][k])]
        assert not changed, f"tensors changed: {changed}"


def test_masks_may_hold_infinities():
    """Attention masks hold -inf on purpose: only parameters and normalisation statistics must be finite."""
    from secateurs._validation import check_model

    m = tiny()
    m.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
    assert check_model(m, values=True) is m


def test_there_are_enough_cases_and_ids_are_unique():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


# -- the doc, generated from the table -------------------------------------------------------------
def render_doc() -> str:
    lines = ["# Bad inputs and the errors they get", "",
             "Generated from the case table of `tests/test_bad_inputs.py` by "
             "`python -m tests.test_bad_inputs --write-doc`; the test checks it is current. Each row is run by "
             "the default suite: the call must raise that exception with a message containing the quoted text, "
             "and the model handed to it must be left bit-for-bit unchanged (tensors, module tree, sizes) unless "
             "the row says otherwise. \"Before\" is what the same call did before issue 17 (empty: the guard "
             "was already there).", "",
             f"{len(CASES)} cases, {sum(bool(c.xfail) for c in CASES)} not fixed yet (marked *open*).", "",
             "| id | what the user does | exception | message contains | before |", "|---|---|---|---|---|"]
    for c in CASES:
        note = f" *open: {c.xfail}*" if c.xfail else ""
        kept = "" if c.model_kept or c.model is None else " (the model was already cut by step 1)"
        lines.append(f"| {c.id} | {_cell(c.does)}{kept} | `{c.error.__name__}` | {_code(c.match)}{note} | {_cell(c.was)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    """A code span that may itself hold backticks."""
    return f"`` {_cell(text)} ``" if "`" in text else f"`{_cell(text)}`"


def test_doc_is_current():
    assert DOC.exists() and DOC.read_text() == render_doc(), "run: python -m tests.test_bad_inputs --write-doc"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-doc"]:
        DOC.write_text(render_doc())
        print(f"wrote {DOC}")
    else:
        sys.exit("usage: python -m tests.test_bad_inputs --write-doc")
