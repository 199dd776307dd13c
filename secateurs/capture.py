"""Capture: run the model's own Python once and see every tensor operation it performs.

The model runs under a :class:`~torch.overrides.TorchFunctionMode`, so every call that reaches
PyTorch (``F.conv2d``, ``F.batch_norm``, ``torch.cat``, ``Tensor.view``, ``x + y``...) is seen at
the level of the functional API, whatever module class made it: timm's ``BatchNormAct2d``, a
``Conv2dSame``, ultralytics' ``C2f`` and a user's own ``forward`` all decompose into the same small
set of operations, and each has one rule in :mod:`secateurs._ops` or :mod:`secateurs._layers`.

Python control flow (shape checks, loops over layer lists, ``if self.training``) simply runs, so
it is *specialised on the example input*: the groups found are those of the path that input took.
The first pass runs on meta tensors (shapes only; heavy layers are shortcut by hand); an operation
that needs values (``.item()``, data-dependent branches, custom ops without meta kernels) restarts
the capture on real tensors, on a copy of the buffers so the model is never changed. Training
mode comes first, so training-only branches (auxiliary heads) are seen; a model whose training
forward needs more than its inputs (torchvision detectors want targets) is captured in eval mode.

Sizes read from a tensor (``x.shape``, ``x.size(1)``) come back as :class:`TrackedInt`, an ``int``
that remembers which channels it counts, so ``x.view(b, c * h * w)`` is known to follow pruning
while ``x.view(-1, 400)`` is not.
"""
from __future__ import annotations

import contextlib
import operator
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from . import _ids, _layers, _meta, _ops
from ._ids import Context, TrackedInt
from ._stateless import Stateless
from ._threads import one_thread
from ._training import watch_training
from ._validation import PruningError

__all__ = ["Call", "CaptureError", "TrackedInt", "capture", "one_thread", "run_captured"]


@dataclass
class Call:
    """One intercepted operation, in the form the rules read (``op``, ``target``, ``name``, args)."""

    op: str  # "call_function" or "call_method"
    target: Any  # the function, or the method's name
    name: str  # where it happened (module path), for messages
    args: tuple
    kwargs: dict


class CaptureError(Exception):
    """The model's forward raised during capture (kept apart from rule bugs for the retry logic)."""

    def __init__(self, where: str, err: BaseException) -> None:
        super().__init__(f"{where}: {type(err).__name__}: {err}")
        self.where, self.err = where, err


# -- operation lookup ------------------------------------------------------------------------
_DUNDERS = {
    "__add__": operator.add, "__radd__": operator.add, "__iadd__": operator.iadd,
    "__sub__": operator.sub, "__rsub__": operator.sub, "__isub__": operator.isub,
    "__mul__": operator.mul, "__rmul__": operator.mul, "__imul__": operator.imul,
    "__truediv__": operator.truediv, "__rtruediv__": operator.truediv, "__itruediv__": operator.itruediv,
    "__div__": operator.truediv, "__floordiv__": operator.floordiv, "__rfloordiv__": operator.floordiv,
    "__mod__": operator.mod, "__pow__": operator.pow, "__rpow__": operator.pow, "__neg__": operator.neg,
    "__abs__": operator.abs, "__pos__": operator.pos, "__and__": operator.and_, "__or__": operator.or_,
    "__eq__": operator.eq, "__ne__": operator.ne, "__lt__": operator.lt, "__le__": operator.le,
    "__gt__": operator.gt, "__ge__": operator.ge, "__getitem__": operator.getitem,
    "__matmul__": operator.matmul, "__rmatmul__": operator.matmul,
}
_QUIET_PROPS = {"dtype", "device", "is_cuda", "requires_grad", "grad", "grad_fn", "is_leaf", "layout",
                "is_sparse", "is_quantized", "is_meta", "is_nested", "_version", "names", "itemsize",
                "nbytes", "ndim", "output_nr", "_base", "is_mps", "is_xpu", "is_cpu"}
_QUIET_METHODS = {"dim", "numel", "is_contiguous", "get_device", "element_size", "is_floating_point",
                  "is_complex", "data_ptr", "storage_offset", "stride", "untyped_storage", "__len__",
                  "__format__", "__repr__", "__hash__", "__bool__", "is_set_to", "has_names",
                  "__reduce_ex__", "ndimension", "nelement", "is_nonzero", "is_inference",
                  "__array__", "__dlpack__", "register_hook", "retain_grad", "__deepcopy__",
                  "__contains__", "__index__", "__int__", "__float__"}


