"""Channel ids: the bookkeeping every rule shares (ids per tensor axis, unions, freezes, bindings).

Every tensor flowing through the captured forward carries an integer *id array*: a tensor with the
same number of dimensions whose size is 1 on axes that carry no channel identity and the full size
on axes that do (its "channel axes"). Two ids that must disappear together are *united*; an id
that must never disappear is *frozen*. ``None`` means "no channel axes": the tensor's shape is
fixed and anything it is combined with elementwise along a full-size axis must keep its size.

Rules are deliberately conservative: an operation we do not understand freezes the channels that
feed it (with a warning naming it), it never guesses.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

Ids = torch.Tensor | None
_MAX_ELEMENTWISE = 1 << 20  # larger multi-axis parameters used outside a layer rule are kept whole


def map_aggregate(tree: Any, fn: Callable) -> Any:
    """Apply ``fn`` to every leaf of nested tuples, lists and dicts (namedtuples kept)."""
    if isinstance(tree, tuple):
        res = [map_aggregate(v, fn) for v in tree]
        return type(tree)(*res) if hasattr(tree, "_fields") else tuple(res)
    if isinstance(tree, list):
        return [map_aggregate(v, fn) for v in tree]
    if isinstance(tree, dict):
        return {k: map_aggregate(v, fn) for k, v in tree.items()}
    return fn(tree)


def is_derived(size: Any) -> bool:
    """A size argument computed from a tensor's shape (it follows pruning), not a literal."""
    if isinstance(size, (list, tuple)):
        return len(size) > 0 and all(is_derived(s) for s in size)
    return isinstance(size, int) and type(size) is not int and not isinstance(size, bool)
FROZEN = 0  # id reserved for positions that can never be removed (padding, unknown sources)


@dataclass(frozen=True)
class Binding:
    """One tensor axis (or integer attribute) of a module that shrinks with a set of ids.

    ``kind`` is ``"tensor"`` (parameter/buffer ``name`` sliced along ``axis``), ``"elementwise"``
    (a parameter used directly in the graph; ``ids`` has its full shape and the axis is found
    after grouping) or ``"attr"`` (integer attribute, or element ``axis`` of a tuple attribute,
    set to the number of kept ids divided by ``divisor``).
    """

    module: str
    name: str
    axis: int | None
    ids: torch.Tensor
    kind: str = "tensor"
    divisor: int = 1
    role: str = "out"  # "out": this tensor produces the channel; "in": it consumes it


class Context:
    """Mutable state of one propagation pass: id allocation, unions, freezes and bindings."""

    def __init__(self) -> None:
        self.next_id = FROZEN + 1
        self.edges: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.frozen: list[torch.Tensor] = [torch.tensor([FROZEN])]
        self.inexact: list[torch.Tensor] = []
        self.bindings: list[Binding] = []
        self._warned: dict[str, list] = {}  # one warning per kind: message -> [first place, count]
        self._bound: dict[tuple[str, str, int], torch.Tensor] = {}
        # set by the capture: the (module, tensor name) owning a parameter, ids without creating them
        self.owner: Callable[[Any], tuple[str, str] | None] = lambda t: None
        self.peek: Callable[[Any], Ids] = lambda t: None
        self.source: Callable[[Any], Any] = lambda t: None
        self.ids_of: Callable[[Any], Ids] = lambda t: None
        self.modules: dict[str, nn.Module] = {}
        # set by a capture that also counts: the eval forward's layer costs, or who read `training`
        self.eval_costs: list | None = None
        self.training_read: str | None = None
        self.unnamed = False  # a counting pass without module names met a layer that needs one

    # -- ids ---------------------------------------------------------------------------------
    def fresh(self, n: int) -> torch.Tensor:
        ids = torch.arange(self.next_id, self.next_id + n)
        self.next_id += n
        return ids

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        self.edges.append((a.reshape(-1), b.reshape(-1)))

    def freeze(self, ids: Ids) -> None:
        if ids is not None:
            self.frozen.append(ids.reshape(-1))

    def freeze_all(self, tree: Any) -> None:
        for ids in leaves(tree):
            self.freeze(ids)

    def mark_inexact(self, ids: Ids) -> None:
        if ids is not None:
            self.inexact.append(ids.reshape(-1))

    def bind(self, module: str, name: str, axis: int | None, ids: torch.Tensor, **kw: Any) -> None:
        kind = kw.get("kind", "tensor")
        if kind != "elementwise" and ids.dim() != 1:
            ids = ids.reshape(-1)  # keep the same object when possible: grouping shares work per object
        if kind == "tensor":  # a layer called twice: both calls' channels are one set of slices
            key = (module, name, axis)
            seen = self._bound.get(key)
            if seen is None:
                self._bound[key] = ids
            elif len(seen) == len(ids):
                self.union(seen, ids)
                return
        self.bindings.append(Binding(module, name, axis, ids, **kw))

    def bind_param(self, t: Any, axis: int, ids: torch.Tensor, role: str = "out") -> bool:
        """Bind axis ``axis`` of parameter/buffer ``t`` to ``ids``; False if ``t`` is no parameter."""
        own = self.owner(t)
        if own is None:
            return False
        self.bind(own[0], own[1], axis, ids, role=role)
        seen = self.peek(t)  # also used elementwise elsewhere: those ids are the same channels
        if seen is not None and seen.dim() > axis and seen.shape[axis] == len(ids):
            shape = [1] * seen.dim()
            shape[axis] = -1
            self.union(seen, ids.view(shape))
        return True

    def bind_attr(self, t: Any, attr: str, size: int, ids: torch.Tensor, role: str = "out",
                  divisor: int = 1, index: int | None = None) -> bool:
        """Bind an integer size attribute of the module owning ``t`` when it holds ``size``."""
        own = self.owner(t)
        m = self.modules.get(own[0]) if own is not None else None
        val = getattr(m, attr, None) if m is not None else None
        if index is not None:
            if not isinstance(val, (tuple, list)) or len(val) <= index or val[index] != size:
                return False
        elif type(val) is not int or val != size:
            return False
        self.bind(own[0], attr, index, ids, kind="attr", role=role, divisor=divisor)
        return True

    def warn(self, msg: str, where: str = "") -> None:
        entry = self._warned.setdefault(msg, [where, 0])
        entry[1] += 1

    @property
    def warnings(self) -> list[str]:
        out = []
        for msg, (where, n) in self._warned.items():
            at = f" (at '{where}'{f' and {n - 1} more places' if n > 1 else ''})" if where else ""
            out.append(msg + at)
        return out


