"""Measured latency that can be compared: one harness for the API, the CLI report and the benchmarks.

Two models timed minutes apart on a shared CPU can differ by more than pruning saves, so models
that are compared are timed *interleaved* (one forward of each in turn, the order rotated every
round) after a warm-up, and each gets the median of its rounds with a distribution-free 95%
interval of that median (order statistics), the thread count and the runtime it ran on. Every
round runs on a heap that keeps its freed pages (``secateurs._heap``): glibc otherwise hands them
back, and which model then pays the page faults depended on what had run before.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn

from ._heap import steady_heap
from ._layout import channels_last_only
from ._modes import in_mode
from ._state import copy_model
from ._validation import check_choice, check_scalar

__all__ = ["Timing", "RUNTIMES", "runtime_of", "layout_of", "cuda_graphed", "time_models", "latency_ratio", "time_callables", "median", "measure_latency", "compare_dense_pruned",
           "cpu_name", "device_name", "num_threads", "synchronised"]

RUNTIMES = ("eager", "channels_last", "onnxruntime", "cuda_graph")


@dataclass(frozen=True)
class Timing:
    """One model's latency: median seconds per forward and the 95% interval of that median."""

    median_s: float
    low_s: float
    high_s: float
    repeats: int
    threads: int
    runtime: str
    batch: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def runtime_of(model: nn.Module) -> str:
    """How a latency search times ``model``: on a CUDA GPU, ``"cuda_graph"`` (its forward replayed
    from a CUDA graph, in its own layout and dtype), since eager PyTorch there is bound by launching
    kernels from Python, a cost no channel removal shrinks and deployed runtimes (TensorRT,
    ``torch.compile(mode="reduce-overhead")``) remove; on the CPU its layout (:func:`layout_of`)."""
    if next((p.is_cuda for p in model.parameters()), False):
        return "cuda_graph"
    return layout_of(model)


def layout_of(model: nn.Module) -> str:
    """``"channels_last"`` for a model whose convolutions are stored channels-last (as fine-tuning
    with ``channels_last=True`` leaves them), else ``"eager"``: the two layouts run by different
    kernels, so a latency search must time the layout the model will run in."""
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Conv2d) and isinstance(w, torch.Tensor) and (cl := channels_last_only(w)) is not None:
            return "channels_last" if cl else "eager"
    return "eager"


def _median_interval(times: list[float]) -> tuple[float, float, float]:
    """The median and the order statistics bracketing it with >= 95% confidence: exact ranks from
    binomial(n, 1/2). Below 6 values no pair reaches 95% and the whole range is returned (the
    timing functions ask for 6 rounds at least, so no interval they report claims more than it has)."""
    xs = sorted(times)
    n = len(xs)
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    # [x_(j), x_(n+1-j)] misses the median with probability 2 P(B <= j - 1): the largest j with that <= 5%
    j, tail = 1, 2 * 0.5 ** n
    while j < n // 2 and tail + 2 * math.comb(n, j) * 0.5 ** n <= 0.05:
        tail += 2 * math.comb(n, j) * 0.5 ** n
        j += 1
    return med, xs[j - 1], xs[n - j]


def _as_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError(f"`example_inputs` must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    return tuple(inputs)


def _runner(model: nn.Module, inputs: tuple, runtime: str) -> Callable[[], Any]:
    """A no-argument callable that runs one forward of ``model`` (eager, channels-last or a CUDA graph's replay)."""
    m = model
    if runtime == "channels_last":
        m = copy_model(model).to(memory_format=torch.channels_last)
        inputs = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs)
    m.eval()
    gpu = next((t.device for t in inputs if t.is_cuda), None) or next((p.device for p in m.parameters() if p.is_cuda), None)
    if runtime == "cuda_graph":
        if gpu is None:
            raise ValueError("runtime 'cuda_graph' times a model on a CUDA GPU: move the model and `example_inputs` there")
        if not all(t.is_cuda for t in inputs):  # the model moves a CPU input itself: a copy no graph can hold
            warnings.warn("runtime 'cuda_graph' needs every input on the GPU, and one is on the CPU: timed eager, "
                          "launches included", stacklevel=4)
            return synchronised(lambda: m(*inputs), gpu)
        return cuda_graphed(lambda: m(*inputs), gpu)
    return synchronised(lambda: m(*inputs), gpu)


