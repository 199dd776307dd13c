"""The Method protocol, its options as data, the registry, and the criterion method (the baselines).

The pipeline (:func:`secateurs.prune`) owns everything around a step: analysis, surgery,
fine-tuning, the tolerance and undoing a step, checkpoints and the report. A :class:`Method` only
answers "given this model now, what is the :class:`Decision`?"; a decision that cuts nothing stops
the schedule.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch.nn as nn

from .._registry import Registry
from .._validation import InvalidArgument, check_choice, check_scalar
from ..budget import Budget, latency_plan, plan_for_budget
from ..cost import Cost
from ..criteria import get_criterion, group_scores, list_criteria
from ..depth import LayerPlan
from ..graph import DependencyGraph
from ..surgery import PruningPlan, apply_plan

__all__ = ["Option", "StepContext", "Decision", "Method", "CriterionMethod", "get_method", "register_method",
           "list_methods", "method_class"]


@dataclass(frozen=True)
class Option:
    """One constructor option of a method, as data: its default, its constraint (a range for
    numbers, ``choices`` for names) and its command-line flag, from which the CLI builds the flag.

    ``kind`` is ``int``, ``float``, ``str``, ``bool`` or ``object`` (not checked here, e.g. a name
    or a callable checked by a registry); ``flag`` is the CLI flag (``None``: not on the command
    line); ``nullable``: ``None`` is a valid value ("not set").
    """

    name: str
    default: Any
    help: str = ""
    kind: type = float
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    nullable: bool = False

    def check(self, value: Any) -> Any:
        """``value`` checked against the constraint (a message naming the option), as ``kind``."""
        if value is None and self.nullable:
            return None
        if self.choices is not None:
            return check_choice(value, self.name, self.choices)
        if self.kind is bool:
            return bool(value)
        if self.kind in (int, float):
            value = check_scalar(value, self.name, int if self.kind is int else numbers.Real, min_val=self.low,
                                 max_val=self.high, include_min=not self.open_low, include_max=not self.open_high)
            return self.kind(value)
        return value


@dataclass(kw_only=True)
class StepContext:
    """What a method may look at to plan one step (keyword fields only)."""

    model: nn.Module
    graph: DependencyGraph
    example_inputs: Any
    step: int
    steps: int
    budget: Budget | None
    base: Cost  # the original model
    current: Cost  # the model entering this step
    allocation: str = "global"
    round_to: int = 1
    min_width: int | float = 1
    data: Any = None
    original_widths: Mapping[str, int] = field(default_factory=dict)
    latency_threads: int | None = None
    log: Callable[..., None] = print
    finetune: Any = None  # the pipeline's TrainConfig: methods that train (HFP) start from it
    teacher: Any = None  # the frozen unpruned model when finetune.distill > 0: pass it to every fit()
    val_data: Any = None
    tolerance: float | None = None  # the pipeline's metric tolerance (points), if any
    metric: str | None = None  # the key of evaluate() the tolerance applies to
    metric0: float | None = None  # that metric for the unpruned model
    out_dir: Any = None  # the run folder (Path) when checkpointing, for a method's own checkpoints
    state: dict = field(default_factory=dict)  # JSON-able, saved with every step: survives a resume
    # False under torchrun on every process but the first: a decision made by timing is made there alone
    # (the others would compete for its cores) and the pipeline hands it, with `state`, to the rest
    times: bool = True

    def budget_met(self) -> str | None:
        """The stop reason when the MACs/params budget (a stop rule) is already met, else None."""
        if self.budget is not None and self.budget.met(self.current, self.base):
            return f"{self.budget.kind} target {self.budget.value} met"
        return None


@dataclass
class Decision:
    """What a method decided for one step: channels to cut, or blocks to remove, or neither (then
    ``stop`` says why and the schedule ends). ``info`` is the method's own output for the report;
    ``undo=True`` asks the pipeline to put back the model as it was before :meth:`Method.plan`
    (e.g. training inside the method broke the tolerance); the pipeline keeps that copy for
    methods with ``trains = True`` when a tolerance is set."""

    channels: PruningPlan | None = None
    blocks: LayerPlan | None = None
    info: dict = field(default_factory=dict)
    stop: str | None = None
    undo: bool = False

    @classmethod
    def halt(cls, why: str, undo: bool = False, **info: Any) -> "Decision":
        return cls(info=info, stop=why, undo=undo)

    @property
    def empty(self) -> bool:
        return not (self.channels is not None and self.channels.remove) and not (
            self.blocks is not None and self.blocks.remove)

    def apply(self, model: nn.Module, graph: DependencyGraph, example_inputs: Any) -> dict:
        """Cut the model in place; returns what went ({group or block name: channels or score})."""
        if self.blocks is not None:
            removed = self.blocks.summary()
            self.blocks.apply(model, example_inputs)
            return removed
        removed = {graph.groups[gi].name: len(idx) for gi, idx in self.channels.remove.items()}
        apply_plan(model, graph, self.channels)
        return removed


class Method:
    """One way of deciding what to cut. A subclass declares ``name``, its ``options`` (the
    constructor takes exactly those, positionally in that order or by name, checked against
    their constraints) and implements :meth:`plan`; :meth:`check` and :meth:`refine` are optional."""

    name: ClassVar[str] = "method"
    summary: ClassVar[str] = ""  # one line for the CLI's help
    options: ClassVar[tuple[Option, ...]] = ()
    needs_data: ClassVar[bool] = False
    needs_budget: ClassVar[bool] = True
    default_steps: ClassVar[int] = 1  # the pipeline's `steps` when the caller gives none (see `steps_for`)
    trains: ClassVar[bool] = False  # plan() changes the model (training): the pipeline snapshots before it
    # when the tolerance undoes a step's cut: keep what plan() trained (True: importance weights, whose
    # alpha, learned within the tolerance, ranks the next step) or go back to before it (HFP's training
    # only served that cut)
    undo_keeps_training: ClassVar[bool] = True
    default_tolerance: ClassVar[float | None] = None  # points; used when `val_data` is given without one

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = [o.name for o in self.options]
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes at most {len(names)} positional options, got {len(args)}")
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {k!r}")
            if k in given:
                raise TypeError(f"{type(self).__name__}() got multiple values for option {k!r}")
            given[k] = v
        # as given and checked, before setup() derives from them: what a run's checkpoints record
        self.option_values = {o.name: o.check(given.get(o.name, o.default)) for o in self.options}
        for k, v in self.option_values.items():
            setattr(self, k, v)
        self.setup()

    def setup(self) -> None:
        """Derive state from the checked options (names to callables, cross-option checks)."""


    def check(self, budget: Budget | None) -> None:
        """Refuse a budget this method cannot honour, before any work starts."""

    def steps_for(self, budget: Budget | None, tolerance: float | None) -> int:
        """The pipeline's `steps` when the caller gives none: ``default_steps``."""
        return self.default_steps

    def plan(self, ctx: StepContext) -> Decision:
        raise NotImplementedError

    def refine(self, ctx: StepContext) -> bool:
        """Called after the pipeline undid a step that broke the tolerance; return True to go on
        (e.g. with a smaller step), False to stop. Default: stop."""
        return False