# -- helpers ---------------------------------------------------------------------------------
def leaves(tree: Any) -> list[torch.Tensor]:
    """Every tensor in nested tuples, lists and dicts (called on every captured operation)."""
    out: list[torch.Tensor] = []
    _collect(tree, out)
    return out


def _collect(tree: Any, out: list) -> None:
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            _collect(v, out)
    elif isinstance(tree, dict):
        for v in tree.values():
            _collect(v, out)


def leaves_of(tree: Any, kind: type) -> list:
    """Every leaf of type ``kind`` in nested tuples, lists and dicts."""
    out: list = []
    map_aggregate(tree, lambda x: out.append(x) if isinstance(x, kind) else None)
    return out


def varying(ids: Ids) -> list[int]:
    return [] if ids is None else [k for k, s in enumerate(ids.shape) if s > 1]


def compress(t: torch.Tensor) -> Ids:
    """Shrink every axis along which the ids are constant to size 1; ``None`` if none remain."""
    for k in range(t.dim()):
        if t.shape[k] > 1:
            first = t.narrow(k, 0, 1)
            if bool((t == first).all()):
                t = first
    if t.numel() <= 1:
        return None
    return t


def expand(ids: Ids, shape: torch.Size) -> torch.Tensor:
    """Ids broadcast to a tensor's full shape; positions with no channel identity are frozen."""
    if ids is None:
        return torch.zeros((1,) * len(shape), dtype=torch.long).expand(shape)
    return ids.expand(shape)


def axis_ids(ctx: Context, ids: Ids, axis: int, size: int) -> torch.Tensor | None:
    """The 1-D ids of ``axis`` as seen by a layer whose weights index that axis.

    When the ids also vary along other axes (one weight column serves several ids) the column
    gets fresh ids united with all of them.
    """
    if ids is None:
        return None
    axis = axis % ids.dim()
    if ids.shape[axis] == 1:
        return None
    if all(s == 1 for k, s in enumerate(ids.shape) if k != axis):
        return ids.reshape(-1)
    col = ctx.fresh(size)
    shape = [1] * ids.dim()
    shape[axis] = size
    ctx.union(ids, col.view(shape))
    return col


def place(ids: torch.Tensor, axis: int, ndim: int) -> Ids:
    if ids.numel() <= 1:
        return None
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return ids.reshape(shape)


def tie_columns(ctx: Context, ids: torch.Tensor, rows: int) -> torch.Tensor:
    """Unite ids[i*cols + j] across rows i: removal keeps every row the same size."""
    grid = ids.reshape(rows, -1)
    ctx.union(grid, grid[:1])
    return grid[0]


def tie_rows(ctx: Context, ids: torch.Tensor, rows: int) -> None:
    grid = ids.reshape(rows, -1)
    ctx.union(grid, grid[:, :1])


