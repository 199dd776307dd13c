"""One training loop for training from scratch and for fine-tuning after pruning.

torchvision-reference style: ``train_one_epoch``, ``evaluate``, ``fit``. Runs on one CPU by
default and under ``torchrun`` (DDP: gloo on CPU, NCCL on GPU) with no change. Every epoch ends
with an atomic checkpoint (model, optimizer, scheduler, epoch, RNG state, history); ``resume``
continues bit-for-bit, because the data order and augmentation of an epoch depend only on
``(seed, epoch)``. With ``TrainConfig.distill`` > 0 a frozen teacher (e.g. the unpruned model)
adds a knowledge-distillation term on the logits.
"""
from __future__ import annotations

import contextlib
import csv
import math
import numbers
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ._io import atomic_write
from ._modes import in_mode
from ._validation import InvalidArgument, check_choice, check_model, check_scalar
from .data import IGNORE_INDEX, ArrayDataset, Batches, pad_to_multiple
from .distributed import all_sum, init_distributed, is_main_process
from .metrics import METRICS, batch_stats, check_labels, distillation_loss, metric_key, summarize, task_loss

__all__ = ["TrainConfig", "fit", "evaluate", "predict_padded", "train_one_epoch", "make_optimizer",
           "make_scheduler", "train_batches", "metric_key", "METRICS", "distillation_loss", "task_loss"]


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (defaults: the ResNet-on-CIFAR recipe, shortened)."""

    epochs: int = 10
    steps: int | None = None  # a budget in optimizer steps: overrides `epochs` (the last epoch stops early)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    optimizer: str = "sgd"  # sgd | adamw
    schedule: str = "cosine"  # cosine | step | constant
    milestones: tuple[int, ...] = ()  # step schedule: epochs at which lr is multiplied by gamma
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    distill: float = 0.0  # weight w of the teacher: loss = (1 - w) CE + w T^2 KL(teacher || student); fit needs a teacher
    distill_temperature: float = 4.0  # T: softens both distributions (Hinton et al. 2015)
    amp: bool = False  # bf16/fp16 autocast, on GPU only
    channels_last: bool = False  # measured 1.2-1.3x faster training on CPU too (oneDNN)
    seed: int = 0
    pad: int = 4  # augmentation: zero padding before the random crop (classification)
    crop: int | None = None  # augmentation: random crop size (segmentation)
    flip: bool = True
    cutout: int = 0  # augmentation: side of the square blanked in every training image (classification; 0 = off)
    out_dir: str | None = None
    resume: bool = False
    quiet: bool = False
    tensorboard: bool = False  # also log scalars to out_dir/tb (needs the tensorboard package)
    step_delay: float = field(default=0.0, repr=False)  # seconds per step: lets tests kill a run mid-epoch

    def __post_init__(self) -> None:
        if self.tensorboard and self.out_dir is None:
            raise ValueError("`tensorboard` needs `out_dir`: the event files go to OUT/tb")
        check_choice(self.optimizer, "optimizer", ("sgd", "adamw"))
        check_choice(self.schedule, "schedule", ("cosine", "step", "constant"))
        for name in ("epochs", "batch_size"):
            check_scalar(getattr(self, name), name, int, min_val=1)
        check_scalar(self.distill, "distill", numbers.Real, min_val=0, max_val=1)
        check_scalar(self.distill_temperature, "distill_temperature", numbers.Real, min_val=0, include_min=False)
        check_scalar(self.steps, "steps", int, min_val=1, allow_none=True)
        check_scalar(self.cutout, "cutout", int, min_val=0)
        for name in ("pad", "warmup_epochs"):
            check_scalar(getattr(self, name), name, int, min_val=0)
        check_scalar(self.lr, "lr", numbers.Real, min_val=0, include_min=False)
        check_scalar(self.label_smoothing, "label_smoothing", numbers.Real, min_val=0, max_val=1, include_max=False)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run."""
        return self.steps if self.steps is not None else self.epochs * steps_per_epoch

    def num_epochs(self, steps_per_epoch: int) -> int:
        """Epochs started (the last one may be cut short by ``steps``)."""
        return self.epochs if self.steps is None else -(-self.steps // max(1, steps_per_epoch))


# -- loop ------------------------------------------------------------------------------------
def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(model, batches: Batches, optimizer, scheduler, cfg: TrainConfig, device, epoch: int,
                    task: str, regularizer: Callable[[], torch.Tensor] | None = None,
                    teacher: nn.Module | None = None) -> dict[str, float]:
    """One pass over ``batches``; returns the mean task loss (``loss``, cross-entropy) and, with a
    ``teacher`` (in eval mode, run under no_grad on the same augmented batch), the mean
    distillation term (``kd_loss``): the step minimises ``(1 - w) loss + w kd_loss``, ``w = cfg.distill``."""
    model.train()
    batches.set_epoch(epoch)
    w = cfg.distill if teacher is not None else 0.0
    total, kd_total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), 0
    it = batches
    bar = None
    if not cfg.quiet and is_main_process():
        try:
            from tqdm import tqdm

            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.num_epochs(len(batches))}", leave=False,
                       dynamic_ncols=True, disable=None)
            it = bar
        except ImportError:  # progress is optional
            pass
    left = cfg.total_steps(len(batches)) - epoch * len(batches)  # a step budget ends the last epoch early
    for i, (x, y) in enumerate(it):
        if i >= left:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg.amp):
            out = model(x)
            loss = task_loss(out, y, cfg.label_smoothing)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
                kd = distillation_loss(out, target, cfg.distill_temperature,
                                       valid=y != IGNORE_INDEX if y.dim() > 1 else None)
        objective = (1 - w) * loss + w * kd if teacher is not None else loss
        total_loss = objective + regularizer() if regularizer is not None else objective
        if getattr(regularizer, "done", False):  # e.g. a pruning budget met by these weights: keep them as they are
            total += loss.detach().double().cpu() * len(y)  # (a step more would move gates back above the threshold)
            if teacher is not None:
                kd_total += kd.detach().double().cpu() * len(y)
            count += len(y)
            break
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach().double().cpu() * len(y)
        if teacher is not None:
            kd_total += kd.detach().double().cpu() * len(y)
        count += len(y)
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                            **({"kd": f"{kd.item():.3f}"} if teacher is not None else {}))
        if cfg.step_delay:
            time.sleep(cfg.step_delay)
    stats = all_sum(torch.tensor([total.item(), kd_total.item(), float(count)], dtype=torch.float64))
    n = max(1.0, stats[2].item())
    return {"loss": stats[0].item() / n, **({"kd_loss": stats[1].item() / n} if teacher is not None else {})}