def cuda_graphed(fn: Callable[[], Any], device: torch.device | None = None) -> Callable[[], Any]:
    """``fn`` (a forward on fixed tensors on the CUDA ``device``, default the current one) captured
    once in a CUDA graph: the callable replays it, waits for it and returns its output, so its time
    is the kernels' and not Python's launching of them. Warmed up on a side stream first, as capture
    requires (cuDNN autotunes there too). A forward that synchronises with the host cannot be
    captured, and a failed capture can leave CUDA's state broken, so one more warm-up forward runs
    with synchronisations made errors first; such a forward is timed eager, with a warning."""
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(device):  # streams, capture and replay on the model's GPU, not the current one
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
            syncs = _host_sync(fn)
        torch.cuda.current_stream().wait_stream(side)
        if syncs is not None:
            return _eager_instead(fn, syncs, device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = fn()
        except RuntimeError as err:
            return _eager_instead(fn, err, device)

    def replay() -> Any:
        with torch.cuda.device(device):
            graph.replay()
        return out  # the static output each replay rewrites

    replay.captured = fn  # what the graph reads (weights, inputs) lives as long as the replay
    return synchronised(replay, device)


def synchronised(fn: Callable[[], Any], device: torch.device | None) -> Callable[[], Any]:
    """``fn`` that returns only once its kernels on the CUDA ``device`` have run: they are
    asynchronous, so an unsynchronised clock would time the launch, not the work. ``fn`` itself
    for the CPU (or ``None``)."""
    if device is None or device.type != "cuda":
        return fn

    def run_cuda() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return run_cuda


def _host_sync(fn: Callable[[], Any]) -> Exception | None:
    """The error a forward raises where it synchronises with the host (which capture forbids), if it does."""
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as err:
        return err
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    return None


def _eager_instead(fn: Callable[[], Any], err: Exception, device: torch.device) -> Callable[[], Any]:
    warnings.warn(f"the forward could not be captured in a CUDA graph ({str(err).splitlines()[0]}): timed eager, "
                  "launches included", stacklevel=3)
    torch.cuda.synchronize(device)
    return synchronised(fn, device)


def time_models(models: Mapping[str, nn.Module], example_inputs: Any, *, repeats: int = 30, warmup: int = 5,
                threads: int | None = None, runtime: str = "eager") -> dict[str, Timing]:
    """Time ``models`` interleaved on the same inputs; ``{name: Timing}``.

    Models are left in the mode they were in; ``threads`` (default: torch's current count) is set
    for the measurement only.
    """
    times, threads, batch = _timed(models, example_inputs, repeats, warmup, threads, runtime)
    return {name: Timing(*_median_interval(ts), repeats=len(ts), threads=threads, runtime=runtime, batch=batch)
            for name, ts in times.items()}


def _timed(models: Mapping[str, nn.Module], example_inputs: Any, repeats: int, warmup: int, threads: int | None,
           runtime: str) -> tuple[dict[str, list[float]], int, int]:
    """Seconds of every round of each model (round ``r`` of every model ran back to back), the
    thread count and the batch size."""
    check_choice(runtime, "runtime", RUNTIMES)
    repeats = check_scalar(repeats, "repeats", int, min_val=6)  # fewer rounds bound no 95% interval
    warmup = check_scalar(warmup, "warmup", int, min_val=0)
    if not models or not all(isinstance(m, nn.Module) for m in models.values()):
        raise TypeError("`models` must be a non-empty {name: nn.Module} mapping")
    inputs = _as_inputs(example_inputs)
    threads = check_scalar(threads, "threads", int, min_val=1) if threads is not None else torch.get_num_threads()
    with contextlib.ExitStack() as kept:  # _runner and the export set eval mode; each module's comes back
        for m in models.values():
            kept.enter_context(in_mode(m, training=None))
        if runtime == "onnxruntime":
            times = _ort_timed(models, inputs, repeats, warmup, threads)
        else:
            with num_threads(threads), torch.inference_mode():
                times = time_callables({name: _runner(m, inputs, runtime) for name, m in models.items()}, repeats, warmup)
    return times, threads, int(inputs[0].shape[0]) if inputs[0].dim() else 1


def _ort_timed(models: Mapping[str, nn.Module], inputs: tuple, repeats: int, warmup: int,
               threads: int) -> dict[str, list[float]]:
    """onnxruntime rounds, timed by ``secateurs._ort_timer`` in a fresh process (why: its docstring)."""
    import numpy as np

    from .export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        tags = {f"m{i}": name for i, name in enumerate(models)}
        for tag, name in tags.items():
            export_onnx(models[name], inputs, Path(tmp) / f"{tag}.onnx", check=False, dynamic_batch=False)
        np.savez(Path(tmp) / "inputs.npz", *[t.detach().cpu().numpy() for t in inputs])
        cmd = [sys.executable, "-m", "secateurs._ort_timer", tmp, str(repeats), str(warmup), str(threads), *tags]
        # this very package, installed or not (a script may import it from a path the child does not know)
        path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"timing on onnxruntime failed:\n{done.stderr[-2000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return {tags[tag]: ts for tag, ts in times.items()}


def latency_ratio(dense: nn.Module, pruned: nn.Module, example_inputs: Any, *, threads: int | None = None,
                  runtime: str | None = None, repeats: int = 15, warmup: int = 3) -> float:
    """Median of the per-round ratios pruned / dense (the two run back to back), timed interleaved in
    the layout ``dense`` runs in (unless ``runtime`` says otherwise): the one confirming measurement
    every latency search stops on."""
    times, _, _ = _timed({"dense": dense, "pruned": pruned}, example_inputs, repeats, warmup, threads,
                         runtime or runtime_of(dense))
    return _paired(times["pruned"], times["dense"])[0]


def _paired(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and 95% interval of the per-round ratios ``num / den``: round ``r`` of both ran back to
    back, so a slow spell of the machine falls on both and cancels."""
    return _median_interval([a / b for a, b in zip(num, den)])


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads, then put the count back."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_callables(run: Mapping[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of every call of each callable, run in rounds with a rotating order, on a heap that
    keeps its pages (``secateurs._heap``: else a forward's time depends on what ran before it)."""
    names = list(run)
    times: dict[str, list[float]] = {name: [] for name in names}
    with steady_heap():
        for _ in range(warmup):
            for name in names:
                run[name]()
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no model always runs first
                t0 = time.perf_counter()
                run[name]()
                times[name].append(time.perf_counter() - t0)
    return times


def median(times: list[float]) -> float:
    return _median_interval(times)[0]


def measure_latency(model: nn.Module, example_inputs: Any, repeats: int = 30, warmup: int = 5,
                    threads: int | None = None, runtime: str = "eager") -> float:
    """Median seconds of one eval-mode forward (a shortcut of :func:`time_models` for one model)."""
    return time_models({"model": model}, example_inputs, repeats=repeats, warmup=warmup, threads=threads,
                       runtime=runtime)["model"].median_s


def compare_dense_pruned(dense: nn.Module, pruned: nn.Module, example_inputs: Any, *, batches: tuple[int, ...] = (1, 8),
                         repeats: int = 30, threads: int | None = None, runtime: str = "eager",
                         max_seconds: float | None = None) -> dict[str, Any]:
    """The report's latency guard: dense and pruned timed interleaved at each batch size.

    ``speedup`` is the median of the per-round ratios dense / pruned (the two ran back to back, so a
    slow spell of a shared machine falls on both), with its 95% interval; ``slower`` lists the batch
    sizes where that interval lies below 1, which the report and the CLI state loudly. A batch that
    comes out slower is timed a second time and stays slower only if that timing alone says so too
    (a spell can fall unevenly on the two models for a whole timing: a 32px ResNet-56 read 0.95x in
    one onnxruntime timing and 1.10x in three fresh processes); its row then pools both timings'
    rounds and records ``timings: 2`` and each one's speed-up, so the figure does not lean on whichever
    came out faster. ``max_seconds`` bounds the guard's time: the first batch size is always timed; a
    later one, or a second timing, whose estimate (the slower model's time per sample at the first x
    batch x rounds x 2 models) would pass the bound is not run (a batch goes to ``skipped``, a
    slower verdict stays with ``confirmed: False``) rather than timed with fewer rounds (a U-Net on
    700x1100 frames takes minutes at batch 8).
    """
    xs = _as_inputs(example_inputs)
    out: dict[str, Any] = {"runtime": runtime, "repeats": repeats, "rows": [], "slower": [], "skipped": []}
    t0, per_sample = time.perf_counter(), None

    def fits(b: int) -> tuple[bool, float]:
        estimate = 2 * (repeats + 5) * per_sample * b if per_sample is not None else 0.0
        return max_seconds is None or per_sample is None or time.perf_counter() - t0 + estimate <= max_seconds, estimate

    for b in batches:
        xb = tuple(x[:1].expand(b, *x.shape[1:]).contiguous(memory_format=_format_of(x)) for x in xs)  # every input at batch b
        xb = xb[0] if len(xb) == 1 else xb
        ok, estimate = fits(b)
        if not ok:
            out["skipped"].append({"batch": b, "estimated_s": round(estimate, 1)})
            continue
        times, out["threads"], _ = _timed({"dense": dense, "pruned": pruned}, xb, repeats, 5, threads, runtime)
        row = _guard_row(b, times)
        per_sample = per_sample or max(row["dense_ms"], row["pruned_ms"]) / 1e3 / b
        slower = row["speedup_interval"][1] < 1.0
        if slower and fits(b)[0]:
            again, _, _ = _timed({"dense": dense, "pruned": pruned}, xb, repeats, 5, threads, runtime)
            second, _, second_hi = _paired(again["dense"], again["pruned"])
            slower = second_hi < 1.0
            pooled = _guard_row(b, {k: times[k] + again[k] for k in times})
            row = {**pooled, "timings": 2, "timing_speedups": [row["speedup"], second]}
        elif slower:
            row["confirmed"] = False
        out["rows"].append(row)
        if slower:
            out["slower"].append(b)
    return out


def _guard_row(b: int, times: dict[str, list[float]]) -> dict[str, Any]:
    (d, d_lo, d_hi), (p, p_lo, p_hi) = _median_interval(times["dense"]), _median_interval(times["pruned"])
    speedup, s_lo, s_hi = _paired(times["dense"], times["pruned"])
    return {"batch": b, "dense_ms": 1e3 * d, "pruned_ms": 1e3 * p,
            "dense_interval_ms": [1e3 * d_lo, 1e3 * d_hi], "pruned_interval_ms": [1e3 * p_lo, 1e3 * p_hi],
            "speedup": speedup, "speedup_interval": [s_lo, s_hi]}


def _format_of(x: torch.Tensor) -> torch.memory_format:
    """A channels-last input stays channels-last at every batch (a graph replays the layout it was given)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def cpu_name() -> str:
    """The processor, for stating where a latency was measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or os.uname().machine


def device_name(device: torch.device | str = "cpu") -> str:
    """Where a latency was measured: the CPU, or the GPU with the CUDA and cuDNN builds that pick its kernels."""
    device = torch.device(device)
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()})")
    if device.type != "cpu":
        return device.type
    return cpu_name()
