"""Command line: ``secateurs analyze``, ``secateurs prune`` and ``secateurs train``.

Models are registry names (``secateurs.models.list_models()``), ``torchvision:NAME``, ``timm:NAME``,
``smp:ARCH:ENCODER``, ``ultralytics:FILE.yaml`` (never with downloaded weights) or
``module.path:callable`` (the user typed it, so its code is trusted); datasets are
``secateurs.data.list_datasets()`` names.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from ._state import copy_model
from .budget import ALLOCATIONS, Allocator, Budget
from .data import list_datasets, load_dataset, pad_to_multiple
from .export import export_onnx
from .saving import save
from .graph import analyze
from .cli_args import add_prune_args, get_args_parser, method_options, parse_model_args, parse_with_config  # noqa: F401
from .methods import CriterionMethod, get_method
from .models import create_model, load_pretrained, sizing_kwargs
from .pipeline import prune
from .report import format_table, latency_guard, write_report
from .sensitivity import plot_sensitivity, sensitivity
from .distributed import init_distributed, is_main_process, mark_failed
from .train import TrainConfig, evaluate, fit, metric_key


def load_model(spec: str, *, flag: str = "--model", **kwargs) -> torch.nn.Module:
    """``create_model`` with ``trust_code=True``: a ``module:callable`` name typed on the command line
    is the user's own code."""
    try:
        return create_model(spec, trust_code=True, **kwargs).eval()
    except (ValueError, TypeError, ImportError) as err:  # TypeError: a --model-arg the constructor does not take
        raise SystemExit(f"{flag}: {err}") from None


def _budget(args, optional: bool = False) -> Budget | None:
    given = {k: getattr(args, k) for k in ("macs", "params", "latency", "ratio") if getattr(args, k) is not None}
    if getattr(args, "layers", None):
        given["layers"] = args.layers
    if optional and not given:
        return None
    if len(given) != 1:
        raise SystemExit("secateurs prune: give exactly one budget: --macs, --params, --latency, --ratio "
                         f"or `layers:` in --config (got {', '.join(given) or 'none'})")
    (kind, value), = given.items()
    try:
        return Budget(kind, value)
    except ValueError as err:
        raise SystemExit(f"--{kind}: {err}") from None


DEFAULT_DISTILL = 0.5
DEFAULT_RECONSTRUCT = 512  # calibration images: a criterion's cut re-fitted measured better (docs/methods.md)


def _check_prune_args(args, how) -> tuple[Budget | None, TrainConfig | None, int | float]:
    """Everything the command line can get wrong, refused before any data is loaded."""
    budget = _budget(args, optional=not how.needs_budget)
    _check_input_size(args.input_size)
    if args.data and args.data.partition(":")[0] not in {n.partition(":")[0] for n in list_datasets()}:
        raise SystemExit(f"--data: unknown dataset {args.data!r}; available: {', '.join(list_datasets())}")
    min_width = int(args.min_width) if args.min_width >= 1 else float(args.min_width)
    try:
        Allocator.check_arguments(args.allocation or ALLOCATIONS[0], 1 if args.round_to == "auto" else args.round_to,
                                  min_width)
    except ValueError as err:
        flag = next((f for f in ("allocation", "round_to", "min_width") if f"`{f}`" in str(err)), "allocation")
        raise SystemExit(f"--{flag.replace('_', '-')}: {err}") from None
    if args.reconstruct is not None and args.reconstruct < 0:
        raise SystemExit(f"--reconstruct: a number of calibration images, >= 0, got {args.reconstruct}")
    if (args.finetune_epochs or how.needs_data or args.reconstruct) and not args.data:
        flag = "finetune-epochs" if args.finetune_epochs else "reconstruct" if args.reconstruct else "method " + args.method
        raise SystemExit(f"--{flag} needs --data")
    if args.reconstruct is None:  # on where it was measured: a criterion's cut, with training images to fit on
        args.reconstruct = DEFAULT_RECONSTRUCT if args.data and isinstance(how, CriterionMethod) else 0
    if args.resume and not args.out:
        raise SystemExit("--resume needs --out")
    if args.distill and not args.finetune_epochs:
        raise SystemExit("--distill needs --finetune-epochs: it acts during fine-tuning")
    if args.distill is None:  # on by default when fine-tuning: it measured better (docs/methods.md)
        args.distill = DEFAULT_DISTILL if args.finetune_epochs else 0.0
    if (args.tolerance is not None or args.holdout) and not args.data:
        raise SystemExit(f"--{'tolerance' if args.tolerance is not None else 'holdout'} needs --data: the metric is "
                         "measured on --holdout training samples, or on its test split")
    finetune = None
    if args.finetune_epochs:
        try:
            finetune = TrainConfig(epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.lr,
                                   weight_decay=args.weight_decay, optimizer=args.optimizer, seed=args.seed,
                                   crop=args.crop, quiet=args.quiet, distill=args.distill,
                                   distill_temperature=args.distill_temperature)
        except ValueError as err:
            flag = next((f"--{f.replace('_', '-')}" for f in ("distill", "distill_temperature") if f"`{f}`" in str(err)),
                        "secateurs prune")
            raise SystemExit(f"{flag}: {err}") from None
    return budget, finetune, min_width


