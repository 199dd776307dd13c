"""METHODS.md method 4, importance weights with an error tolerance (Sawant et al. 2022): a learned
weight per channel ranks the filters, which then go step by step while the validation metric
stays within the tolerance."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn as nn

from .._state import copy_model
from .._validation import check_choice, check_scalar
from ..budget import Allocator, Budget, bisect, fill, measure
from ..cost import PlanCost
from ..criteria import group_scores
from ..distributed import all_sum, init_distributed
from ..graph import DependencyGraph
from ..surgery import PruningPlan, apply_plan
from ..train import TrainConfig, evaluate, fit, task_loss, train_batches
from .base import Decision, Method, Option, StepContext, check_stop_rule, register_method
from .gates import ChannelScales, carrier_count, carriers, mean_abs, out_channel_norms

__all__ = ["ImportanceWeights", "ImportanceWeightMethod", "channel_macs"]


def channel_macs(ctx: StepContext) -> torch.Tensor:
    """What removing one channel of each group saves in MACs (coupled layers included), mean 1
    over the prunable channels: weights for a cost-aware L1 penalty."""
    pc = PlanCost(ctx.model, ctx.graph, ctx.example_inputs, base=ctx.current)
    w = torch.zeros(ctx.graph.n_components)
    sizes = torch.zeros(ctx.graph.n_components, dtype=torch.bool)
    for g in ctx.graph.groups:
        mask = torch.zeros(ctx.graph.n_components, dtype=torch.bool)
        mask[g.components[0]] = True
        w[g.components] = float(ctx.current.macs - pc(mask)[0])
        sizes[g.components] = True
    return w / w[sizes].mean().clamp_min(1e-12)


GRADIENT_BATCHES = 16  # what penalty="gradient" reads before alpha's phase


def gradient_weights(model: nn.Module, graph: DependencyGraph, data, cfg: TrainConfig,
                     batches: int = GRADIENT_BATCHES) -> torch.Tensor:
    """Per channel component, its layer's root-mean-square loss gradient on alpha = 1 (over
    ``batches`` of the training batches ``cfg`` draws, in training mode, on the model's device),
    mean 1 over the prunable channels. A penalty weighted by it pulls every layer's alphas in the
    same proportion to the gradients an adaptive optimizer normalises them by; a uniform one,
    orders of magnitude above the deep layers' gradients, sets their moves alone
    (docs/alpha_gradients.md). The task loss alone is read (not a distillation term). Under
    torchrun each process reads its share of every batch and the gradients are averaged, as DDP
    does, so every process gets the same weights. The gradients are read on a copy of the model,
    so the model itself is left as it was. A layer no gradient reaches gets the smallest weight
    of any layer, not 0: with no pull at all its alphas would stay at 1, above every used channel."""
    rank, world, _ = init_distributed()
    probe = copy_model(model).train()  # read on a copy: training mode moves BN's statistics, alpha hooks in
    iw = ImportanceWeights(probe, graph)
    names, ps = list(iw.scales.scales), list(iw.scales.scales.values())
    sums = [torch.zeros_like(p) for p in ps]
    seen, source, device = 0, train_batches(data, cfg, rank, world), ps[0].device
    for epoch in range(-(-batches // max(1, len(source)))):
        source.set_epoch(epoch)
        for x, y in source:
            if seen == batches:
                break
            loss = task_loss(probe(x.to(device)), y.to(device), cfg.label_smoothing)
            grads = torch.autograd.grad(loss, ps, allow_unused=True)  # (an alpha off the path: 0)
            flat = all_sum(torch.cat([torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads)]))
            sums = [a + g.square() for a, g in zip(sums, (flat / world).split([len(p) for p in ps]))]
            seen += 1
    if not seen:
        raise ValueError("importance weights: penalty='gradient' needs at least one training batch")
    layer = ((torch.full_like(s, float((s / seen).mean().sqrt())), iw.labels[n]) for n, s in zip(names, sums))
    w = mean_abs(layer, iw._count).cpu()
    live = iw._count > 0
    if not torch.isfinite(w).all():
        raise ValueError("importance weights: penalty='gradient' read a non-finite training loss; check the data "
                         "and the model before learning alpha")
    if not w[live].any():  # no gradient reaches alpha anywhere (e.g. a zeroed head): nothing to scale by
        return live.float()
    # a layer the loss does not reach (a dead branch; an untrained timm block, whose last BN starts at 0)
    # gets the weakest pull any layer got, not none: its alphas, unused, should drift down, not stay at 1
    dead = live & (w == 0)
    w[dead] = w[live & (w > 0)].min()
    return w / w[live].mean()


class ImportanceWeights:
    """One learnable weight alpha per output channel of every prunable group, for any training loop.

    Alpha multiplies the channel after its norm layer (or its conv where there is none); a
    channel's importance is the mean |alpha| over the places that carry it (a residual channel is
    carried by several). ``init``: ``"ones"``; ``"uniform"``, U(0, 1) (seeded); ``"l1"``, the
    group's filter L1 norms divided by their mean. ``l1`` > 0 adds ``l1 * sum w_c |alpha_c|`` to
    the loss (call the object), with ``w_c = 1``, or with ``cost_weights`` (one per channel
    component, e.g. what each channel costs in MACs, mean 1) so that expensive channels are pushed
    harder. ``alpha_lr``: alpha's own learning rate in :func:`~secateurs.train.fit` (default: the
    network's), for a phase too short for alpha to move at the network's rate; it is an attribute
    of each alpha, which ``copy.deepcopy`` of the model drops. :meth:`fold` multiplies alpha into
    the weights and removes it::

        iw = ImportanceWeights(model, secateurs.analyze(model, x), init="l1", l1=1e-4)
        loss = criterion(model(xb), yb) + iw()        # train as usual
        scores = iw.scores(); iw.fold()               # rank channels by scores, plain model again
    """

    INITS = ("ones", "uniform", "l1")

    def __init__(self, model: nn.Module, graph: DependencyGraph, init: str = "ones", l1: float = 0.0,
                 seed: int = 0, cost_weights: torch.Tensor | None = None, alpha_lr: float | None = None) -> None:
        check_choice(init, "init", self.INITS)
        check_scalar(l1, "l1", min_val=0)
        if alpha_lr is not None:
            check_scalar(alpha_lr, "alpha_lr", min_val=0, include_min=False)
        self.graph, self.l1 = graph, float(l1)
        self.labels = carriers(model, graph)
        if not self.labels:
            raise ValueError("importance weights: the model has no prunable channel")
        start = None
        if init != "ones":
            comp = torch.ones(graph.n_components)
            if init == "uniform":
                comp = torch.rand(graph.n_components, generator=torch.Generator().manual_seed(seed))
            else:
                for g, s in zip(graph.groups, group_scores(model, graph, "l1")):
                    comp[g.components] = s.float() / s.float().mean().clamp_min(1e-12)
            start = {n: comp[lab] for n, lab in self.labels.items()}
        self.scales = ChannelScales(model, self.labels, init=start, lr=alpha_lr)
        self._count = carrier_count(self.labels.values(), graph.n_components)
        self._w = None
        if cost_weights is not None:
            if cost_weights.shape != (graph.n_components,):
                raise ValueError(f"`cost_weights` must have one value per channel component ({graph.n_components})")
            self._w = {n: cost_weights[lab].float().to(self.scales.scales[n].device) for n, lab in self.labels.items()}

    def __call__(self) -> torch.Tensor:
        ps = self.scales.scales
        if not self.l1:
            return next(iter(ps.values())).sum() * 0.0
        if self._w is None:
            return self.l1 * sum(p.abs().sum() for p in ps.values())
        return self.l1 * sum((self._w[n] * p.abs()).sum() for n, p in ps.items())

    def importance(self) -> torch.Tensor:
        """Mean |alpha| per channel component (0 where no weight carries it)."""
        with torch.no_grad():
            return mean_abs(((p, self.labels[n]) for n, p in self.scales.scales.items()), self._count).cpu()

    def scores(self, scaled: bool = False) -> list[torch.Tensor]:
        """Per group: mean |alpha| per channel, or with ``scaled`` |alpha| times the channel's own
        scale in the trained network (|gamma| of its norm layer; its filter's norm over the layer's
        mean where no norm layer carries it): what the channel weighs once alpha is folded in."""
        if not scaled:
            imp = self.importance()
        else:
            with torch.no_grad():
                pairs = []
                for n, p in self.scales.scales.items():
                    m = self.scales.model.get_submodule(n)
                    if m.weight.dim() == 1:
                        own = m.weight.detach().abs()
                    else:
                        own = out_channel_norms(m)
                        own = own / own.mean().clamp_min(1e-12)
                    pairs.append((p * own.to(p), self.labels[n]))
                imp = mean_abs(pairs, self._count).cpu()
        return [imp[g.components] for g in self.graph.groups]

    def fold(self) -> None:
        self.scales.fold()


def norm_order(scores: list[torch.Tensor], norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each group's scores handed out again in the order of ``norms``: the lowest score to the
    lowest-norm channel. A group keeps its scores (so the global ranking takes as many channels
    from it as before), but which of its channels go is the norms' call. Equal scores (alpha that
    never moved) are made to rise by one float step each in norm order: the allocator breaks ties
    by index, which would cut the high-norm channels of a tie."""
    out = []
    for s, n in zip(scores, norms):
        values = torch.sort(s.float()).values
        for i in range(1, len(values)):
            if values[i] <= values[i - 1]:
                values[i] = torch.nextafter(values[i - 1], torch.tensor(float("inf")))
        ranked = torch.empty_like(values)
        ranked[torch.argsort(n, stable=True)] = values
        out.append(ranked)
    return out


