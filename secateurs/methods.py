"""Pruning methods: how each step of the pipeline decides which channels go.

The pipeline (:func:`secateurs.prune`) owns everything around a step: analysis, surgery,
fine-tuning, tolerance, checkpoints and the report. A :class:`Method` only answers "given this
model now, what is the plan?", or ``None`` when it has nothing left to remove (the schedule stops).

- :class:`CriterionMethod`: a criterion (``l1``, ``taylor``...) plus a budget; the baselines.
- :class:`HeuristicMethod`: METHODS.md method 1, a per-layer estimator picks the filters.
- :class:`LayerPruningMethod`: METHODS.md method 2, PLS-VIP scores remove whole residual blocks
  (``dlp``), then optionally filters (``dlp+filters``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ._registry import Registry
from .cost import Cost, PlanCost
from .criteria import get_criterion, group_scores
from .graph import DependencyGraph
from .pipeline import Allocator, Budget, _fill, _latency_plan, _threshold_search, plan_for_budget
from .surgery import PruningPlan

__all__ = ["Method", "StepContext", "CriterionMethod", "HeuristicMethod", "LayerPruningMethod", "LayerPlan",
           "HFPMethod", "HFPRegularizer", "ChannelScales",
           "get_method", "register_method", "list_methods", "register_estimator", "list_estimators"]


@dataclass
class StepContext:
    """What a method may look at to plan one step."""

    model: nn.Module
    graph: DependencyGraph
    example_inputs: Any
    step: int
    steps: int
    budget: Budget | None
    base: Cost  # the original model
    current: Cost  # the model entering this step
    allocation: str
    round_to: int
    min_width: int | float
    data: Any = None
    original_widths: Mapping[str, int] = field(default_factory=dict)
    latency_threads: int | None = None
    log: Callable[..., None] = print
    finetune: Any = None  # the pipeline's TrainConfig: methods that train (HFP) start from it
    val_data: Any = None


class Method:
    """One way of deciding what to cut; subclasses implement :meth:`plan`."""

    name = "method"
    needs_data = False
    needs_budget = True

    def check(self, budget: Budget | None) -> None:
        """Refuse a budget this method cannot honour, before any work starts."""

    def plan(self, ctx: StepContext) -> tuple[PruningPlan | None, dict]:
        raise NotImplementedError


_METHODS: Registry[type] = Registry("method")
register_method = _METHODS.register


def list_methods() -> list[str]:
    """Registered methods; every criterion name is a method too (criterion + budget)."""
    from .criteria import list_criteria

    return sorted(set(_METHODS.names()) | set(list_criteria()))


class CriterionMethod(Method):
    """Score channels with a criterion, allocate the step's share of the budget."""

    needs_budget = True

    def __init__(self, criterion: str | Callable = "l2", **criterion_kwargs: Any) -> None:
        self.fn = get_criterion(criterion)
        self.name = criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom")
        self.needs_data = bool(getattr(self.fn, "needs_data", False))
        self.kwargs = criterion_kwargs

    def plan(self, ctx: StepContext) -> tuple[PruningPlan | None, dict]:
        scores = group_scores(ctx.model, ctx.graph, self.fn, data=ctx.data, **self.kwargs)
        budget = ctx.budget.at_step(ctx.step, ctx.steps)
        if budget.kind == "latency":
            return _latency_plan(ctx.model, ctx.graph, ctx.example_inputs, scores, budget, ctx.allocation, ctx.round_to,
                                 ctx.min_width, ctx.current, ctx.latency_threads, ctx.log)
        plan, _ = plan_for_budget(ctx.model, ctx.graph, ctx.example_inputs, scores, budget, ctx.allocation,
                                  ctx.round_to, ctx.min_width, base=ctx.current, reference=ctx.base)
        return plan, {}


# -- method 1: heuristic automatic filter pruning -------------------------------------------------
_ESTIMATORS: Registry[Callable] = Registry("estimator")
register_estimator = _ESTIMATORS.register
list_estimators = _ESTIMATORS.names


