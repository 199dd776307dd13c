"""Depth surgery: find residual blocks that can go, remove them, or truncate the network after one.

A block is removable when its output is ``input + f(input)`` through an identity shortcut (possibly
followed by parameter-free ops such as a ReLU): replacing it by ``nn.Identity()`` then keeps every
shape in the network, and if ``f`` is (near) zero it keeps the function too. This is found from the
:mod:`torch.fx` graph, not from class names, so any architecture built from such blocks works.
Blocks whose shortcut is a projection (they change shapes) are reported as non-removable.

How the blocks are scored (PLS-VIP of their outputs) lives in :mod:`secateurs.pls`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from ._validation import PruningError
from .cost import count
from .fxtrace import trace_fx

__all__ = ["Block", "LayerPlan", "find_blocks", "remove_blocks", "truncate", "block_names"]


@dataclass(frozen=True)
class Block:
    """A residual unit of the model, in forward order.

    ``stage`` numbers runs of consecutive blocks that share a parent container and a shape (a
    non-removable block, e.g. a down-sampling one, starts a new stage), so a budget can keep at
    least one block per stage. ``macs`` (per sample) and ``params`` are the block's own.
    """

    name: str
    stage: int
    macs: int
    params: int
    input_shape: tuple[int, ...]
    removable: bool
    reason: str = ""


# -- structure from the fx graph -------------------------------------------------------------------
_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass
class _Candidate:
    name: str
    order: int  # position of its first node in the graph: forward order
    removable: bool
    reason: str


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or \
        (node.op == "call_method" and node.target in _ADD_METHODS)


def _stack(node: fx.Node) -> list[tuple[str, str]]:
    """(key, qualified name) of the modules a node was traced in, outermost first."""
    return [(k, v[0]) for k, v in (node.meta.get("nn_module_stack") or {}).items()]


def _params_of(modules: dict[str, nn.Module], node: fx.Node) -> bool:
    if node.op == "call_module":
        return any(True for _ in modules[node.target].parameters())
    return False


def _unwrap_identity(node: Any, modules: dict[str, nn.Module]) -> Any:
    # the CIFAR ResNet shortcut is a literal nn.Identity() call
    while isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules[node.target], nn.Identity):
        node = node.args[0] if node.args else None
    return node


def _depends_on(node: fx.Node, source: fx.Node, members: set[fx.Node]) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is source:
            return True
        if n in seen or n not in members:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _history(node: fx.Node, source: fx.Node, members: set[fx.Node]) -> int:
    return len(_path(node, source, members))


def _path(node: fx.Node, source: fx.Node, members: set[fx.Node]) -> list[fx.Node]:
    """Nodes of the block that ``node`` depends on, up to ``source``."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n is source or n in seen or n not in members:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def _structure(model: nn.Module) -> list[_Candidate]:
    """Residual units of ``model`` from its fx graph (no shapes: those need example inputs)."""
    graph, _ = trace_fx(model)
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    members: dict[str, set[fx.Node]] = {}
    first: dict[str, int] = {}
    calls: dict[str, set[str]] = {}
    innermost: dict[fx.Node, str] = {}
    for i, node in enumerate(nodes):
        st = _stack(node)
        if st:
            innermost[node] = st[-1][1]
        for key, q in st:
            members.setdefault(q, set()).add(node)
            first.setdefault(q, i)
            calls.setdefault(q, set()).add(key)

    found: dict[str, _Candidate] = {}
    for q, mem in members.items():
        if not q or q not in modules:
            continue
        if len(calls[q]) > 1:
            continue  # judged below by the sibling rule, if at all
        ext = {a for n in mem for a in n.all_input_nodes if a not in mem and a.op != "get_attr"}
        outs = [n for n in mem if any(u not in mem for u in n.users)]
        if len(ext) != 1 or len(outs) != 1:
            continue
        (x,), out = ext, outs[0]
        # walk back over a parameter-free tail (ReLU, dropout, ...) to the residual add
        node, tail_params = out, []
        while node in mem and not _is_add(node) and len(node.all_input_nodes) == 1:
            if _params_of(modules, node):
                tail_params.append(node.target)
            node = node.all_input_nodes[0]
        if node not in mem or not _is_add(node):
            continue
        add = node
        ops = [_unwrap_identity(a, modules) for a in add.args[:2]]
        if len(ops) != 2 or not all(isinstance(a, fx.Node) for a in ops):
            continue
        own = innermost.get(add) == q
        if x in ops:
            other = ops[1] if ops[0] is x else ops[0]
            if other is x or not _depends_on(other, x, mem):
                continue  # x + x or x + constant: not a residual branch
            if tail_params:
                if own:
                    found[q] = _Candidate(q, first[q], False, f"layer(s) with parameters {tail_params} follow the residual add, "
                                          "so the block is not input + f(input)")
                continue
            found[q] = _Candidate(q, first[q], True, "")
        elif own and all(_depends_on(a, x, mem) for a in ops):
            # the shortcut is the operand with the shorter history inside the block
            short = min(ops, key=lambda a: _history(a, x, mem))
            mods = [n.target for n in _path(short, x, mem) if n.op == "call_module"]
            names = list(dict.fromkeys(_child_of(q, t) for t in mods))
            via = f"goes through {', '.join(repr(n) for n in names)}" if names else "is not an identity"
            found[q] = _Candidate(q, first[q], False, f"its shortcut {via} (a projection), so removing it would change "
                                  "the tensor that the next layer receives")

    # the largest unit wins: drop candidates nested in a removable block
    removable = [c.name for c in found.values() if c.removable]
    kept = {q: c for q, c in found.items()
            if not any(q.startswith(r + ".") for r in removable)}
    # blocks of the same (non-torch.nn) class without an identity shortcut: report, to mark stage starts
    kinds = {type(modules[q]) for q in kept if not type(modules[q]).__module__.startswith("torch.nn")}
    for q, m in modules.items():
        if q in kept or type(m) not in kinds or q not in members:
            continue
        if any(q.startswith(k + ".") or k.startswith(q + ".") for k in kept):
            continue
        reason = (f"it is called {len(calls[q])} times" if len(calls[q]) > 1
                  else "it has no identity shortcut: its output is not input + f(input)")
        kept[q] = _Candidate(q, first[q], False, reason)
    return sorted(kept.values(), key=lambda c: c.order)