def predict_padded(model: nn.Module, x: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """Dense prediction of any image size: reflect-pad H and W up to a multiple of ``multiple``
    (encoder-decoders halve the size at every level) and crop the output back."""
    h, w = x.shape[-2:]
    return model(pad_to_multiple(x, multiple))[..., :h, :w]


@torch.no_grad()
def evaluate(model: nn.Module, ds: ArrayDataset, batch_size: int = 256, device: torch.device | str | None = None,
             amp: bool = False) -> dict[str, float]:
    """Top-1/top-5 (classification) or pixel accuracy, IoU, Dice (segmentation) on ``ds``.

    Segmentation images of any size are padded for the network and scored on their own pixels.
    Under DDP every process takes its stride of the samples and the sums are all-reduced.
    """
    if len(ds) == 0:
        raise ValueError(f"`ds` ({getattr(ds, 'name', 'the dataset')}) is empty: there is nothing to evaluate")
    seg = ds.task == "segmentation"
    if seg:  # whole large images: a few at a time
        batch_size = min(batch_size, 4)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sub = ds if world == 1 else ArrayDataset(ds.name, ds.images[rank::world], ds.targets[rank::world], ds.classes,
                                             ds.task, ds.mean, ds.std)
    stats = None
    with in_mode(model, training=False):
        for x, y in Batches(sub, batch_size, train=False):
            with _autocast(device, amp):
                out = (predict_padded(model, x.to(device)) if seg else model(x.to(device))).float()
            if stats is None:  # a label past the logits would be counted wrong, silently
                check_labels(ds, out.shape[1], "ds")
            s = batch_stats(out.cpu(), y, ds.task, max(2, ds.num_classes))
            stats = s if stats is None else stats + s
    stats = all_sum(stats if stats is not None else torch.zeros(1, dtype=torch.float64))
    return summarize(stats, ds.task, max(2, ds.num_classes))


def _resume(ckpt: Path, model: nn.Module, optimizer, scheduler, cfg: TrainConfig) -> tuple[int, list[dict]]:
    """Everything a killed run had (weights, optimizer, schedule, RNG, history) back from its checkpoint."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    then, now = ([g.get("initial_lr", g["lr"]) for g in o["param_groups"]]
                 for o in (state["optimizer"], optimizer.state_dict()))
    if len(then) != len(now):  # before anything is loaded: the model stays as it was
        raise ValueError(f"{ckpt}: its optimizer has {len(then)} parameter groups, this run's {len(now)} (a gate "
                         "with its own learning rate, such as importance weights' alpha_lr, was added or removed); "
                         "resume with the options it was made with, or delete the checkpoint")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    changed = _changed_settings(state.get("config", {}), cfg)
    if then != now and state.get("config", {}).get("lr", cfg.lr) == cfg.lr:  # a group's own rate (alpha_lr)
        changed.append(f"learning rates per parameter group {then} -> {now} (the checkpoint's rates go on)")
    if changed:
        warnings.warn(f"resuming {ckpt} at epoch {state['epoch']} with settings that differ from its run's: "
                      f"{'; '.join(changed)}; the rest of the run follows the new ones", stacklevel=3)
    return state["epoch"], list(state["history"])


_RUN_ONLY = {"out_dir", "resume", "quiet", "tensorboard", "step_delay", "amp", "channels_last"}


def _changed_settings(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings that shape the run's trajectory (schedule, data order, augmentation) and differ
    from a checkpoint's: a resume under them is no longer the run it continues."""
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 (a saved tuple may come back a list)
    now = asdict(cfg)
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now
            if k in saved and k not in _RUN_ONLY and plain(saved[k]) != plain(now[k])]


