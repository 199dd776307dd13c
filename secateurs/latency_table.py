"""Per-layer latency tables of the machine the user runs on, and the latency a plan would leave.

MACs are a poor proxy for time: a convolution's latency moves in steps with the hardware's vector
width and blocking, and a small layer costs its fixed overhead whatever its width. So for every
distinct conv/linear shape a model has, the layer is timed on this machine (runtime, threads, the
user's batch) at a grid of output widths (inputs full) and of input widths (outputs full); the
tables are cached in one JSON file per machine and reused by every later prune. A layer's latency
at (in, out) is read off the two curves (a separable model, exact at both edges of the grid), and
the latency of the whole pruned model is the sum over layers plus the rest of the model (norms,
activations, adds), which scales with the activations the plan keeps, less a fixed share that one
measured plan calibrates (:meth:`LatencyModel.calibrate`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ._io import atomic_write
from .cost import count
from .graph import DependencyGraph
from .latency import (cuda_graphed, device_name, layout_of, median, num_threads, runtime_of, synchronised, time_callables,
                      time_models)

__all__ = ["LatencyModel", "default_cache_dir"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_cache_dir() -> Path:
    root = os.environ.get("SECATEURS_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                             "secateurs")
    return Path(root) / "latency"


_FORMAT = 3  # the cache layout, what a layer's key describes and how it is timed (3: on a steady heap): a change starts new files


def _machine_key(threads: int, runtime: str, device: torch.device) -> str:
    if device.type == "cpu":
        where = f"{device_name(device)}|{os.cpu_count()}"
    else:  # what picks a GPU's kernels besides the GPU: autotuning, and TF32 for float32 convs and matmuls
        where = (f"{device_name(device)}|cudnn.benchmark={torch.backends.cudnn.benchmark}|"
                 f"tf32={torch.backends.cudnn.allow_tf32},{torch.backends.cuda.matmul.allow_tf32}")
    text = f"v{_FORMAT}|{where}|torch {torch.__version__}|{threads} threads|{runtime}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_file(cache_dir: str | os.PathLike | None, threads: int, runtime: str,
                device: torch.device = torch.device("cpu")) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"{_machine_key(threads, runtime, device)}.json"


def _read(path: Path) -> dict:
    """The cached tables; a file that is not a JSON object (cut short, edited) counts as empty, so the
    tables are measured again and the file rewritten rather than breaking every later run."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(path: Path, entries: dict) -> None:
    """Add ``entries`` to the machine's cache file (re-read first: another run may have added some)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**_read(path), **entries}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(merged)))


def _grid(full: int, points: int, step: int = 1) -> list[int]:
    """Widths from about full/points to full, evenly spaced, distinct; with ``step``, multiples of it
    (``step`` itself and ``full`` too): the widths a plan rounded to ``step`` can have, so the table
    reads the fast side of the hardware's steps (mobilenet_v2's depthwise convs here: 24 channels took
    1.8x as long as 32), down to the narrowest (below the grid a time shrinks towards zero, which no
    layer's fixed cost does)."""
    if step <= 1 or full <= step:
        return sorted({max(1, round(full * j / points)) for j in range(1, points + 1)})
    return sorted({min(full, max(step, step * round(full * j / points / step))) for j in range(1, points + 1)}
                  | {step, full})


def _interp(curve: list[list[float]], w: float) -> float:
    """Piecewise-linear latency at width ``w`` through the measured (width, seconds) points."""
    if w <= curve[0][0]:
        return curve[0][1] * max(w, 0) / curve[0][0]  # below the grid: shrinks towards zero
    for (w0, t0), (w1, t1) in zip(curve, curve[1:]):
        if w <= w1:
            return t0 + (t1 - t0) * (w - w0) / (w1 - w0)
    return curve[-1][1]


class _Layer:
    """One conv/linear layer: its shape key, and where its kept widths come from in a plan."""

    def __init__(self, name: str, module: nn.Module, x_shape: tuple, y_shape: tuple) -> None:
        self.name = name
        self.linear = isinstance(module, nn.Linear)
        if self.linear and len(x_shape) == 1 or not self.linear and len(x_shape) == module.weight.dim() - 1:
            x_shape, y_shape = (1, *x_shape), (1, *y_shape)  # unbatched: one sample
        self.batch, self.cin = x_shape[0], (x_shape[-1] if self.linear else x_shape[1])
        self.cout = y_shape[-1] if self.linear else y_shape[1]
        self.spatial = tuple(x_shape[2:]) if not self.linear else tuple(x_shape[1:-1])
        self.out_elems = int(torch.Size(y_shape[1:]).numel()) // max(self.cout, 1)
        self.groups = 1 if self.linear else module.groups
        self.depthwise = self.groups > 1 and self.groups == self.cin == self.cout
        conv = {} if self.linear else {k: list(getattr(module, k)) if isinstance(getattr(module, k), tuple)
                                       else getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation")}
        if not self.linear and module.padding_mode != "zeros":  # padded by F.pad before the conv: the input
            conv["padding"] = 0  # recorded is the padded one (the pad itself falls in the rest of the model)
        self.dtype = module.weight.dtype
        self.spec = {"type": type(module).__name__ if isinstance(module, _CONVS) else "Linear", "batch": self.batch,
                     "cin": self.cin, "cout": self.cout, "spatial": list(self.spatial), "groups": self.groups,
                     "bias": module.bias is not None, **conv,
                     **({"dtype": str(self.dtype).replace("torch.", "")} if self.dtype != torch.float32 else {})}
        self.key = json.dumps(self.spec, sort_keys=True)
        self.labels: dict[int, list[torch.Tensor]] = {}  # weight axis -> binding labels

    def build(self, cin: int, cout: int, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
        s = self.spec
        if self.linear:
            m, x = nn.Linear(cin, cout, bias=s["bias"]), torch.randn(self.batch, *self.spatial, cin)
        else:
            groups = cin if self.depthwise else self.groups
            cls = getattr(nn, s["type"])
            m = cls(cin, cout, s["kernel_size"], s["stride"], s["padding"], s["dilation"], groups=groups, bias=s["bias"])
            x = torch.randn(self.batch, cin, *self.spatial)
        return m.to(device, self.dtype), x.to(device, self.dtype)

    def kept(self, axis: int, removed: torch.Tensor, full: int) -> int:
        labs = self.labels.get(axis)
        if not labs:
            return full
        gone = removed[labs[0]]
        for lab in labs[1:]:
            gone = gone | removed[lab]
        return int((~gone).sum())


class LatencyModel:
    """Predicted latency (seconds) of the model a plan leaves, from measured per-layer tables.

    ``model(removed)`` takes the removed-components mask of an :class:`~secateurs.budget.Allocator`.
    The prediction for the unpruned model equals its measured latency by construction.
    """

    def __init__(self, model: nn.Module, graph: DependencyGraph, example_inputs: Any, *, threads: int | None = None,
                 runtime: str = "eager", grid: int = 6, repeats: int = 5, cache_dir: str | os.PathLike | None = None,
                 step: int = 1, log: Callable[..., None] = lambda *a: None) -> None:
        if runtime not in _TABLE_RUNTIMES:
            raise ValueError(f"latency tables are measured on {', '.join(map(repr, _TABLE_RUNTIMES))}, not {runtime!r}")
        self.device = _timing_device(model, runtime)
        # a graphed table's layers take the model's own layout, as its graph replays it
        self.channels_last = (layout_of(model) if runtime == "cuda_graph" else runtime) == "channels_last"
        self.threads = threads or torch.get_num_threads()
        self.runtime, self.grid, self.repeats, self.step = runtime, grid, repeats, step
        self.path = _cache_file(cache_dir, self.threads, _table_runtime(model, runtime), self.device)
        modules = dict(model.named_modules())
        self.layers = [_Layer(l.name, modules[l.name], l.input_shape, l.output_shape)
                       for l in count(model, example_inputs).layers
                       if isinstance(modules.get(l.name), (*_CONVS, nn.Linear)) and l.weight == "weight"]
        for b, lab in zip(graph.bindings, graph.binding_labels):
            if b.kind == "tensor" and b.name == "weight" and b.axis in (0, 1):
                for layer in self.layers:
                    if layer.name == b.module:
                        layer.labels.setdefault(b.axis, []).append(lab)
        self.tables = self._tables(log)
        self.measured_s = time_models({"model": model}, example_inputs, repeats=15, warmup=3, threads=self.threads,
                                      runtime=runtime)["model"].median_s
        self._full = [self._layer_time(layer, layer.cin, layer.cout) for layer in self.layers]
        self.rest_s = max(self.measured_s - sum(self._full), 0.0)
        self._act_full = sum(layer.cout * layer.out_elems for layer in self.layers) or 1
        self.fixed = 0.0  # the share of the rest that stays whatever the widths: see calibrate
        # layers timed alone can add up to more than the model (their own overheads): scale to it
        self._scale = self.measured_s / (sum(self._full) + self.rest_s) if self._full else 1.0

    # -- measuring -------------------------------------------------------------------------------
    def _tables(self, log) -> dict[str, dict]:
        cache = _read(self.path)
        # a stepped table has its own key (its grid: multiples of the step, in the layer's units)
        stored = {layer.key: layer.key + (f"|multiples={s}" if (s := self._units(layer)[1]) > 1 else "")
                  for layer in self.layers}
        missing = {stored[layer.key]: layer for layer in self.layers if stored[layer.key] not in cache}
        if missing:
            log(f"latency tables: timing {len(missing)} layer shape(s) on {device_name(self.device)} ({self.path})")
            with num_threads(self.threads):
                measured = {key: self._measure(layer) for key, layer in missing.items()}
            _store(self.path, measured)
            cache.update(measured)
        return {layer.key: cache[stored[layer.key]] for layer in self.layers}

    def _measure(self, layer: _Layer) -> dict[str, list]:
        torch.manual_seed(0)
        widths, points = {}, []
        axes = ("dw",) if layer.depthwise else ("out", "in")
        unit, step = self._units(layer)
        for axis in axes:
            full = layer.cout if axis != "in" else layer.cin
            for w in _grid(full // unit, self.grid, step):
                w *= unit
                cin, cout = (w, w) if axis == "dw" else (layer.cin, w) if axis == "out" else (w, layer.cout)
                widths[(axis, w)] = (cin, cout)
                points.append((axis, w))
        times = _time_widths(layer, widths, self.device, self.channels_last, self.runtime == "cuda_graph", self.repeats, 2)
        return {axis: [[w, median(times[(a, w)])] for a, w in points if a == axis] for axis in axes}

    def _units(self, layer: _Layer) -> tuple[int, int]:
        """(channels per unit, the plan's step in units): a grouped conv's widths move one channel per
        conv group at a time, so ``round_to`` channels are ``step / gcd(step, groups)`` of its units,
        as :class:`~secateurs.budget.Allocator` rounds a channel group whose unit is one channel per
        conv group (ResNeXt's dense -> grouped -> dense); where a group's unit is coarser, its widths
        are still multiples of this step."""
        unit = layer.groups if (layer.groups > 1 and not layer.depthwise) else 1
        return unit, self.step // math.gcd(self.step, unit)

    # -- predicting ------------------------------------------------------------------------------
    def _layer_time(self, layer: _Layer, cin: int, cout: int) -> float:
        t = self.tables[layer.key]
        if layer.depthwise:
            return _interp(t["dw"], cout)
        full = t["out"][-1][1]
        return _interp(t["out"], cout) * _interp(t["in"], cin) / full if full > 0 else 0.0

    def _parts(self, removed: torch.Tensor) -> tuple[float, float]:
        """(seconds of the conv/linear layers, the share of their output activations kept) under a plan."""
        total, act = 0.0, 0
        for layer in self.layers:
            cout = layer.kept(0, removed, layer.cout)
            if layer.depthwise:
                cin = cout
            elif layer.groups > 1:  # grouped: the same positions leave every group (weight axis 1 is one group's)
                cin = layer.groups * layer.kept(1, removed, layer.cin // layer.groups)
            else:
                cin = layer.kept(1, removed, layer.cin)
            total += self._layer_time(layer, cin, cout)
            act += cout * layer.out_elems
        return total, act / self._act_full

    def __call__(self, removed: torch.Tensor) -> float:
        layers, act = self._parts(removed)
        return self._scale * (layers + self.rest_s * (self.fixed + (1 - self.fixed) * act))

    def calibrate(self, removed: torch.Tensor, ratio: float) -> float:
        """Fit the share of the rest of the model that stays whatever the widths to one measured
        latency ratio of the plan ``removed`` (in [0, 1]; returned). Norms, activations and adds cost
        time in proportion to the activations they touch, plus a fixed cost per op: on a CIFAR
        ResNet at 32px on a CPU mostly the latter, so a rest that shrank with the activations predicted
        0.45 of the dense latency for a plan measured at 0.62."""
        layers, act = self._parts(removed)
        if self.rest_s > 0 and act < 1:
            unexplained = ratio * self.full() / self._scale - layers - self.rest_s * act
            self.fixed = min(max(unexplained / (self.rest_s * (1 - act)), 0.0), 1.0)
        return self.fixed

    def full(self) -> float:
        return self._scale * (sum(self._full) + self.rest_s)


_TABLE_RUNTIMES = ("eager", "channels_last", "cuda_graph")


def _layer_call(layer: _Layer, cin: int, cout: int, device: torch.device, channels_last: bool,
                graphed: bool) -> Callable[[], Any]:
    """One forward of the layer at these widths, as the model's runtime runs it (call under inference_mode)."""
    m, x = layer.build(cin, cout, device)
    m.eval()
    if channels_last and x.dim() == 4:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    call = lambda m=m, x=x: m(x)  # noqa: E731 (the module stays reachable from the call)
    return cuda_graphed(call, device) if graphed else synchronised(call, device)


_STEPS = (1, 2, 4, 8, 16, 32)
_CPU_MAX_STEP = 16
_RULE = 5  # how auto_round_to picks its step, in its cache key: a new rule measures again


def _timing_device(model: nn.Module, runtime: str) -> torch.device:
    """Layers are timed where the model runs (its widths should suit that device's kernels): the
    CPU or a CUDA GPU, whose name joins the cache key."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"latency tables time layers on the CPU or a CUDA GPU, but the model is on {dev}: move it "
                         "to one of those (method='dlp' with a latency target times whole models where they run)")
    if runtime == "cuda_graph" and dev.type != "cuda":
        raise ValueError(f"runtime 'cuda_graph' times layers on a CUDA GPU, but the model is on {dev}")
    return dev


def _table_runtime(model: nn.Module, runtime: str) -> str:
    """The runtime part of the cache key: a graphed table is timed in the model's own layout, so it names it."""
    return f"cuda_graph|{layout_of(model)}" if runtime == "cuda_graph" else runtime


def _time_widths(layer: _Layer, widths: dict, device: torch.device, channels_last: bool, graphed: bool, repeats: int,
                 warmup: int) -> dict:
    """Seconds of every round of the layer at each ``{key: (cin, cout)}``: interleaved, or one width
    at a time when graphed (each graph holds its own memory pool: all of a large layer's at once
    could fill a GPU)."""
    with torch.inference_mode():
        if not graphed:
            calls = {k: _layer_call(layer, cin, cout, device, channels_last, False) for k, (cin, cout) in widths.items()}
            return time_callables(calls, repeats, warmup)
        return {k: time_callables({k: _layer_call(layer, cin, cout, device, channels_last, True)}, repeats, warmup)[k]
                for k, (cin, cout) in widths.items()}


def auto_round_to(model: nn.Module, example_inputs: Any, *, threads: int | None = None, layers: int = 3,
                  band: int = 64, repeats: int = 5, cache_dir: str | os.PathLike | None = None,
                  runtime: str | None = None, floor: int = 8) -> int:
    """The width multiple on the fast side of this machine's steps, measured (``round_to="auto"``).

    The model's largest conv layers (and its largest depthwise ones, whose widths the 1x1s around
    them share) are timed at every output width in a band around half their width (at most
    ``band``), and a straight line is fitted through those times. A step ``s`` scores the mean
    residual of the widths that are multiples of ``s``: under a staircase (vector width, blocking)
    the right edges of the steps lie below the line, so their multiple wins; on a smooth curve every
    step scores about zero and the smallest is kept. A coarser step must save 1.5x what a finer one
    does: the smallest step within 0.5% of the latency or two thirds of the best step's saving wins.
    Where some of these layers are wide enough to tell every step apart (a band of 64), narrower
    ones are left out, so a narrow layer cannot cap the steps. Steps start at ``floor``: PyTorch
    timing cannot see the runtimes a model is deployed with, and onnxruntime's blocked kernels want multiples of 8
    (CIFAR ResNets, whose eager curve is smooth, pruned at step 1 ran slower than dense there; at
    8 they did not). On a CPU no step above 16 is chosen (vgg16 pruned at 32 ran no faster than at
    16 here, though its wide convs run 32 at a time). Cached per machine, layout
    (``runtime``, default: the model's own) and layer shapes.
    """
    threads = threads or torch.get_num_threads()
    runtime = runtime or runtime_of(model)
    device = _timing_device(model, runtime)  # before anything is timed
    path = _cache_file(cache_dir, threads, _table_runtime(model, runtime), device)
    modules = dict(model.named_modules())
    found = [(l.macs, _Layer(l.name, modules[l.name], l.input_shape, l.output_shape))
             for l in count(model, example_inputs).layers if isinstance(modules.get(l.name), _CONVS) and l.weight == "weight"]
    # dense and depthwise convs (grouped ones have their own steps, in units of their groups)
    ranked = [layer for _, layer in sorted(found, key=lambda p: -p[0])
              if layer.cout >= 4 * floor and (layer.groups == 1 or layer.depthwise)]
    # the narrowest band caps the steps every layer is scored on: where some layers can tell every
    # step of _STEPS apart (32 too, on a CPU as well: there 64-wide layers would let a CIFAR ResNet's
    # 32-wide groups take steps of 16), narrower ones stay out (mobilenet_v2's 32-wide depthwise conv
    # held its 144-wide ones, which run 16 at a time here, to steps of 8)
    ranked = [c for c in ranked if min(band, c.cout // 2) >= 2 * _STEPS[-1]] or ranked
    # depthwise convs are memory-bound: few MACs, yet their own staircase can cost more than the 1x1s'
    top = [c for c in ranked if c.groups == 1][:layers] + [c for c in ranked if c.depthwise][:layers]
    bands = [min(band, layer.cout // 2) for layer in top]
    # two multiples at least in every band; on a CPU at most 16: vgg16's 256-wide convs run 32 at a
    # time here, yet vgg16 pruned at 16 ran as fast at batch 1 and faster at batch 8 (0.95 against
    # 0.92 of the MACs ratio, three pairs of fresh processes): a step of 32 leaves its 64- and
    # 128-wide layers few widths, which no band of the wide layers sees
    cap = _STEPS[-1] if device.type == "cuda" else _CPU_MAX_STEP
    steps = [s for s in _STEPS if floor <= s <= min(min(bands, default=0) // 2, cap)]
    if not steps:
        return floor
    key = f"round_to|{floor}|{_RULE}|" + "|".join(layer.key for layer in top)
    cached = _read(path).get(key)
    if cached is not None:
        return int(cached)
    with num_threads(threads):
        cl = (layout_of(model) if runtime == "cuda_graph" else runtime) == "channels_last"
        scores = [_step_scores(layer, b, repeats, cl, device, runtime == "cuda_graph") for layer, b in zip(top, bands)]
    total = {s: sum(sc[0][s] for sc in scores) for s in steps}
    # a coarser step must earn its keep: it halves the widths to choose from, and the mean residual
    # of its few multiples in the band is noisier. The smallest step within 0.5% of the latency or
    # two thirds of the best saving wins: here 16 saved 90% of what 32 did in mobilenet_v2's bands,
    # yet the model pruned at 16 ran faster than at 32 (0.71/0.84-0.91 against 0.69/0.79 of the MACs
    # ratio): the coarser step leaves the allocation less to choose from, which the bands do not see
    best = min(total.values())
    tol = max(0.005 * sum(sc[1] for sc in scores), -best / 3)
    step = min(s for s in steps if total[s] <= best + tol)
    _store(path, {key: step})
    return step


def _step_scores(layer: _Layer, band: int, repeats: int, channels_last: bool = False,
                 device: torch.device = torch.device("cpu"), graphed: bool = False) -> tuple[dict[int, float], float]:
    """Mean residual (seconds, against a fitted line) of the multiples of each step, and the mean latency."""
    lo = layer.cout // 2 - band // 2
    widths = list(range(lo, lo + band + 1))
    torch.manual_seed(0)
    times = _time_widths(layer, {w: (w if layer.depthwise else layer.cin, w) for w in widths}, device, channels_last,
                         graphed, repeats, 1)
    lat = {w: median(ts) for w, ts in times.items()}
    return step_scores(lat), sum(lat.values()) / len(lat)


def step_scores(lat: dict[int, float]) -> dict[int, float]:
    """For each step, the mean residual of its multiples against the least-squares line of ``lat``."""
    ws = list(lat)
    mw, mt = sum(ws) / len(ws), sum(lat.values()) / len(ws)
    b = sum((w - mw) * (lat[w] - mt) for w in ws) / max(sum((w - mw) ** 2 for w in ws), 1e-12)
    resid = {w: lat[w] - (mt + b * (w - mw)) for w in ws}
    out = {}
    for s in _STEPS:
        mult = [r for w, r in resid.items() if w % s == 0]
        out[s] = sum(mult) / len(mult) if mult else 0.0
    return out
