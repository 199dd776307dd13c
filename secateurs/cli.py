"""Command line: ``secateurs analyze``, ``secateurs prune`` and ``secateurs train``.

Models are registry names (``secateurs.models.list_models()``), ``torchvision:NAME``, ``timm:NAME``,
``smp:ARCH:ENCODER``, ``ultralytics:FILE.yaml`` (never with downloaded weights) or
``module.path:callable`` (the user typed it, so its code is trusted); datasets are
``secateurs.data.list_datasets()`` names.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ._state import copy_model
from .budget import ALLOCATIONS, Allocator, Budget
from .criteria import list_criteria
from .data import list_datasets, load_dataset
from .export import export_onnx
from .saving import save
from .graph import analyze
from .latency import compare_dense_pruned, runtime_of
from .methods import get_method, list_methods, method_class
from .models import create_model, load_pretrained, sizing_kwargs
from .pipeline import prune
from .report import format_table, write_report
from .sensitivity import plot_sensitivity, sensitivity
from .train import TrainConfig, fit, init_distributed, is_main_process, metric_key


def load_model(spec: str, **kwargs) -> torch.nn.Module:
    """``create_model`` with ``trust_code=True``: a ``module:callable`` name typed on the command line
    is the user's own code."""
    try:
        return create_model(spec, trust_code=True, **kwargs).eval()
    except (ValueError, TypeError, ImportError) as err:  # TypeError: a --model-arg the constructor does not take
        raise SystemExit(f"--model: {err}") from None