def _example_shape(ds) -> list[int]:
    """One input as the data's images are run: segmentation frames padded as evaluation pads them
    (a U-Net runs only at a multiple of its downsampling; HeLa's are 700x1100)."""
    first = ds.images[:1].float()
    return list((pad_to_multiple(first) if ds.task == "segmentation" else first).shape)


def _prune_data(args) -> tuple:
    """(train, what the metric and its stop rules read, test reported only): with --holdout the
    held-out training samples are read and the test split only reported, else the test split is both."""
    train = load_dataset(args.data, "train", root=args.data_root, download=args.download)
    test = load_dataset(args.data, "test", root=args.data_root, download=args.download).subset(args.val_subset, args.seed)
    if not args.holdout:
        return train.subset(args.subset, args.seed), test, None
    try:
        train, held = train.holdout(args.holdout)
    except ValueError as err:
        raise SystemExit(f"--holdout: {err}") from None
    return train.subset(args.subset, args.seed), held, test


def _report_splits(report: dict, test_ds, test_before: dict | None, model, main_proc: bool = True) -> None:
    """The test split's metrics when the stop rules read held-out samples; else a note that the
    test split chose where the schedule stopped (its figure is then not independent of it)."""
    if test_ds is not None:
        report["test"] = {"before": test_before, "after": evaluate(model, test_ds), "samples": len(test_ds)}
    elif report.get("tolerance") is not None:
        msg = (f"note: the tolerance ({report['tolerance']} points) read the test split that the metric is reported "
               "on; pass --holdout N to stop on held-out training samples instead")
        report.setdefault("warnings", []).append(msg)
        if main_proc:
            print(msg, file=sys.stderr, flush=True)


def _check_input_size(size: list[int] | None) -> None:
    if size is not None and (len(size) < 2 or any(n < 1 for n in size)):
        raise SystemExit(f"--input-size must be positive sizes, batch first (e.g. 1 3 224 224), got {' '.join(map(str, size))}")


def _save_outputs(args, model: torch.nn.Module, x: torch.Tensor, report: dict) -> None:
    """model.safetensors + model.json, model.onnx and report.* in --out, then the table."""
    if args.out:
        out = Path(args.out)
        save(model, out, x, extra={"report": "report.json"})
        if not args.no_onnx:
            report["onnx"] = export_onnx(model, x, out / "model.onnx")
        write_report(report, out)
    print(format_table(report))
    if args.out:
        print(f"wrote {args.out}/: model.safetensors, model.json" + ("" if args.no_onnx else ", model.onnx") +
              ", report.json, report.md")


