"""The training loss and the metrics every evaluation reports: top-1/top-5, or pixel accuracy, IoU,
Dice and mIoU over the labelled pixels of masks (``IGNORE_INDEX`` pixels count nowhere). Kept as sums
that add up across batches and processes, so DDP evaluation all-reduces one tensor."""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

from ._validation import InvalidArgument
from .data import IGNORE_INDEX

__all__ = ["task_loss", "distillation_loss", "check_labels", "batch_stats", "summarize", "METRICS", "metric_key"]


def task_loss(out: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on labels, or on every labelled pixel of masks (``IGNORE_INDEX`` pixels skipped)."""
    ignore = IGNORE_INDEX if y.dim() > 1 else -100
    if y.dim() > 1 and not (y != IGNORE_INDEX).any():  # no labelled pixel: the mean would be NaN
        return out.float().sum() * 0.0
    return F.cross_entropy(out.float(), y, ignore_index=ignore, label_smoothing=label_smoothing)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` over dim 1 (the classes), averaged over
    samples and, for dense outputs ``[N, C, H, W]``, over the pixels ``valid`` marks (all by default:
    pass the labelled pixels, so padding no class owns does not pull the student). ``T^2`` keeps the
    gradient's scale independent of ``T`` (Hinton et al. 2015); identical logits give exactly 0."""
    if student.shape != teacher.shape:
        raise ValueError(f"`teacher` outputs shape {tuple(teacher.shape)} but the model {tuple(student.shape)}; "
                         "distillation needs the same outputs (classes, and pixels for segmentation)")
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    log_q = F.log_softmax(teacher.float() / temperature, dim=1)
    per = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(1)
    if valid is not None:
        if valid.shape != per.shape:
            raise ValueError(f"`valid` has shape {tuple(valid.shape)}, the outputs {tuple(per.shape)} positions")
        if not valid.any():  # nothing labelled: no pull, and no NaN from an empty mean
            return per.sum() * 0.0
        per = per[valid]
    return per.mean() * temperature ** 2


def check_labels(ds: Any, outputs: int, name: str) -> None:
    """Labels the model has no output for: cross-entropy would fail naming nothing, and accuracy
    would count them silently wrong. ``outputs``: the model's logits per sample (dim 1)."""
    t = getattr(ds, "targets", None)
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.numel() == 0:
        return
    lo, hi = _label_range(t, getattr(ds, "task", "classification") == "segmentation")
    if lo is not None and (lo < 0 or hi >= outputs):
        raise ValueError(f"`{name}` ({getattr(ds, 'name', type(ds).__name__)}) has labels {lo}..{hi} but the model "
                         f"outputs {outputs} classes: give it a head for every class (e.g. create_model(..., "
                         f"num_classes={max(hi + 1, getattr(ds, 'num_classes', 0))}))")


_RANGES: dict[int, tuple] = {}  # id(targets) -> (weakref, (version, masks), range); a few datasets per process


def _label_range(t: torch.Tensor, masks: bool) -> tuple[int | None, int | None]:
    """(lowest, highest) label, unlabelled pixels left out; remembered per tensor (and its in-place
    version), since evaluate asks every epoch. Masks are read a chunk at a time, never copied whole."""
    hit = _RANGES.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == (t._version, masks):
        return hit[2]
    lo = hi = None
    for chunk in (t.flatten().split(1 << 22) if masks else (t,)):
        if masks:
            chunk = chunk[chunk != IGNORE_INDEX]
        if chunk.numel():
            a, b = torch.aminmax(chunk)
            lo, hi = (int(a), int(b)) if lo is None else (min(lo, int(a)), max(hi, int(b)))
    if len(_RANGES) > 64:
        _RANGES.clear()
    _RANGES[id(t)] = (weakref.ref(t), (t._version, masks), (lo, hi))
    return lo, hi


def batch_stats(out: torch.Tensor, y: torch.Tensor, task: str, num_classes: int) -> torch.Tensor:
    """Sums that add up across batches and processes (masks: over their labelled pixels only)."""
    if task == "classification":
        top5 = out.topk(min(5, out.shape[1]), dim=1).indices
        return torch.tensor([len(y), (top5[:, 0] == y).sum().item(), (top5 == y[:, None]).any(1).sum().item()],
                            dtype=torch.float64)
    pred = out.argmax(1)
    labelled = y != IGNORE_INDEX
    stats = [labelled.sum().item(), ((pred == y) & labelled).sum().item()]
    for c in range(num_classes):  # per-class intersection, prediction area, target area
        p, t = (pred == c) & labelled, y == c
        stats += [(p & t).sum().item(), p.sum().item(), t.sum().item()]
    return torch.tensor(stats, dtype=torch.float64)


def summarize(stats: torch.Tensor, task: str, num_classes: int) -> dict[str, float]:
    if task == "classification":
        n = stats[0].item()
        return {"top1": 100 * stats[1].item() / n, "top5": 100 * stats[2].item() / n}
    n = stats[0].item()
    inter, ps, ts = stats[2::3], stats[3::3], stats[4::3]
    fg = slice(1, None) if num_classes > 1 else slice(0, None)
    iou = inter / (ps + ts - inter).clamp_min(1)
    dice = 2 * inter / (ps + ts).clamp_min(1)
    seen = (ps + ts) > 0  # a class neither predicted nor present is left out of the means, not scored 0
    mean = lambda v, keep: 100 * v[keep].mean().item() if keep.any() else 100.0  # noqa: E731
    return {"pixel_acc": 100 * stats[1].item() / n, "iou": mean(iou[fg], seen[fg]),
            "dice": mean(dice[fg], seen[fg]), "miou": mean(iou, seen)}


METRICS = {"classification": ("top1", "top5"), "segmentation": ("pixel_acc", "iou", "dice", "miou")}


def metric_key(data: Any, metric: str | None = None) -> str:
    """The key of :func:`evaluate` a tolerance or a sensitivity curve refers to: ``metric`` checked
    against what ``data``'s task measures, else top-1 (classification) or IoU (segmentation)."""
    task = getattr(data, "task", "classification")
    if metric:
        known = METRICS.get(task, ())
        if data is not None and metric not in known:
            raise InvalidArgument(f"`metric` must be one of {', '.join(known)} for {task} data, got {metric!r}")
        return metric
    return "iou" if task == "segmentation" else "top1"