@register_estimator("mean_minus_std")
def mean_minus_std(scores: torch.Tensor, kappa: float = 0.5, **_: Any) -> float:
    """gamma = mean - kappa * std of the layer's scores (METHODS.md default, kappa = 0.5)."""
    return float(scores.mean() - kappa * scores.std(unbiased=False))


@register_estimator("ratio_of_mean")
def ratio_of_mean(scores: torch.Tensor, rho: float = 0.5, **_: Any) -> float:
    """gamma = rho * mean of the layer's scores."""
    return float(rho * scores.mean())


@register_method("heuristic")
class HeuristicMethod(Method):
    """Choudhary et al. 2022 as specified in METHODS.md: per layer (coupled group), the filters
    whose L1 score falls under the estimator gamma go, never below ``min_keep`` of the original
    width. No rate is set by hand; the schedule stops when no filter falls under gamma.

    ``scope="layer"`` applies the estimator to each group's scores. ``scope="global"`` (our
    choice) divides each group's scores by their mean, so they are comparable across layers, and
    applies the estimator once to all of them: layers whose filters are unusually uneven lose more.
    (Per-layer z-scores would make the global threshold equal to the layer-wise one.)
    With a MACs/params ``budget``, the last round removes only the lowest-scoring candidates needed
    to meet it, and no round starts once it is met.
    """

    needs_budget = False

    def __init__(self, estimator: str | Callable = "mean_minus_std", kappa: float = 0.5, rho: float = 0.5,
                 min_keep: float = 0.1, scope: str = "layer", criterion: str | Callable = "l1") -> None:
        self.estimator = _ESTIMATORS.get(estimator)
        self.estimator_name = estimator if isinstance(estimator, str) else getattr(estimator, "__name__", "custom")
        if scope not in ("layer", "global"):
            raise ValueError(f"`scope` must be 'layer' or 'global', got {scope!r}")
        if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or not 0 < min_keep <= 1:
            raise ValueError(f"`min_keep` must be a fraction in (0, 1], got {min_keep!r}")
        for name, v in (("kappa", kappa), ("rho", rho)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"`{name}` must be a finite number, got {v!r}")
        self.kappa, self.rho, self.min_keep, self.scope = float(kappa), float(rho), float(min_keep), scope
        self.criterion = get_criterion(criterion)
        self.name = "heuristic"

    def _gamma(self, s: torch.Tensor) -> float:
        return float(self.estimator(s, kappa=self.kappa, rho=self.rho))

    def candidates(self, graph: DependencyGraph, scores: list[torch.Tensor],
                   original_widths: Mapping[str, int], round_to: int = 1) -> dict[int, torch.Tensor]:
        """Channels under the estimator, per group, lowest first, after the min-kept guard."""
        if self.scope == "global":
            normed = [s / s.mean().clamp_min(1e-12) for s in scores]
            pooled = torch.cat(normed) if normed else torch.zeros(0)
            gammas = [self._gamma(pooled)] * len(scores)
            scores = normed
        else:
            gammas = [self._gamma(s) for s in scores]
        out = {}
        for g, s, gamma in zip(graph.groups, scores, gammas):
            below = (s < gamma).nonzero().flatten()
            floor = max(1, math.ceil(self.min_keep * original_widths.get(g.name, g.size)))
            n = min(len(below), max(0, g.size - floor))
            if round_to > 1 and n:
                keep = -(-(g.size - n) // round_to) * round_to  # kept width rounded up
                n = max(0, g.size - min(g.size, keep))
            if n:
                order = below[torch.argsort(s[below], stable=True)]
                out[g.index] = order[:n]
        return out

    def check(self, budget: Budget | None) -> None:
        if budget is not None and budget.kind not in ("macs", "params"):
            raise ValueError(f"method 'heuristic' takes a macs or params target as a stop rule, not {budget.kind!r}")

    def plan(self, ctx: StepContext) -> tuple[PruningPlan | None, dict]:
        limit = None
        if ctx.budget is not None:
            which = 0 if ctx.budget.kind == "macs" else 1
            limit = ctx.budget.value * (ctx.base.macs, ctx.base.params)[which]
            if (ctx.current.macs, ctx.current.params)[which] <= limit:
                return None, {"stop": f"{ctx.budget.kind} target {ctx.budget.value} met"}
        scores = group_scores(ctx.model, ctx.graph, self.criterion, data=ctx.data)
        cands = self.candidates(ctx.graph, scores, ctx.original_widths, ctx.round_to)
        if not cands:
            return None, {"stop": "no filter falls under the estimator"}
        if limit is not None:
            cands = self._trim_to_budget(ctx, scores, cands, limit, which)
        return PruningPlan({gi: idx.sort().values.tolist() for gi, idx in cands.items()}), {}

    def _trim_to_budget(self, ctx, scores, cands, limit, which):
        """Remove only as many candidates (lowest normalised score first) as the budget needs."""
        pc = PlanCost(ctx.model, ctx.graph, ctx.example_inputs, base=ctx.current)
        groups = ctx.graph.groups

        def cost(chosen: dict[int, torch.Tensor]) -> int:
            mask = torch.zeros(ctx.graph.n_components, dtype=torch.bool)
            for gi, idx in chosen.items():
                mask[groups[gi].components[idx]] = True
            return pc(mask)[which]

        if cost(cands) > limit:
            return cands  # even all candidates do not reach it: take them all, the next round goes on
        flat = sorted(((float(scores[gi][c] / scores[gi].mean().clamp_min(1e-12)), gi, int(c))
                       for gi, idx in cands.items() for c in idx))

        def first(n: int) -> dict[int, torch.Tensor]:
            chosen: dict[int, list[int]] = {}
            for _, gi, c in flat[:n]:
                chosen.setdefault(gi, []).append(c)
            return {gi: torch.tensor(v) for gi, v in chosen.items()}

        lo, hi = 1, len(flat)
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(first(mid)) <= limit:
                hi = mid
            else:
                lo = mid + 1
        return first(lo)


def get_method(method: str | Callable | Method, **options: Any) -> Method:
    """A :class:`Method` from a registered method name, a criterion name or callable, or itself."""
    if isinstance(method, Method):
        if options:
            raise ValueError("pass options to the Method's constructor, not with an instance")
        return method
    if isinstance(method, str) and method in _METHODS.names():
        try:
            return _METHODS.get(method)(**options)
        except TypeError as err:
            raise ValueError(f"method {method!r}: {err}") from None
    from .criteria import list_criteria

    if isinstance(method, str) and method not in list_criteria():
        raise ValueError(f"unknown method {method!r}; criteria (pruned to a budget): {', '.join(list_criteria())}; "
                         f"methods: {', '.join(_METHODS.names())}")
    return CriterionMethod(method, **options)


# -- method 2: discriminative layer pruning (PLS + VIP) and the cascade ---------------------------
@dataclass
class LayerPlan:
    """Whole blocks to remove (or a cut after one block), with the scores that chose them."""

    remove: list[str]
    scores: dict[str, float] = field(default_factory=dict)
    truncate_after: str | None = None

    def summary(self) -> dict[str, float]:
        return {n: round(self.scores.get(n, float("nan")), 4) for n in self.remove}

    def apply(self, model: nn.Module, example_inputs: Any) -> None:
        from .blocks import remove_blocks, truncate

        if self.truncate_after is not None:
            truncate(model, self.truncate_after, example_inputs=example_inputs)
        else:
            remove_blocks(model, self.remove, example_inputs)


@register_method("dlp")
class LayerPruningMethod(Method):
    """Jordao et al. 2020 as specified in METHODS.md section 2: score every removable residual
    block by the mean VIP of its pooled output in a PLS fit on the labels, then remove blocks.

    ``mode="rank"`` removes the lowest-scoring removable blocks until ``fraction`` of them, or
    ``count`` blocks, are gone, or the MACs/params budget is met, keeping ``min_per_stage``
    removable blocks in every stage (down-sampling blocks never go). ``mode="truncate"`` walks
    the blocks of stage ``start_stage`` onwards (default: the last stage); the first block whose
    score does not rise over the previous one goes with everything after it, and a fresh head is
    attached (our reading of "cut at the first block whose score does not rise": it is the one
    that gives the paper's ResNet-56 arithmetic, stage 3 truncated to its first block).
    With ``filters=True`` ("dlp+filters") later steps prune filters: ``filter_ratio`` of the
    remaining ones per step by joint PLS-VIP (criterion ``vip``), as the paper's cascade does.
    """

    needs_data = True
    needs_budget = False

    def __init__(self, mode: str = "rank", fraction: float | None = None, count: int | None = None,
                 min_per_stage: int = 1, per_class: int = 50, n_components: int = 4, joint: bool = False,
                 pool: int = 8, start_stage: int | None = None, filters: bool = False, filter_ratio: float = 0.1,
                 filter_components: int = 2) -> None:
        if mode not in ("rank", "truncate"):
            raise ValueError(f"`mode` must be 'rank' or 'truncate', got {mode!r}")
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"`count` must be a positive int, got {count!r}")
        if isinstance(min_per_stage, bool) or not isinstance(min_per_stage, int) or min_per_stage < 0:
            raise ValueError(f"`min_per_stage` must be a non-negative int, got {min_per_stage!r}")
        if not 0 < filter_ratio < 1:
            raise ValueError(f"`filter_ratio` must be in (0, 1), got {filter_ratio!r}")
        self.mode, self.fraction, self.count, self.min_per_stage = mode, fraction, count, min_per_stage
        self.per_class, self.n_components, self.joint, self.pool = per_class, n_components, joint, pool
        self.start_stage, self.filters, self.filter_ratio = start_stage, filters, filter_ratio
        self.filter_components = filter_components
        self.name = "dlp+filters" if filters else "dlp"

    def check(self, budget: Budget | None) -> None:
        if budget is not None and budget.kind not in ("macs", "params"):
            raise ValueError(f"method {self.name!r} takes a macs or params target, not {budget.kind!r}")
        if self.mode == "rank" and budget is None and self.count is None and self.fraction is None:
            raise ValueError(f"method {self.name!r} (rank) needs a stop: a macs/params target, `count` or `fraction`")

    def plan(self, ctx: StepContext):
        if ctx.step > 1:
            if not self.filters:
                return None, {"stop": "layer pruning is one step (use dlp+filters for the filter cascade)"}
            scores = group_scores(ctx.model, ctx.graph, "vip", data=ctx.data, n_components=self.filter_components)
            plan, _ = plan_for_budget(ctx.model, ctx.graph, ctx.example_inputs, scores, Budget("ratio", self.filter_ratio),
                                      "global", ctx.round_to, ctx.min_width, base=ctx.current, normalize=False)
            return plan, {}
        from .blocks import block_scores, find_blocks

        blocks = find_blocks(ctx.model, ctx.example_inputs)
        removable = [b for b in blocks if b.removable]
        if not removable:
            return None, {"stop": "no removable block (identity-shortcut residual unit) in this model"}
        if self.mode == "truncate":
            stage = self.start_stage if self.start_stage is not None else max(b.stage for b in blocks)
            walk = [b for b in blocks if b.stage >= stage]
            scores = block_scores(ctx.model, walk, ctx.data, self.per_class, self.n_components, self.joint, self.pool)
            cut = next((i for i in range(1, len(walk)) if scores[walk[i].name] <= scores[walk[i - 1].name]), None)
            if cut is None:
                return None, {"stop": "block scores rise to the end: nothing to truncate", "block_scores": scores}
            after = walk[cut - 1].name  # the first block that adds nothing goes, with everything after it
            return LayerPlan([b.name for b in walk[cut:]], scores, truncate_after=after), {"block_scores": scores}
        scores = block_scores(ctx.model, removable, ctx.data, self.per_class, self.n_components, self.joint, self.pool)
        left = {}
        for b in removable:
            left[b.stage] = left.get(b.stage, 0) + 1
        n_max = len(removable)
        if self.count is not None:
            n_max = min(n_max, self.count)
        if self.fraction is not None:
            n_max = min(n_max, math.floor(self.fraction * len(removable) + 1e-9))
        limit = None
        if ctx.budget is not None:
            which = 0 if ctx.budget.kind == "macs" else 1
            limit = ctx.budget.value * (ctx.base.macs, ctx.base.params)[which]
            cost = [ctx.current.macs, ctx.current.params][which]
        chosen = []
        for b in sorted(removable, key=lambda b: scores[b.name]):
            if len(chosen) >= n_max or (limit is not None and cost <= limit):
                break
            if left[b.stage] <= self.min_per_stage:
                continue
            chosen.append(b.name)
            left[b.stage] -= 1
            if limit is not None:
                cost -= (b.macs, b.params)[which]
        if not chosen:
            return None, {"stop": "no block may go (min_per_stage or budget already met)", "block_scores": scores}
        return LayerPlan(chosen, scores), {"block_scores": scores}


