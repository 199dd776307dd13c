"""Exact MACs and parameter counts under the convention of METHODS.md.

MACs count Conv (H_out*W_out*C_in*C_out*k/groups), ConvTranspose (the same per *input*
position) and Linear (in*out per token) layers, per sample; BN, activations, bias and pooling
are free. Params are all parameters of the model (BN affine included, running stats excluded).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ._stateless import walk
from ._validation import check_example_inputs, check_model
from .capture import capture
from .latency import measure_latency  # noqa: F401  (re-exported: the one harness lives in latency.py)

__all__ = ["Cost", "LayerCost", "PlanCost", "count", "measure_latency"]


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str
    macs: int
    params: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight: str = "weight"  # the parameter of ``name`` whose elements the MACs scale with


@dataclass(frozen=True)
class Cost:
    macs: int
    params: int
    layers: list[LayerCost] = field(default_factory=list)

    def __str__(self) -> str:
        return f"MACs {self.macs / 1e6:,.2f} M, params {self.params / 1e6:,.3f} M"

    def table(self) -> str:
        rows = [f"{'layer':<40} {'kind':<16} {'MACs':>14} {'params':>12}  out shape"]
        for r in self.layers:
            rows.append(f"{r.name:<40} {r.kind:<16} {r.macs:>14,} {r.params:>12,}  {list(r.output_shape)}")
        rows.append(f"{'total':<40} {'':<16} {self.macs:>14,} {self.params:>12,}")
        return "\n".join(rows)


def count(model: nn.Module, example_inputs: Any, *, reuse: bool = True) -> Cost:
    """MACs per sample and parameters of ``model``, with a per-layer breakdown.

    Counts every conv, transposed conv, linear and attention projection the eval-mode forward
    calls, whichever module calls them (functional calls included). Shapes come from a meta-tensor
    pass when the model allows it (no arithmetic), else from one real forward under
    ``torch.no_grad()``; the model is left as it was. With ``reuse`` a model counted before with no
    module, parameter, buffer, setting (stride, a forward flag) or input shape changed since gets the
    same result without a forward;
    ``reuse=False`` always runs one (forward hooks see it; a meta pass that turns out to need values
    is followed by a real one, so hooks can see both: the root's pre-hook marks each pass).
    """
    check_model(model)
    inputs = check_example_inputs(example_inputs)
    key = _signature(model, inputs)
    hit = _LAST.get(model) if reuse else None
    if hit is not None and hit[0] == key:
        return hit[1]
    records: list = []
    capture(model, inputs, costs=records, train_first=False)
    return remember(model, inputs, records, key)


def remember(model: nn.Module, inputs: tuple, records: list, key: tuple | None = None) -> Cost:
    """The :class:`Cost` of what a counting pass recorded (:func:`count`'s, or an analysis that
    counted too), remembered as the model's last count."""
    layers = [LayerCost(*r) for r in records]
    cost = Cost(sum(r.macs for r in layers), _n_params(model), layers)
    _LAST[model] = (key if key is not None else _signature(model, inputs), cost)
    return cost


# the last count of each model: a cut checks the model with one count, and the report's count that
# follows reuses it while no module, parameter, buffer, setting or input shape has changed
_LAST: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module, inputs: tuple) -> tuple:
    walked = walk(model)  # one walk: torch's recursive generators cost more than the comparison
    mods = tuple(id(m) for _, m in walked)
    tensors = tuple((id(t), t.shape) for _, m in walked for d in (m._parameters, m._buffers)
                    for t in d.values() if t is not None)
    shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in inputs)
    # settings such as stride, padding or a forward flag change the MACs without changing a shape
    settings = tuple(tuple((k, v) for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, _SETTINGS))
                     for _, m in walked)
    return mods, tensors, shapes, settings


_SETTINGS = (bool, int, float, str, tuple, type(None))


def _n_params(model: nn.Module) -> int:
    unique = {id(p): p for _, m in walk(model) for p in m._parameters.values() if p is not None}
    return sum(p.numel() for p in unique.values())