def _child_of(block: str, target: str) -> str:
    """The direct child of ``block`` that holds module ``target`` (names the shortcut)."""
    if not target.startswith(block + "."):
        return target
    return block + "." + target[len(block) + 1:].split(".")[0]


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError(f"`example_inputs` must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def find_blocks(model: nn.Module, example_inputs: Any) -> list[Block]:
    """Residual blocks of ``model`` in forward order, removable or not (see :class:`Block`).

    One fx trace finds the structure; one forward on ``example_inputs`` (eval mode, no grad)
    gives shapes and MACs and checks that each removable block keeps its input's shape and is
    called with that input alone (else ``nn.Identity`` could not stand in for it).
    """
    inputs = _as_inputs(example_inputs)
    cands = _structure(model)
    modules = dict(model.named_modules())
    seen: dict[str, dict[str, Any]] = {}
    handles = []

    def hook(q):
        def fn(m, args, kwargs, out):
            rec = seen.setdefault(q, {"calls": 0})
            rec["calls"] += 1
            x = args[0] if args else None
            rec["in"] = tuple(x.shape) if isinstance(x, torch.Tensor) else None
            rec["out"] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            rec["single"] = len(args) == 1 and not kwargs and isinstance(x, torch.Tensor)
        return fn

    for c in cands:
        handles.append(modules[c.name].register_forward_hook(hook(c.name), with_kwargs=True))
    try:
        cost = count(model, inputs, reuse=False)  # the hooks above must see a forward
    finally:
        for h in handles:
            h.remove()

    blocks: list[Block] = []
    stage, prev = -1, None
    for c in cands:
        rec = seen.get(c.name)
        removable, reason = c.removable, c.reason
        if rec is None:
            removable, reason = False, "it does not run on the example inputs"
        elif removable and not rec["single"]:
            removable, reason = False, "it is not called with a single tensor, so nn.Identity cannot replace it"
        elif removable and rec["in"] != rec["out"]:
            removable, reason = False, f"its output shape {list(rec['out'] or [])} differs from its input shape {list(rec['in'] or [])}"
        if not removable and rec and rec["in"] and rec["out"] and rec["in"] != rec["out"] and "shape" not in reason:
            reason += f" (input {list(rec['in'])}, output {list(rec['out'])})"
        in_shape = tuple(rec["in"] or ()) if rec else ()
        parent = c.name.rpartition(".")[0]
        if prev is None or not removable or parent != prev[0] or in_shape != prev[1]:
            stage += 1
        prev = (parent, tuple(rec["out"] or ()) if rec else ())
        macs = sum(layer.macs for layer in cost.layers if layer.name.startswith(c.name + "."))
        params = sum(p.numel() for p in modules[c.name].parameters())
        blocks.append(Block(c.name, stage, macs, params, in_shape, removable, reason))
    return blocks


# -- removal ---------------------------------------------------------------------------------------
def _set(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    old = holder._modules[child]
    holder._modules[child] = new  # plain dict access also works for names such as 'block1-0'
    return old


def block_names(blocks: Iterable[Block | str]) -> list[str]:
    if isinstance(blocks, (str, Block)):
        blocks = [blocks]
    out = []
    for b in blocks:
        name = b.name if isinstance(b, Block) else b
        if not isinstance(name, str):
            raise TypeError(f"blocks must be names or Block objects, got {type(b).__name__}")
        if name not in out:
            out.append(name)
    return out


def _forward(model: nn.Module, inputs: tuple) -> Any:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return model(*inputs)
    finally:
        for m, t in modes.items():
            m.training = t


def remove_blocks(model: nn.Module, blocks: Iterable[Block | str], example_inputs: Any = None) -> nn.Module:
    """Replace each named removable block by ``nn.Identity()`` in place, so its parameters go.

    Everything is checked before anything changes: an unknown or non-removable block raises
    :class:`PruningError` naming it, and the model is untouched. With ``example_inputs`` the
    checks include shapes, and the result is run once (restored on failure); without them only
    the fx structure is used.
    """
    names = block_names(blocks)
    if example_inputs is not None:
        inputs = _as_inputs(example_inputs)
        found = {b.name: (b.removable, b.reason) for b in find_blocks(model, inputs)}
    else:
        inputs = None
        found = {c.name: (c.removable, c.reason) for c in _structure(model)}
    for n in names:
        if n not in found:
            ok = [b for b, (r, _) in found.items() if r]
            raise PruningError(f"'{n}' is not a block of {type(model).__name__}; removable blocks: "
                               f"{', '.join(ok[:12]) or 'none'}{' ...' if len(ok) > 12 else ''}")
        if not found[n][0]:
            raise PruningError(f"block '{n}' cannot be removed: {found[n][1]}")
    ref = None
    if inputs is not None:
        out = _forward(model, inputs)
        ref = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    olds = {n: _set(model, n, nn.Identity()) for n in names}
    if inputs is not None:
        try:
            out = _forward(model, inputs)
            if ref is not None and tuple(out.shape) != ref:
                raise PruningError(f"removing {names} changed the output shape from {list(ref)} to {list(out.shape)}")
        except Exception as err:
            for n, m in olds.items():
                _set(model, n, m)
            if isinstance(err, PruningError):
                raise
            raise PruningError(f"the model no longer runs after removing {names}: {type(err).__name__}: {err}") from err
    return model


class _Stop(Exception):
    pass


def _head(model: nn.Module, inputs: tuple, cut: str, later: list[str]) -> str:
    """The classifier head (the last Linear to run), checked to follow the cut through
    parameter-free layers only."""
    order: list[str] = []  # the parametrised leaves, in the order of one forward
    handles = [m.register_forward_hook(lambda m, a, o, n=n: order.append(n))
               for n, m in model.named_modules() if n and not m._modules and any(True for _ in m.parameters(recurse=False))]
    try:
        _forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    linears = [i for i, n in enumerate(order) if isinstance(modules[n], nn.Linear)]
    if not linears:
        raise PruningError(f"{type(model).__name__} has no nn.Linear classifier head to replace")
    head_at = linears[-1]
    head = order[head_at]
    if len(set(order[head_at:])) > 1 or order.count(head) > 1:
        raise PruningError(f"'{head}' is not the last layer of {type(model).__name__}, so it cannot be the head")
    in_cut = [i for i, n in enumerate(order) if n.startswith(cut + ".")]
    start = in_cut[-1] + 1 if in_cut else 0
    stray = [n for n in order[start:head_at] if not any(n.startswith(b + ".") for b in later)]
    if stray:
        raise PruningError(f"cannot truncate {type(model).__name__} after '{cut}': layer(s) with parameters "
                           f"{sorted(set(stray))[:6]} run between the cut and the head '{head}'; truncate needs "
                           "a chain of residual stages followed by pooling and a Linear head")
    return head


def _outermost_gone(modules: dict[str, nn.Module], later: list[str]) -> list[str]:
    """The modules to replace: a container goes whole when all its children go."""
    gone = set(later)
    changed = True
    while changed:
        changed = False
        for q, m in modules.items():
            if q and q not in gone and m._modules and all(f"{q}.{c}" in gone for c in m._modules) \
                    and not any(q.startswith(g + ".") for g in gone):
                gone = {g for g in gone if not g.startswith(q + ".")} | {q}
                changed = True
    return sorted(g for g in gone if not any(g.startswith(o + ".") for o in gone))


def truncate(model: nn.Module, after: str | Block, num_classes: int | None = None, *,
             example_inputs: Any) -> nn.Module:
    """Cut a chain of residual stages after block ``after`` and attach a fresh ``nn.Linear`` head.

    This is the paper's released ``truncate`` mode: every block after the cut goes (a stage whose
    blocks all go is replaced whole), and the last ``nn.Linear`` of the forward (``fc``) becomes
    ``nn.Linear(C, num_classes)`` with C the channel count at the cut (``num_classes`` defaults to
    the old head's). ``after`` may also name a container of blocks (cut after its last one).
    Only parameter-free layers (pooling, flatten) may sit between the cut and the head: anything
    else (a norm layer sized for the old width, extra Linear layers, a layer between stages)
    raises :class:`PruningError` and leaves the model untouched. In place; returns ``model``.
    """
    inputs = _as_inputs(example_inputs)
    after = after.name if isinstance(after, Block) else after
    blocks = find_blocks(model, inputs)
    names = [b.name for b in blocks]
    inside = [n for n in names if n.startswith(after + ".")]
    if after in names:
        cut = after
    elif inside:
        cut = inside[-1]
    else:
        raise PruningError(f"'{after}' is not a block of {type(model).__name__} nor a container of blocks; "
                           f"blocks: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    later = names[names.index(cut) + 1:]

    head = _head(model, inputs, cut, later)
    modules = dict(model.named_modules())
    gone = _outermost_gone(modules, later)

    old_head = modules[head]
    olds: dict[str, nn.Module] = {}
    try:
        for g in gone:
            olds[g] = _set(model, g, nn.Identity())
        seen: list[torch.Size] = []

        def stop(m, a):  # the old head no longer fits: stop the forward at its input
            seen.append(a[0].shape)
            raise _Stop

        h = old_head.register_forward_pre_hook(stop)
        try:
            _forward(model, inputs)
        except _Stop:
            pass
        finally:
            h.remove()
        c = seen[-1][-1]
        n_out = old_head.out_features if num_classes is None else int(num_classes)
        w = old_head.weight
        olds[head] = _set(model, head, nn.Linear(c, n_out, bias=old_head.bias is not None, device=w.device, dtype=w.dtype))
        out = _forward(model, inputs)
        if not isinstance(out, torch.Tensor) or out.shape[-1] != n_out:
            raise PruningError(f"the truncated model gives {getattr(out, 'shape', type(out).__name__)}, not [..., {n_out}]")
    except Exception as err:
        for n in reversed(list(olds)):
            _set(model, n, olds[n])
        if isinstance(err, PruningError):
            raise
        raise PruningError(f"cannot truncate {type(model).__name__} after '{cut}': {type(err).__name__}: {err}") from err
    return model


@dataclass
class LayerPlan:
    """Whole blocks to remove (or a cut after one block), with the scores that chose them: the
    depth counterpart of :class:`~secateurs.surgery.PruningPlan`."""

    remove: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    truncate_after: str | None = None

    def summary(self) -> dict[str, float]:
        return {n: round(self.scores.get(n, float("nan")), 4) for n in self.remove}

    def apply(self, model: nn.Module, example_inputs: Any) -> None:
        if self.truncate_after is not None:
            truncate(model, self.truncate_after, example_inputs=example_inputs)
        else:
            remove_blocks(model, self.remove, example_inputs)