@register_method("dlp+filters")
def _dlp_filters(**options: Any) -> LayerPruningMethod:
    return LayerPruningMethod(filters=True, **options)


# -- method 3: Holistic Filter Pruning -------------------------------------------------------------
_GATED = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ChannelScales:
    """Learnable per-channel multipliers on module outputs, for channels no norm layer can gate.

    Each scale is a parameter registered on its module (so any optimizer built afterwards trains
    it) and applied by a forward hook; :meth:`fold` multiplies it into the module's weight and bias
    and removes both, so the model is plain again (and exact: ``conv(x) * s`` is ``conv_s(x)``).
    """

    NAME = "secateurs_scale"

    def __init__(self, model: nn.Module, modules: Iterable[str]) -> None:
        self.model, self.handles, self.scales = model, [], {}
        for name in modules:
            m = model.get_submodule(name)
            if not isinstance(m, _CONVS) or isinstance(m, nn.modules.conv._ConvTransposeNd):
                raise ValueError(f"module '{name}': channel scales go on Conv/Linear outputs, not {type(m).__name__}")
            width = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            p = nn.Parameter(torch.ones(width, device=m.weight.device))
            m.register_parameter(self.NAME, p)
            self.scales[name] = p
            self.handles.append(m.register_forward_hook(self._hook))

    @staticmethod
    def _hook(m, args, out):
        s = getattr(m, ChannelScales.NAME)
        return out * (s if out.dim() == 2 or isinstance(m, nn.Linear) else s.view(1, -1, *([1] * (out.dim() - 2))))

    def fold(self) -> None:
        with torch.no_grad():
            for name, p in self.scales.items():
                m = self.model.get_submodule(name)
                m.weight.mul_(p.view(-1, *([1] * (m.weight.dim() - 1))))
                if m.bias is not None:
                    m.bias.mul_(p)
                del m._parameters[self.NAME]
        for h in self.handles:
            h.remove()
        self.handles, self.scales = [], {}