def _add_model_args(s: argparse.ArgumentParser, required: bool = False) -> None:
    s.add_argument("--model", default=None if required else "torchvision:resnet50", required=required,
                   help="registry name (cifar_resnet56, unet...), torchvision:NAME, timm:NAME, smp:ARCH:ENCODER "
                        "(smp:Unet:resnet34), ultralytics:FILE.yaml (ultralytics:yolov8n.yaml) or "
                        "module.path:callable (imports and calls your code); no weights are downloaded")
    s.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor argument, VALUE in JSON (base=16, pretrained=false, "
                        "encoder_depth=4, decoder_channels=[128,64,32,16,8]; not JSON: the raw string); repeatable")


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["base=16", 'act="relu"', "mode=fast"]`` -> ``{"base": 16, "act": "relu", "mode": "fast"}``:
    each VALUE is read as JSON, and kept as the raw string when it is not valid JSON."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SystemExit(f"--model-arg must look like KEY=VALUE with KEY a Python identifier, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _add_data_args(s: argparse.ArgumentParser, required: bool = False) -> None:
    s.add_argument("--data", required=required, default=None,
                   help="cifar10, cifar100, fashion-mnist, digits, isbi2012, hela, imagefolder:PATH")
    s.add_argument("--data-root", default=None, help="folder holding the datasets (else $SECATEURS_DATA, ../shared/data)")
    s.add_argument("--download", action="store_true", help="let torchvision download the dataset if it is not found")
    s.add_argument("--subset", type=int, default=None, help="train on this many samples (CPU protocol)")
    s.add_argument("--val-subset", type=int, default=None, help="evaluate on this many samples")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("secateurs", description="Structured pruning for PyTorch CNNs.", add_help=add_help)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="list the prunable channel groups")
    _add_model_args(a)
    a.add_argument("--input-size", type=int, nargs="+", default=[1, 3, 224, 224], help="example input shape")
    s = sub.add_parser("prune", help="prune to a MACs/params/latency budget, fine-tune, save, export and report")
    add_prune_args(s)
    v = sub.add_parser("sensitivity", help="prune each group alone at several ratios and plot the metric drop")
    _add_model_args(v)
    v.add_argument("--pretrained", default=None, help="a zoo checkpoint (secateurs.models.list_pretrained())")
    _add_data_args(v, required=True)
    v.add_argument("--method", default="l1", help="importance criterion")
    v.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    v.add_argument("--out", default="runs/sensitivity", help="folder for sensitivity.json and sensitivity.png")
    v.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="train (or fine-tune) a model on a dataset; torchrun-ready")
    _add_model_args(t, required=True)
    _add_data_args(t, required=True)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128, help="global batch size (split across processes)")
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--optimizer", default="sgd", help="sgd or adamw")
    t.add_argument("--schedule", default="cosine", help="cosine, step or constant")
    t.add_argument("--milestones", type=int, nargs="*", default=[], help="step schedule epochs")
    t.add_argument("--warmup-epochs", type=int, default=0)
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--pad", type=int, default=4, help="zero padding before the random crop (classification)")
    t.add_argument("--cutout", type=int, default=0, metavar="PX",
                   help="blank one PX x PX square of every training image (classification; 16 for CIFAR)")
    t.add_argument("--crop", type=int, default=None, help="random crop size (segmentation)")
    t.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    t.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on CPU and GPU)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--holdout", type=int, default=0,
                   help="set aside this many training samples (class-balanced, seed 0) as never-seen validation data")
    t.add_argument("--norm", default=None, help="normalisation layer for models that offer a choice (tiny_cnn: bn, gn, none)")
    t.add_argument("--out", default=None, help="run folder: checkpoint.pt, log.csv")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--init-from", default=None, help="start from these weights (a run folder or its checkpoint.pt, or "
                   "a .safetensors file) with a new optimizer and schedule: a second training stage")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--tensorboard", action="store_true", help="also log to OUT/tb (pip install tensorboard)")
    t.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def add_prune_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", default=None, help="YAML file whose keys are these options (flags given here win)")
    _add_model_args(s)
    s.add_argument("--pretrained", default=None, help="start from a zoo checkpoint (secateurs.models.list_pretrained())")
    s.add_argument("--input-size", type=int, nargs="+", default=None,
                   help="example input shape (default: one sample of --data, else 1 3 224 224)")
    _add_data_args(s)
    s.add_argument("--method", default="l2",
                   help=f"a criterion pruned to the budget ({', '.join(list_criteria())}) or a method "
                        f"({', '.join(_method_names())}); each method's options follow")
    b = s.add_argument_group("budget (one of them; hfp takes --macs and --params together)")
    b.add_argument("--macs", type=float, default=None, help="kept fraction of MACs, in (0, 1]")
    b.add_argument("--params", type=float, default=None, help="kept fraction of parameters, in (0, 1]")
    b.add_argument("--latency", type=float, default=None, help="kept fraction of measured latency here, in (0, 1]")
    b.add_argument("--ratio", type=float, default=None, help="fraction of channels removed from every group")
    s.add_argument("--allocation", default=None, help="global (one ranking), uniform (same ratio per group) or latency (global, each group weighted by the time its channels save per MAC on this machine)")
    s.add_argument("--round-to", type=_round_to, default=1,
                   help="keep widths multiples of this (8 suits fast kernels), or 'auto': measured on this machine")
    s.add_argument("--min-width", type=float, default=1, help="minimum kept channels per group (>= 1) or fraction (< 1)")
    s.add_argument("--ignore", nargs="*", default=[], help="modules whose output channels are kept")
    s.add_argument("--steps", type=int, default=None,
                   help="iterative schedule: prune -> fine-tune at most this many times (default 1; importance-weights 100)")
    s.add_argument("--tolerance", type=float, default=None, help="stop once the metric falls by more than this (points)")
    s.add_argument("--metric", default=None,
                   help="metric for --tolerance: top1, top5, pixel_acc, iou, dice, miou (default top1 or iou)")
    s.add_argument("--finetune-epochs", type=int, default=0, help="epochs of fine-tuning after each step")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=0.01)
    s.add_argument("--weight-decay", type=float, default=5e-4)
    s.add_argument("--optimizer", default="sgd")
    s.add_argument("--crop", type=int, default=None, help="random crop size for fine-tuning (segmentation)")
    s.add_argument("--distill", type=float, default=None, metavar="W",
                   help="weight in [0, 1] of knowledge distillation from the unpruned model during every fine-tuning: "
                        "loss = (1-W) CE + W T^2 KL(teacher || student) on the logits (default 0.5 when fine-tuning: "
                        "+0.8 to +1.3 top-1 on ResNet-20 at 50%% and 30%% MACs, 3 seeds, docs/accuracy.md; 0: off)")
    s.add_argument("--distill-temperature", type=float, default=4.0, metavar="T",
                   help="softmax temperature of --distill (default: 4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="run folder: model.safetensors, model.json, model.onnx, report.*")
    s.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    s.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    s.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    s.add_argument("--quiet", action="store_true")
    _add_method_args(s)


def _method_names() -> list[str]:
    """Registered methods that are not plain criteria (read when the parser is built)."""
    return [m for m in list_methods() if m not in list_criteria()]


def _flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add_method_args(s: argparse.ArgumentParser) -> None:
    """One flag per declared method option (:class:`secateurs.methods.Option`); a flag shared by
    several methods (``--min-keep``) or already on the parser (``--seed``) is added once. Flags
    default to None, so each method's own default applies."""
    seen = set(s._option_string_actions)
    defaults: dict[str, set] = {}  # flag -> the defaults of the methods declaring it
    for name in _method_names():
        for o in method_class(name).options:
            defaults.setdefault(o.flag, set()).add(repr(o.default))
    for name in _method_names():
        cls = method_class(name)
        new = [o for o in cls.options if o.flag is not None and o.flag not in seen]
        if not new:
            continue
        group = s.add_argument_group(f"{name}: {cls.summary}")
        for o in new:
            kw: dict[str, Any] = {"default": None, "dest": _flag_dest(o.flag), "help": o.help if len(
                defaults[o.flag]) > 1 else f"{o.help} (default: {o.default})"}  # else: each method has its own
            if o.kind is bool:
                kw["action"] = "store_true"
            else:
                kw["type"] = o.kind if o.kind in (int, float) else str
            group.add_argument(o.flag, **kw)
            seen.add(o.flag)


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen method's options from its flags (a flag not given: the method's default). A
    method with a ``params`` option takes ``--params`` as a second target beside ``--macs``."""
    if args.method not in _method_names():
        return {}
    options = {}
    for o in method_class(args.method).options:
        if o.flag is not None:
            value = getattr(args, _flag_dest(o.flag), None)
            options[o.name] = o.default if value is None else value
    names = {o.name for o in method_class(args.method).options}
    if "params" in names and args.macs is not None and args.params is not None:  # both targets: params rides along
        options["params"], args.params = args.params, None
    return options


def parse_with_config(parser: argparse.ArgumentParser, argv, path: str) -> argparse.Namespace:
    """Options from a YAML file become defaults, so flags on the command line still win."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"--config {path}: {err}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"--config {path}: expected a mapping of options, got {type(cfg).__name__}")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    known = {a.dest for a in sub._actions if a.dest not in ("help", "config")}
    clean = {str(k).replace("-", "_"): v for k, v in cfg.items()}
    layers = clean.pop("layers", None)
    unknown = sorted(set(clean) - known)
    if unknown:
        raise SystemExit(f"--config {path}: unknown key(s) {', '.join(unknown)}; "
                         f"valid keys: {', '.join(sorted(known | {'layers'}))}")
    sub.set_defaults(**clean)
    args = parser.parse_args(argv)
    args.layers = layers
    return args


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