LR_ATTR = "secateurs_lr"  # a parameter carrying this attribute trains at that learning rate, without decay


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights only; a parameter with a ``secateurs_lr`` attribute (a pruning gate
    that must move within a short phase, e.g. importance weights' alpha) gets its own group at that
    rate, which the schedule scales like the others."""
    decay, no_decay, own = [], [], {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if (lr := getattr(p, LR_ATTR, None)) is not None:
            own.setdefault(float(lr), []).append(p)
        else:
            (no_decay if p.dim() <= 1 else decay).append(p)  # no weight decay on BN/bias
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups += [{"params": ps, "weight_decay": 0.0, "lr": lr} for lr, ps in own.items()]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.total_steps(steps_per_epoch)
    warm = cfg.warmup_epochs * steps_per_epoch
    milestones = [m * steps_per_epoch for m in cfg.milestones]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def channels_last_hazard(model: nn.Module, device: torch.device) -> str | None:
    """The first layer that torch's CPU channels-last kernels cannot train, or None.

    torch 2.14's CPU backward of a 1x1 convolution with a stride and fewer than 8 input channels
    per group corrupts the heap in channels-last (a crash, or garbage, some steps later); pruning
    makes such layers (a ResNet shortcut cut to 7 channels). Contiguous memory trains them fine.
    """
    if device.type != "cpu":
        return None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and set(m.kernel_size) == {1} and max(m.stride) > 1 \
                and m.in_channels // m.groups < 8:
            return name
    return None


def _memory_format(model: nn.Module, cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Put the model in channels-last when asked and safe; the config training then follows."""
    hazard = channels_last_hazard(model, device) if cfg.channels_last else None
    if hazard is not None:
        warnings.warn(f"channels_last=True ignored: module '{hazard}' is a strided 1x1 conv with fewer than 8 input "
                      "channels, whose channels-last CPU backward crashes in this torch; training in contiguous memory",
                      RuntimeWarning, stacklevel=3)
        cfg = replace(cfg, channels_last=False)
        model.to(memory_format=torch.contiguous_format)  # a model handed over channels-last would still crash
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return cfg


def _check_teacher(model: nn.Module, teacher: Any, cfg: TrainConfig) -> nn.Module | None:
    """The teacher ``fit`` distils from, or None when ``cfg.distill`` is 0 (a teacher is then unused)."""
    if cfg.distill == 0:
        return None
    if teacher is None:
        raise InvalidArgument(f"`distill` is {cfg.distill}: pass `teacher`, the frozen model to distil from "
                              "(prune() passes the unpruned model)")
    check_model(teacher, "teacher")
    if teacher is model:
        raise InvalidArgument("`teacher` must be a separate, frozen module (e.g. a deepcopy), not the model being trained")
    return teacher


def _probe(model: nn.Module, train_ds: ArrayDataset, cfg: TrainConfig, device) -> tuple[Any, Any]:
    """One augmented training sample and the model's eval-mode outputs for it (under no_grad: no
    weight or statistic changes), which the checks before training compare against."""
    first = next(iter(Batches(train_ds, 1, train=True, seed=cfg.seed, flip=False, crop=cfg.crop,
                              pad=cfg.pad if train_ds.task == "classification" else 0)), None)
    if first is None:  # no sample: no step will run either
        return None, None
    x = first[0].to(device)
    with in_mode(model, training=False), torch.no_grad(), _autocast(torch.device(device), cfg.amp):
        return x, model(x)


def _ready_teacher(teacher: nn.Module, x: Any, out: Any, cfg: TrainConfig, device) -> None:
    """Move the teacher beside the model in eval mode and refuse one whose outputs for the probe
    sample ``x`` differ in shape from the model's (``out``) before any weight or statistic changes."""
    teacher.to(device).eval()
    if cfg.channels_last:
        teacher.to(memory_format=torch.channels_last)
    if x is None:
        return
    with torch.no_grad():
        b = teacher(x)
    if out.shape[1:] != b.shape[1:]:
        raise ValueError(f"`teacher` outputs shape {tuple(b.shape[1:])} per sample but the model "
                         f"{tuple(out.shape[1:])}; distillation needs the same outputs (classes, and pixels for segmentation)")


def train_batches(train_ds: ArrayDataset, cfg: TrainConfig, rank: int = 0, world: int = 1) -> Batches:
    """The augmented training batches :func:`fit` draws, for anything that must see the same ones."""
    images_only = train_ds.task == "classification"  # segmentation crops instead, and keeps every labelled pixel
    return Batches(train_ds, cfg.batch_size, train=True, seed=cfg.seed, rank=rank, world=world,
                   pad=cfg.pad if images_only else 0, crop=cfg.crop, flip=cfg.flip,
                   cutout=cfg.cutout if images_only else 0)


def fit(model: nn.Module, train_ds: ArrayDataset, val_ds: ArrayDataset | None, cfg: TrainConfig,
        device: torch.device | str | None = None,
        regularizer: Callable[[], torch.Tensor] | None = None,
        teacher: nn.Module | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place; returns the per-epoch history (also in ``out_dir/log.csv``).

    ``regularizer()`` is added to the task loss at every step (e.g. a pruning budget loss); if it
    has a true ``done`` attribute, training stops after that step.

    ``teacher`` (required when ``cfg.distill`` > 0, unused otherwise): a frozen module whose logits
    the model learns to match (:func:`distillation_loss`). It is moved to the model's device and
    run in eval mode under no_grad on the same augmented batches, never wrapped in DDP, never
    trained and never checkpointed: pass it again on ``resume``. Its mode is restored at the end.
    The history then holds ``kd_loss`` beside ``loss`` (the cross-entropy).
    """
    teacher = _check_teacher(model, teacher, cfg)
    rank, world, dev = init_distributed()
    device = torch.device(device) if device is not None else dev
    torch.manual_seed(cfg.seed)
    model.to(device)
    cfg = _memory_format(model, cfg, device)
    x, probe = _probe(model, train_ds, cfg, device)
    if isinstance(probe, torch.Tensor) and probe.dim() >= 2:  # labels the head has no output for, named
        for ds, name in ((train_ds, "train_ds"), (val_ds, "val_ds")):
            if ds is not None:
                check_labels(ds, probe.shape[1], name)
    writer = None
    # the teacher goes back to its modes and the writer closes, whatever happens in between
    with in_mode(teacher, training=None) if teacher is not None else contextlib.nullcontext():
        try:
            if teacher is not None:
                _ready_teacher(teacher, x, probe, cfg, device)
            batches = train_batches(train_ds, cfg, rank, world)
            if len(batches) == 0:
                raise ValueError(f"`train_ds` has {len(train_ds)} samples, fewer than one batch (batch_size={cfg.batch_size}"
                                 f"{f' per process of {world}' if world > 1 else ''}): nothing would be trained")
            optimizer = make_optimizer(model, cfg)
            scheduler = make_scheduler(optimizer, cfg, len(batches))
            out = Path(cfg.out_dir) if cfg.out_dir else None
            ckpt = out / "checkpoint.pt" if out else None
            start, history = (_resume(ckpt, model, optimizer, scheduler, cfg)
                              if cfg.resume and ckpt is not None and ckpt.exists() else (0, []))
            net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
            if out is not None and is_main_process():
                out.mkdir(parents=True, exist_ok=True)
                if cfg.tensorboard:
                    writer = _tensorboard_writer(out / "tb")
            for epoch in range(start, cfg.num_epochs(len(batches))):
                t0 = time.perf_counter()
                losses = train_one_epoch(net, batches, optimizer, scheduler, cfg, device, epoch, train_ds.task,
                                         regularizer, teacher=teacher)
                row = {"epoch": epoch + 1, **losses, "lr": optimizer.param_groups[0]["lr"],
                       "time_s": time.perf_counter() - t0}
                if val_ds is not None:
                    row.update({f"val_{k}": v for k, v in evaluate(model, val_ds, device=device, amp=cfg.amp).items()})
                if hasattr(regularizer, "stats"):  # e.g. the current MACs of a model being pruned
                    row.update(regularizer.stats())
                history.append(row)
                if is_main_process():
                    _record(row, history, writer, out, model, optimizer, scheduler, cfg)
                if world > 1:
                    dist.barrier()
                if getattr(regularizer, "done", False):
                    break
            return history
        finally:
            if writer is not None:
                writer.close()


def _record(row: dict, history: list[dict], writer, out: Path | None, model, optimizer, scheduler,
            cfg: TrainConfig) -> None:
    """Print and log one epoch, then checkpoint it atomically (a kill leaves the previous checkpoint)."""
    if not cfg.quiet:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    if writer is not None:
        for k, v in row.items():
            if k != "epoch":
                writer.add_scalar(k, v, row["epoch"])
        writer.flush()
    if out is not None:
        _write_log(out / "log.csv", history)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": row["epoch"], "rng": torch.get_rng_state(),
                 "history": history, "config": asdict(cfg)}
        atomic_write(out / "checkpoint.pt", lambda tmp: torch.save(state, tmp))


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("tensorboard=True needs the tensorboard package: pip install 'secateurs[tensorboard]'") from err
    return SummaryWriter(str(path))


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    keys = list(dict.fromkeys(k for r in history for k in r))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)

    atomic_write(path, write)