SEARCHES = ("steps", "bisect")
PENALTIES = ("uniform", "gradient")
RANKS = ("alpha", "scale", "layer", "norm")


@register_method("importance-weights")
class ImportanceWeightMethod(Method):
    """Sawant et al. 2022 as specified in METHODS.md section 4: train importance weights with the
    network for ``epochs``, fold them in, then remove the lowest-|alpha| channels step by step,
    ``fraction`` of the remaining removable ones per step (the pipeline fine-tunes after every step
    and undoes the step that breaks its ``tolerance``; the step size is then halved and the
    schedule goes on, at most ``refinements`` times, so it ends closer to the tolerance; 0 stops
    at the first undone step), or, with ``search="bisect"``, find by
    bisection the largest share of channels whose removal (plus the fine-tune) stays within it.

    ``cost_aware=True`` (ours, not the paper's): the L1 penalty on a channel's alpha and its rank are
    weighted by what removing it saves in MACs, and a step removes ``fraction`` of the current
    MACs rather than of the channels; the default ranks by |alpha| alone, which tends to empty the
    wide, cheap deep layers first (params fall much faster than MACs). ``rank="layer"`` (ours)
    answers the same failure differently: alpha still picks the channels inside a layer, but each
    group's |alpha| is divided by its mean (over the channels left) before the global ranking, as
    the L1 baseline's norms are, so no layer is emptied because its alphas shrank as a whole (on the
    U-Nets it measured worse: alpha barely moves in a short phase, and divided by their means the
    layers with the most spread, the full-resolution ones, are cut first; docs/methods.md). With
    ``cost_aware`` its ranking part cancels (a group's channels all cost the same MACs).
    ``rank="norm"`` (ours) splits the two decisions: |alpha| still sets how many channels each
    layer loses (a layer's scores are kept, only handed out again before every step), the L1
    norms of the filters being cut which ones (docs/segmentation_widths: on the U-Nets, L1 cut to
    importance weights' own widths scored above importance weights themselves).

    No rate is set by hand: the tolerance stops the schedule. A MACs/params target, if given, is a
    second stop rule (the last step is trimmed to it). ``min_keep``: no group goes below that
    fraction of its original width. The ranking is global: alpha is comparable across layers (it
    starts equal everywhere, or at mean 1 per layer with ``init="l1"``).
    """

    name = "importance-weights"
    summary = "METHODS.md 4, importance weights; --tolerance drives it, needs --data"
    needs_data = True
    needs_budget = False
    default_steps = 100
    trains = True
    default_tolerance = 1.0  # METHODS.md: the allowed drop, 1 point of the task metric by default
    options = (
        Option("epochs", 5, "epochs of training the importance weights with the network (a `steps` in the "
               "fine-tuning config takes precedence)", kind=int, low=0, flag="--iw-epochs"),
        Option("init", "ones", "importance-weight initialisation: ones, uniform or l1", kind=str,
               choices=ImportanceWeights.INITS, flag="--init"),
        Option("l1", 1e-4, "L1 penalty on the importance weights (0: none)", low=0, flag="--l1"),
        Option("fraction", 0.05, "share of the remaining removable filters cut per step (1: one cut, to the target)",
               low=0, high=1, open_low=True, flag="--fraction"),
        Option("search", "steps", "steps (fraction per step) or bisect (largest share within tolerance)", kind=str,
               choices=SEARCHES, flag="--search"),
        Option("bisect_iters", 6, "bisect: number of probes", kind=int, low=1, flag="--bisect-iters"),
        Option("min_keep", 0.05, "never keep less than this fraction of a layer's width", low=0, high=1,
               open_low=True, flag="--min-keep"),
        Option("lr", None, "the network's learning rate while alpha is learnt (default: the fine-tuning one)", low=0,
               open_low=True, nullable=True),
        Option("alpha_lr", None, "alpha's own learning rate while it is learnt (default: the network's; "
               "ours: a short phase at the network's rate leaves alpha near its start)", low=0, open_low=True,
               nullable=True, flag="--alpha-lr"),
        Option("seed", 0, "seed of the uniform initialisation", kind=int, flag="--seed"),
        Option("cost_aware", False, "ours: weight alpha's penalty and rank by the MACs each channel costs "
               "(MACs fall sooner)", kind=bool, flag="--cost-aware"),
        Option("refinements", 2, "steps: after an undone step, halve the step and go on, at most this many "
               "times (0: stop)", kind=int, low=0, flag="--refinements"),
        Option("penalty", "uniform", "L1 penalty per channel: the same everywhere (uniform, the paper) or scaled by "
               "its layer's loss gradient on alpha, read before alpha's phase (gradient, ours: deep layers, whose "
               "gradients are far weaker, are not emptied by the penalty alone)", kind=str, choices=PENALTIES,
               flag="--iw-penalty"),
        Option("rank", "alpha", "rank channels by |alpha| (alpha, the paper), by |alpha| times the channel's own "
               "scale, |gamma| (scale, ours), by |alpha| over its layer's mean (layer, ours: every layer keeps "
               "its share) or norm (ours: |alpha| sets how many channels each layer loses, the filters' L1 norms "
               "which ones)", kind=str, choices=RANKS, flag="--iw-rank"),
    )

    def check(self, budget: Budget | None) -> None:
        check_stop_rule("importance-weights", budget)

    # -- phase 1: learn alpha -----------------------------------------------------------------
    def _train_config(self, ctx: StepContext, epochs: int, folder: str | None) -> TrainConfig:
        cfg = ctx.finetune if ctx.finetune is not None else TrainConfig(quiet=True)
        out = str(ctx.out_dir / folder) if ctx.out_dir is not None and folder else None
        return replace(cfg, epochs=epochs, out_dir=out, resume=out is not None, **({"lr": self.lr} if self.lr else {}))

    def _learn(self, ctx: StepContext) -> Decision | dict:
        """Train alpha with the weights, fold it; the scores go to ``ctx.state`` (saved with steps).
        Returns the report's info, or a decision to stop and undo if the metric broke the tolerance."""
        weights = channel_macs(ctx) if self.cost_aware else None
        pull = weights
        if self.penalty == "gradient" and self.l1:
            cfg = self._train_config(ctx, 1, None)
            ctx.model.to(init_distributed()[2])  # where fit trains it next
            pull = gradient_weights(ctx.model, ctx.graph, ctx.data, cfg) * (1 if weights is None else weights)
            prunable = torch.cat([g.components for g in ctx.graph.groups])
            pull = pull / pull[prunable].mean()
        iw = ImportanceWeights(ctx.model, ctx.graph, self.init, self.l1, self.seed, cost_weights=pull,
                               alpha_lr=self.alpha_lr)
        try:
            history = fit(ctx.model, ctx.data, None, self._train_config(ctx, self.epochs, "importance"),
                          regularizer=iw, teacher=ctx.teacher) if self.epochs else []
            scores = iw.scores(scaled=self.rank == "scale")
        finally:
            iw.fold()
        if weights is not None:  # importance per MAC saved: expensive channels must earn their place
            scores = [s / weights[g.components].clamp_min(1e-12) for g, s in zip(ctx.graph.groups, scores)]
        self._store(ctx, scores)
        info: dict[str, Any] = {"iw_history": history}
        if ctx.val_data is not None and ctx.metric is not None:
            info["iw_metric_trained"] = evaluate(ctx.model, ctx.val_data)[ctx.metric]
            if ctx.tolerance is not None and ctx.metric0 - info["iw_metric_trained"] > ctx.tolerance:
                # the user gets the model they gave, not a worse one: the pipeline undoes the training
                return Decision.halt(f"{ctx.metric} fell by {ctx.metric0 - info['iw_metric_trained']:.2f} while "
                                     f"learning the importance weights (> tolerance {ctx.tolerance}); model left as it "
                                     "was", undo=True, **info)
        return info

    @staticmethod
    def _store(ctx: StepContext, scores: list[torch.Tensor]) -> None:
        """The scores in ``ctx.state`` (saved with every step), which the surgery and an undo follow."""
        ctx.state["scores"] = {g.name: s.tolist() for g, s in zip(ctx.graph.groups, scores)}

    def _scores(self, ctx: StepContext) -> list[torch.Tensor]:
        stored = ctx.state["scores"]
        out = []
        for g in ctx.graph.groups:
            s = stored.get(g.name)
            if s is None or len(s) != g.size:
                raise RuntimeError(f"importance weights: group '{g.name}' has {g.size} channels, the stored scores "
                                   f"{None if s is None else len(s)}; the model changed outside the schedule")
            out.append(torch.tensor(s))
        return out

    def _allocator(self, ctx: StepContext, scores: list[torch.Tensor]) -> Allocator:
        alloc = Allocator(ctx.graph, scores, "global", ctx.round_to, ctx.min_width,
                          normalize=self.rank == "layer", original=ctx.original_widths)
        for i, g in enumerate(ctx.graph.groups):  # the floor refers to the original width
            alloc.raise_floor(i, math.ceil(self.min_keep * ctx.original_widths.get(g.name, g.size)))
        return alloc

    @staticmethod
    def _fewest_removals(alloc: Allocator, cost: Callable[[list[int]], float], goal: float, hi: int) -> int:
        """The fewest lowest-score channels (at most ``hi``) whose removal brings ``cost`` to ``goal``."""
        return bisect(1, hi, lambda n: cost(alloc.keep_removing(n)) <= goal)

    def _commit(self, ctx: StepContext, alloc: Allocator, keep: list[int]) -> PruningPlan:
        plan = alloc.plan(keep)
        ctx.state["before_step"] = {k: list(v) for k, v in ctx.state["scores"].items()}
        for g in ctx.graph.groups:  # the stored scores follow the surgery
            if g.index in plan.remove:
                gone = set(plan.remove[g.index])
                ctx.state["scores"][g.name] = [v for j, v in enumerate(ctx.state["scores"][g.name]) if j not in gone]
        return plan

    def refine(self, ctx: StepContext) -> bool:
        """The pipeline undid a step: halve the step size and go on, at most ``refinements`` times."""
        st = ctx.state
        if self.search != "steps" or st.get("halvings", 0) >= self.refinements or "before_step" not in st:
            return False
        st["scores"] = st.pop("before_step")
        st["halvings"] = st.get("halvings", 0) + 1
        return True

    def plan(self, ctx: StepContext) -> Decision:
        if self.search == "bisect" and (ctx.tolerance is None or ctx.val_data is None):
            raise ValueError("importance-weights with search='bisect' needs `tolerance` and `val_data`")
        info: dict[str, Any] = {}
        if "scores" not in ctx.state:
            learned = self._learn(ctx)
            if isinstance(learned, Decision):
                return learned
            info = learned
        elif self.search == "bisect":
            return Decision.halt("bisection done")
        met = ctx.budget_met()
        if met:
            return Decision.halt(met, **info)
        scores = self._scores(ctx)
        if self.rank == "norm":  # the filters of the model cut now pick, every step; each layer keeps its scores
            scores = norm_order(scores, group_scores(ctx.model, ctx.graph, "l1"))
            self._store(ctx, scores)
        alloc = self._allocator(ctx, scores)
        pc = PlanCost(ctx.model, ctx.graph, ctx.example_inputs, base=ctx.current)
        removable = alloc.removable()
        if removable == 0:
            return Decision.halt("every group is at its minimum width", **info)
        if self.search == "bisect":
            keep, info["iw_bisection"] = self._bisect(ctx, alloc, removable)
            if keep is None:
                return Decision.halt("no removal stays within the tolerance", **info)
        else:
            keep = alloc.keep_removing(self._step_size(ctx, alloc, pc, removable))
        if ctx.budget is not None:
            keep = self._trim(ctx, alloc, pc, keep, removable)
        if all(k == g.size for k, g in zip(keep, ctx.graph.groups)):
            return Decision.halt("nothing left to remove (round_to / min_keep)", **info)
        return Decision(channels=self._commit(ctx, alloc, keep), info=info)

    def _step_size(self, ctx: StepContext, alloc: Allocator, pc: PlanCost, removable: int) -> int:
        """How many channels this step removes: ``fraction`` (halved after each undone step) of
        the removable channels, or with ``cost_aware`` of the current MACs."""
        fraction = self.fraction * 0.5 ** ctx.state.get("halvings", 0)
        if self.cost_aware:  # a step is a share of the MACs: the cheapest-per-MAC channels come in bulk
            return self._fewest_removals(alloc, lambda k: pc(alloc.removed(k))[0], ctx.current.macs * (1 - fraction),
                                         removable)
        return max(1, math.ceil(fraction * removable))

    def _trim(self, ctx: StepContext, alloc: Allocator, pc: PlanCost, keep: list[int], removable: int) -> list[int]:
        """If the MACs/params target is reached inside this step, remove only what it needs."""
        limit = ctx.budget.limit(ctx.base)

        def cost(k: list[int]) -> float:
            return measure(pc(alloc.removed(k)), ctx.budget.kind)

        if cost(keep) < limit:
            # (bisect the count first: one channel at a time from a big step would take thousands of costings)
            keep = fill(alloc, alloc.keep_removing(self._fewest_removals(alloc, cost, limit, removable)), cost, limit)
        return keep

    def _bisect(self, ctx: StepContext, alloc: Allocator, removable: int):
        """Largest number of lowest-|alpha| channels whose removal and fine-tune stay within the tolerance."""
        tried = []

        def within(n: int) -> bool:
            probe = copy_model(ctx.model)
            apply_plan(probe, ctx.graph, alloc.plan(alloc.keep_removing(n)))
            if ctx.finetune is not None:
                # fine-tuned as the committed step will be (the pipeline's config), not at alpha's rate
                fit(probe, ctx.data, None, replace(ctx.finetune, out_dir=None, resume=False), teacher=ctx.teacher)
            m = evaluate(probe, ctx.val_data)[ctx.metric]
            ok = ctx.metric0 - m <= ctx.tolerance
            tried.append({"removed_channels": n, "metric": m, "within": ok})
            ctx.log(f"bisection: {n}/{removable} channels -> {ctx.metric} {m:.2f} ({'within' if ok else 'outside'})")
            return ok

        lo = bisect(0, removable, within, largest=True, max_probes=self.bisect_iters)
        return (alloc.keep_removing(lo) if lo else None), tried