def flat_ids(values, ids) -> list[Ids]:
    """Ids aligned with ``leaves(values)`` (ids trees mirror value trees)."""
    out: list[Ids] = []

    def walk(v, i):
        if isinstance(v, torch.Tensor):
            out.append(i if isinstance(i, torch.Tensor) else None)
        elif isinstance(v, (list, tuple)):
            for k, x in enumerate(v):
                walk(x, i[k] if isinstance(i, (list, tuple)) and k < len(i) else None)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, i.get(k) if isinstance(i, dict) else None)

    walk(values, ids)
    return out


def size_markers(values, ids) -> list[torch.Tensor]:
    """Channel ids behind integer arguments (sizes read from a channel axis)."""
    out: list[torch.Tensor] = []

    def walk(v, i):
        if isinstance(i, torch.Tensor):
            if not isinstance(v, torch.Tensor):
                out.append(i.reshape(-1))
        elif isinstance(i, (list, tuple)) and isinstance(v, (list, tuple)):
            for a, b in zip(v, i):
                walk(a, b)
        elif isinstance(i, dict) and isinstance(v, dict):
            for k in i:
                walk(v.get(k), i[k])

    walk(values, ids)
    return out


def size_ids(xi: Ids, nd: int) -> tuple:
    """Per-dimension channel ids of a tensor's shape (``None`` for axes that carry none)."""
    out = []
    for k in range(nd):
        if xi is not None and xi.shape[k] > 1:
            out.append(xi.movedim(k, 0).reshape(xi.shape[k], -1)[:, 0])
        else:
            out.append(None)
    return tuple(out)


def op_name(node: Any) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def unknown(ctx: Context, node: Any, aids, kids, why: str = "") -> None:
    tracked = [i for i in leaves((aids, kids))]
    if tracked:
        for i in tracked:
            ctx.freeze(i)
        ctx.warn(f"unsupported operation '{op_name(node)}'{': ' + why if why else ''}; the channels feeding it are kept",
                 node.name or "<top-level forward>")
    return None



_PARAMETRIZATION = re.compile(r"(^|\.)parametrizations\.[^.]+\.\d+$")  # a module inside a ParametrizationList


def param_ids(ctx: Context, owner: tuple[str, str], t: torch.Tensor) -> Ids:
    """Ids of a parameter used directly in the computation (layer scale, gain, bias added by hand).

    It is prunable along one axis if, after grouping, its channels depend on that axis alone.
    """
    if t.numel() <= 1 or not (t.is_floating_point() or t.is_complex()):
        return None  # index and counter buffers are never cut
    if _PARAMETRIZATION.search(owner[0]):
        return None  # a parametrization's own state (spectral norm's u, v): cut only through what it parametrizes
    if t.numel() > _MAX_ELEMENTWISE and sum(s > 1 for s in t.shape) > 1:
        return None  # a large weight outside any layer rule: fixed size
    ids = ctx.fresh(t.numel()).view(t.shape)
    ctx.bind(owner[0], owner[1], None, ids, kind="elementwise")
    return compress(ids)


# -- sizes that remember their channels ------------------------------------------------------------
class TrackedInt(int):
    """An ``int`` read from a tensor's shape that remembers the channel ids it counts."""

    ids: torch.Tensor

    def __new__(cls, value: int, ids: torch.Tensor) -> "TrackedInt":
        obj = int.__new__(cls, value)
        obj.ids = ids
        return obj

    def __reduce__(self):  # deepcopy / pickle see a plain int
        return (int, (int(self),))


def _arith(op: Callable, swap: bool = False) -> Callable:
    def fn(self, other):
        a, b = (other, self) if swap else (self, other)
        res = op(int(a) if isinstance(a, int) else a, int(b) if isinstance(b, int) else b)
        if type(res) is not int:
            return res
        marks = [t.ids for t in (self, other) if isinstance(t, TrackedInt)]
        return TrackedInt(res, torch.cat(marks) if len(marks) > 1 else marks[0])
    return fn


for _name, _op in (("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("floordiv", operator.floordiv), ("mod", operator.mod), ("pow", operator.pow)):
    setattr(TrackedInt, f"__{_name}__", _arith(_op))
    setattr(TrackedInt, f"__r{_name}__", _arith(_op, swap=True))
TrackedInt.__neg__ = lambda self: TrackedInt(-int(self), self.ids)  # type: ignore[method-assign]
TrackedInt.__pos__ = lambda self: self  # type: ignore[method-assign]
TrackedInt.__abs__ = lambda self: TrackedInt(abs(int(self)), self.ids)  # type: ignore[method-assign]
