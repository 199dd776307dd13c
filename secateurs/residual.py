"""Residual units from the :mod:`torch.fx` graph: which submodules compute ``input + f(input)``
through an identity shortcut (possibly followed by parameter-free ops such as a ReLU), judged from
the nodes inside each unit only, never from class names. :mod:`secateurs.depth` adds shapes, MACs
and the surgery that removes them.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ._validation import PruningError
from .fxtrace import trace_fx

__all__ = ["Unit", "residual_units", "out_of_place"]

_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass
class Unit:
    """A candidate block before shapes are known: ``removable`` when its output is input + f(input)."""

    name: str
    order: int  # position of its first node in the graph: forward order
    removable: bool
    reason: str
    alone: bool = False  # found by tracing a submodule on its own: how its caller calls it is unseen
    tail: Any = field(default=None, repr=False, compare=False)  # the parameter-free ops after the add, callable
    tail_ops: tuple = ()  # their names, for messages
    tail_child: str | None = None  # the tail when it is one stateless submodule of the unit: its name in the unit


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


def _unwrap_identity(node: Any, modules: dict[str, nn.Module], members: set) -> Any:
    """Through the unit's own ``nn.Identity`` calls (the CIFAR ResNet shortcut is one); one outside
    the unit, such as a removed block before it, is where its input comes from."""
    while (isinstance(node, fx.Node) and node in members and node.op == "call_module"
           and isinstance(modules[node.target], nn.Identity)):
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


def residual_units(model: nn.Module, prefix: str = "") -> list[Unit]:
    """Residual units of ``model`` from its fx graph (no shapes: those need example inputs), named
    ``prefix`` + their name in ``model``.

    A model whose own forward fx cannot trace (ultralytics' DetectionModel runs its layers by
    index from a list) is traced piecewise, each child on its own (in registration order, the
    forward order of such layer lists), and so is every submodule fx had to keep opaque: a residual
    unit is judged from its own nodes only, so the caller's dataflow is not needed, but how the
    caller calls it is unseen (``Unit.alone``): ``depth.find_blocks`` checks that on a real forward.
    Non-removable look-alikes (same class, no identity shortcut) are listed only within the piece
    that holds them, so a piecewise trace may leave some stage markers out.
    """
    try:
        graph, leaves = trace_fx(model)
    except PruningError:
        parts = []
        for name, child in model.named_children():
            try:
                parts += residual_units(child, f"{prefix}{name}.")
            except PruningError:
                continue
        if not parts:
            raise  # nothing found piecewise: fx's own reason is the useful one
        return [replace(c, order=i) for i, c in enumerate(parts)]
    units = _units(model, graph, prefix)
    if prefix:
        units = [replace(c, alone=True) for c in units]
    return _inside_opaque(model, graph, leaves, units, prefix)


def _inside_opaque(model: nn.Module, graph: fx.Graph, leaves: list[str], units: list[Unit],
                   prefix: str) -> list[Unit]:
    """``units`` and the residual units inside the submodules the trace kept opaque (ultralytics'
    C2f makes a list of its input), in forward order. A leaf's own trace judges it better than the
    caller's graph, where it is one opaque node."""
    at: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        if n.op == "call_module":
            at.setdefault(str(n.target), i)
    modules = dict(model.named_modules())
    removable = [c.name for c in units if c.removable]
    inner: list[tuple[tuple[int, int], Unit]] = []
    for leaf in leaves:
        if leaf not in at or any(f"{prefix}{leaf}".startswith(r + ".") for r in removable):
            continue
        try:
            inner += [((at[leaf], c.order), c) for c in residual_units(modules[leaf], f"{prefix}{leaf}.")]
        except PruningError:
            continue
    judged = {c.name for _, c in inner}
    keyed = [((c.order, -1), c) for c in units if c.name not in judged] + inner
    return [replace(c, order=i) for i, (_, c) in enumerate(sorted(keyed, key=lambda kc: kc[0]))]


def _membership(graph: fx.Graph, piece: bool) -> tuple[dict, dict, dict, dict]:
    """{module: its nodes}, {module: index of its first node}, {module: its call keys} and {node: the
    innermost module running it}, from fx's module stacks. A ``piece`` (a submodule traced on its
    own) is itself a module of its graph, named ""."""
    members: dict[str, set[fx.Node]] = {}
    first: dict[str, int] = {}
    calls: dict[str, set[str]] = {}
    innermost: dict[fx.Node, str] = {}
    for i, node in enumerate(graph.nodes):
        st = _stack(node)
        if piece and node.op not in ("placeholder", "output", "get_attr"):
            st = [("", "")] + st
        if st:
            innermost[node] = st[-1][1]
        for key, q in st:
            members.setdefault(q, set()).add(node)
            first.setdefault(q, i)
            calls.setdefault(q, set()).add(key)
    return members, first, calls, innermost


