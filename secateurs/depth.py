"""Depth surgery: find residual blocks that can go, remove them, or truncate the network after one.

A block is removable when its output is ``input + f(input)`` through an identity shortcut (possibly
followed by parameter-free ops, such as a ReLU, that leave its input unchanged): replacing it by
``nn.Identity()`` then keeps every shape in the network, and if ``f`` is (near) zero it keeps the
function too. This is found from the :mod:`torch.fx` graph (:mod:`secateurs.residual`), not from
class names, so any architecture built from such blocks works.
Blocks whose shortcut is a projection (they change shapes) are reported as non-removable.

How the blocks are scored (PLS-VIP of their outputs) lives in :mod:`secateurs.pls`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from ._hooks import until
from ._modes import in_mode
from ._state import copy_model
from ._validation import PruningError
from .cost import count
from .residual import out_of_place, residual_units

__all__ = ["Block", "LayerPlan", "find_blocks", "remove_blocks", "truncate", "block_names"]


@dataclass(frozen=True)
class Block:
    """A residual unit of the model, in forward order.

    ``stage`` numbers runs of consecutive blocks that share a parent container and a shape (a
    non-removable block, e.g. a down-sampling one, starts a new stage), so a budget can keep at
    least one block per stage. ``macs`` (per sample) and ``params`` are the block's own.
    ``replacement`` names the block's own submodule that stands in for it when the ops after its
    add change its input (a CSP block's leaky ``act3``); empty: ``nn.Identity``.
    """

    name: str
    stage: int
    macs: int
    params: int
    input_shape: tuple[int, ...]
    removable: bool
    reason: str = ""
    replacement: str = ""


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError(f"`example_inputs` must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def find_blocks(model: nn.Module, example_inputs: Any) -> list[Block]:
    """Residual blocks of ``model`` in forward order, removable or not (see :class:`Block`).

    The fx graph finds the structure (:func:`secateurs.residual.residual_units`); a counting pass on
    ``example_inputs`` (eval mode, no grad) gives shapes and MACs and checks that each removable
    block runs once, keeps its input's shape and is called with that input alone, and one real
    forward checks that the ops after its add leave its input unchanged (else ``nn.Identity``
    could not stand in for it, and only a block whose tail is one stateless submodule of its own,
    which then replaces it, stays removable).
    """
    inputs = _as_inputs(example_inputs)
    cands = residual_units(model)
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

    # a counting pass that needs values restarts (meta, then real): only the last pass's calls count
    handles.append(model.register_forward_pre_hook(lambda m, args: seen.clear()))
    for c in cands:
        handles.append(modules[c.name].register_forward_hook(hook(c.name), with_kwargs=True))
    try:
        cost = count(model, inputs, reuse=False)  # the hooks above must see a forward
    finally:
        for h in handles:
            h.remove()
    tails = _tail_verdicts(model, [c for c in cands if c.removable and c.tail is not None], inputs)

    blocks: list[Block] = []
    stage, prev = -1, None
    for c in cands:
        rec = seen.get(c.name)
        removable, reason, replacement = c.removable, c.reason, ""
        if rec is None:
            removable, reason = False, "it does not run on the example inputs"
        elif removable and rec["calls"] > 1:
            removable, reason = False, f"it is called {rec['calls']} times"
        elif removable and not rec["single"]:
            removable, reason = False, "it is not called with a single tensor, so nn.Identity cannot replace it"
        elif removable and rec["in"] != rec["out"]:
            removable, reason = False, f"its output shape {list(rec['out'] or [])} differs from its input shape {list(rec['in'] or [])}"
        elif removable and tails.get(c.name):
            if c.tail_child:  # tail(x + 0) is tail(x): the block's own tail module stands in for it
                replacement = c.tail_child
            else:
                removable, reason = False, tails[c.name]
        if not removable and rec and rec["in"] and rec["out"] and rec["in"] != rec["out"] and "shape" not in reason:
            reason += f" (input {list(rec['in'])}, output {list(rec['out'])})"
        in_shape = tuple(rec["in"] or ()) if rec else ()
        parent = c.name.rpartition(".")[0]
        if prev is None or not removable or parent != prev[0] or in_shape != prev[1]:
            stage += 1
        prev = (parent, tuple(rec["out"] or ()) if rec else ())
        macs = sum(layer.macs for layer in cost.layers if layer.name.startswith(c.name + "."))
        params = sum(p.numel() for p in modules[c.name].parameters())
        blocks.append(Block(c.name, stage, macs, params, in_shape, removable, reason, replacement))
    return blocks


def _tail_verdicts(model: nn.Module, units: list, inputs: tuple) -> dict[str, str]:
    """{unit: why not} for the units whose ops after the add change their input, from one real forward
    (the count may have run on meta tensors): relu(x + f(x)) is x where f is zero only if x >= 0, as
    after the ReLU that ends every torchvision ResNet block, not on a CSP stage's raw input."""
    verdicts: dict[str, str] = {}

    def check(u):
        def fn(m, args):  # one input at a time: nothing is kept but the verdict
            x = args[0] if args else None
            try:
                y = u.tail(x.clone()) if isinstance(x, torch.Tensor) else None
                ok = isinstance(y, torch.Tensor) and y.shape == x.shape and bool(torch.allclose(y, x, rtol=1e-5, atol=1e-6))
                verdicts[u.name] = "" if ok else (
                    f"{', '.join(repr(o) for o in u.tail_ops)} after its residual add change(s) its input, so even with "
                    "a zero branch nn.Identity would not stand in for it (e.g. a ReLU on an input that can be negative)")
            except Exception as err:  # a tail that cannot run alone is not known to be safe
                verdicts[u.name] = f"the ops after its residual add could not be checked: {type(err).__name__}: {err}"
        return fn

    if not units:
        return {}
    modules = dict(model.named_modules())
    handles = [modules[u.name].register_forward_pre_hook(check(u)) for u in units]
    try:
        _forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return {u.name: verdicts.get(u.name, "it did not run on a real forward, so the ops after its add are unchecked")
            for u in units if verdicts.get(u.name) != ""}


# -- removal ---------------------------------------------------------------------------------------
def _set(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    old = holder._modules[child]
    holder._modules[child] = new  # plain dict access also works for names such as 'block1-0'
    return old


def _stand_in(block: nn.Module, child: str) -> nn.Module:
    """What replaces a removed block: ``nn.Identity()``, or its own tail submodule ``child``
    (tagged by ``remove_blocks`` once the removal stands, so :func:`secateurs.save` records it)."""
    # a copy (it holds no parameters): a removal that fails leaves the block's own tail as it was
    return out_of_place(copy_model(block.get_submodule(child))) if child else nn.Identity()


def block_names(blocks: Iterable[Block | str]) -> list[str]:
    if isinstance(blocks, (str, Block)):
        blocks = [blocks]
    if not isinstance(blocks, Iterable):
        raise TypeError(f"`blocks` must be block names or Block objects, got {type(blocks).__name__}")
    out = []
    for b in blocks:
        name = b.name if isinstance(b, Block) else b
        if not isinstance(name, str):
            raise TypeError(f"blocks must be names or Block objects, got {type(b).__name__}")
        if name not in out:
            out.append(name)
    return out


def _forward(model: nn.Module, inputs: tuple) -> Any:
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    with in_mode(model, training=False), torch.no_grad():
        return model(*inputs)


def remove_blocks(model: nn.Module, blocks: Iterable[Block | str], example_inputs: Any = None) -> nn.Module:
    """Replace each named removable block by ``nn.Identity()`` in place, so its parameters go.

    Everything is checked before anything changes: an unknown or non-removable block raises
    :class:`PruningError` naming it, and the model is untouched. With ``example_inputs`` the
    checks include shapes and the ops after each add (see :func:`find_blocks`; a block whose tail
    changes its input is replaced by that tail, its own submodule, instead), and the result is run
    once (restored on failure); without them only the fx structure is used: a block whose tail is
    one of its own stateless submodules is replaced by it (``tail(x + 0)`` is ``tail(x)``, whatever
    ``x`` holds), any other by ``nn.Identity``, exact only if its tail leaves ``x`` unchanged: pass
    the inputs to have that checked.
    """
    names = block_names(blocks)
    if example_inputs is not None:
        inputs = _as_inputs(example_inputs)
        found = {b.name: (b.removable, b.reason, b.replacement) for b in find_blocks(model, inputs)}
    else:
        inputs = None
        found = {c.name: (c.removable and not c.alone, c.reason or "it was found by tracing a submodule on its own "
                          "(fx cannot trace the model whole): pass example_inputs so a forward checks how it is called",
                          c.tail_child or "") for c in residual_units(model)}
    for n in names:
        if n not in found:
            ok = [b for b, (r, _, _) in found.items() if r]
            raise PruningError(f"'{n}' is not a block of {type(model).__name__}; removable blocks: "
                               f"{', '.join(ok[:12]) or 'none'}{' ...' if len(ok) > 12 else ''}")
        if not found[n][0]:
            raise PruningError(f"block '{n}' cannot be removed: {found[n][1]}")
    ref = None
    if inputs is not None:
        out = _forward(model, inputs)
        ref = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    olds = {n: _set(model, n, _stand_in(model.get_submodule(n), found[n][2])) for n in names}
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
    for n in names:
        if found[n][2]:
            model.get_submodule(n)._secateurs_child = found[n][2]  # save/load rebuild it as the block's own child
    return model


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
    if not isinstance(after, str):
        raise TypeError(f"`after` must be a block name or a Block, got {type(after).__name__}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"`num_classes` must be a positive int or None, got {num_classes!r}")
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
        c = until(old_head, lambda: _forward(model, inputs)).shape[-1]  # the old head no longer fits: not run
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
