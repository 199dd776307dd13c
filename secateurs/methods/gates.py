"""Per-channel gates shared by HFP (method 3) and importance weights (method 4): where a channel's
multiplier goes (after the norm layer that carries it, else after its producing conv), learnable
scales with exact folding, and the mean |gate| per channel component."""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ..graph import DependencyGraph
from ..train import LR_ATTR

__all__ = ["GATED_NORMS", "ChannelScales", "SharedScales", "carriers", "carrier_count", "mean_abs", "out_channel_norms"]

GATED_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)  # norm layers whose |scale| gates a channel


def scale_channels(out: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``out`` with channel (dim 1; the last dim of a 2-d output) ``c`` multiplied by ``s[c]``."""
    return out * (s if out.dim() == 2 else s.view(1, -1, *([1] * (out.dim() - 2))))


def _norm_act(m: nn.Module) -> nn.Module | None:
    """The activation a norm layer applies inside its own forward (timm's ``BatchNormAct2d``), if any."""
    act = getattr(m, "act", None)
    if isinstance(m, GATED_NORMS) and isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        return act
    return None


def _hook_output(m: nn.Module, scale: Callable[[torch.Tensor], torch.Tensor]):
    """Apply ``scale`` to ``m``'s output where folding it into ``m``'s weight and bias is exact: after
    a norm layer that applies its activation itself, on that activation's input (scaled after a SiLU,
    the fold was 2% off on timm's efficientnet_b0)."""
    act = _norm_act(m)
    if act is not None:
        return act.register_forward_pre_hook(lambda _, args: (scale(args[0]), *args[1:]))
    return m.register_forward_hook(lambda _, args, out: scale(out))


class ChannelScales:
    """Learnable per-channel multipliers on module outputs (convs, transposed convs, linears, or
    affine norm layers), trained with the network and folded back into it exactly.

    Each scale is a parameter registered on its module (so any optimizer built afterwards trains
    it) and applied by a forward hook; :meth:`fold` multiplies it into the module's weight and bias
    and removes both, so the model is plain again (``conv(x) * s`` is ``conv_s(x)``, and
    ``norm(x) * s`` is the norm with ``s * weight`` and ``s * bias``; a norm layer that applies its
    activation itself is scaled before it). ``init`` gives starting
    values per module (default ones); ``lr``, if given, is the scales' own learning rate in
    :func:`secateurs.train.make_optimizer` (a short phase at the network's rate barely moves them).
    """

    NAME = "secateurs_scale"

    def __init__(self, model: nn.Module, modules: Iterable[str], init: Mapping[str, torch.Tensor] | None = None,
                 lr: float | None = None) -> None:
        self.model, self.handles, self.scales = model, [], {}
        for name in modules:
            m = model.get_submodule(name)
            width = _out_width(m, name)
            start = torch.ones(width) if init is None or name not in init else torch.as_tensor(init[name]).float()
            if start.shape != (width,):
                raise ValueError(f"module '{name}': init has shape {tuple(start.shape)}, expected ({width},)")
            p = nn.Parameter(start.clone().to(m.weight.device))
            if lr is not None:
                setattr(p, LR_ATTR, float(lr))
            m.register_parameter(self.NAME, p)
            self.scales[name] = p
            self.handles.append(_hook_output(m, functools.partial(self._scaled, m)))

    @staticmethod
    def _scaled(m: nn.Module, out: torch.Tensor) -> torch.Tensor:
        s = getattr(m, ChannelScales.NAME)
        return out * s if isinstance(m, nn.Linear) else scale_channels(out, s)

    def fold(self) -> None:
        with torch.no_grad():
            for name, p in self.scales.items():
                m = self.model.get_submodule(name)
                w = m.weight
                if isinstance(m, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, *k)
                    g = m.groups
                    w.view(g, w.shape[0] // g, w.shape[1], -1).mul_(p.view(g, 1, w.shape[1], 1))
                elif isinstance(m, GATED_NORMS):
                    w.mul_(p)
                else:
                    w.mul_(p.view(-1, *([1] * (w.dim() - 1))))
                if m.bias is not None:
                    m.bias.mul_(p)
                del m._parameters[self.NAME]
        for h in self.handles:
            h.remove()
        self.handles, self.scales = [], {}


class SharedScales:
    """One learnable multiplier per channel *component*, applied after every norm layer that
    carries it: a channel of a residual group carried by several norm layers gets a single gate,
    pushed by the channel's whole cost (the mean of their |scales| moves 1/K as fast and needs all
    K of them to shrink).

    The parameter lives on the model's root while training (so an optimizer built afterwards
    trains it); :meth:`fold` multiplies it into each carrier's weight and bias and removes it.
    ``init`` (one value per component, positive) starts the gates there instead of at 1 and divides
    each carrier's weight and bias by it, so the model computes the same function: a trained
    network's ranking of its channels (their mean |scale|) carries over into the gates.
    """

    NAME = "secateurs_shared_scale"

    def __init__(self, model: nn.Module, carriers_: Mapping[str, torch.Tensor], components: torch.Tensor,
                 n_components: int, init: torch.Tensor | None = None) -> None:
        self.model, self.handles = model, []
        self.components = components  # the component ids that get a shared gate
        slot = torch.full((n_components,), -1, dtype=torch.long)
        slot[components] = torch.arange(len(components))
        dev = next(model.parameters()).device
        start = torch.ones(len(components)) if init is None else torch.as_tensor(init, dtype=torch.float).detach().cpu()
        if start.shape != (len(components),) or not bool((start > 0).all()):
            raise ValueError(f"init: one positive value per shared component ({len(components)}), got shape "
                             f"{tuple(start.shape)}" + (f", min {float(start.min()):g}" if start.numel() else ""))
        self.param = nn.Parameter(start.clone().to(dev))
        self.where: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, lab in carriers_.items():
            idx = slot[lab]
            mask = idx >= 0
            if mask.any():
                self.where[name] = (mask.to(dev), idx.clamp_min(0).to(dev))
        model.register_parameter(self.NAME, self.param)  # first: a name taken fails before the carriers change
        if init is not None:
            self._scale_carriers(inverse=True)
        for name in self.where:
            self.handles.append(_hook_output(model.get_submodule(name), functools.partial(self._scaled, name)))

    def _full(self, name: str) -> torch.Tensor:
        mask, idx = self.where[name]
        return torch.where(mask, self.param[idx], torch.ones_like(self.param[idx]))

    def _scaled(self, name: str, out: torch.Tensor) -> torch.Tensor:
        return scale_channels(out, self._full(name))

    def _scale_carriers(self, inverse: bool = False) -> None:
        """Each carrier's weight and bias times its gates (divided by them with ``inverse``)."""
        scale = torch.Tensor.div_ if inverse else torch.Tensor.mul_
        with torch.no_grad():
            for name in self.where:
                m = self.model.get_submodule(name)
                s = self._full(name)
                scale(m.weight, s)
                if m.bias is not None:
                    scale(m.bias, s)

    def fold(self) -> None:
        self._scale_carriers()
        for h in self.handles:
            h.remove()
        self.handles, self.where = [], {}  # folded once: a second call changes nothing
        self.model._parameters.pop(self.NAME, None)


def _out_width(m: nn.Module, name: str) -> int:
    if isinstance(m, GATED_NORMS) and getattr(m, "weight", None) is not None:
        return m.num_features if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.num_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    raise ValueError(f"module '{name}': channel scales go on conv, linear or affine norm outputs, "
                     f"not {type(m).__name__}")


def out_channel_norms(m: nn.Module) -> torch.Tensor:
    """L2 norm of each output channel's weights: a transposed conv stores them along dim 1, group by
    group (weight: in, out / groups, *k), every other layer along dim 0."""
    w = m.weight.detach()
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        g, per = m.groups, w.shape[1]
        return w.reshape(g, w.shape[0] // g, per, -1).transpose(1, 2).reshape(g * per, -1).norm(dim=1)
    return w.flatten(1).norm(dim=1)


def carriers(model: nn.Module, graph: DependencyGraph, transposed: bool = True) -> dict[str, torch.Tensor]:
    """Where a per-channel multiplier goes: after the affine norm layers that carry a prunable
    channel, else after its producing conv/linear (so a norm layer cannot undo it); transposed
    convs only if ``transposed``. Returns {module name: component label of each output channel}."""
    modules = dict(model.named_modules())
    prunable = torch.zeros(graph.n_components, dtype=torch.bool)
    for g in graph.groups:
        prunable[g.components] = True
    norms, producers = {}, {}
    for b, lab in zip(graph.bindings, graph.binding_labels):
        m = modules.get(b.module)
        if (b.kind == "tensor" and b.name == "weight" and isinstance(m, GATED_NORMS) and getattr(m, "affine", True)
                and prunable[lab].any()):
            norms[b.module] = lab
        elif (b.kind == "attr" and b.role == "out" and b.name in ("out_channels", "out_features")
              and prunable[lab].any() and (transposed or not isinstance(m, nn.modules.conv._ConvTransposeNd))):
            producers[b.module] = lab
    normed = torch.zeros(graph.n_components, dtype=torch.bool)
    for lab in norms.values():
        normed[lab] = True
    out = dict(norms)
    out.update({n: lab for n, lab in producers.items() if (prunable[lab] & ~normed[lab]).any()})
    return out


def carrier_count(labels: Iterable[torch.Tensor], n: int) -> torch.Tensor:
    """How many carriers each channel component has."""
    count = torch.zeros(n)
    for lab in labels:
        count.index_add_(0, lab, torch.ones(len(lab)))
    return count


def mean_abs(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], count: torch.Tensor) -> torch.Tensor:
    """Mean |value| per channel component over its carriers (0 where none); differentiable."""
    pairs = list(pairs)
    dev = pairs[0][0].device
    total = torch.zeros(len(count), device=dev)
    for w, lab in pairs:
        total = total.index_add(0, lab.to(dev), w.abs().float())
    return total / count.to(dev).clamp_min(1)