_RESOLVED: dict[Any, tuple[str, Any, Callable | None]] = {}


def _resolve(func: Any) -> tuple[str, Any, Callable | None]:
    """(op, target, rule) for an intercepted callable, looked up once per callable."""
    try:
        return _RESOLVED[func]
    except (KeyError, TypeError):
        pass
    res = _lookup(func)
    try:
        _RESOLVED[func] = res
    except TypeError:  # unhashable callable
        pass
    return res


def _lookup(func: Any) -> tuple[str, Any, Callable | None]:
    """(op, target, rule) for an intercepted callable; rule None means unknown."""
    self_obj = getattr(func, "__self__", None)
    if type(func).__name__ == "method-wrapper" and isinstance(self_obj, type(torch.Tensor.shape)):
        prop = self_obj.__name__  # a property getter: x.shape, x.T, x.data ...
        return "property", prop, None
    rule = _layers.FUNCTIONS.get(func)
    if rule is not None:
        return "call_function", func, rule
    name = getattr(func, "__name__", None)
    qual = getattr(func, "__qualname__", "") or ""
    if name is not None and (getattr(torch.Tensor, name, None) is func or qual.startswith(("Tensor.", "TensorBase."))
                             or (name.startswith("__") and getattr(torch._C.TensorBase, name, None) is func)):
        if name in _DUNDERS:
            target = _DUNDERS[name]
            return "call_function", target, _layers.FUNCTIONS.get(target)
        if name in _QUIET_METHODS:
            return "call_method", name, _ops.nothing
        return "call_method", name, _layers.METHODS.get(name)
    if name is not None:
        by_name = _layers.FUNCTIONS_BY_NAME.get((getattr(func, "__module__", None), name))
        if by_name is not None:
            return "call_function", func, by_name
    return "call_function", func, None


_RESHAPES = {"view", "reshape", "expand", "unflatten", "repeat", "tile", "broadcast_to"}
_SIZE_ATTRS = ("in_channels", "out_channels", "num_features", "num_channels", "in_features", "out_features",
               "num_parameters", "embedding_dim")
_SWAPPED = {"__radd__", "__rsub__", "__rmul__", "__rtruediv__", "__rfloordiv__", "__rpow__", "__rmatmul__"}


