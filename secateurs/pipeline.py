"""What a user runs: :func:`prune` drives a method step by step (analyse, decide, cut, fine-tune,
measure), undoes the step that breaks the tolerance, checkpoints every step and writes the report.

It is a short driver on purpose: budgets and allocation are :mod:`secateurs.budget`, the decisions
are :mod:`secateurs.methods`, the cut is :mod:`secateurs.surgery` / :mod:`secateurs.depth`.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ._modes import in_mode
from ._state import copy_model
from ._validation import (InvalidArgument, PruningError, check_dataset, check_example_inputs, check_model,
                          check_out_dir, check_scalar)
from .reconstruct import refit_before_cut
from .budget import (ALLOCATIONS, BUDGETS, Allocator, Budget, as_budget, deprecated_budget, plan_for_budget,  # noqa: F401
                     uniform_plan)  # Allocator, Budget, plan_for_budget, uniform_plan: re-exported for one release
from .checkpoints import RunCheckpoints, drop_stale_training
from .cost import Cost, count
from .saving import load as load_model
from .graph import DependencyGraph, analyze, analyze_and_count
from .latency_table import auto_round_to
from .methods import Method, StepContext, get_method
from .metrics import check_labels
from .report import collapse_guard, guard_samples, predictions
from .report import latency_guard as time_against_dense
from .distributed import barrier, from_first_process, init_distributed, is_main_process
from .train import TrainConfig, evaluate, fit, metric_key

__all__ = ["prune", "METHOD_OUTPUT"]

METHOD_OUTPUT = "method_output"  # the report key holding a method's own output (scores, histories...)
_TIMINGS = ("analyze_s", "plan_s", "surgery_s", "finetune_s")


@dataclass
class _Request:
    """The checked arguments of one :func:`prune` call."""

    how: Method
    budget: Budget | None
    allocation: str
    steps: int
    finetune: TrainConfig | None
    key: str | None  # the metric's key in evaluate(), when there is validation data
    options: dict = field(default_factory=dict)
    tolerance: float | None = None  # as given, or the method's default when `val_data` is given
    reconstruct: int = 0  # calibration images for the least-squares re-fit before every channel cut


def _check_request(model: nn.Module, method: Any, target: Any, allocation: str | None, round_to: int,
                   min_width: int | float, data: Any, val_data: Any, finetune: Any, steps: int | None,
                   tolerance: float | None, metric: str | None, method_options: Mapping | None,
                   reconstruct: int = 0) -> _Request:
    """Every argument is checked here, before the model is touched."""
    how = get_method(method, **dict(method_options or {}))
    if target is None and how.needs_budget:
        raise ValueError("give a `target` (kept fraction of MACs/params/latency, or {module: ratio}) or a `ratio`")
    budget = as_budget(target) if target is not None else None
    how.check(budget)
    kind = budget.kind if budget is not None else None
    allocation = allocation or ("global" if kind in ("macs", "params", "latency") else "uniform")
    Allocator.check_arguments(allocation, round_to, min_width)
    if tolerance is None and how.default_tolerance is not None and budget is None:  # its own stop rule (METHODS.md)
        if val_data is not None:
            tolerance = how.default_tolerance
        elif steps is None:  # nothing would stop its default schedule short of its floors
            raise ValueError(f"method {how.name!r} stops on its tolerance ({how.default_tolerance} points by default, "
                             "read on `val_data`), a MACs/params target or a number of `steps`: pass one")
    steps = check_scalar(how.steps_for(budget, tolerance) if steps is None else steps, "steps", int, min_val=1)
    check_scalar(reconstruct, "reconstruct", int, min_val=0)
    if (how.needs_data or reconstruct) and data is None:
        raise ValueError(f"{'`reconstruct`' if reconstruct else f'method {how.name!r}'} needs data: pass `data`")
    if finetune is not None:
        if data is None:
            raise ValueError("`finetune` needs `data` (the training set)")
        if isinstance(finetune, Mapping):
            try:
                finetune = TrainConfig(**finetune)
            except InvalidArgument:  # a field out of range: its own message names it
                raise
            except TypeError as err:
                raise TypeError(f"`finetune` must hold TrainConfig fields: {err}") from None
        if not isinstance(finetune, TrainConfig):
            raise TypeError(f"`finetune` must be a TrainConfig or a dict of its fields, got {type(finetune).__name__}")
    if tolerance is not None:
        if val_data is None:
            raise ValueError("`tolerance` needs `val_data` to measure the metric")
        check_scalar(tolerance, "tolerance", min_val=0)
    if metric is not None and val_data is None:
        raise ValueError(f"`metric` ({metric!r}) needs `val_data` to be measured on")
    key = metric_key(val_data, metric)
    if kind == "latency":
        dev = next(model.parameters()).device
        if dev.type != "cpu" and not (dev.type == "cuda" and torch.cuda.is_available()):
            raise PruningError(f"a latency target needs the model to run here; it is on {dev}")
    return _Request(how, budget, allocation, steps, finetune, key if val_data is not None else None,
                    dict(method_options or {}), tolerance, reconstruct)


def _check_data(model: nn.Module, inputs: tuple, data: Any, val_data: Any) -> None:
    """The datasets, and labels the model's head has no output for, named before any cut: one eval
    forward of the example inputs gives the number of logits (nothing changes: no_grad, the mode restored)."""
    check_dataset(data, "data", inputs)
    check_dataset(val_data, "val_data", inputs, arrays=True)
    if not any(isinstance(getattr(d, "targets", None), torch.Tensor) for d in (data, val_data)):
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with in_mode(model, training=False), torch.no_grad():
        out = model(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs))
    if isinstance(out, torch.Tensor) and out.dim() >= 2:
        for d, name in ((data, "data"), (val_data, "val_data")):
            if isinstance(getattr(d, "targets", None), torch.Tensor):
                check_labels(d, out.shape[1], name)


def _teacher(model: nn.Module, finetune: TrainConfig | None, given: nn.Module | None) -> nn.Module | None:
    """A frozen copy of the unpruned model to distil from during every fine-tuning, only when the
    fine-tuning asks for it (it costs a model's memory and a forward per step). ``given`` replaces
    it: the model before an earlier prune of a cascade, whose outputs the user is after."""
    if given is not None:
        check_model(given, "teacher", values=True)
        if given is model:
            raise InvalidArgument("`teacher` must be a separate module (e.g. a deepcopy), not the model being pruned")
    if finetune is None or finetune.distill == 0:
        return None
    if given is not None:
        return given.eval().requires_grad_(False)
    teacher = copy_model(model).eval()
    teacher.requires_grad_(False)
    return teacher


def _restore(model: nn.Module, snapshot: nn.Module) -> None:
    """Put ``snapshot``'s whole state (architecture included) back into the user's object."""
    model.__dict__.clear()
    model.__dict__.update(snapshot.__dict__)


def _widths(cost: Cost) -> dict[str, int]:
    """Output width of every counted layer (channels for convs, features for linears)."""
    out = {}
    for layer in cost.layers:
        shape = layer.output_shape
        out[layer.name] = int(shape[-1] if layer.kind in ("Linear", "MultiheadAttention") or len(shape) < 2 else shape[1])
    return out


def _checkpoint_request(req: _Request, report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a resumed run must match (every method option's value, as checked) and the options' defaults."""
    request = {k: report[k] for k in ("method", "budget", "allocation", "round_to", "min_width", "steps_requested",
                                      "reconstruct") if k != "reconstruct" or req.reconstruct}
    request["method_options"] = getattr(req.how, "option_values", None) or req.options
    return request, {o.name: o.default for o in req.how.options}


def _start_report(req: _Request, model: nn.Module, base: Cost, metric0: float | None, round_to: int,
                  min_width: int | float, tolerance: float | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "method": req.how.name, "method_options": req.options,
        "budget": {"kind": req.budget.kind if req.budget else None, "target": req.budget.value if req.budget else None},
        "allocation": req.allocation, "round_to": round_to, "min_width": min_width, "steps_requested": req.steps,
        "tolerance": tolerance, "metric_name": req.key, "reconstruct": req.reconstruct,
        "before": {"macs": base.macs, "params": base.params, "metric": metric0},
        "steps": [{"step": 0, "macs": base.macs, "params": base.params, "metric": metric0}],
    }
    if hasattr(model, "secateurs_spec"):
        report["model"] = model.secateurs_spec
    return report


def _finish_report(run: _Run, t_all: float, dense: nn.Module | None) -> dict:
    # an undone step restored the model whose cost `run.current` still holds
    report, base, final, extra, timings = run.report, run.base, run.current, run.extra, run.timings
    kept = [r for r in report["steps"] if not r.get("reverted")]
    last = report["steps"][-1]  # an undone cut that kept its training scores what the model is now
    metric = last["metric_restored"] if last.get("reverted") and "metric_restored" in last else kept[-1]["metric"]
    report["after"] = {"macs": final.macs, "params": final.params, "metric": metric}
    report["kept"] = {"macs": final.macs / base.macs, "params": final.params / base.params}
    w0, w1 = _widths(base), _widths(final)
    report["layers"] = [{"name": l.name, "kind": l.kind, "width_before": w0[l.name], "width_after": w1.get(l.name),
                         "macs_before": l.macs, "macs_after": next((r.macs for r in final.layers if r.name == l.name), 0)}
                        for l in base.layers]
    report["timings"] = dict(timings, total_s=time.perf_counter() - t_all)
    report[METHOD_OUTPUT] = {k: v for k, v in extra.items() if k not in ("_state", "original_widths")}
    report["original_widths"] = extra.get("original_widths", {})
    cut = (final.macs, final.params) != (base.macs, base.params)
    if cut and run.predictions0 is not None:  # None: nothing the guard can read, or not the first process
        try:
            collapse_guard(run.model, run.samples, report, run.predictions0,
                           trained=run.req.finetune is not None)
        except Exception as err:  # noqa: BLE001
            _guard_failed(report, "the collapse guard could not run the pruned model", err)
    if dense is not None and cut:
        t0 = time.perf_counter()  # its own line of the timings, outside the run's total
        try:
            time_against_dense(dense, run.model, run.example_inputs, report, threads=run.context["latency_threads"])
        except Exception as err:  # noqa: BLE001
            _guard_failed(report, "the latency guard could not time the models", err)
        report["timings"]["latency_guard_s"] = time.perf_counter() - t0
    return report


def _guard_failed(report: dict, what: str, err: Exception) -> None:
    """The cut is made and kept: a guard that cannot run is said (the report and a warning), never raised."""
    msg = f"{what}: {type(err).__name__}: {err}"
    report.setdefault("warnings", []).append(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


@dataclass
class _Run:
    """What the step loop carries from step to step."""

    model: nn.Module
    example_inputs: Any
    req: _Request
    base: Cost
    current: Cost
    report: dict
    extra: dict
    ckpt: RunCheckpoints
    timings: dict
    log: Callable[..., None]
    context: dict  # the StepContext fields that do not change between steps
    samples: Any = None  # the collapse guard's few samples, and what the unpruned model predicted on them
    predictions0: Any = None


def _step(run: _Run, k: int, ignore: Any, tolerance: float | None, graph: DependencyGraph | None = None) -> str | None:
    """One step: analyse (unless ``graph`` is this model's already), decide, cut, fine-tune, measure;
    undo it if it breaks the tolerance. Returns why the schedule stops, or None to go on."""
    model, req, timings = run.model, run.req, run.timings
    t0 = time.perf_counter()
    if graph is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = analyze(model, run.example_inputs, ignore=ignore)
    if "original_widths" not in run.extra:  # min-kept guards refer to the original widths, across resumes too
        run.extra["original_widths"] = {g.name: g.size for g in graph.groups}
    t1 = time.perf_counter()
    # each step its own data order (one seed for all would replay the same first batches every step);
    # the method sees the same config, so what it trains or probes inside the step reads those batches
    finetune = replace(req.finetune, seed=req.finetune.seed + k) if req.finetune is not None else None
    ctx = StepContext(model=model, graph=graph, step=k, current=run.current,
                      original_widths=run.extra["original_widths"], state=run.extra.setdefault("_state", {}),
                      times=is_main_process(), **{**run.context, "finetune": finetune})
    before_plan = copy_model(model) if tolerance is not None and req.how.trains else None
    decision, state = from_first_process((req.how.plan(ctx), ctx.state))  # timed plans: made by the first
    ctx.state.update(state)
    t3 = time.perf_counter()
    timings["analyze_s"] += t1 - t0
    timings["plan_s"] += t3 - t1
    if decision.undo and before_plan is not None:
        _restore(model, before_plan)
    if decision.empty:
        why = decision.stop or "nothing left to remove"
        run.log(f"step {k}: {why}; stopping")
        return why
    run.extra.update(decision.info)
    # what undoing this step goes back to: before plan() when the method's training only served this cut
    snapshot = before_plan if before_plan is not None and not req.how.undo_keeps_training else (
        copy_model(model) if tolerance is not None else None)
    if req.reconstruct and decision.channels is not None and decision.channels.remove:
        fits, n = refit_before_cut(model, graph, decision.channels, run.context["data"], req.reconstruct)
        run.extra.setdefault("reconstruction", {})[str(k)] = {m: [round(a, 5), round(b, 5)] for m, (a, b) in fits.items()}
        if fits:
            run.log(f"step {k}: {len(fits)} layers re-fitted on {n} images, squared output error (relative) "
                    f"{sum(a for a, _ in fits.values()) / len(fits):.3f} -> {sum(b for _, b in fits.values()) / len(fits):.3f}")
    removed = decision.apply(model, graph, run.example_inputs)
    t4 = time.perf_counter()
    timings["surgery_s"] += t4 - t3
    if finetune is not None:
        out = run.ckpt.out
        cfg = finetune
        if out is not None:
            cfg = replace(cfg, out_dir=str(run.ckpt.step_dir(k) / "train"), resume=True)
            if is_main_process():
                drop_stale_training(model, Path(cfg.out_dir), run.log)
            barrier()  # the others wait for it before fit reads the folder
        fit(model, run.context["data"], None, cfg, teacher=run.context["teacher"])
        timings["finetune_s"] += time.perf_counter() - t4
    return _measure_step(run, ctx, k, removed, snapshot, tolerance)


def _measure_step(run: _Run, ctx: StepContext, k: int, removed: dict, snapshot: nn.Module | None,
                  tolerance: float | None) -> str | None:
    """Count and evaluate the cut model; keep the step, or undo it (and let the method refine)."""
    model, report, base, key = run.model, run.report, run.base, run.req.key
    after = count(model, run.example_inputs)
    row = {"step": k, "macs": after.macs, "params": after.params,
           "metric": evaluate(model, run.context["val_data"])[key] if key is not None else None, "removed": removed}
    run.log(f"step {k}/{run.req.steps}: MACs {after.macs / base.macs:.1%}, params {after.params / base.params:.1%}"
            + (f", {key} {row['metric']:.2f}" if row["metric"] is not None else ""))
    metric0 = report["before"]["metric"]
    if tolerance is not None and metric0 - row["metric"] > tolerance:
        _restore(model, snapshot)
        row["reverted"] = True
        if run.req.how.trains and run.req.how.undo_keeps_training:  # trained, not cut: what the model now scores
            row["metric_restored"] = evaluate(model, run.context["val_data"])[key]
        report["steps"].append(row)
        why = f"{key} fell by {metric0 - row['metric']:.2f} > tolerance {tolerance} at step {k}; step undone"
        if run.req.how.refine(ctx):  # e.g. try a smaller step
            run.log(why + "; trying a smaller step")
            report["stopped"] = why + f"; no step left to try a smaller one ({run.req.steps} at most)"
            return None
        run.log(why)
        return why
    report["steps"].append(row)
    report.pop("stopped", None)
    run.current = after
    run.ckpt.save(model, run.example_inputs, k, report["steps"], run.extra)
    return None


def prune(model: nn.Module, example_inputs: Any, method: str | Callable | Method = "l2", target: Any = None, *,
          allocation: str | None = None, ignore: Iterable[str | nn.Module] | None = None, round_to: int | str = 1,
          min_width: int | float = 1, data: Any = None, val_data: Any = None, finetune: Any = None,
          steps: int | None = None, tolerance: float | None = None, metric: str | None = None,
          latency_threads: int | None = None, method_options: Mapping[str, Any] | None = None,
          out_dir: str | Path | None = None, resume: bool = False, quiet: bool = True,
          teacher: nn.Module | None = None, latency_guard: bool | None = None, budget: str | None = None,
          ratio: float | None = None, reconstruct: int = 0) -> tuple[nn.Module, dict]:
    """Prune ``model`` in place to a budget and return ``(model, report)``.

    Parameters
    ----------
    method : str, callable or Method, default="l2"
        A criterion name (``secateurs.list_criteria()``) or ``fn(model, graph, **kw) -> scores``,
        pruned to the budget; or a method (``secateurs.list_methods()``, e.g. "heuristic") that
        decides by itself, configured by ``method_options``.
    target : float, dict or Budget
        A kept fraction of MACs (``0.5``); a dict with one budget kind (``{"macs": 0.5}``,
        ``{"params": 0.4}``, ``{"latency": 0.7}``, ``{"ratio": 0.3}``: remove that fraction of
        every group) or {module name: removed ratio}; or a :class:`~secateurs.budget.Budget`.
        Optional for methods that pick their own widths (then it is a stop rule).
    allocation : {"global", "uniform", "latency"}, default="global" for MACs/params/latency, else "uniform"
        ``"latency"``: global, with each group's scores divided by the latency its channels save per
        MAC on this machine (per-layer tables, ``latency_threads``): a MACs budget spent where it buys time
        (for MACs/params budgets; a latency budget already spends the tables, a ratio is taken globally).
    round_to, min_width : widths become multiples of ``round_to`` and at least ``min_width``;
        ``round_to="auto"`` measures the multiple on the fast side of this machine's steps.
    data, val_data : datasets for data-driven criteria / fine-tuning, and for the metric.
    finetune : TrainConfig or dict of its fields; fine-tunes after every step when given. With
        ``distill`` > 0 every fine-tuning (and the training inside methods such as hfp) also
        distils from a frozen copy of the model as given here, unpruned (on resume too).
    teacher : the module to distil from instead (frozen in place), e.g. the unpruned model when this
        prune continues a cascade on an already pruned one.
    steps : one-shot (1) or at most that many prune -> fine-tune rounds (a criterion's budget is
        shared out geometrically; a method may stop earlier when it has nothing left to remove).
        Default: the method's (1; "importance-weights" 100; "heuristic" 10 with a stop rule; "dlp+filters" 7).
    tolerance : stop (and undo the last step) once the validation metric drops by more than this;
        "importance-weights" with ``val_data`` and no target: 1 point (METHODS.md).
    out_dir, resume : every finished step (and every fine-tuning epoch) is checkpointed there;
        ``resume=True`` with the same arguments continues a killed run where it stopped.
    latency_guard : time the unpruned and the pruned model interleaved (batch 1 and 8, 30 rounds) into
        ``report["latency"]``, warning loudly when the pruned one is measurably slower. Default: when
        the prune trains or spends a latency budget (seconds beside its minutes); a bare cut stays fast.
    reconstruct : before every channel cut, re-fit the layers reading a removed channel by least squares
        on this many images of ``data`` to compute what they did unpruned (:mod:`secateurs.reconstruct`).
    budget, ratio : deprecated (a DeprecationWarning; removed in the next release): the kind of a
        fractional ``target``, and a removed ratio; pass ``target={kind: value}`` instead.

    The report keeps what the method itself measured (block scores, training histories...)
    under ``report["method_output"]``. Every argument is checked before the model is touched;
    MACs/params budgets are met to within the cost of one channel block (typically << 1%), never exceeded.
    """
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    target, ignore = deprecated_budget(target, budget, ratio), _reusable(ignore)
    check_model(model, values=True)  # a module, with finite weights
    inputs = check_example_inputs(example_inputs, finite=True)
    auto = isinstance(round_to, str) and round_to == "auto"
    req = _check_request(model, method, target, allocation, 1 if auto else round_to, min_width, data, val_data,
                         finetune, steps, tolerance, metric, method_options, reconstruct)
    _check_data(model, inputs, data, val_data)
    guard = _guard_wanted(inputs, req, latency_guard)
    teacher = _teacher(model, req.finetune, teacher)  # before _resume loads a step's weights into the model
    check_out_dir(out_dir, resume)  # created and written once now: a full disk fails before the cut
    init_distributed()  # under torchrun: the ranks known before the first process alone times or copies
    dense = copy_model(model) if guard and is_main_process() else None  # the guard's, and the rollback's
    round_to = _measured_round_to(model, example_inputs, latency_threads, log) if auto else round_to
    timings, t_all = dict.fromkeys(_TIMINGS, 0.0), time.perf_counter()
    graph, base = _count_before(model, example_inputs, ignore, resume or req.key is not None, timings)
    metric0 = evaluate(model, val_data)[req.key] if req.key is not None else None
    report = _start_report(req, model, base, metric0, round_to, min_width, req.tolerance)
    ckpt = RunCheckpoints(model, out_dir, *_checkpoint_request(req, report))
    context = dict(example_inputs=example_inputs, steps=req.steps, budget=req.budget, base=base,
                   allocation=req.allocation, round_to=round_to, min_width=min_width, data=data,
                   latency_threads=latency_threads, log=log, finetune=req.finetune, teacher=teacher, val_data=val_data,
                   tolerance=req.tolerance, metric=req.key, metric0=metric0, out_dir=ckpt.out if ckpt.enabled else None)
    run = _Run(model, example_inputs, req, base, base, report, {}, ckpt, timings, log, context)
    _run_steps(run, ignore, req.tolerance, graph, resume, spare=dense)
    return model, _finish_report(run, t_all, dense)


def _guard_before(run: _Run) -> None:
    """The collapse guard's samples (from ``val_data`` when given, else ``data``) and the unpruned
    model's predictions on them; none (the guard then stands aside) under torchrun but on the first
    process, for data it cannot read, or when this forward fails: the guard never fails a run."""
    if not is_main_process():
        return
    val = run.context["val_data"]
    try:
        run.samples = guard_samples(val if val is not None else run.context["data"])
        run.predictions0 = predictions(run.model, run.samples)
    except Exception:  # noqa: BLE001
        run.samples, run.predictions0 = None, None


def _reusable(ignore: Any) -> Any:
    """Every step analyses the model again: a generator of names would be spent by the first."""
    return list(ignore) if ignore is not None and not isinstance(ignore, (str, nn.Module)) else ignore


def _guard_wanted(inputs: tuple, req: _Request, guard: Any) -> bool:
    """Whether the latency guard times this run (on the first process alone: the others would
    compete for its cores). The harness batches flat tensor inputs only."""
    if guard not in (None, True, False):
        raise InvalidArgument(f"`latency_guard` must be True, False or None, got {guard!r}")
    flat = all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in inputs)
    if guard and not flat:
        raise InvalidArgument("`latency_guard=True` times batched tensor inputs only; `example_inputs` holds nested "
                              "inputs (e.g. a list of images) or a 0-d tensor: time the models with "
                              "secateurs.time_models instead")
    if guard is None:
        return flat and (req.finetune is not None or req.how.trains
                         or (req.budget is not None and req.budget.kind == "latency"))
    return guard


def _run_steps(run: _Run, ignore: Any, tolerance: float | None, graph: DependencyGraph | None, resume: bool,
               spare: nn.Module | None = None) -> None:
    """The schedule. An error after a cut (a later step's unreachable target, a failed fine-tuning)
    puts the user's model back as it came; a one-shot cut without fine-tuning is undone by the surgery itself.
    ``spare``: an unpruned copy already made (the latency guard's), the rollback then needs no other."""
    model, req = run.model, run.req
    _guard_before(run)  # before _resume loads a step's weights
    original = spare if spare is not None else (
        copy_model(model) if req.steps > 1 or req.finetune is not None or resume else None)
    try:
        start = _resume(run) if resume else (run.ckpt.clear() or 1)
        for k in range(start, req.steps + 1):
            stop = _step(run, k, ignore, tolerance, graph if k == start else None)
            if stop is not None:
                run.report["stopped"] = stop
                break
    except BaseException:
        if original is not None:
            _restore(model, original)
        raise


def _measured_round_to(model: nn.Module, example_inputs: Any, threads: int | None, log: Callable) -> int:
    """``round_to="auto"``: measured on this machine once, then cached; under torchrun by the
    first process alone (the others would compete for its cores) and shared."""
    round_to = auto_round_to(model, example_inputs, threads=threads) if is_main_process() else None
    round_to = from_first_process(round_to)
    log(f"round_to='auto': {round_to} on this machine")
    return round_to


def _count_before(model: nn.Module, example_inputs: Any, ignore: Any, separately: bool, timings: dict
                  ) -> tuple[DependencyGraph | None, Cost]:
    """The MACs before, and the first step's analysis from the same capture when the model allows
    (``separately``: the model is replaced or runs before the first step, so only count)."""
    if separately:
        return None, count(model, example_inputs)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph, base = analyze_and_count(model, example_inputs, ignore=ignore)
    timings["analyze_s"] += time.perf_counter() - t0
    return graph, base


def _resume(run: _Run) -> int:
    """Load the last finished step of an earlier run with the same request; the first step to run."""
    state = run.ckpt.load()
    if state is None or not state["completed_steps"]:
        return 1
    done = state["completed_steps"]
    # the caller's model is the one the killed run started from: it is shrunk to the step's sizes
    load_model(run.ckpt.step_dir(done), model=run.model)
    run.current = count(run.model, run.example_inputs)
    run.report["steps"] = state["steps"]
    run.extra = state.get("extra", {})
    run.log(f"resuming after step {done}/{run.req.steps}")
    return done + 1