def _units(model: nn.Module, graph: fx.Graph, prefix: str) -> list[Unit]:
    modules = dict(model.named_modules())
    members, first, calls, innermost = _membership(graph, piece=bool(prefix))
    full = lambda q: prefix + q if q else prefix[:-1]  # noqa: E731
    found: dict[str, Unit] = {}
    for q, mem in members.items():
        if (not q and not prefix) or q not in modules:
            continue
        if len(calls[q]) > 1:
            continue  # judged below by the sibling rule, if at all
        ext = {a for n in mem for a in n.all_input_nodes if a not in mem and a.op != "get_attr"}
        outs = [n for n in mem if any(u not in mem for u in n.users)]
        if len(ext) != 1 or len(outs) != 1:
            continue
        (x,), out = ext, outs[0]
        # walk back over a parameter-free tail (ReLU, dropout, ...) to the residual add
        node, tail_params, tail = out, [], []
        while node in mem and not _is_add(node) and len(node.all_input_nodes) == 1:
            if _params_of(modules, node):
                tail_params.append(full(str(node.target)))
            tail.insert(0, node)
            node = node.all_input_nodes[0]
        if node not in mem or not _is_add(node):
            continue
        add = node
        ops = [_unwrap_identity(a, modules, mem) for a in add.args[:2]]
        if len(ops) != 2 or not all(isinstance(a, fx.Node) for a in ops):
            continue
        own = innermost.get(add) == q
        if x in ops:
            other = ops[1] if ops[0] is x else ops[0]
            if other is x or not _depends_on(other, x, mem):
                continue  # x + x or x + constant: not a residual branch
            if tail_params:
                if own:
                    found[q] = Unit(full(q), first[q], False, f"layer(s) with parameters {tail_params} follow the residual add, "
                                          "so the block is not input + f(input)")
                continue
            try:
                check = _tail_module(model, add, tail) if tail else None
            except Exception as err:  # a tail that cannot be rebuilt cannot be checked: not known to be safe
                found[q] = Unit(full(q), first[q], False, f"the ops after its residual add could not be rebuilt to check "
                                f"them: {type(err).__name__}: {err}")
                continue
            found[q] = Unit(full(q), first[q], True, "", tail=check, tail_ops=tuple(_op_name(n, full) for n in tail),
                            tail_child=_own_child(modules, q, tail))
        elif own and all(_depends_on(a, x, mem) for a in ops):
            # the shortcut is the operand with the shorter history inside the block
            short = min(ops, key=lambda a: _history(a, x, mem))
            mods = [n.target for n in _path(short, x, mem) if n.op == "call_module"]
            names = list(dict.fromkeys(full(_child_of(q, t)) for t in mods))
            via = f"goes through {', '.join(repr(n) for n in names)}" if names else "is not an identity"
            found[q] = Unit(full(q), first[q], False, f"its shortcut {via} (a projection), so removing it would change "
                                  "the tensor that the next layer receives")

    # the largest unit wins: drop candidates nested in a removable block
    removable = [c.name for c in found.values() if c.removable]
    kept = {q: c for q, c in found.items()
            if not any(c.name.startswith(r + ".") for r in removable)}
    # blocks of the same (non-torch.nn) class without an identity shortcut: report, to mark stage starts
    kinds = {type(modules[q]) for q in kept if not type(modules[q]).__module__.startswith("torch.nn")}
    for q, m in modules.items():
        if q in kept or type(m) not in kinds or q not in members:
            continue
        if any(not k or q.startswith(k + ".") or k.startswith(q + ".") for k in kept):
            continue
        reason = (f"it is called {len(calls[q])} times" if len(calls[q]) > 1
                  else "it has no identity shortcut: its output is not input + f(input)")
        kept[q] = Unit(full(q), first[q], False, reason)
    return sorted(kept.values(), key=lambda c: c.order)


def _tail_module(root: nn.Module, add: fx.Node, tail: list[fx.Node]) -> fx.GraphModule:
    """The ops after a unit's residual add, as a module of one input: where they change that input
    (a ReLU on values that can be negative), ``nn.Identity`` is no stand-in for the unit even when
    its branch is zero."""
    g = fx.Graph()
    env = {add: g.placeholder("x")}
    for n in tail:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[tail[-1]])
    return fx.GraphModule(root, g)


def _own_child(modules: dict[str, nn.Module], q: str, tail: list[fx.Node]) -> str | None:
    """The tail's name inside unit ``q`` when it is a single call of one of the unit's own stateless
    submodules (a CSP block's ``act3``): the unit can then be replaced by it, exactly, when its
    branch is zero, where ``nn.Identity`` would not be (a leaky ReLU changes negative inputs)."""
    if not q or len(tail) != 1 or tail[0].op != "call_module" or not str(tail[0].target).startswith(q + "."):
        return None
    m = modules[str(tail[0].target)]
    if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
        return None
    return str(tail[0].target)[len(q) + 1:]


def out_of_place(tail: nn.Module) -> nn.Module:
    """A removed block's tail submodule made to stand in for it: in the block an in-place tail wrote
    into the sum ``x + f(x)``; standing in, it would write into ``x``, which a skip or a feature tap
    may still read. Returns ``tail``, with ``inplace`` off."""
    if getattr(tail, "inplace", False):
        tail.inplace = False
    return tail


def _op_name(node: fx.Node, full: Any) -> str:
    if node.op == "call_module":
        return full(str(node.target))
    return getattr(node.target, "__name__", str(node.target))


def _child_of(block: str, target: str) -> str:
    """The direct child of ``block`` that holds module ``target`` (names the shortcut)."""
    if not block:
        return target.split(".")[0]
    if not target.startswith(block + "."):
        return target
    return block + "." + target[len(block) + 1:].split(".")[0]
