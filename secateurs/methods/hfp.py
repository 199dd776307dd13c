"""METHODS.md method 3, Holistic Filter Pruning (Enderich et al. 2021): a differentiable MACs/params
loss on per-channel gates during ordinary training, then the dead channels are cut."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from .._validation import check_choice, check_scalar
from ..budget import Allocator, Budget, fill, measure, threshold_search
from ..cost import Cost, PlanCost
from ..graph import DependencyGraph
from ..train import TrainConfig, fit
from .base import Decision, Method, Option, StepContext, register_method
from .gates import GATED_NORMS, ChannelScales, SharedScales, carrier_count, carriers, mean_abs

__all__ = ["HFPRegularizer", "HFPMethod"]


class HFPRegularizer:
    """The budget loss of Holistic Filter Pruning, for any training loop.

    One gate per channel: the |scale| of the norm layer that carries it; for a channel several norm
    layers carry (a residual stage) their mean |scale| (``tie="mean"``) or one explicit gate shared
    by all of them (``tie="shared"``, see :class:`SharedScales`; it starts at 1, ``"shared-mean"``
    starts it at their mean |scale| with the carriers divided by it, the same function); or an
    explicit :class:`ChannelScales` on its producing convs where no norm layer carries it (call
    :meth:`close` at the end to fold those back); a channel is alive while its gate exceeds
    ``threshold``. The loss is
    ``lam * sum over unmet targets of C(alive) / C_target`` (a target pulls while the *hard* count
    exceeds it, i.e. ``max(0, C/C_target - 1)`` with the surrogate's gradient), with C the differentiable MACs
    or params of :meth:`PlanCost.soft`, so every gate is pushed down in proportion to what its
    channel costs *including* its neighbours' inputs. ``surrogate="ste"`` counts hard gates and
    passes the gradient straight through (scaled by the initial mean gate); ``"soft"`` counts a
    sigmoid around the threshold; ``"cut"`` passes it straight through to the gates the target's cut
    would remove now (the lowest, as few as meet every target) and to no other: pushing every gate
    alike dragged the survivors' down with the dying ones (to a quarter of their size on ResNet-20).
    Under ``"cut"`` a gate that fell below the threshold stays dead (and pushed): its channel counts
    as cut whatever the gate reads later (the final cut re-adds the best dead channels that still fit).
    Counted afresh each step, the cut's last gates never all read dead at once: pushed on, momentum
    swings them around zero; left alone, the task loss lifts them back. A pushed gate can also swing
    around zero in steps larger than the threshold and never read below it (on ResNet-20 the last gate
    of a cut swung between 0.02 and 0.08 for 220 steps while the weight grew 4x), so under ``"cut"``
    a channel whose every carrier changed sign while pushed counts as dead too: it went through zero
    between two readings (crossings count within one push: the channel stayed in the cut since).
    That met the target in all three ResNet-20 rows at 50% (one had fallen back), but a residual
    channel's gate, the mean of several carriers, can still swing above the threshold with a carrier
    that never changes sign while its channel is in the cut (ResNet-20 at 30%: a 4-carrier gate between
    0.03 and 0.07 for 140 steps, one row of three fell back).
    Known limits: under ``"ste"`` and ``"soft"`` and a weight grown large (``ramp="grow"`` from a large
    ``lam``), gates can settle in that swing and the target is never met: the budget loss alone at
    lam 50 left ultralytics' yolo11n-seg at 0.85 of the MACs after 300 steps (at lam 5: 0.6 met in 111).
    Under ``"cut"`` each gate is still pushed in proportion to what its channel costs, so a cut that
    holds many cheap channels falls slowly: on freshly initialised library models (every gate 1, the
    cut a near-arbitrary set) the budget loss alone at lam 5 met 0.6 of timm's efficientnet_b1 in
    447 steps (``"ste"``: 124) and left smp's FPN:mobilenet_v2 at 0.615 after 700.
    ``lam`` ramps up linearly over ``warmup_steps``, then holds
    (``ramp="hold"``) or keeps rising at the same rate over the steps a target is unmet (``ramp="grow"``):
    the straight-through gradient is scaled by 1/mean gate, so with a held weight the steps the gates take
    to fall grow faster than their scale (about 6x for gates 3x higher, in the tests), and a network
    trained longer may miss its phase. ``done``
    turns true at the first step whose hard count meets every target.

    In your own loop::

        reg = HFPRegularizer(model, secateurs.analyze(model, x), x, macs=0.5)
        loss = criterion(model(xb), yb) + reg()       # every step; once reg.done, stop before stepping
                                                      # (these weights met the target; a step may undo it)
    """

    def __init__(self, model: nn.Module, graph: DependencyGraph, example_inputs: Any, macs: float | None = None,
                 params: float | None = None, lam: float = 5.0, warmup_steps: int = 100, threshold: float = 1e-2,
                 surrogate: str = "ste", base: Cost | None = None, tie: str = "mean", ramp: str = "hold") -> None:
        if macs is None and params is None:
            raise ValueError("HFP needs a target: `macs` and/or `params` (kept fractions)")
        for name, v in (("macs", macs), ("params", params)):  # kept fractions
            check_scalar(v, name, min_val=0, max_val=1, include_min=False, allow_none=True)
        check_choice(surrogate, "surrogate", SURROGATES)
        check_choice(tie, "tie", TIES)
        check_choice(ramp, "ramp", RAMPS)
        self.ramp = ramp
        self.cost = PlanCost(model, graph, example_inputs, base=base)
        self.graph, self.threshold, self.surrogate = graph, float(threshold), surrogate
        self.lam, self.warmup_steps, self.steps, self.unmet_steps = float(lam), max(1, int(warmup_steps)), 0, 0
        self.targets = {k: Budget(k, v).limit(self.cost.base) for k, v in (("macs", macs), ("params", params))
                        if v is not None}
        where = carriers(model, graph, transposed=False)
        modules = dict(model.named_modules())
        # norm layers gate their channels; channels no norm layer carries get explicit scales on their convs
        producers = {n: lab for n, lab in where.items() if not isinstance(modules[n], GATED_NORMS)}
        self._gates = [(modules[n].weight, lab) for n, lab in where.items() if n not in producers]
        self.scales = ChannelScales(model, producers) if producers else None
        if self.scales is not None:
            self._gates += [(self.scales.scales[n], lab) for n, lab in producers.items()]
        if not self._gates:
            raise ValueError("HFP found no gate: no norm layer and no prunable conv output in the model")
        prunable = torch.zeros(graph.n_components, dtype=torch.bool)
        for g in graph.groups:
            prunable[g.components] = True
        counts = carrier_count((lab for _, lab in self._gates), graph.n_components)
        self._count = counts
        self.shared = None  # channels several norm layers carry (residual groups): one gate of their own
        norms = {n: lab for n, lab in where.items() if n not in producers}
        multi = ((carrier_count(norms.values(), graph.n_components) > 1) & prunable).nonzero().flatten()
        if tie != "mean" and len(multi):
            start = None
            if tie == "shared-mean":  # the gate starts where the mean tie reads, the carriers rescaled to match
                with torch.no_grad():
                    start = mean_abs(self._gates, counts)[multi].cpu().clamp_min(max(self.threshold, 1e-6))
            try:
                self.shared = SharedScales(model, norms, multi, graph.n_components, init=start)
            except BaseException:
                self.close()  # the explicit scales already on the model come off again
                raise
        self.gated = (counts > 0) & prunable  # frozen channels: always alive
        with torch.no_grad():
            self.scale = float(self.gates()[self.gated].mean().clamp_min(1e-6))
        self.done = False
        self.dead = torch.zeros(graph.n_components, dtype=torch.bool)  # "cut": gates that fell below, for good
        # "cut": each gate parameter's signs at the last step, which of its entries changed sign while pushed
        self._signs: list[torch.Tensor] = []
        self._crossed: list[torch.Tensor] = []
        self._pushed = torch.zeros(graph.n_components, dtype=torch.bool)
        self.last: dict[str, float] = {}

    def gates(self) -> torch.Tensor:
        g = mean_abs(self._gates, self._count)
        if self.shared is not None:
            g = g.index_put((self.shared.components.to(g.device),), self.shared.param.abs().to(g.dtype))
        return g

    def alive(self, hard_only: bool = False) -> torch.Tensor:
        g = self.gates()
        gated = self.gated.to(g.device)
        live = g > self.threshold
        if self.surrogate == "cut":
            live = live & ~self.dead.to(g.device)
        hard = torch.where(gated, live.float(), torch.ones_like(g))
        if hard_only:
            return hard
        if self.surrogate == "soft":
            soft = torch.sigmoid((g - self.threshold) / (0.5 * self.scale))
            return torch.where(gated, soft, torch.ones_like(g))
        lin = g / self.scale
        pushed = gated & self._pushed.to(g.device) if self.surrogate == "cut" else gated
        return hard + torch.where(pushed, lin - lin.detach(), torch.zeros_like(g))

    def ranked(self, g: torch.Tensor) -> torch.Tensor:
        """Gates (on the CPU) as a cut ranks them: a dead one below every live one, in the order it reads."""
        g = g.detach().cpu()
        return torch.where(self.dead, self.threshold * g / (1 + g), g)

    def _below_cut(self, g: torch.Tensor) -> torch.Tensor:
        """The gated channels (a CPU mask) a cut of the lowest gates must take to meet every target (all of
        them when no cut does); bisected on their count, as the cost of a cut grows with it."""
        order = torch.where(self.gated, self.ranked(g), torch.tensor(float("inf"))).argsort()
        n = int(self.gated.sum())

        def removed(k: int) -> torch.Tensor:
            mask = torch.zeros(len(order), dtype=torch.bool)
            mask[order[:k]] = True
            return mask

        def meets(k: int) -> bool:
            macs, params = self.cost(removed(k))
            return all({"macs": macs, "params": params}[kind] <= t for kind, t in self.targets.items())

        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if meets(mid) else (mid + 1, hi)
        return removed(lo)

    def _crossed_zero(self) -> torch.Tensor:
        """Channels every carrier of which changed sign while pushed (since the push began, as the channel
        stayed in the cut): each went through zero."""
        pairs = [*self._gates, *([(self.shared.param, self.shared.components)] if self.shared is not None else [])]
        signs = [torch.sign(p.detach().float().cpu()) for p, _ in pairs]
        if not self._signs:
            self._signs, self._crossed = signs, [torch.zeros_like(s, dtype=torch.bool) for s in signs]
        hits = torch.zeros(self.graph.n_components)
        for i, ((_, lab), s) in enumerate(zip(pairs, signs)):
            lab = lab.cpu()
            self._crossed[i] &= self._pushed[lab]  # a crossing counts within the push it happened in
            self._crossed[i] |= (s != self._signs[i]) & self._pushed[lab]
            if i < len(self._gates):
                hits.index_add_(0, lab, self._crossed[i].float())
        self._signs = signs
        crossed = (self._count > 0) & (hits >= self._count)
        if self.shared is not None:  # one gate of their own: the carriers' signs do not decide
            crossed[self.shared.components.cpu()] = self._crossed[-1]
        return crossed

    def hard_cost(self) -> dict[str, int]:
        with torch.no_grad():
            macs, params = self.cost(~self.alive(hard_only=True).bool().cpu())
        return {"macs": macs, "params": params}

    def __call__(self) -> torch.Tensor:
        self.steps += 1
        if self.surrogate == "cut":
            with torch.no_grad():
                g = self.gates()
                self.dead |= self.gated & ((g.cpu() <= self.threshold) | self._crossed_zero())
                self._pushed = self._below_cut(g)  # pushed this step; the sign rule reads it at the next
        macs, params = self.cost.soft(self.alive().cpu() if self._gates[0][0].device.type != "cpu" else self.alive())
        value = {"macs": macs, "params": params}
        hard = self.hard_cost()
        self.last = {f"hfp_{k}": hard[k] / measure(self.cost.base, k) for k in hard}
        self.done = all(hard[k] <= t for k, t in self.targets.items())
        self.unmet_steps += not self.done
        lam = self.lam * (self.unmet_steps / self.warmup_steps if self.ramp == "grow"
                          else min(1.0, self.steps / self.warmup_steps))
        # the hard count decides whether a target still pulls (a soft count could meet it first and stall)
        loss = sum(value[k] / t for k, t in self.targets.items() if hard[k] > t)
        if not torch.is_tensor(loss):
            loss = macs * 0.0
        return lam * loss.to(self._gates[0][0].device)

    def stats(self) -> dict[str, float]:
        return dict(self.last)

    def close(self) -> None:
        """Fold the explicit scales into their layers: the model has no extra parameter or hook."""
        if self.scales is not None:
            self.scales.fold()
        if self.shared is not None:
            self.shared.fold()


SURROGATES = ("ste", "soft", "cut")
TIES = ("shared", "mean", "shared-mean")
RAMPS = ("hold", "grow")


@register_method("hfp")
class HFPMethod(Method):
    """Enderich et al. 2021 as specified in METHODS.md section 3: train with the budget loss until
    the hard count of alive channels meets the target (at most ``epochs`` epochs), then cut the dead
    channels. If training ends first, the lowest gates are cut to meet the target anyway; either
    way the best dead channels are re-added while they fit, so the pruned model lands within a
    channel of the target. ``params`` adds a second target (the pipeline's is the first)."""

    name = "hfp"
    summary = "METHODS.md 3, Holistic Filter Pruning; --macs and/or --params, needs --data"
    needs_data = True
    needs_budget = True
    trains = True
    undo_keeps_training = False  # its training only served the cut: an undone cut undoes the training too
    options = (
        Option("epochs", 10, "most epochs of training with the budget loss (a `steps` in the fine-tuning config "
               "takes precedence)", kind=int, low=1, flag="--hfp-epochs"),
        Option("steps", None, "most optimizer steps of training with the budget loss, whatever the fine-tuning "
               "config says (which then fine-tunes after the cut alone)", kind=int, low=1, nullable=True,
               flag="--hfp-steps"),
        Option("lam", 5.0, "weight of the budget loss (ramped up)", low=0, flag="--lam"),
        Option("warmup_steps", 100, "steps over which the weight ramps up", kind=int, low=0, flag="--warmup-steps"),
        Option("threshold", 1e-2, "a channel is dead when its BN |scale| is below", low=0, flag="--gate-threshold"),
        Option("surrogate", "ste", "ste (hard count, straight-through), soft (sigmoid count) or cut (straight-through "
               "to the lowest gates a cut meeting the target would remove, and no other)", kind=str,
               choices=SURROGATES, flag="--surrogate"),
        Option("params", None, "a second target: kept fraction of parameters (with a macs budget)", low=0, high=1,
               open_low=True, nullable=True),
        Option("lr", None, "learning rate while pruning (default: the fine-tuning one)", low=0, open_low=True,
               nullable=True),
        Option("tie", "mean", "channels several norm layers carry (residual stages): the mean of their |scales| "
               "(mean) or one shared explicit gate, from 1 (shared) or from that mean (shared-mean)", kind=str,
               choices=TIES, flag="--hfp-tie"),
        Option("ramp", "hold", "after warmup_steps the weight holds at lam (hold) or keeps rising at the same rate "
               "over the steps the target is unmet (grow)", kind=str, choices=RAMPS, flag="--hfp-ramp"),
    )

    def check(self, budget: Budget | None) -> None:
        if budget is None or budget.kind not in ("macs", "params"):
            raise ValueError("method 'hfp' needs a macs or params target")
        if budget.kind == "params" and self.params is not None:  # it would silently replace the target
            raise ValueError(f"method 'hfp': the `params` option ({self.params}) is a second target beside a macs "
                             f"target, but the target is already params={budget.value}")

    def plan(self, ctx: StepContext) -> Decision:
        if ctx.step > 1:
            return Decision.halt("HFP prunes in one training phase")
        targets = {ctx.budget.kind: ctx.budget.at_step(1, 1).value}
        if self.params is not None:
            targets["params"] = self.params
        reg = HFPRegularizer(ctx.model, ctx.graph, ctx.example_inputs, lam=self.lam, warmup_steps=self.warmup_steps,
                             threshold=self.threshold, surrogate=self.surrogate, base=ctx.current, tie=self.tie,
                             ramp=self.ramp, **targets)
        cfg = ctx.finetune if ctx.finetune is not None else TrainConfig(quiet=True)
        # constant lr while pruning: a decaying schedule would freeze the gates before the target
        cfg = replace(cfg, epochs=self.epochs, out_dir=None, resume=False, schedule="constant", warmup_epochs=0,
                      **({"lr": self.lr} if self.lr else {}), **({"steps": self.steps} if self.steps else {}))
        try:
            history = fit(ctx.model, ctx.data, ctx.val_data, cfg, regularizer=reg, teacher=ctx.teacher)
            gates = reg.ranked(reg.gates())  # a gate that died stays dead (fill re-adds the best dead that fit)
            alive = reg.alive(hard_only=True).cpu().bool()
        finally:
            reg.close()
        scores = [torch.where(reg.gated[g.components], gates[g.components], torch.full((g.size,), float("inf")))
                  for g in ctx.graph.groups]
        alloc = Allocator(ctx.graph, scores, "global", ctx.round_to, ctx.min_width, normalize=False,
                          original=ctx.original_widths)
        keep = [alloc.clamp(g.index, int(alive[g.components].sum())) for g in ctx.graph.groups]
        pc = reg.cost
        limits = {k: Budget(k, v).limit(pc.base) for k, v in targets.items()}

        def worst(k):  # the tightest constraint, as a fraction of its limit (<= 1 fits)
            cost = pc(alloc.removed(k))
            return max(measure(cost, n) / lim for n, lim in limits.items())

        if worst(keep) > 1:  # training stopped before the target: cut the lowest gates to meet it
            keep = threshold_search(alloc, worst, 1.0)
        keep = fill(alloc, keep, worst, 1.0)
        info = {"hfp_history": history, "hfp_converged": bool(reg.done), "hfp_steps": reg.steps}
        return Decision(channels=alloc.plan(keep), info=info)