GUARD_SECONDS = 120.0  # the latency guard's bound: batch 8 is left out (and said so) past it


def _latency_guard(dense: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, report: dict) -> None:
    """Dense and pruned timed interleaved at batch 1 and 8 (8 only if it fits in two minutes), both in the
    pruned model's layout: the report's latency rows, and a loud warning when the pruned one is slower."""
    guard = compare_dense_pruned(dense, model, x, batches=(1, 8), repeats=30, max_seconds=GUARD_SECONDS, runtime=runtime_of(model))
    report["latency"] = guard
    for r in guard["rows"]:
        report["before"][f"latency_b{r['batch']}_ms"] = r["dense_ms"]
        report["after"][f"latency_b{r['batch']}_ms"] = r["pruned_ms"]
    if guard["slower"]:
        rows = [r for r in guard["rows"] if r["batch"] in guard["slower"]]
        msg = ("WARNING: the pruned model is SLOWER than the dense one on this machine at batch "
               + ", ".join(f"{r['batch']} ({r['pruned_ms']:.2f} ms vs {r['dense_ms']:.2f} ms)" for r in rows)
               + "; try --round-to auto or a --latency target")
        report.setdefault("warnings", []).append(msg)
        print(msg, file=sys.stderr, flush=True)


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer or 'auto', got {text!r}") from None