class PlanCost:
    """MACs and params of the model a plan would leave, computed without cutting anything.

    Every counted layer's MACs are (positions per sample) x (weight elements), and positions do
    not change with channel pruning; a pruned tensor keeps, along each bound axis, the positions
    none of whose channels is removed (as surgery does). So one gather and a few reductions give
    the exact cost of any plan, which lets the budget search try hundreds of plans per second.
    """

    def __init__(self, model: nn.Module, graph, example_inputs: Any, base: Cost | None = None) -> None:
        base = base or count(model, example_inputs)
        self.base = base
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        # bound axes of every parameter: (tensor key, axis) -> binding ids
        axes: dict[tuple[str, int], list[int]] = {}
        for i, b in enumerate(graph.bindings):
            if b.kind == "tensor" and b.name in modules[b.module]._parameters:
                key = f"{b.module}.{b.name}" if b.module else b.name
                axes.setdefault((key, b.axis), []).append(i)
        keys = list(dict.fromkeys(k for k, _ in axes))
        index = {k: j for j, k in enumerate(keys)}
        unbound = []
        for k in keys:
            shape = params[k].shape
            bound = {a for kk, a in axes if kk == k}
            unbound.append(math.prod(s for d, s in enumerate(shape) if d not in bound))
        self._unbound = torch.tensor(unbound, dtype=torch.long)
        self._fixed_params = sum(p.numel() for k, p in params.items() if k not in index)
        # one entry per (tensor, axis): its positions' component labels, stacked per binding
        single_labels, single_seg, self._multi = [], [], []
        entry_tensor, entry_size = [], []
        for e, ((k, a), ids) in enumerate(axes.items()):
            entry_tensor.append(index[k])
            entry_size.append(params[k].shape[a])
            if len(ids) == 1:
                lab = graph.binding_labels[ids[0]]
                single_labels.append(lab)
                single_seg.append(torch.full((len(lab),), e, dtype=torch.long))
            else:
                self._multi.append((e, torch.stack([graph.binding_labels[i] for i in ids])))
        self._labels = torch.cat(single_labels) if single_labels else torch.zeros(0, dtype=torch.long)
        self._seg = torch.cat(single_seg) if single_seg else torch.zeros(0, dtype=torch.long)
        self._entry_tensor = torch.tensor(entry_tensor, dtype=torch.long)
        self._entry_size = torch.tensor(entry_size, dtype=torch.long)
        # MACs: positions x weight elements for counted layers whose weights shrink
        weights_of = {"MultiheadAttention": ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                                             "out_proj.weight")}
        pos, tens, fixed = [], [], 0
        for layer in base.layers:
            names = [f"{layer.name}.{w}" if layer.name else w for w in weights_of.get(layer.kind, (layer.weight,))]
            names = [n for n in names if n in params]
            numel = sum(params[n].numel() for n in names)
            if not numel or not any(n in index for n in names):
                fixed += layer.macs
                continue
            if layer.macs % numel:
                raise ValueError(f"layer '{layer.name}': MACs {layer.macs} are not a multiple of its {numel} weights")
            for n in names:
                if n in index:
                    pos.append(layer.macs // numel)
                    tens.append(index[n])
                else:
                    fixed += layer.macs // numel * params[n].numel()
        self._fixed_macs = fixed
        self._mac_pos = torch.tensor(pos, dtype=torch.long)
        self._mac_tensor = torch.tensor(tens, dtype=torch.long)

    def soft(self, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(MACs, params) as differentiable functions of a per-component alive value in [0, 1].

        Every weight tensor costs the product of the alive counts along its bound axes, so a
        conv's cost falls with the channels on *both* of its sides (HFP's holistic coupling).
        With hard 0/1 values it equals ``self(~alive.bool())`` exactly.
        """
        n = len(self._entry_size)
        kept = torch.zeros(n, dtype=alive.dtype, device=alive.device).index_add(
            0, self._seg.to(alive.device), alive[self._labels.to(alive.device)])
        for e, lab in self._multi:  # several bindings on one axis: a position lives if all do
            kept = kept.index_put((torch.tensor([e], device=alive.device),),
                                  alive[lab.to(alive.device)].prod(0).sum().reshape(1))
        if not hasattr(self, "_axes_of"):
            rows = [[] for _ in range(len(self._unbound))]
            for e, t in enumerate(self._entry_tensor.tolist()):
                rows[t].append(e)
            width = max((len(r) for r in rows), default=1)
            self._axes_of = torch.tensor([r + [n] * (width - len(r)) for r in rows], dtype=torch.long)
        padded = torch.cat([kept, kept.new_ones(1)])
        numel = self._unbound.to(kept) * padded[self._axes_of.to(alive.device)].prod(1)
        macs = self._fixed_macs + (self._mac_pos.to(kept) * numel[self._mac_tensor.to(alive.device)]).sum()
        return macs, self._fixed_params + numel.sum()

    def __call__(self, removed: torch.Tensor) -> tuple[int, int]:
        """(MACs, params) after removing the components flagged in ``removed`` (bool per component)."""
        gone = torch.zeros(len(self._entry_size), dtype=torch.long)
        gone.index_add_(0, self._seg, removed[self._labels].long())
        kept = self._entry_size - gone
        for e, lab in self._multi:
            kept[e] = (~removed[lab]).all(0).sum()
        numel = self._unbound.clone().scatter_reduce_(0, self._entry_tensor, kept, reduce="prod")
        macs = self._fixed_macs + int((self._mac_pos * numel[self._mac_tensor]).sum())
        return macs, self._fixed_params + int(numel.sum())