def prune_main(args) -> int:
    """Prune, fine-tune, save (safetensors + JSON), export ONNX, report; all inputs checked first."""
    options = method_options(args)
    try:
        how = get_method(args.method, **options)
    except ValueError as err:
        raise SystemExit(f"--method: {err}") from None
    budget, finetune, min_width = _check_prune_args(args, how)
    init_distributed()  # under torchrun: every process prunes the same way, fine-tunes its share, one writes
    main_proc = is_main_process()
    train_ds = val_ds = test_ds = None
    if args.data:
        train_ds, val_ds, test_ds = _prune_data(args)
    if args.metric is not None:
        try:
            metric_key(val_ds, args.metric)
        except ValueError as err:
            raise SystemExit(f"--metric: {err}") from None
    torch.manual_seed(args.seed)
    model = build_model(args, train_ds).eval()
    shape = args.input_size or (_example_shape(val_ds) if val_ds is not None else [1, 3, 224, 224])
    x = torch.randn(*shape)
    name = args.pretrained or args.model
    dense = None if args.no_latency else copy_model(model)  # timed beside the pruned model afterwards
    log = (lambda *a: None) if args.quiet or not main_proc else print
    log(f"{name}: pruning by {args.method}" + (f" to {budget.kind} {budget.value}" if budget else ""))
    test_before = evaluate(model, test_ds) if test_ds is not None else None
    model, report = prune(model, x, args.method, budget, method_options=options, allocation=args.allocation,
                          ignore=args.ignore or None, round_to=args.round_to, min_width=min_width, data=train_ds,
                          val_data=val_ds, finetune=finetune, steps=args.steps, tolerance=args.tolerance,
                          metric=args.metric, out_dir=args.out, resume=args.resume, quiet=args.quiet or not main_proc,
                          reconstruct=args.reconstruct, latency_guard=False)  # timed below, on the CPU, with --no-latency honoured
    model = model.cpu()  # measured, saved and exported on the CPU
    _report_splits(report, test_ds, test_before, model, main_proc)
    if dense is not None and main_proc:  # under torchrun one process times, the others would compete with it
        latency_guard(dense, model, x, report)
    report["threads"] = torch.get_num_threads()
    report["protocol"] = (f"{name} on {train_ds.name if train_ds else 'no data'}"
                          + (f", fine-tune {args.finetune_epochs} epoch(s)/step on {len(train_ds)} samples" if finetune else ", no fine-tuning")
                          + (f", distilled from the unpruned model (w {args.distill}, T {args.distill_temperature})"
                             if finetune is not None and args.distill else "")
                          + (f", metric on {len(val_ds)} {'held-out training' if test_ds is not None else 'test'} samples"
                             if val_ds is not None else "")
                          + f", {torch.get_num_threads()} CPU threads")
    if main_proc:
        _save_outputs(args, model, x, report)
    return 0


def sensitivity_main(args) -> int:
    val_ds = load_dataset(args.data, "test", root=args.data_root, download=args.download).subset(args.val_subset, args.seed)
    model = build_model(args, val_ds).eval()
    x = torch.randn(*_example_shape(val_ds))
    result = sensitivity(model, x, val_ds, ratios=tuple(args.ratios), method=args.method)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps(result, indent=2))
    plot_sensitivity(result, out / "sensitivity.png")
    worst = sorted(result["groups"], key=lambda g: -max(g["drops"]))[:5]
    print(f"baseline {result['metric']} {result['baseline']:.2f}; most sensitive groups:")
    for g in worst:
        print(f"  {g['name']:<40} drops {', '.join(f'{d:+.2f}' for d in g['drops'])}")
    print(f"wrote {out}/sensitivity.json and sensitivity.png")
    return 0


def _sized_for(spec: str, ds) -> dict:
    """Constructor arguments giving ``spec`` the dataset's classes and input channels, under the builder's
    own names (smp: classes, in_channels; ultralytics: nc, ch)."""
    return sizing_kwargs(spec, max(2, ds.num_classes), ds.images.shape[1])


def build_model(args, ds=None, **extra) -> torch.nn.Module:
    """--pretrained (zoo checkpoint), else --model sized for the dataset's classes and channels."""
    if getattr(args, "pretrained", None):
        try:
            return load_pretrained(args.pretrained)
        except ValueError as err:
            raise SystemExit(f"--pretrained: {err}") from None
    kw = dict(extra)
    if ds is not None:
        kw.update(_sized_for(args.model, ds))
    kw.update(parse_model_args(args.model_arg))
    return load_model(args.model, **kw)


def _init_from(model, path: Path, flag: str = "--init-from") -> None:
    """Load the weights of an earlier run into ``model`` (strictly: the same architecture)."""
    if path.is_dir():
        path = path / "checkpoint.pt"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            epoch, epochs = ckpt.get("epoch"), ckpt.get("config", {}).get("epochs")
            if epoch is not None and epochs is not None and epoch < epochs:  # e.g. a teacher still training beside
                raise SystemExit(f"{flag} {path}: an unfinished run (epoch {epoch} of {epochs}); finish it first "
                                 "(`secateurs train --resume` with its --out)")
            state = ckpt["model"]
        model.load_state_dict(state)
    except (OSError, KeyError, RuntimeError) as err:
        raise SystemExit(f"{flag} {path}: {type(err).__name__}: {str(err)[:300]}") from None