DEFAULT_DISTILL = 0.5


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
    if (args.finetune_epochs or how.needs_data) and not args.data:
        raise SystemExit(f"--{'finetune-epochs' if args.finetune_epochs else 'method ' + args.method} needs --data")
    if args.resume and not args.out:
        raise SystemExit("--resume needs --out")
    if args.distill and not args.finetune_epochs:
        raise SystemExit("--distill needs --finetune-epochs: it acts during fine-tuning")
    if args.distill is None:  # on by default when fine-tuning: it measured better (docs/methods.md)
        args.distill = DEFAULT_DISTILL if args.finetune_epochs else 0.0
    if args.tolerance is not None and not args.data:
        raise SystemExit("--tolerance needs --data: the metric is measured on its test split")
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
    train_ds = val_ds = None
    if args.data:
        train_ds = load_dataset(args.data, "train", root=args.data_root, download=args.download).subset(args.subset, args.seed)
        val_ds = load_dataset(args.data, "test", root=args.data_root, download=args.download).subset(args.val_subset, args.seed)
    if args.metric is not None:
        try:
            metric_key(val_ds, args.metric)
        except ValueError as err:
            raise SystemExit(f"--metric: {err}") from None
    torch.manual_seed(args.seed)
    model = build_model(args, train_ds).eval()
    shape = args.input_size or ([1, *val_ds.images.shape[1:]] if val_ds is not None else [1, 3, 224, 224])
    x = torch.randn(*shape)
    name = args.pretrained or args.model
    dense = None if args.no_latency else copy_model(model)  # timed beside the pruned model afterwards
    log = (lambda *a: None) if args.quiet or not main_proc else print
    log(f"{name}: pruning by {args.method}" + (f" to {budget.kind} {budget.value}" if budget else ""))
    model, report = prune(model, x, args.method, budget, method_options=options, allocation=args.allocation,
                          ignore=args.ignore or None, round_to=args.round_to, min_width=min_width, data=train_ds,
                          val_data=val_ds, finetune=finetune, steps=args.steps, tolerance=args.tolerance,
                          metric=args.metric, out_dir=args.out, resume=args.resume, quiet=args.quiet or not main_proc)
    model = model.cpu()  # measured, saved and exported on the CPU
    if dense is not None and main_proc:  # under torchrun one process times, the others would compete with it
        _latency_guard(dense, model, x, report)
    report["threads"] = torch.get_num_threads()
    report["protocol"] = (f"{name} on {train_ds.name if train_ds else 'no data'}"
                          + (f", fine-tune {args.finetune_epochs} epoch(s)/step on {len(train_ds)} samples" if finetune else ", no fine-tuning")
                          + (f", distilled from the unpruned model (w {args.distill}, T {args.distill_temperature})"
                             if finetune is not None and args.distill else "")
                          + (f", metric on {len(val_ds)} validation samples" if val_ds is not None else "")
                          + f", {torch.get_num_threads()} CPU threads")
    if main_proc:
        _save_outputs(args, model, x, report)
    return 0


def sensitivity_main(args) -> int:
    val_ds = load_dataset(args.data, "test", root=args.data_root, download=args.download).subset(args.val_subset, args.seed)
    model = build_model(args, val_ds).eval()
    x = torch.randn(1, *val_ds.images.shape[1:])
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


def build_model(args, ds=None, **extra) -> torch.nn.Module:
    """--pretrained (zoo checkpoint), else --model sized for the dataset's classes and channels."""
    if getattr(args, "pretrained", None):
        try:
            return load_pretrained(args.pretrained)
        except ValueError as err:
            raise SystemExit(f"--pretrained: {err}") from None
    kw = dict(extra)
    if ds is not None:  # under the builder's own names (smp: classes, in_channels; ultralytics: nc, ch)
        kw.update(sizing_kwargs(args.model, max(2, ds.num_classes), ds.images.shape[1]))
    kw.update(parse_model_args(args.model_arg))
    return load_model(args.model, **kw)


def _init_from(model, path: Path) -> None:
    """Load the weights of an earlier run into ``model`` (strictly: the same architecture)."""
    if path.is_dir():
        path = path / "checkpoint.pt"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        model.load_state_dict(state)
    except (OSError, KeyError, RuntimeError) as err:
        raise SystemExit(f"--init-from {path}: {type(err).__name__}: {str(err)[:300]}") from None


def train_main(args) -> int:
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
    try:
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          optimizer=args.optimizer, schedule=args.schedule, milestones=tuple(args.milestones),
                          warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, amp=args.amp,
                          channels_last=args.channels_last, seed=args.seed, pad=args.pad, crop=args.crop, cutout=args.cutout,
                          out_dir=args.out,
                          resume=args.resume, quiet=args.quiet, tensorboard=args.tensorboard, step_delay=args.step_delay)
    except ValueError as err:
        raise SystemExit(f"secateurs train: {err}") from None
    history = fit(model, train_ds, val_ds, cfg)
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
    try:  # a bad value found past the flag checks: one line naming it, not a traceback
        return handlers[args.command](args)
    except (ValueError, FileExistsError, NotADirectoryError) as err:
        raise SystemExit(f"secateurs {args.command}: {err}") from err


if __name__ == "__main__":
    sys.exit(main())