class _Mode(TorchFunctionMode):
    """Propagates channel ids through every operation of one forward."""

    def __init__(self, ctx: Context, owners: dict[int, tuple[str, str]], meta: bool, names: dict[int, str],
                 ignored: set[str], costs: list | None, modules: dict[str, nn.Module], rules: bool = True) -> None:
        super().__init__()
        self.ctx, self.owners, self.meta, self.names = ctx, owners, meta, names
        self.ignored, self.costs, self.rules = ignored, costs, rules
        self.named = True  # the module hooks keep `stack` (a counting pass may run without them)
        self.ids: dict[int, tuple[weakref.ref, Any]] = {}
        self.derived: dict[int, tuple[weakref.ref, Any]] = {}
        self.inputs: set[int] = set()
        self.stack: list[str] = [""]
        ctx.owner = self.owner
        ctx.source = self.source
        ctx.ids_of = self.get
        ctx.peek = lambda t: self.get(t, materialize=False)
        ctx.modules = modules
        self.batch = 1  # samples in the example inputs: MACs are counted per sample
        self.batch_read = False  # set once a layer that knows its batch dim read a model input
        self.batch_inputs: set[int] = set()  # the top-level tensor inputs such a layer may read

    # -- id storage keyed by tensor identity --------------------------------------------------
    def owner(self, t: Any) -> tuple[str, str] | None:
        return self.owners.get(id(t)) if isinstance(t, torch.Tensor) else None

    def get(self, t: Any, materialize: bool = True) -> Any:
        if isinstance(t, TrackedInt):
            return t.ids
        if not isinstance(t, torch.Tensor):
            return None
        entry = self.ids.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        if not materialize:
            return None
        own = self.owners.get(id(t))
        if own is not None:  # a parameter used directly (layer scale, gain...): ids of its own
            ids = _ids.param_ids(self.ctx, own, t)
            self.put(t, ids)
            return ids
        return self._derived_ids(t)

    # -- parameter provenance (weight standardisation, reparametrised weights) -----------------
    def source(self, t: Any) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """(main parameter, other parameters) a tensor was computed from, if only from parameters."""
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) in self.owners:
            return t, [], False
        entry = self.derived.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _track_source(self, target, args, kwargs, out) -> bool:
        """Record what ``out`` was computed from when only parameters (and constants) took part."""
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and (id(x) in self.ids or id(x) in self.inputs) and self.source(x) is None:
            return False  # the common case, decided by the first operand: an activation takes part
        tensors = _ids.leaves((args, kwargs))
        if not tensors or not isinstance(out, torch.Tensor):
            return False
        found = []
        for v in tensors:
            src = self.source(v)
            if src is None:
                if id(v) in self.ids or id(v) in self.inputs:
                    return False  # an activation takes part: not a parameter computation
                continue
            found.append(src)
        if not found:
            return False
        main = max((f[0] for f in found), key=lambda p: p.numel())
        others = [q for f in found for q in [f[0], *f[1]] if q is not main]
        fixed = any(len(f) > 2 and f[2] for f in found) or self._literal_sizes(target, args, kwargs, main)
        self.derived[id(out)] = (weakref.ref(out), (main, list({id(q): q for q in others}.values()), fixed))
        return True

    def _literal_sizes(self, target, args, kwargs, main: torch.Tensor) -> bool:
        """A reshape of parameters to literal sizes follows pruning only when each size is one that
        surgery updates on the parameter's module (``self.out_channels``), else it is fixed."""
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if name not in _RESHAPES:
            return False
        own = self.owners.get(id(main))
        m = self.ctx.modules.get(own[0]) if own else None
        allowed = {getattr(m, a) for a in _SIZE_ATTRS if type(getattr(m, a, None)) is int}
        sizes = [v for v in _ids.leaves_of((args[1:], kwargs), int) if type(v) is int and v > 1]
        return any(v not in allowed for v in sizes)

    def _derived_ids(self, t: torch.Tensor) -> Any:
        """Ids of a parameter reshaped for broadcasting (``gamma.view(1, -1, 1, 1)``): the
        parameter's own, placed on the one axis the result varies along."""
        entry = self.derived.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        main, others, fixed = entry[1]
        axes = [k for k, n in enumerate(t.shape) if n > 1]
        if len(axes) != 1 or sum(n > 1 for n in main.shape) != 1 or main.numel() != t.shape[axes[0]]:
            return None
        ids = self.get(main)
        if ids is None:
            return None
        ids = _ids.place(ids.reshape(-1), axes[0], t.dim())
        for q in others:
            qi = self.get(q) if q.numel() == main.numel() else None
            if qi is not None:
                self.ctx.union(qi.reshape(-1), ids.reshape(-1))
            elif q.numel() > 1:
                self.ctx.freeze(ids)
        if fixed:
            self.ctx.freeze(ids)  # reshaped to literal sizes: its length cannot change
        self.put(t, ids)
        return ids

    def put(self, t: Any, ids: Any) -> None:
        if isinstance(t, torch.Tensor):
            self.ids[id(t)] = (weakref.ref(t), ids)
        elif isinstance(t, (tuple, list)):
            for k, v in enumerate(t):
                self.put(v, ids[k] if isinstance(ids, (tuple, list)) and k < len(ids) else None)

    def tree_ids(self, tree: Any, materialize: bool = True) -> Any:
        if isinstance(tree, (torch.Tensor, TrackedInt)):
            return self.get(tree, materialize)
        if isinstance(tree, (tuple, list)):
            return tuple([self.tree_ids(v, materialize) for v in tree])
        if isinstance(tree, dict):
            return {k: self.tree_ids(v, materialize) for k, v in tree.items()}
        return None

    # -- module boundaries (messages, ignore=) ------------------------------------------------
    def pre_hook(self, m: nn.Module, args: Any) -> None:
        self.stack.append(self.names.get(id(m), self.stack[-1]))

    def post_hook(self, m: nn.Module, args: Any, out: Any) -> None:
        name = self.stack.pop() if len(self.stack) > 1 else ""
        if name in self.ignored:
            self.ctx.freeze_all(self.tree_ids(out))

    # -- the interception ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op, target, rule = _resolve(func)
        fname = getattr(func, "__name__", "")
        swapped = fname in _SWAPPED and len(args) == 2
        if op == "property":
            return self._property(target, func(*args, **kwargs), args)
        fast = (_meta.META_SHAPES if self.meta else _layers.REAL_GUARDS).get(target)
        out = fast(args, kwargs) if fast is not None else None
        if out is None:
            out = func(*args, **kwargs)
        if self.costs is not None:
            cost = _layers.COSTS.get(target)
            if cost is not None:
                cost(self, Call(op, target, self.stack[-1], args, kwargs), args, kwargs, out)
            if not self.rules:  # counting only
                return out
        if swapped:
            args = (args[1], args[0])
        node = Call(op, target, self.stack[-1], args, kwargs)
        if target == "size":
            return self._shape(args, out)
        if self._track_source(target, args, kwargs, out):
            return out  # a computation on parameters alone: its consumer reads where it came from
        layer = rule in _layers.LAYER_RULES
        aids = self.tree_ids(args, materialize=not layer)
        kids = self.tree_ids(kwargs, materialize=not layer) if kwargs else {}
        if rule is None:
            out_ids = _ids.unknown(self.ctx, node, aids, kids)
        else:
            out_ids = rule(self.ctx, node, args, kwargs, aids, kids, out)
        self.put(out, out_ids)
        return out

    def _shape(self, args, out):
        x = args[0]
        xi = self.get(x, materialize=False)
        if xi is None or not self.rules:
            return out
        per_dim = _ids.size_ids(xi, x.dim())
        if isinstance(out, int):
            dim = args[1] if len(args) > 1 else None
            i = per_dim[dim] if isinstance(dim, int) else None
            return TrackedInt(out, i) if i is not None else out
        return torch.Size([TrackedInt(s, i) if i is not None else s for s, i in zip(out, per_dim)])

    def _property(self, prop: str, out: Any, args: tuple) -> Any:
        if not self.rules or not isinstance(out, (torch.Tensor, torch.Size)):
            return out
        if prop == "shape":
            return self._shape(args, out)
        xi = self.get(args[0])
        if prop == "data":
            self.put(out, xi)
        elif prop in ("T", "mT", "H", "mH"):
            self.put(out, None if xi is None else _ids.compress(getattr(xi, prop)))
        elif prop not in _QUIET_PROPS:
            _ids.unknown(self.ctx, Call("property", prop, self.stack[-1], args, {}), (xi,), {})
        return out