def check_stop_rule(method: str, budget: Budget | None) -> None:
    """Methods that pick their own widths take at most a MACs/params target, as a stop rule."""
    if budget is not None and budget.kind not in ("macs", "params"):
        raise ValueError(f"method {method!r} takes a macs or params target as a stop rule, not {budget.kind!r}")


_METHODS: Registry[type[Method]] = Registry("method")
register_method = _METHODS.register


def method_class(name: str) -> type[Method]:
    """The :class:`Method` subclass a registered name builds (its ``options`` describe it)."""
    return _METHODS.get(name)


def list_methods() -> list[str]:
    """Registered methods; every criterion name is a method too (criterion + budget)."""
    return sorted(set(_METHODS.names()) | set(list_criteria()))


class CriterionMethod(Method):
    """Score channels with a criterion, allocate the step's share of the budget."""

    def __init__(self, criterion: str | Callable = "l2", **criterion_kwargs: Any) -> None:
        self.fn = get_criterion(criterion)
        self.name = criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom")
        self.needs_data = bool(getattr(self.fn, "needs_data", False))
        self.kwargs = criterion_kwargs


    def plan(self, ctx: StepContext) -> Decision:
        scores = group_scores(ctx.model, ctx.graph, self.fn, data=ctx.data, **self.kwargs)
        budget = ctx.budget.at_step(ctx.step, ctx.steps)
        if budget.kind == "latency":
            return self._to_latency(ctx, scores)
        plan, _ = plan_for_budget(ctx.model, ctx.graph, ctx.example_inputs, scores, budget, ctx.allocation,
                                  ctx.round_to, ctx.min_width, base=ctx.current, reference=ctx.base,
                                  threads=ctx.latency_threads, original=ctx.original_widths)
        return Decision(channels=plan)

    def _to_latency(self, ctx: StepContext, scores: list) -> Decision:
        """Each step times the model as it finds it: the steps left share out what the earlier ones
        have not reached yet (v / so far, geometrically), so a miss is made up, not compounded."""
        if not ctx.times:
            return Decision()  # the first process's decision replaces it
        so_far = ctx.state.get("latency_so_far", 1.0)
        if so_far <= ctx.budget.value:
            return Decision.halt(f"latency target {ctx.budget.value} met ({so_far:.3g} of the unpruned model's)")
        aim = (ctx.budget.value / so_far) ** (1 / (ctx.steps - ctx.step + 1))
        plan, info = latency_plan(ctx.model, ctx.graph, ctx.example_inputs, scores, Budget("latency", aim),
                                  ctx.allocation, ctx.round_to, ctx.min_width, ctx.latency_threads, ctx.log,
                                  original=ctx.original_widths)
        ctx.state["latency_so_far"] = so_far * info["latency_ratio"]  # a step the tolerance undoes stops the run
        return Decision(channels=plan, info={**info, "latency_ratio_total": ctx.state["latency_so_far"]})


def get_method(method: str | Callable | Method, **options: Any) -> Method:
    """A :class:`Method` from a registered method name, a criterion name or callable, or itself."""
    if isinstance(method, Method):
        if options:
            raise ValueError("pass options to the Method's constructor, not with an instance")
        return method
    if isinstance(method, str) and method in _METHODS.names():
        try:
            return _METHODS.get(method)(**options)
        except InvalidArgument:
            raise
        except TypeError as err:
            raise ValueError(f"method {method!r}: {err}") from None
    if isinstance(method, str) and method not in list_criteria():
        raise ValueError(f"unknown method {method!r}; criteria (pruned to a budget): {', '.join(list_criteria())}; "
                         f"methods: {', '.join(_METHODS.names())}")
    return CriterionMethod(method, **options)