def _check_teacher_args(args) -> None:
    """The distillation flags, refused before any data is read; their defaults filled in with --teacher."""
    if args.teacher is None:
        given = [f for f, v in [("--teacher-model", args.teacher_model), ("--distill", args.distill),
                                ("--distill-temperature", args.distill_temperature)] if v is not None]
        if given:
            raise SystemExit(f"{given[0]} needs --teacher (the weights to distil from)")
        args.distill, args.distill_temperature = 0.0, TrainConfig.distill_temperature
        return
    args.distill = DEFAULT_DISTILL if args.distill is None else args.distill
    if args.distill_temperature is None:
        args.distill_temperature = TrainConfig.distill_temperature
    if not 0 < args.distill <= 1:
        raise SystemExit(f"--distill must be in (0, 1] with --teacher, got {args.distill}")
    if not args.distill_temperature > 0:
        raise SystemExit(f"--distill-temperature must be > 0, got {args.distill_temperature}")


def _teacher(args, train_ds):
    """The frozen model ``--teacher`` names, or None: how a small network learns from a larger trained one."""
    if args.teacher is None:
        return None
    if args.teacher_model:
        teacher = load_model(args.teacher_model, flag="--teacher-model", **_sized_for(args.teacher_model, train_ds))
    else:  # the student's own architecture, built as the student is (its --norm and --model-arg included)
        teacher = build_model(args, train_ds, norm=args.norm)
    _init_from(teacher, Path(args.teacher), flag="--teacher")
    return teacher.eval().requires_grad_(False)


def train_main(args) -> int:
    _check_teacher_args(args)
    train_ds = load_dataset(args.data, "train", root=args.data_root, download=args.download)
    if args.holdout:
        try:
            train_ds = train_ds.holdout(args.holdout)[0]
        except ValueError as err:
            raise SystemExit(f"--holdout: {err}") from None
    train_ds = train_ds.subset(args.subset, args.seed)
    val_ds = load_dataset(args.data, "test", root=args.data_root, download=args.download).subset(args.val_subset, args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args, train_ds, norm=args.norm)
    resuming = args.resume and args.out and (Path(args.out) / "checkpoint.pt").exists()
    if args.init_from and not resuming:  # a run being resumed already holds its weights
        _init_from(model, Path(args.init_from))
    teacher = _teacher(args, train_ds)
    try:
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          optimizer=args.optimizer, schedule=args.schedule, milestones=tuple(args.milestones),
                          warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, amp=args.amp,
                          channels_last=args.channels_last, seed=args.seed, pad=args.pad, crop=args.crop, cutout=args.cutout,
                          out_dir=args.out,
                          resume=args.resume, quiet=args.quiet, tensorboard=args.tensorboard, step_delay=args.step_delay,
                          distill=args.distill, distill_temperature=args.distill_temperature)
    except ValueError as err:
        raise SystemExit(f"secateurs train: {err}") from None
    history = fit(model, train_ds, val_ds, cfg, teacher=teacher)
    if is_main_process() and history:
        last = history[-1]
        print("final", " ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith("val_")))
    return 0


def analyze_main(args) -> int:
    _check_input_size(args.input_size)
    model = build_model(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = analyze(model, torch.randn(*args.input_size))
    print(graph.describe())
    for w in graph.warnings:
        print("warning:", w)
    return 0


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.command == "prune" and args.config:
        args = parse_with_config(parser, argv, args.config)
    handlers = {"train": train_main, "prune": prune_main, "analyze": analyze_main, "sensitivity": sensitivity_main}
    try:
        try:  # a bad value found past the flag checks: one line naming it, not a traceback
            code = handlers[args.command](args)
        except (ValueError, FileExistsError, NotADirectoryError) as err:
            raise SystemExit(f"secateurs {args.command}: {err}") from err
    except BaseException as err:  # a failing process must not close a torchrun group at exit
        if not (isinstance(err, SystemExit) and err.code in (0, None)):
            mark_failed()
        raise
    if code:
        mark_failed()
    return code


if __name__ == "__main__":
    sys.exit(main())