# -- running ---------------------------------------------------------------------------------
def run_captured(model: nn.Module, inputs: tuple, ctx: Context, *, train: bool, meta: bool,
                 ignored: set[str] = frozenset(), costs: list | None = None, rules: bool | None = None) -> Any:
    """One forward of ``model`` under the capture mode; the model is left exactly as it was.
    ``costs`` collects the counted layers; with it, the channel rules run only when ``rules`` says
    so (a training pass that does both also notes in ``ctx.training_read`` who read the flag).

    A counting pass first runs without the module hooks that keep the current module's name (each
    module call is cheaper without them): a layer is named after its weight's module. Only when a
    weight belongs to no module (computed weights), or a pass on real tensors fails (the error
    names the module), does it run again with them."""
    rules = costs is None if rules is None else rules
    if rules:
        return _run(model, inputs, ctx, train, meta, ignored, costs, rules, named=True)
    try:
        out = _run(model, inputs, ctx, train, meta, ignored, costs, rules, named=False)
    except CaptureError:
        if meta:  # a meta failure is never shown: the real pass that follows replaces it
            raise
    else:
        if not ctx.unnamed:
            return out
    costs.clear()
    ctx.unnamed = False
    return _run(model, inputs, ctx, train, meta, ignored, costs, rules, named=True)