class HFPRegularizer:
    """The budget loss of Holistic Filter Pruning, for any training loop.

    One gate per channel: the mean |scale| of the norm layers that carry it (tied across the
    coupled group), or of an explicit :class:`ChannelScales` on its producing convs where no norm
    layer carries it (call :meth:`close` at the end to fold those back); a channel is alive while
    its gate exceeds ``threshold``. The loss is
    ``lam * sum over unmet targets of C(alive) / C_target`` (a target pulls while the *hard* count
    exceeds it, i.e. ``max(0, C/C_target - 1)`` with the surrogate's gradient), with C the differentiable MACs
    or params of :meth:`PlanCost.soft`, so every gate is pushed down in proportion to what its
    channel costs *including* its neighbours' inputs. ``surrogate="ste"`` counts hard gates and
    passes the gradient straight through (scaled by the initial mean gate); ``"soft"`` counts a
    sigmoid around the threshold. ``lam`` ramps up linearly over ``warmup_steps``. ``done``
    turns true at the first step whose hard count meets every target.

    In your own loop::

        reg = HFPRegularizer(model, secateurs.analyze(model, x), x, macs=0.5)
        loss = criterion(model(xb), yb) + reg()       # every step; stop when reg.done
    """

    def __init__(self, model: nn.Module, graph: DependencyGraph, example_inputs: Any, macs: float | None = None,
                 params: float | None = None, lam: float = 5.0, warmup_steps: int = 100, threshold: float = 1e-2,
                 surrogate: str = "ste", base: Cost | None = None) -> None:
        if macs is None and params is None:
            raise ValueError("HFP needs a target: `macs` and/or `params` (kept fractions)")
        for name, v in (("macs", macs), ("params", params)):
            if v is not None and not 0 < v <= 1:
                raise ValueError(f"`{name}` must be a kept fraction in (0, 1], got {v!r}")
        if surrogate not in ("ste", "soft"):
            raise ValueError(f"`surrogate` must be 'ste' or 'soft', got {surrogate!r}")
        self.cost = PlanCost(model, graph, example_inputs, base=base)
        self.graph, self.threshold, self.surrogate = graph, float(threshold), surrogate
        self.lam, self.warmup_steps, self.steps = float(lam), max(1, int(warmup_steps)), 0
        self.targets = {k: v * (self.cost.base.macs if k == "macs" else self.cost.base.params)
                        for k, v in (("macs", macs), ("params", params)) if v is not None}
        modules = dict(model.named_modules())
        self._gates = []  # (gate parameter, component label of each position)
        for i, b in enumerate(graph.bindings):
            m = modules.get(b.module)
            if b.kind == "tensor" and b.name == "weight" and isinstance(m, _GATED) and getattr(m, "affine", True):
                self._gates.append((m.weight, graph.binding_labels[i]))
        prunable = torch.zeros(graph.n_components, dtype=torch.bool)
        for g in graph.groups:
            prunable[g.components] = True
        normed = torch.zeros(graph.n_components, dtype=torch.bool)
        for _, lab in self._gates:
            normed[lab] = True
        # groups with channels no norm layer carries: explicit scales on their producing convs
        producers = {}
        for i, b in enumerate(graph.bindings):
            lab = graph.binding_labels[i]
            if (b.kind == "tensor" and b.name == "weight" and b.axis == 0 and b.role == "out"
                    and isinstance(modules.get(b.module), _CONVS)
                    and not isinstance(modules.get(b.module), nn.modules.conv._ConvTransposeNd)
                    and (prunable[lab] & ~normed[lab]).any()):
                producers[b.module] = lab
        self.scales = ChannelScales(model, producers) if producers else None
        if self.scales is not None:
            self._gates += [(self.scales.scales[n], lab) for n, lab in producers.items()]
        if not self._gates:
            raise ValueError("HFP found no gate: no norm layer and no prunable conv output in the model")
        counts = torch.zeros(graph.n_components)
        for w, lab in self._gates:
            counts.index_add_(0, lab, torch.ones(len(lab)))
        self._count = counts
        self.gated = (counts > 0) & prunable  # frozen channels: always alive
        with torch.no_grad():
            self.scale = float(self.gates()[self.gated].mean().clamp_min(1e-6))
        self.done = False
        self.last: dict[str, float] = {}

    def gates(self) -> torch.Tensor:
        dev = self._gates[0][0].device
        total = torch.zeros(self.graph.n_components, device=dev)
        for w, lab in self._gates:
            total = total.index_add(0, lab.to(dev), w.abs().float())
        return total / self._count.to(dev).clamp_min(1)

    def alive(self, hard_only: bool = False) -> torch.Tensor:
        g = self.gates()
        gated = self.gated.to(g.device)
        hard = torch.where(gated, (g > self.threshold).float(), torch.ones_like(g))
        if hard_only:
            return hard
        if self.surrogate == "soft":
            soft = torch.sigmoid((g - self.threshold) / (0.5 * self.scale))
            return torch.where(gated, soft, torch.ones_like(g))
        lin = g / self.scale
        return hard + torch.where(gated, lin - lin.detach(), torch.zeros_like(g))

    def hard_cost(self) -> dict[str, int]:
        with torch.no_grad():
            macs, params = self.cost(~self.alive(hard_only=True).bool().cpu())
        return {"macs": macs, "params": params}

    def __call__(self) -> torch.Tensor:
        self.steps += 1
        macs, params = self.cost.soft(self.alive().cpu() if self._gates[0][0].device.type != "cpu" else self.alive())
        value = {"macs": macs, "params": params}
        lam = self.lam * min(1.0, self.steps / self.warmup_steps)
        hard = self.hard_cost()
        self.last = {f"hfp_{k}": hard[k] / (self.cost.base.macs if k == "macs" else self.cost.base.params) for k in hard}
        self.done = all(hard[k] <= t for k, t in self.targets.items())
        # the hard count decides whether a target still pulls (a soft count could meet it first and stall)
        loss = sum(value[k] / t for k, t in self.targets.items() if hard[k] > t)
        if not torch.is_tensor(loss):
            loss = macs * 0.0
        return lam * loss.to(self._gates[0][0].device)

    def stats(self) -> dict[str, float]:
        return dict(self.last)

    def close(self) -> None:
        """Fold the explicit scales into their convs: the model has no extra parameter or hook."""
        if self.scales is not None:
            self.scales.fold()


