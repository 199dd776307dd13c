"""ONNX export with an onnxruntime parity check."""
from __future__ import annotations

import itertools
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["export_onnx"]

_ONNX_HINT = "pip install onnx onnxruntime onnxscript"


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, check: bool = True,
                opset: int | None = None, *, dynamic_batch: bool = True, dynamo: bool | None = None,
                tol: float = 1e-4) -> dict[str, Any]:
    """Export ``model`` (in eval mode) to ONNX and, if ``check``, compare onnxruntime with PyTorch.

    ``dynamo=None`` uses the TorchScript exporter (``dynamo=False``: about 10x faster for CNNs and
    exact), and the torch.export one if that fails or no longer exists; pass True/False to force
    one. Returns ``{"path", "max_abs_diff", "max_rel_diff", "seconds", "exporter", "opset"}``;
    the relative difference is divided by the largest reference magnitude, and ``seconds`` is the
    export time. Raises ``RuntimeError`` when ``max_rel_diff > tol`` (the file is kept to inspect).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    try:
        import onnx
    except ImportError as err:
        raise ImportError(f"export_onnx needs the onnx package: {_ONNX_HINT}") from err
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs) \
        if isinstance(example_inputs, (tuple, list)) else None
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError(f"`example_inputs` must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            ref = _flatten(model(*args))
        in_names = ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
        out_names = ["output"] if len(ref) == 1 else [f"output{i}" for i in range(len(ref))]
        t0 = time.perf_counter()
        exporter = _export(model, args, path, opset, in_names, out_names, ref, dynamic_batch, dynamo)
        seconds = time.perf_counter() - t0
    finally:
        for m, mode in modes.items():
            m.train(mode)

    proto = onnx.load(str(path), load_external_data=False)
    result: dict[str, Any] = {"path": str(path), "max_abs_diff": None, "max_rel_diff": None, "seconds": seconds,
                              "exporter": exporter,
                              "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)}
    if not check:
        return result
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError(f"export_onnx(check=True) needs onnxruntime: {_ONNX_HINT}") from err
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
    outs = sess.run(None, feeds)
    if len(outs) != len(ref):
        raise RuntimeError(f"{path}: onnxruntime gives {len(outs)} outputs, PyTorch {len(ref)}")
    abs_d = rel_d = 0.0
    for i, (o, r) in enumerate(zip(outs, ref)):
        r = r.detach().cpu()
        o = torch.from_numpy(o)
        if o.shape != r.shape:
            raise RuntimeError(f"{path}: output {i} has shape {tuple(o.shape)} in onnxruntime, {tuple(r.shape)} in PyTorch")
        d = (o.double() - r.double()).abs().max().item() if r.numel() else 0.0
        abs_d = max(abs_d, d)
        rel_d = max(rel_d, d / max(r.double().abs().max().item() if r.numel() else 0.0, 1e-12))
    result.update(max_abs_diff=abs_d, max_rel_diff=rel_d)
    if not rel_d <= tol:
        raise RuntimeError(f"{path}: onnxruntime and PyTorch differ by {rel_d:.3g} relative (> {tol:g}), "
                           f"{abs_d:.3g} absolute ({exporter} exporter)")
    return result


def _flatten(out: Any) -> list[torch.Tensor]:
    """Outputs in the order the exporters emit them: tensors, then nested tuples/lists/dicts."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    raise TypeError(f"model outputs must be tensors, or tuples/lists/dicts of them, got {type(out).__name__}")


def _export(model: nn.Module, args: tuple, path: Path, opset: int | None, in_names: list[str], out_names: list[str],
            ref: list[torch.Tensor], dynamic_batch: bool, dynamo: bool | None) -> str:
    batch = args[0].shape[0] if args[0].dim() else None
    batched_in = [n for n, a in zip(in_names, args) if batch is not None and a.dim() and a.shape[0] == batch]
    batched_out = [n for n, r in zip(out_names, ref) if batch is not None and r.dim() and r.shape[0] == batch]
    common = dict(input_names=in_names, output_names=out_names, opset_version=opset, verbose=False)
    first_err = None
    if not dynamo:
        try:
            axes = {n: {0: "batch"} for n in batched_in + batched_out} if dynamic_batch and batch is not None else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # chosen knowingly; see the docstring
                torch.onnx.export(model, args, str(path), dynamo=False, dynamic_axes=axes, **common)
            return "torchscript"
        except Exception as err:
            if dynamo is False:
                raise RuntimeError(f"TorchScript ONNX export failed: {err}") from err
            first_err = err
    try:
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the torch.export ONNX exporter needs onnxscript: {_ONNX_HINT}") from (first_err or err)
    big = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())) > 1.8 * 2**30
    shapes = tuple({0: "batch"} if n in batched_in else None for n, a in zip(in_names, args)) \
        if dynamic_batch and batch is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, args, str(path), dynamo=True, dynamic_shapes=shapes, external_data=big, **common)
    except Exception as err:
        note = f" (the TorchScript exporter failed first: {first_err})" if first_err else ""
        raise RuntimeError(f"torch.export ONNX export failed: {err}{note}") from err
    return "dynamo"