def _run(model: nn.Module, inputs: tuple, ctx: Context, train: bool, meta: bool, ignored: set[str],
         costs: list | None, rules: bool, named: bool) -> Any:
    swap = Stateless(model, meta)
    modules = swap.modules
    names = {id(m): n for n, m in modules.items()}
    if meta:
        inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
    elif swap.device is not None:
        inputs = tuple(t.to(swap.device) if isinstance(t, torch.Tensor) else t for t in inputs)
    mode = _Mode(ctx, swap.owners, meta, names, set(ignored), costs, modules, rules)
    mode.named = named
    mode.batch = batch_guess(inputs)
    mode.batch_inputs = {id(t) for t in inputs if isinstance(t, torch.Tensor)}
    mode.inputs = {id(t) for t in torch.utils._pytree.tree_leaves(list(inputs)) if isinstance(t, torch.Tensor)}
    hooks = [nn.modules.module.register_module_forward_pre_hook(mode.pre_hook),
             nn.modules.module.register_module_forward_hook(mode.post_hook)] if named else []
    try:
        watching = train and rules and costs is not None
        with swap, (watch_training(modules.values()) if watching else contextlib.nullcontext()) as watch:
            swap.set_mode(model, train)
            with torch.no_grad(), mode:
                try:
                    out = model(*inputs)
                except PruningError:
                    raise
                except Exception as err:
                    raise CaptureError(_where(mode), err) from err
            if watch is not None and watch.unsafe:
                ctx.training_read = watch.first
        ctx.freeze_all(mode.tree_ids(_flatten_output(out)))
        return out
    finally:
        for h in hooks:
            h.remove()


def batch_guess(inputs: tuple) -> int:
    """Samples in the example inputs before any layer says: a leading list of same-rank tensors with
    as many channels each holds one image apiece (torchvision detection), else the first tensor's
    leading size. The first conv or attention to read a top-level tensor input corrects it (an
    unbatched ``[C, H, W]``, a sequence-first ``[L, N, E]``)."""
    first = inputs[0] if inputs else None
    if (isinstance(first, list) and first and all(isinstance(t, torch.Tensor) for t in first)
            and len({(t.dim(), t.shape[0] if t.dim() else None) for t in first}) == 1 and first[0].dim() >= 2):
        return len(first)
    leaf = next((t for t in torch.utils._pytree.tree_leaves(list(inputs)) if isinstance(t, torch.Tensor) and t.dim() > 0),
                None)
    return int(leaf.shape[0]) if leaf is not None else 1


def _where(mode: _Mode) -> str:
    top = mode.stack[-1]
    return f"in module '{top}'" if top else "in the model's own forward"


def _flatten_output(out: Any) -> list:
    """Every tensor in a nested output (tuples, lists, dicts, dataclass-like objects)."""
    found: list = []
    seen: set[int] = set()

    def walk(v, depth):
        if depth > 8 or id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x, depth + 1)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x, depth + 1)
        elif hasattr(v, "__dict__") and not isinstance(v, (nn.Module, type)):
            for x in vars(v).values():
                walk(x, depth + 1)

    walk(out, 0)
    return found


def capture(model: nn.Module, inputs: tuple, ignored: set[str] = frozenset(),
            costs: list | None = None, train_first: bool = True, count: bool = False) -> tuple[Context, str]:
    """Capture ``model`` on ``inputs``, trying the cheapest pass that works.

    Returns the filled :class:`Context` and the pass used (``"train/meta"``, ``"eval/real"``...).
    Raises :class:`PruningError` naming the module where the forward failed on real tensors in
    every mode. ``costs`` makes it a counting pass (no channel rules). With ``count`` the channel
    pass records the layer costs too and keeps them in ``ctx.eval_costs`` when they are what a
    counting pass would find: a meta pass in eval mode, or in training mode when only layers whose
    training branch runs the same convs and linears read the flag (:mod:`secateurs._training`).
    """
    last: CaptureError | None = None
    modes = (True, False) if train_first else (False,)
    for meta in (True, False):
        for train in modes:
            ctx = Context()
            rec: list | None = [] if costs is not None or count else None
            kw = dict(train=train, meta=meta, ignored=ignored, costs=rec, rules=costs is None)
            try:
                if meta:
                    with one_thread():
                        run_captured(model, inputs, ctx, **kw)
                else:  # real arithmetic: let it use every thread
                    run_captured(model, inputs, ctx, **kw)
            except CaptureError as err:
                last = err
                continue
            if costs is not None:
                costs.extend(rec)
            elif count and meta and ctx.training_read is None:
                ctx.eval_costs = rec
            return ctx, f"{'train' if train else 'eval'}/{'meta' if meta else 'real'}"
    assert last is not None
    raise PruningError(f"running {type(model).__name__} on example_inputs failed {last}") from last.err

