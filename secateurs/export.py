"""ONNX export with an onnxruntime parity check, for any model the engine prunes (outputs may be
nested tuples/lists/dicts); a failed export names the operation and the module where it failed."""
from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from ._modes import in_mode

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
    export time. With ``dynamic_batch`` the check also runs a batch twice as large (the example and
    its mirror image), since the batch axis is declared dynamic. Raises ``RuntimeError`` when
    ``max_rel_diff > tol`` (the file is kept to inspect), and when an exporter fails, naming the
    exporter, the model class, the operation (``aten::kthvalue``) and the module where it failed
    when they can be found.
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
    path = _check_arguments(path, opset, tol)
    path.parent.mkdir(parents=True, exist_ok=True)

    with in_mode(model, training=False):
        with torch.no_grad():
            ref = _flatten(_reference(model, args))
            cases = [(args, ref, "")]
            if check and dynamic_batch and args[0].dim():  # the declared batch axis must work: batch x2
                twice = tuple(torch.cat([a, a.flip(-1)]) if a.dim() and a.shape[0] == args[0].shape[0] else a
                              for a in args)
                try:
                    cases.append((twice, _flatten(model(*twice)),
                                  f" at batch {2 * args[0].shape[0]} (pass dynamic_batch=False for a fixed batch)"))
                except Exception:  # the model itself takes one batch size only: nothing to compare with
                    pass
        in_names = ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
        out_names = ["output"] if len(ref) == 1 else [f"output{i}" for i in range(len(ref))]
        t0 = time.perf_counter()
        exporter = _export(model, args, path, opset, in_names, out_names, ref, dynamic_batch, dynamo)
        seconds = time.perf_counter() - t0

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
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise RuntimeError(f"{path}: onnxruntime cannot load the exported model (opset {result['opset']}, "
                           f"{exporter} exporter): {err}") from err
    abs_d = rel_d = 0.0
    for inputs, expected, note in cases:
        a, r = _compare(sess, inputs, expected, f"{path}{note}", in_names)
        abs_d, rel_d = max(abs_d, a), max(rel_d, r)
        result.update(max_abs_diff=abs_d, max_rel_diff=rel_d)
        if not rel_d <= tol:
            raise RuntimeError(f"{path}: onnxruntime and PyTorch differ by {rel_d:.3g} relative (> {tol:g}), "
                               f"{abs_d:.3g} absolute ({exporter} exporter){note}")
    return result