@register_method("hfp")
class HFPMethod(Method):
    """Enderich et al. 2021 as specified in METHODS.md section 3: train with the budget loss until
    the hard count of alive channels meets the target (at most ``epochs`` epochs), then cut the dead
    channels. If training ends first, the lowest gates are cut to meet the target anyway; either
    way the best dead channels are re-added while they fit, so the pruned model lands within a
    channel of the target. ``params`` adds a second target (the pipeline's is the first)."""

    needs_data = True
    needs_budget = True

    def __init__(self, epochs: int = 10, lam: float = 5.0, warmup_steps: int = 100, threshold: float = 1e-2,
                 surrogate: str = "ste", params: float | None = None, lr: float | None = None) -> None:
        self.epochs, self.lam, self.warmup_steps, self.threshold = epochs, lam, warmup_steps, threshold
        self.surrogate, self.params, self.lr = surrogate, params, lr
        self.name = "hfp"
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"`epochs` must be a positive int, got {epochs!r}")
        if surrogate not in ("ste", "soft"):
            raise ValueError(f"`surrogate` must be 'ste' or 'soft', got {surrogate!r}")

    def check(self, budget: Budget | None) -> None:
        if budget is None or budget.kind not in ("macs", "params"):
            raise ValueError("method 'hfp' needs a macs or params target")

    def plan(self, ctx: StepContext):
        from dataclasses import replace as dc_replace

        from .train import TrainConfig, fit

        if ctx.step > 1:
            return None, {"stop": "HFP prunes in one training phase"}
        targets = {ctx.budget.kind: ctx.budget.at_step(1, 1).value}
        if self.params is not None:
            targets["params"] = self.params
        reg = HFPRegularizer(ctx.model, ctx.graph, ctx.example_inputs, lam=self.lam, warmup_steps=self.warmup_steps,
                             threshold=self.threshold, surrogate=self.surrogate, base=ctx.current, **targets)
        cfg = ctx.finetune if ctx.finetune is not None else TrainConfig(quiet=True)
        # constant lr while pruning: a decaying schedule would freeze the gates before the target
        cfg = dc_replace(cfg, epochs=self.epochs, out_dir=None, resume=False, schedule="constant", warmup_epochs=0,
                         **({"lr": self.lr} if self.lr else {}))
        try:
            history = fit(ctx.model, ctx.data, ctx.val_data, cfg, regularizer=reg)
            gates = reg.gates().detach().cpu()
            alive = reg.alive(hard_only=True).cpu().bool()
        finally:
            reg.close()
        scores = [torch.where(reg.gated[g.components], gates[g.components], torch.full((g.size,), float("inf")))
                  for g in ctx.graph.groups]
        alloc = Allocator(ctx.graph, scores, "global", ctx.round_to, ctx.min_width, normalize=False)
        keep = [alloc.clamp(g.index, int(alive[g.components].sum())) for g in ctx.graph.groups]
        pc = reg.cost
        limits = {k: v * (pc.base.macs if k == "macs" else pc.base.params) for k, v in targets.items()}

        def worst(k):  # the tightest constraint, as a fraction of its limit (<= 1 fits)
            macs, params = pc(alloc.removed(k))
            return max({"macs": macs, "params": params}[n] / lim for n, lim in limits.items())

        if worst(keep) > 1:  # training stopped before the target: cut the lowest gates to meet it
            keep = _threshold_search(alloc, worst, 1.0)
        keep = _fill(alloc, keep, worst, 1.0)
        info = {"hfp_history": history, "hfp_converged": bool(reg.done), "hfp_steps": reg.steps}
        return alloc.plan(keep), info
