"""The command line's arguments: the parsers of ``secateurs analyze|prune|sensitivity|train``, one
flag per declared method option, and the YAML ``--config`` whose keys are the prune flags."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .criteria import list_criteria
from .methods import list_methods, method_class

__all__ = ["get_args_parser", "add_prune_args", "parse_model_args", "method_options", "parse_with_config"]


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
    t.add_argument("--teacher", default=None, metavar="RUN",
                   help="distil from this trained model (a run folder, its checkpoint.pt or a .safetensors file; "
                        "its architecture is --teacher-model): loss = (1-W) CE + W T^2 KL(teacher || student)")
    t.add_argument("--teacher-model", default=None,
                   help="the teacher's architecture, built with its defaults sized for the data (default: --model "
                        "with its --norm and --model-arg)")
    t.add_argument("--distill", type=float, default=None, metavar="W", help="weight of --teacher, in (0, 1] (default 0.5)")
    t.add_argument("--distill-temperature", type=float, default=None, metavar="T",
                   help="softmax temperature of --teacher (default 4)")
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
                   help="iterative schedule: prune -> fine-tune at most this many times (default: the method's; 1, "
                        "heuristic 10 with a target or tolerance, dlp+filters 7, importance-weights 100)")
    s.add_argument("--tolerance", type=float, default=None, help="stop once the metric falls by more than this (points)")
    s.add_argument("--metric", default=None,
                   help="metric for --tolerance: top1, top5, pixel_acc, iou, dice, miou (default top1 or iou)")
    s.add_argument("--holdout", type=int, default=0,
                   help="hold out this many training samples for what stops on the metric (--tolerance, importance-"
                        "weights' 1 point); the test split is then only reported (default 0: the test split decides)")
    s.add_argument("--finetune-epochs", type=int, default=0, help="epochs of fine-tuning after each step")
    s.add_argument("--reconstruct", type=int, default=None, metavar="N",
                   help="before every cut, re-fit the layers that read a removed channel by least squares on N "
                        "training images so they compute what they did unpruned (default: 512 with --data for a "
                        "criterion such as l1 or l2, where it measured better, else 0; 0 turns it off)")
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


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer or 'auto', got {text!r}") from None