def _check_arguments(path: Any, opset: Any, tol: Any) -> Path:
    if opset is not None:
        lo, hi = _opset_range()
        if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
            raise ValueError(f"`opset` must be an int from {lo} to {hi} or None, got {opset!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"`tol` must be a number >= 0, got {tol!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"`path` {str(path)!r} is a directory; give the .onnx file to write")
    return path


def _opset_range() -> tuple[int, int]:
    """The opsets this torch exports (its own constants, where this torch version has them)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET, ONNX_MIN_OPSET
        return int(ONNX_MIN_OPSET), int(ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return 7, 99


def _compare(sess: Any, args: tuple, ref: list[torch.Tensor], where: str, names: list[str]) -> tuple[float, float]:
    """Largest absolute difference between onnxruntime and PyTorch, and the same divided by the
    largest reference magnitude, over all outputs."""
    # by name: an input the model ignores is dropped from the graph, and the rest must not shift
    wanted = {i.name for i in sess.get_inputs()}
    feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args) if n in wanted}
    try:
        outs = sess.run(None, feeds)
    except Exception as err:
        raise RuntimeError(f"{where}: onnxruntime cannot run the exported model: {err}") from err
    if len(outs) != len(ref):
        raise RuntimeError(f"{where}: onnxruntime gives {len(outs)} outputs, PyTorch {len(ref)}")
    abs_d = rel_d = 0.0
    for i, (o, r) in enumerate(zip(outs, ref)):
        r = r.detach().cpu()
        o = torch.from_numpy(o)
        if o.shape != r.shape:
            raise RuntimeError(f"{where}: output {i} has shape {tuple(o.shape)} in onnxruntime, {tuple(r.shape)} in PyTorch")
        o, r = o.double(), r.double()
        # a NaN or inf where the other has something else is a difference (max() would drop a NaN)
        odd = ~o.isfinite()
        if not torch.equal(odd, ~r.isfinite()) or not torch.equal(o[odd].nan_to_num(), r[odd].nan_to_num()):
            return math.inf, math.inf
        o, r = o[~odd], r[~odd]
        d = (o - r).abs().max().item() if r.numel() else 0.0
        abs_d = max(abs_d, d)
        rel_d = max(rel_d, d / max(r.abs().max().item() if r.numel() else 0.0, 1e-12))
    return abs_d, rel_d


def _flatten(out: Any) -> list[torch.Tensor]:
    """Outputs in the order the exporters emit them: tensors, then nested tuples/lists/dicts (``None``
    entries are dropped, as the exporters drop them)."""
    if out is None:
        return []
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
    stack: list[str] = []
    if not dynamo:
        try:
            axes = {n: {0: "batch"} for n in batched_in + batched_out} if dynamic_batch and batch is not None else None
            with warnings.catch_warnings(), _module_stack(model) as stack:
                warnings.simplefilter("ignore", DeprecationWarning)  # chosen knowingly; see the docstring
                torch.onnx.export(model, args, str(path), dynamo=False, dynamic_axes=axes, **common)
            return "torchscript"
        except Exception as err:
            first_err = _failure(model, "TorchScript", err, stack, lambda op: _locate_op(model, args, opset, op))
            if dynamo is False:
                raise first_err from err
    try:
        import onnxscript  # noqa: F401
    except ImportError as err:
        if first_err is not None:
            raise RuntimeError(f"{first_err}; the torch.export exporter was not tried: it needs onnxscript "
                               f"({_ONNX_HINT})") from first_err.__cause__
        raise ImportError(f"the torch.export ONNX exporter needs onnxscript: {_ONNX_HINT}") from err
    big = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers())) > 1.8 * 2**30
    shapes = tuple({0: "batch"} if n in batched_in else None for n, a in zip(in_names, args)) \
        if dynamic_batch and batch is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, args, str(path), dynamo=True, dynamic_shapes=shapes, external_data=big, **common)
    except Exception as err:
        note = f"; before it, {first_err}" if first_err else ""
        raise RuntimeError(f"{_failure(model, 'torch.export', err)}{note}") from err
    return "dynamo"


def _reference(model: nn.Module, args: tuple) -> Any:
    """PyTorch's own outputs; inputs that do not fit the model are the caller's error, said so."""
    with _module_stack(model) as stack:
        try:
            return model(*args)
        except Exception as err:
            where = f" in module '{stack[-1]}'" if stack and stack[-1] else ""
            shapes = ", ".join(str(tuple(a.shape)) for a in args)
            raise ValueError(f"`example_inputs` (shape {shapes}) do not fit {type(model).__name__}: its forward "
                             f"failed{where}: {type(err).__name__}: {err}") from err


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    """Forward hooks keeping the names of the modules entered and not yet left: after an exception
    raised inside a forward (while the exporter traces), the last name is where it was raised."""
    stack: list[str] = []

    def enter(name: str):
        def hook(module, inputs):
            if not name:
                stack.clear()  # a new forward of the whole model
            stack.append(name)
        return hook

    def leave(name: str):
        def hook(module, inputs, output):
            while stack and stack.pop() != name:
                pass
        return hook

    handles = []
    try:
        for name, m in model.named_modules():
            handles += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave(name))]
        yield stack
    finally:
        for h in handles:
            h.remove()


def _locate_op(model: nn.Module, args: tuple, opset: int | None, op: str) -> str | None:
    """The module that calls operation ``op`` (``aten::kthvalue``): exported again with unsupported
    operations passed through as ``org.pytorch.aten`` nodes, whose names carry the module scope
    (``/body/body.1/kthvalue``). None when that export fails too."""
    try:
        import onnx

        f = io.BytesIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, f, dynamo=False, opset_version=opset,
                              operator_export_type=torch.onnx.OperatorExportTypes.ONNX_FALLTHROUGH)
        nodes = onnx.load_from_string(f.getvalue()).graph.node
    except Exception:
        return None
    for node in nodes:
        if node.domain not in ("", "ai.onnx") and node.op_type == op.rpartition("::")[2]:
            scope = node.name.strip("/").split("/")[:-1]
            return scope[-1] if scope else ""
    return None


_OP = re.compile(r"'((?:aten|prim|onnx|quantized|torchvision)::[\w.]+)'")


def _failure(model: nn.Module, exporter: str, err: Exception, stack: list[str] | None = None,
             locate=None) -> RuntimeError:
    """``RuntimeError`` naming the exporter, the model class, the operation and the module (when
    they can be found) and the exporter's own first line."""
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    msg = lines[0] if lines else type(err).__name__
    match = _OP.search(text)
    op = match.group(1) if match else None
    where = stack[-1] if stack else (locate(op) if op and locate else None)
    parts = [f"at operation '{op}'"] if op else []
    if where:
        try:
            parts.append(f"in module '{where}' ({type(model.get_submodule(where)).__name__})")
        except AttributeError:
            parts.append(f"in module '{where}'")
    elif where is not None:
        parts.append(f"in {type(model).__name__}.forward itself")
    else:
        parts.append("(the module could not be located)")
    return RuntimeError(f"ONNX export of {type(model).__name__} failed in the {exporter} exporter "
                        f"{' '.join(parts)}: {type(err).__name__}: {msg}")
