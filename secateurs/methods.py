"""Pruning methods: how each step of the pipeline decides which channels go.

The pipeline (:func:`secateurs.prune`) owns everything around a step: analysis, surgery,
fine-tuning, tolerance, checkpoints and the report. A :class:`Method` only answers "given this
model now, what is the plan?", or ``None`` when it has nothing left to remove (the schedule stops).

- :class:`CriterionMethod`: a criterion (``l1``, ``taylor``...) plus a budget; the baselines.
- :class:`HeuristicMethod`: METHODS.md method 1, a per-layer estimator picks the filters.
- :class:`LayerPruningMethod`: METHODS.md method 2, PLS-VIP scores remove whole residual blocks
  (``dlp``), then optionally filters (``dlp+filters``).
- :class:`HFPMethod`: METHODS.md method 3, a differentiable MACs/params loss on BN-scale gates.
- :class:`ImportanceWeightMethod`: METHODS.md method 4, learned per-channel weights, then steps
  while the validation metric stays within a tolerance (``importance-weights``).
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
           "HFPMethod", "HFPRegularizer", "ChannelScales", "ImportanceWeights", "ImportanceWeightMethod",
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
    tolerance: float | None = None  # the pipeline's metric tolerance (points), if any
    metric: str | None = None  # the key of evaluate() the tolerance applies to
    metric0: float | None = None  # that metric for the unpruned model
    out_dir: Any = None  # the run folder (Path) when checkpointing, for a method's own checkpoints
    state: dict = field(default_factory=dict)  # JSON-able, saved with every step: survives a resume


class Method:
    """One way of deciding what to cut; subclasses implement :meth:`plan`."""

    name = "method"
    needs_data = False
    needs_budget = True
    default_steps = 1  # the pipeline's `steps` when the caller gives none

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


class ChannelScales:
    """Learnable per-channel multipliers on module outputs (convs, transposed convs, linears, or
    affine norm layers), trained with the network and folded back into it exactly.

    Each scale is a parameter registered on its module (so any optimizer built afterwards trains
    it) and applied by a forward hook; :meth:`fold` multiplies it into the module's weight and bias
    and removes both, so the model is plain again (``conv(x) * s`` is ``conv_s(x)``, and
    ``norm(x) * s`` is the norm with ``s * weight`` and ``s * bias``). ``init`` gives starting
    values per module (default ones).
    """

    NAME = "secateurs_scale"

    def __init__(self, model: nn.Module, modules: Iterable[str], init: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model, self.handles, self.scales = model, [], {}
        for name in modules:
            m = model.get_submodule(name)
            width = _out_width(m, name)
            start = torch.ones(width) if init is None or name not in init else torch.as_tensor(init[name]).float()
            if start.shape != (width,):
                raise ValueError(f"module '{name}': init has shape {tuple(start.shape)}, expected ({width},)")
            p = nn.Parameter(start.clone().to(m.weight.device))
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
                w = m.weight
                if isinstance(m, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, *k)
                    g = m.groups
                    w.view(g, w.shape[0] // g, w.shape[1], -1).mul_(p.view(g, 1, w.shape[1], 1))
                elif isinstance(m, _GATED):
                    w.mul_(p)
                else:
                    w.mul_(p.view(-1, *([1] * (w.dim() - 1))))
                if m.bias is not None:
                    m.bias.mul_(p)
                del m._parameters[self.NAME]
        for h in self.handles:
            h.remove()
        self.handles, self.scales = [], {}


def _out_width(m: nn.Module, name: str) -> int:
    if isinstance(m, _GATED) and getattr(m, "weight", None) is not None:
        return m.num_features if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.num_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    raise ValueError(f"module '{name}': channel scales go on conv, linear or affine norm outputs, "
                     f"not {type(m).__name__}")


def _carriers(model: nn.Module, graph: DependencyGraph, transposed: bool = True) -> dict[str, torch.Tensor]:
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
        if (b.kind == "tensor" and b.name == "weight" and isinstance(m, _GATED) and getattr(m, "affine", True)
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


def _carrier_count(labels: Iterable[torch.Tensor], n: int) -> torch.Tensor:
    """How many carriers each channel component has."""
    count = torch.zeros(n)
    for lab in labels:
        count.index_add_(0, lab, torch.ones(len(lab)))
    return count


def _mean_abs(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], count: torch.Tensor) -> torch.Tensor:
    """Mean |value| per channel component over its carriers (0 where none); differentiable."""
    pairs = list(pairs)
    dev = pairs[0][0].device
    total = torch.zeros(len(count), device=dev)
    for w, lab in pairs:
        total = total.index_add(0, lab.to(dev), w.abs().float())
    return total / count.to(dev).clamp_min(1)


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
        carriers = _carriers(model, graph, transposed=False)
        modules = dict(model.named_modules())
        # norm layers gate their channels; channels no norm layer carries get explicit scales on their convs
        producers = {n: lab for n, lab in carriers.items() if not isinstance(modules[n], _GATED)}
        self._gates = [(modules[n].weight, lab) for n, lab in carriers.items() if n not in producers]
        self.scales = ChannelScales(model, producers) if producers else None
        if self.scales is not None:
            self._gates += [(self.scales.scales[n], lab) for n, lab in producers.items()]
        if not self._gates:
            raise ValueError("HFP found no gate: no norm layer and no prunable conv output in the model")
        prunable = torch.zeros(graph.n_components, dtype=torch.bool)
        for g in graph.groups:
            prunable[g.components] = True
        counts = _carrier_count((lab for _, lab in self._gates), graph.n_components)
        self._count = counts
        self.gated = (counts > 0) & prunable  # frozen channels: always alive
        with torch.no_grad():
            self.scale = float(self.gates()[self.gated].mean().clamp_min(1e-6))
        self.done = False
        self.last: dict[str, float] = {}

    def gates(self) -> torch.Tensor:
        return _mean_abs(self._gates, self._count)

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


# -- method 4: importance weights with an error tolerance ------------------------------------------
def _channel_macs(ctx: StepContext) -> torch.Tensor:
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


class ImportanceWeights:
    """One learnable weight alpha per output channel of every prunable group, for any training loop.

    Alpha multiplies the channel after its norm layer (or its conv where there is none); a
    channel's importance is the mean |alpha| over the places that carry it (a residual channel is
    carried by several). ``init``: ``"ones"``; ``"uniform"``, U(0, 1) (seeded); ``"l1"``, the
    group's filter L1 norms divided by their mean. ``l1`` > 0 adds ``l1 * sum w_c |alpha_c|`` to
    the loss (call the object), with ``w_c = 1``, or with ``cost_weights`` (one per channel
    component, e.g. what each channel costs in MACs, mean 1) so that expensive channels are pushed
    harder. :meth:`fold` multiplies alpha into the weights and removes it::

        iw = ImportanceWeights(model, secateurs.analyze(model, x), init="l1", l1=1e-4)
        loss = criterion(model(xb), yb) + iw()        # train as usual
        scores = iw.scores(); iw.fold()               # rank channels by scores, plain model again
    """

    INITS = ("ones", "uniform", "l1")

    def __init__(self, model: nn.Module, graph: DependencyGraph, init: str = "ones", l1: float = 0.0,
                 seed: int = 0, cost_weights: torch.Tensor | None = None) -> None:
        if init not in self.INITS:
            raise ValueError(f"`init` must be one of {', '.join(self.INITS)}, got {init!r}")
        if isinstance(l1, bool) or not isinstance(l1, (int, float)) or not l1 >= 0:
            raise ValueError(f"`l1` must be a non-negative number, got {l1!r}")
        self.graph, self.l1 = graph, float(l1)
        self.labels = _carriers(model, graph)
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
        self.scales = ChannelScales(model, self.labels, init=start)
        self._count = _carrier_count(self.labels.values(), graph.n_components)
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
            return _mean_abs(((p, self.labels[n]) for n, p in self.scales.scales.items()), self._count).cpu()

    def scores(self) -> list[torch.Tensor]:
        imp = self.importance()
        return [imp[g.components] for g in self.graph.groups]

    def fold(self) -> None:
        self.scales.fold()


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
    wide, cheap deep layers first (params fall much faster than MACs).

    No rate is set by hand: the tolerance stops the schedule. A MACs/params target, if given, is a
    second stop rule (the last step is trimmed to it). ``min_keep``: no group goes below that
    fraction of its original width. The ranking is global: alpha is comparable across layers (it
    starts equal everywhere, or at mean 1 per layer with ``init="l1"``).
    """

    needs_data = True
    needs_budget = False
    default_steps = 100

    def __init__(self, epochs: int = 5, init: str = "ones", l1: float = 1e-4, fraction: float = 0.05,
                 search: str = "steps", bisect_iters: int = 6, min_keep: float = 0.05, lr: float | None = None,
                 seed: int = 0, cost_aware: bool = False, refinements: int = 2) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"`epochs` must be a non-negative int, got {epochs!r}")
        if init not in ImportanceWeights.INITS:
            raise ValueError(f"`init` must be one of {', '.join(ImportanceWeights.INITS)}, got {init!r}")
        if isinstance(l1, bool) or not isinstance(l1, (int, float)) or not l1 >= 0:
            raise ValueError(f"`l1` must be a non-negative number, got {l1!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}")
        if search not in ("steps", "bisect"):
            raise ValueError(f"`search` must be 'steps' or 'bisect', got {search!r}")
        if isinstance(bisect_iters, bool) or not isinstance(bisect_iters, int) or bisect_iters < 1:
            raise ValueError(f"`bisect_iters` must be a positive int, got {bisect_iters!r}")
        if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or not 0 < min_keep <= 1:
            raise ValueError(f"`min_keep` must be a fraction in (0, 1], got {min_keep!r}")
        if isinstance(refinements, bool) or not isinstance(refinements, int) or refinements < 0:
            raise ValueError(f"`refinements` must be a non-negative int, got {refinements!r}")
        self.cost_aware, self.refinements = bool(cost_aware), refinements
        self.epochs, self.init, self.l1, self.fraction, self.search = epochs, init, float(l1), float(fraction), search
        self.bisect_iters, self.min_keep, self.lr, self.seed = bisect_iters, float(min_keep), lr, seed
        self.name = "importance-weights"

    def check(self, budget: Budget | None) -> None:
        if budget is not None and budget.kind not in ("macs", "params"):
            raise ValueError(f"method 'importance-weights' takes a macs or params target as a stop rule, not {budget.kind!r}")

    # -- phase 1: learn alpha -----------------------------------------------------------------
    def _train_config(self, ctx: StepContext, epochs: int, folder: str | None):
        from dataclasses import replace as dc_replace

        from .train import TrainConfig

        cfg = ctx.finetune if ctx.finetune is not None else TrainConfig(quiet=True)
        out = str(ctx.out_dir / folder) if ctx.out_dir is not None and folder else None
        return dc_replace(cfg, epochs=epochs, out_dir=out, resume=out is not None, **({"lr": self.lr} if self.lr else {}))

    def _learn(self, ctx: StepContext) -> dict:
        """Train alpha with the weights, fold it; the scores go to ``ctx.state`` (saved with steps)."""
        import copy

        from .train import evaluate, fit

        before = copy.deepcopy(ctx.model) if ctx.tolerance is not None else None
        weights = _channel_macs(ctx) if self.cost_aware else None
        iw = ImportanceWeights(ctx.model, ctx.graph, self.init, self.l1, self.seed, cost_weights=weights)
        try:
            history = fit(ctx.model, ctx.data, None, self._train_config(ctx, self.epochs, "importance"),
                          regularizer=iw) if self.epochs else []
            scores = iw.scores()
        finally:
            iw.fold()
        if weights is not None:  # importance per MAC saved: expensive channels must earn their place
            scores = [s / weights[g.components].clamp_min(1e-12) for g, s in zip(ctx.graph.groups, scores)]
        ctx.state["scores"] = {g.name: s.tolist() for g, s in zip(ctx.graph.groups, scores)}
        info: dict[str, Any] = {"iw_history": history}
        if ctx.val_data is not None and ctx.metric is not None:
            info["iw_metric_trained"] = evaluate(ctx.model, ctx.val_data)[ctx.metric]
            if ctx.tolerance is not None and ctx.metric0 - info["iw_metric_trained"] > ctx.tolerance:
                from .pipeline import _restore

                _restore(ctx.model, before)  # the user gets the model they gave, not a worse one
                info["stop"] = (f"{ctx.metric} fell by {ctx.metric0 - info['iw_metric_trained']:.2f} while learning "
                                f"the importance weights (> tolerance {ctx.tolerance}); model left as it was")
        return info

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
        alloc = Allocator(ctx.graph, scores, "global", ctx.round_to, ctx.min_width, normalize=False)
        for i, g in enumerate(ctx.graph.groups):  # the floor refers to the original width
            floor = math.ceil(self.min_keep * ctx.original_widths.get(g.name, g.size))
            alloc.min_keep[i] = min(g.size, max(alloc.min_keep[i], alloc._round(floor, g.size)))
        return alloc

    def _keep_removing(self, alloc: Allocator, n: int) -> list[int]:
        """Widths after removing the ``n`` lowest removable channels, over all groups."""
        groups = alloc.graph.groups
        flat = sorted((float(alloc.sorted_norm[i][k]), i) for i, g in enumerate(groups)
                      for k in range(alloc.min_keep[i], g.size))
        cut = [0] * len(groups)
        for _, i in flat[:n]:
            cut[i] += 1
        return [alloc.clamp(i, g.size - c) for i, (g, c) in enumerate(zip(groups, cut))]

    def _fewest_removals(self, alloc: Allocator, cost: Callable[[list[int]], float], goal: float, hi: int) -> int:
        """The fewest lowest-score channels (at most ``hi``) whose removal brings ``cost`` to ``goal``."""
        lo = 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(self._keep_removing(alloc, mid)) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return lo

    @staticmethod
    def _removable(alloc: Allocator) -> int:
        return sum(g.size - k for g, k in zip(alloc.graph.groups, alloc.min_keep))

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

    def plan(self, ctx: StepContext):
        if self.search == "bisect" and (ctx.tolerance is None or ctx.val_data is None):
            raise ValueError("importance-weights with search='bisect' needs `tolerance` and `val_data`")
        info: dict[str, Any] = {}
        if "scores" not in ctx.state:
            info = self._learn(ctx)
            if "stop" in info:
                return None, info
        elif self.search == "bisect":
            return None, {"stop": "bisection done"}
        limit = None
        if ctx.budget is not None:
            which = 0 if ctx.budget.kind == "macs" else 1
            limit = ctx.budget.value * (ctx.base.macs, ctx.base.params)[which]
            if (ctx.current.macs, ctx.current.params)[which] <= limit:
                return None, dict(info, stop=f"{ctx.budget.kind} target {ctx.budget.value} met")
        alloc = self._allocator(ctx, self._scores(ctx))
        pc = PlanCost(ctx.model, ctx.graph, ctx.example_inputs, base=ctx.current)
        removable = self._removable(alloc)
        if removable == 0:
            return None, dict(info, stop="every group is at its minimum width")
        if self.search == "bisect":
            keep, info["iw_bisection"] = self._bisect(ctx, alloc, removable)
            if keep is None:
                return None, dict(info, stop="no removal stays within the tolerance")
        else:
            fraction = self.fraction * 0.5 ** ctx.state.get("halvings", 0)
            if self.cost_aware:  # a step is a share of the MACs: the cheapest-per-MAC channels come in bulk
                n = self._fewest_removals(alloc, lambda k: pc(alloc.removed(k))[0], ctx.current.macs * (1 - fraction),
                                          removable)
            else:
                n = max(1, math.ceil(fraction * removable))
            keep = self._keep_removing(alloc, n)
        if limit is not None:

            def cost(k: list[int]) -> float:
                return pc(alloc.removed(k))[which]

            if cost(keep) < limit:  # the target is reached inside this step: remove only what it needs
                # (bisect the count first: one channel at a time from a big step would take thousands of costings)
                keep = _fill(alloc, self._keep_removing(alloc, self._fewest_removals(alloc, cost, limit, removable)),
                             cost, limit)
        if all(k == g.size for k, g in zip(keep, ctx.graph.groups)):
            return None, dict(info, stop="nothing left to remove (round_to / min_keep)")
        return self._commit(ctx, alloc, keep), info

    def _bisect(self, ctx: StepContext, alloc: Allocator, removable: int):
        """Largest number of lowest-|alpha| channels whose removal and fine-tune stay within the tolerance."""
        import copy

        from .surgery import apply_plan
        from .train import evaluate, fit

        lo, hi, tried = 0, removable, []
        for _ in range(self.bisect_iters):
            mid = (lo + hi + 1) // 2
            if mid <= lo:
                break
            keep = self._keep_removing(alloc, mid)
            probe = copy.deepcopy(ctx.model)
            apply_plan(probe, ctx.graph, alloc.plan(keep))
            if ctx.finetune is not None:
                fit(probe, ctx.data, None, self._train_config(ctx, ctx.finetune.epochs, None))
            m = evaluate(probe, ctx.val_data)[ctx.metric]
            ok = ctx.metric0 - m <= ctx.tolerance
            tried.append({"removed_channels": mid, "metric": m, "within": ok})
            ctx.log(f"bisection: {mid}/{removable} channels -> {ctx.metric} {m:.2f} ({'within' if ok else 'outside'})")
            lo, hi = (mid, hi) if ok else (lo, mid - 1)
        return (self._keep_removing(alloc, lo) if lo else None), tried
