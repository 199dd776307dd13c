"""METHODS.md method 2, discriminative layer pruning (Jordao et al. 2020): PLS-VIP scores remove
whole residual blocks (``dlp``), then optionally filters (``dlp+filters``, the paper's cascade)."""
from __future__ import annotations

import math

from .._state import copy_model
from .._validation import PruningError
from ..budget import Budget, measure, plan_for_budget
from ..criteria import get_criterion, group_scores
from ..depth import Block, LayerPlan, find_blocks
from ..latency import latency_ratio
from ..pls import block_scores
from .base import Decision, Method, Option, StepContext, check_stop_rule, register_method

__all__ = ["LayerPruningMethod", "CascadeMethod"]


@register_method("dlp")
class LayerPruningMethod(Method):
    """Jordao et al. 2020 as specified in METHODS.md section 2: score every removable residual
    block by the mean VIP of its pooled output in a PLS fit on the labels, then remove blocks.
    On segmentation masks each cell of a coarse grid is a sample labelled by its class shares
    (:func:`secateurs.pls.block_features`): a U-Net's encoder blocks are ranked the same way.

    ``mode="rank"`` removes the lowest-scoring removable blocks until ``fraction`` of them, or
    ``count`` blocks, are gone, or the MACs/params budget is met (in the cascade its square root:
    the filter steps spend the rest, as the paper's layers then filters), keeping ``min_per_stage``
    removable blocks in every stage (down-sampling blocks never go). ``mode="truncate"`` walks
    the blocks of stage ``start_stage`` onwards (default: the last stage); the first block whose
    score does not rise over the previous one goes with everything after it, and a fresh head is
    attached (our reading of "cut at the first block whose score does not rise": it is the one
    that gives the paper's ResNet-56 arithmetic, stage 3 truncated to its first block).
    With ``filters=True`` ("dlp+filters") later steps prune filters: ``filter_ratio`` of the
    remaining ones per step by joint PLS-VIP (criterion ``vip``), as the paper's cascade does.
    """

    name = "dlp"
    summary = "METHODS.md 2, layer pruning (dlp, dlp+filters); needs --data"
    needs_data = True
    needs_budget = False
    options = (
        Option("mode", "rank", "rank (lowest-VIP blocks go) or truncate (cut where scores stop rising)",
               kind=str, choices=("rank", "truncate"), flag="--mode"),
        Option("fraction", None, "rank: remove this fraction of removable blocks", low=0, high=1, open_low=True,
               nullable=True, flag="--blocks-fraction"),
        Option("count", None, "rank: remove this many blocks", kind=int, low=1, nullable=True, flag="--blocks"),
        Option("min_per_stage", 1, "rank: removable blocks kept in every stage", kind=int, low=0,
               flag="--min-per-stage"),
        Option("per_class", 50, "samples per class for the PLS features (a mask counts for every class it shows)",
               kind=int, low=1, nullable=True,
               flag="--per-class"),
        Option("n_components", 4, "PLS components of the block scores", kind=int, low=1),
        Option("joint", False, "one PLS over all blocks instead of one per block", kind=bool, flag="--joint"),
        Option("pool", 8, "average-pooling window of the block features (masks: cells per side of the grid)",
               kind=int, low=1),
        Option("start_stage", None, "truncate: first stage walked (default: the last)", kind=int, low=0,
               nullable=True),
        Option("filters", False, "then prune filters by PLS-VIP (the cascade; method dlp+filters)", kind=bool),
        Option("filter_ratio", 0.1, "dlp+filters: share of filters removed per step", low=0, high=1,
               open_low=True, open_high=True, flag="--filter-ratio"),
        Option("filter_components", 2, "PLS components of the filter scores", kind=int, low=1),
        Option("filter_criterion", "vip", "dlp+filters: what ranks the filters of its steps (vip: the paper's "
               "joint PLS-VIP; or any registered criterion, e.g. l1)", kind=object, flag="--filter-criterion"),
    )

    def setup(self) -> None:
        self.name = "dlp+filters" if self.filters else "dlp"

    def check(self, budget: Budget | None) -> None:
        if self.filters:
            try:
                get_criterion(self.filter_criterion)
            except (TypeError, ValueError) as err:
                raise ValueError(f"method {self.name!r}, option `filter_criterion`: {err}") from None
        if budget is not None and budget.kind == "latency":  # blocks go, each count timed (`_to_latency`)
            if self.mode != "rank" or self.filters:
                raise ValueError(f"method {self.name!r} takes a latency target with mode='rank' and no filter "
                                 "steps (dlp): prune filters to a latency afterwards with a criterion")
            return
        check_stop_rule(self.name, budget)
        if self.mode == "rank" and budget is None and self.count is None and self.fraction is None:
            raise ValueError(f"method {self.name!r} (rank) needs a stop: a macs/params target, `count` or `fraction`")

    def plan(self, ctx: StepContext) -> Decision:
        if ctx.step > 1:
            return self._filters(ctx)
        blocks = find_blocks(ctx.model, ctx.example_inputs)
        removable = [b for b in blocks if b.removable]
        if not removable:
            return Decision.halt("no removable block (identity-shortcut residual unit) in this model")
        if self.mode == "truncate":
            if getattr(ctx.data, "task", "classification") != "classification":
                raise ValueError(f"method {self.name!r}: mode='truncate' attaches a classifier head; on "
                                 f"{ctx.data.task} data use mode='rank'")
            return self._truncate(ctx, blocks)
        return self._rank(ctx, removable)

    def _scores(self, ctx: StepContext, blocks: list[Block]) -> dict[str, float]:
        return block_scores(ctx.model, blocks, ctx.data, self.per_class, self.n_components, self.joint, self.pool)

    def _filters(self, ctx: StepContext) -> Decision:
        """Steps after the first: the cascade's filter pruning (``filter_ratio`` of the filters a step,
        ranked by ``filter_criterion``: PLS-VIP as the paper does; L1 measured 2 points better on
        CIFAR ResNet-56 at half the MACs, docs/accuracy.md), or the end. A MACs/params target stops it, the last step cut to meet it exactly."""
        if not self.filters:
            return Decision.halt("layer pruning is one step (use dlp+filters for the filter cascade)")
        met = ctx.budget_met()
        if met:
            return Decision.halt(met)
        extra = {"n_components": self.filter_components} if self.filter_criterion == "vip" else {}
        scores = group_scores(ctx.model, ctx.graph, self.filter_criterion, data=ctx.data, **extra)
        plan = self._filter_plan(ctx, scores, Budget("ratio", self.filter_ratio))
        if ctx.budget is not None:  # the step that would pass the target stops at it
            try:
                to_target = self._filter_plan(ctx, scores, ctx.budget)
            except PruningError:  # not reachable in one step from here: the step's share, and on
                to_target = plan
            if sum(map(len, to_target.remove.values())) < sum(map(len, plan.remove.values())):
                plan = to_target
        return Decision(channels=plan)

    def _filter_plan(self, ctx: StepContext, scores, budget: Budget):
        plan, _ = plan_for_budget(ctx.model, ctx.graph, ctx.example_inputs, scores, budget, "global", ctx.round_to,
                                  ctx.min_width, base=ctx.current, reference=ctx.base, normalize=False,
                                  original=ctx.original_widths)
        return plan

    def _truncate(self, ctx: StepContext, blocks: list[Block]) -> Decision:
        stage = self.start_stage if self.start_stage is not None else max(b.stage for b in blocks)
        walk = [b for b in blocks if b.stage >= stage]
        scores = self._scores(ctx, walk)
        cut = next((i for i in range(1, len(walk)) if scores[walk[i].name] <= scores[walk[i - 1].name]), None)
        if cut is None:
            return Decision.halt("block scores rise to the end: nothing to truncate", block_scores=scores)
        after = walk[cut - 1].name  # the first block that adds nothing goes, with everything after it
        return Decision(blocks=LayerPlan([b.name for b in walk[cut:]], scores, truncate_after=after),
                        info={"block_scores": scores})

    def _rank(self, ctx: StepContext, removable: list[Block]) -> Decision:
        scores = self._scores(ctx, removable)
        left: dict[int, int] = {}
        for b in removable:
            left[b.stage] = left.get(b.stage, 0) + 1
        n_max = len(removable)
        if self.count is not None:
            n_max = min(n_max, self.count)
        if self.fraction is not None:
            n_max = min(n_max, math.floor(self.fraction * len(removable) + 1e-9))
        order = []  # the blocks that may go, lowest score first
        for b in sorted(removable, key=lambda b: scores[b.name]):
            if len(order) >= n_max:
                break
            if left[b.stage] > self.min_per_stage:
                order.append(b)
                left[b.stage] -= 1
        budget = ctx.budget
        if budget is not None and budget.kind == "latency":
            return self._to_latency(ctx, order, scores) if order else Decision.halt(
                "no block may go (min_per_stage, count or fraction)", block_scores=scores)
        if budget is not None and self.filters and ctx.steps > 1:  # the cascade: blocks spend the square
            budget = Budget(budget.kind, budget.value ** 0.5)  # root of the target, the filter steps the rest
        limit = budget.limit(ctx.base) if budget is not None else None
        cost = measure(ctx.current, budget.kind) if budget is not None else None
        chosen = []
        for b in order:
            if limit is not None and cost <= limit:
                break
            chosen.append(b.name)
            if limit is not None:
                cost -= measure((b.macs, b.params), budget.kind)
        if not chosen:
            return Decision.halt("no block may go (min_per_stage or budget already met)", block_scores=scores)
        return Decision(blocks=LayerPlan(chosen, scores), info={"block_scores": scores})


    def _to_latency(self, ctx: StepContext, order: list[Block], scores: dict[str, float]) -> Decision:
        """The fewest of ``order``'s first blocks whose removal meets the latency target, each count
        timed against the model as it is (interleaved, in its own layout). On small inputs a block's
        time is mostly per-layer cost that narrower channels keep: on CIFAR ResNet-20 at batch 8,
        3 of 7 blocks reached 0.65 of the latency at 65% of the MACs, where channel pruning needed
        about 18% of the MACs."""
        if not ctx.times:
            return Decision()  # the first process's decision replaces it
        target, tried = ctx.budget.value, []
        for k in range(1, len(order) + 1):
            names = [b.name for b in order[:k]]
            probe = copy_model(ctx.model)
            LayerPlan(names, scores).apply(probe, ctx.example_inputs)
            ratio = latency_ratio(ctx.model, probe, ctx.example_inputs, threads=ctx.latency_threads)
            tried.append({"blocks": k, "latency_ratio": round(ratio, 4)})
            ctx.log(f"dlp: {k} block(s) removed -> latency {ratio:.3f} of the model's (target {target:.3f})")
            if ratio <= target:
                return Decision(blocks=LayerPlan(names, scores),
                                info={"block_scores": scores, "latency_search": tried, "latency_ratio": ratio})
        raise PruningError(f"method {self.name!r}: removing all {len(order)} blocks that may go measured "
                           f"{tried[-1]['latency_ratio']:.3g} of the latency, not {target:.3g} (lower min_per_stage, "
                           "or prune channels after the blocks)")


@register_method("dlp+filters")
class CascadeMethod(LayerPruningMethod):
    """Layer pruning, then PLS-VIP filter pruning in the later steps (the paper's cascade): ``dlp``
    with ``filters=True``, which is not an option here."""

    name = "dlp+filters"
    options = tuple(o for o in LayerPruningMethod.options if o.name != "filters")
    default_steps = 7  # the blocks, then the paper's 6 filter iterations (METHODS.md: -62.69% MACs after 6)

    def setup(self) -> None:
        self.filters = True
        super().setup()
