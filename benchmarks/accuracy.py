"""Accuracy at equal MACs under one step budget: every method as its spec says, beside Torch-Pruning.

The protocol (issue 18), the same for every row:

- data: CIFAR-10 (JPEG); the training set less a held-out split of 5,000 images
  (``ArrayDataset.holdout``, class-balanced, fixed) for anything that picks or stops on a metric;
  top-1 on the full 10,000-image test set, which nothing is tuned on;
- budget: ``--steps`` optimizer steps per row, pruning phase and fine-tuning together, counted by a
  global optimizer hook (so Torch-Pruning's own loops count alike); what a method's phase leaves is
  fine-tuned (SGD Nesterov, cosine, batch 128, ``--lr``); a row that spent more is marked;
- every method as specified: HFP trains until its hard count meets the target (``converged`` and the
  step it happened are recorded; a row that fell back to the lowest gates is labelled so), importance
  weights learn alpha then cut step by step with fine-tuning between, the heuristic runs its
  estimator (kappa 0.5) with fine-tuning between rounds, dlp+filters is the cascade (PLS-VIP blocks,
  then VIP filters over several fine-tuned iterations); Torch-Pruning's magnitude pruner is iterative
  as its examples are, its BN-scale and group-norm pruners sparse-train first (weight decay 0, their
  recommended regulariser) and fine-tune after the cut;
- ``control``: the unpruned model trained for the same steps, so the gain from extra training is
  not credited to pruning;
- latency (issue 19): every pruned row's latency over the unpruned model's at ``--latency-batch`` (8),
  timed interleaved on this CPU (at batch 1 a 32px ResNet is mostly per-layer overhead);
  ``l2@latency`` prunes to a *latency* target ``--latency-gain`` (0.8) times the latency that
  Torch-Pruning's magnitude prune at the same MACs target leaves (its one-shot architecture, timed in
  the same row), so "as accurate and at least 20% faster" is read off one table; ``dlp@latency``
  removes whole residual blocks only (lowest PLS-VIP first), as few as meet that target;
- seeds: ``--seeds`` (at least 3 for the report); mean and 95% interval (Student t) per method,
  paired differences per seed (same criterion in both tools, and best of ours against best of theirs).

Rows are appended to ``accuracy.csv`` as they finish (a killed run resumes at the next row);
``accuracy.md`` is generated from it only.

    python -m benchmarks.accuracy --models cifar_resnet20_cifar10 --targets 0.5 0.3 --seeds 0 1 2
    python -m benchmarks.accuracy --quick            # the machinery on tiny settings, into runs/accuracy-quick
    python -m benchmarks.accuracy --report-only
"""
from __future__ import annotations

import argparse
import ast
import copy
import math
import time
import warnings
from pathlib import Path

import torch

from benchmarks._protocol import add_run_args, append_row, interval, read_rows, source_commit, write_rows  # noqa: F401 (interval: the report's, re-exported)
from benchmarks.accuracy_report import PAIRS, no_worse, paired, summarize, write_report  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
OURS = ["l1", "l2", "bn_scale", "taylor", "heuristic", "dlp", "dlp+filters", "hfp", "importance-weights"]
THEIRS = ["tp_magnitude", "tp_bn_scale", "tp_group_norm"]
TP_REG = {"tp_bn_scale": 1e-4, "tp_group_norm": 5e-4}  # network slimming's lambda; TP's CIFAR group_sl script
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # fit trains there too
FIELDS = ["model", "target", "method", "tool", "seed", "steps", "steps_used", "phase_steps", "over_budget", "kept_macs",
          "kept_params", "top1_before", "top1", "val_top1", "converged", "converged_step", "fallback", "stopped",
          "missed_target", "distill", "train_images", "test_images", "seconds", "latency_ratio", "latency_target",
          "cpu", "commit", "error", "settings"]
# the verdicts first (a grid cut short by a session still answers them): same-criterion pairs with
# Torch-Pruning, the paper methods against l1, the latency prune, the control; then the other variants
GRID_ORDER = ["tp_magnitude", "l2:distill=0", "l2", "l1", "tp_bn_scale", "bn_scale:distill=0", "bn_scale", "hfp",
              "heuristic", "l2@latency", "control", "tp_group_norm", "dlp+filters", "dlp+l2@latency", "importance-weights",
              "importance-weights@tol", "hfp:tie=shared", "hfp:lam=5", "importance-weights:rank=scale", "l2:allocation=latency",
              "taylor", "dlp@latency", "dlp", "hfp:lr=0.1", "dlp+filters:criterion=l1", "hfp:phase=0.8"]
FINAL = 999  # the seed offset of a row's last fine-tuning (see finetune)


class StepCounter:
    """Every optimizer step taken anywhere (ours or Torch-Pruning's loops), via torch's global hook."""

    def __init__(self) -> None:
        self.n = 0
        self._handle = None

    def __enter__(self) -> "StepCounter":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._count)
        return self

    def _count(self, *args) -> None:
        self.n += 1

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def finetune(args, seed: int, steps: int, distill: float = 0.0, call: int = 0):
    """The row's fine-tuning recipe; ``call`` numbers the fits of one row, so that each reads its own
    batches (one seed for all would replay the same first images in every short round)."""
    from secateurs.train import TrainConfig

    return TrainConfig(steps=max(1, steps), batch_size=args.batch_size, lr=args.lr, weight_decay=5e-4, quiet=True,
                       seed=seed * 1000 + call, channels_last=True, distill=distill, distill_temperature=args.temperature)


def _fit(model, train, cfg, teacher=None) -> None:
    from secateurs.train import fit

    fit(model, train, None, cfg, teacher=teacher)  # fit ignores the teacher when cfg.distill is 0


# -- Torch-Pruning ---------------------------------------------------------------------------
def _tp_pruner(model, x, kind: str, ratio: float):
    import torch_pruning as tp

    from benchmarks.compare import _head, _tp_importance

    cls = {"tp_magnitude": tp.pruner.MagnitudePruner, "tp_bn_scale": tp.pruner.BNScalePruner,
           "tp_group_norm": tp.pruner.GroupNormPruner}[kind]
    extra = {"reg": TP_REG[kind]} if kind in TP_REG else {}
    return cls(model, x, importance=_tp_importance(kind), pruning_ratio=ratio, global_pruning=True,
               ignored_layers=_head(model), **extra)


def _tp_sparse_phase(model, pruner, train, args, seed: int, steps: int) -> None:
    """Torch-Pruning's sparse learning: its regulariser after every backward, weight decay 0."""
    import torch.nn.functional as F

    from secateurs.data import Batches

    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    batches = Batches(train, args.batch_size, train=True, seed=seed, pad=4)
    if hasattr(pruner, "update_regularizer"):
        pruner.update_regularizer()
    model.train()
    done, epoch = 0, 0
    while done < steps:
        batches.set_epoch(epoch)
        for xb, yb in batches:
            xb, yb = xb.to(DEVICE), yb.to(DEVICE)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            pruner.regularize(model)
            opt.step()
            done += 1
            if done >= steps:
                break
        epoch += 1
    model.eval()


def run_tp(method: str, model, x, target: float, train, args, seed: int) -> dict:
    import secateurs
    from benchmarks.compare import tp_ratio_for_macs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "tp_magnitude":  # iterative, fine-tuned between, as Torch-Pruning's examples do
            # each round a one-shot global ratio to target**(i/k) of the MACs: the last lands on the target
            # (its own iterative scheduler spaces channel ratios, which overshoots the MACs by a few points)
            k, base = args.rounds, secateurs.count(model, x).macs
            for i in range(1, k + 1):
                goal = target ** (i / k) * base / secateurs.count(model, x).macs
                if goal < 1:
                    _tp_pruner(model, x, method, tp_ratio_for_macs(model, x, method, goal)).step()
                _fit(model, train, finetune(args, seed, max(1, args.steps // (2 * k)), call=i))
        else:  # sparse learning, then the global ratio that meets the MACs on the sparse model
            _tp_sparse_phase(model, _tp_pruner(model, x, method, 0.5), train, args, seed, args.steps // 2)
            _tp_pruner(model, x, method, tp_ratio_for_macs(model, x, method, target)).step()
    return {}


def latency_ratio(base, model, args) -> float:
    """Latency of ``model`` over ``base`` at ``--latency-batch`` on this CPU, timed interleaved (median of 100:
    30 left the per-row ratios of one architecture a few points apart on this shared machine)."""
    from secateurs.latency import latency_ratio as ratio

    # one memory format for both: fine-tuning leaves models channels-last, which oneDNN runs by another path
    cpu = lambda m: copy.deepcopy(m).cpu().eval().to(memory_format=torch.channels_last)  # noqa: E731
    return ratio(cpu(base), cpu(model), torch.randn(args.latency_batch, 3, 32, 32), threads=args.threads, repeats=100,
                 runtime="eager")


# -- ours --------------------------------------------------------------------------------------
def variant(method: str) -> tuple[str, dict]:
    """``"hfp:tie=shared:lam=20"`` -> ("hfp", {"tie": "shared", "lam": 20}): a method with options is
    its own row; numbers are read as numbers."""
    name, *opts = method.split(":")
    return name, {k: _literal(v) for k, v in (o.split("=", 1) for o in opts)}


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_ours(method: str, model, x, target: float, train, val, args, seed: int) -> dict:
    """Prune with one of OURS as its spec says; the caller fine-tunes what is left of the budget."""
    import secateurs

    method, extra = variant(method)
    extra = {k: v for k, v in extra.items() if k not in ("distill", "temperature")}  # the row's, already in args

    per_round = finetune(args, seed, max(1, args.steps // (2 * args.rounds)), args.distill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "hfp":
            return _hfp(model, x, target, train, args, seed, extra)
        if method == "dlp@latency":
            return _blocks_to_latency(model, x, target, args, train)
        if method in ("l2@latency", "dlp+l2@latency"):
            return _latency(model, x, target, args, blocks_first=per_round if method.startswith("dlp") else None,
                            train=train)
        if method in ("importance-weights", "importance-weights@tol"):
            # alpha learned (one round of steps), then cut step by step with fine-tuning between: the
            # share per step takes about `rounds` steps to the target (widths ~ sqrt of the MACs)
            fraction = 1 - math.sqrt(target) ** (1 / args.rounds)
            options = {"epochs": 1, "fraction": min(1.0, fraction), **extra}
            if method.endswith("@tol"):  # the method proper: the tolerance on the held-out split stops it
                # alpha's round and up to 2 x rounds cuts share the budget: (2 x rounds + 1) equal parts
                part = finetune(args, seed, max(1, args.steps // (2 * args.rounds + 1)), args.distill)
                _, rep = secateurs.prune(model, x, "importance-weights", None, data=train, val_data=val,
                                         tolerance=args.tolerance, finetune=part, steps=2 * args.rounds,
                                         method_options=options, latency_guard=False)
                return {"stopped": rep.get("stopped", "")[:80]}
            secateurs.prune(model, x, method, target, data=train, finetune=per_round, steps=args.rounds + 2,
                            method_options=options, latency_guard=False)
        elif method == "heuristic":  # its estimator (kappa 0.5), fine-tuned between rounds, to the target
            secateurs.prune(model, x, method, target, steps=args.rounds, finetune=per_round, data=train,
                            method_options={"kappa": 0.5}, latency_guard=False)
        elif method == "dlp+filters":  # the cascade: PLS-VIP blocks, then VIP filters, iterated and fine-tuned
            # ("dlp+filters:criterion=l1": the same cascade, its filter steps ranked by another criterion;
            # ":reconstruct=512": each filter step re-fitted by least squares before its cut; ":filter_steps=1")
            base, dense = secateurs.count(model, x).macs, copy.deepcopy(model)
            criterion, k = extra.pop("criterion", "vip"), int(extra.pop("filter_steps", max(1, args.rounds - 1)))
            secateurs.prune(model, x, "dlp", max(target, 0.8), data=train, finetune=per_round,
                            method_options={"per_class": 20}, latency_guard=False)
            rest = target * base / secateurs.count(model, x).macs
            if rest < 1:  # distilled from the unpruned model, not the block-pruned one
                secateurs.prune(model, x, criterion, rest, steps=k, data=train,
                                finetune=per_round, teacher=dense, latency_guard=False, **extra)
        elif "rounds" in extra:  # "l1:rounds=4": a criterion cut in that many steps, each fine-tuned (distilled)
            # for its share of half the budget, as Torch-Pruning's magnitude row is; the caller fine-tunes the rest
            k = int(extra.pop("rounds"))
            secateurs.prune(model, x, method, target, steps=k, finetune=finetune(args, seed, args.steps // (2 * k),
                            args.distill), data=train, latency_guard=False, **extra)
        else:  # a criterion: one cut (bias compensation included), then fine-tuning; "l2:allocation=latency";
            # "dlp": the lowest PLS-VIP residual blocks removed until the MACs target is met
            _prune_on_cpu(model, args, method, target, data=train, latency_threads=args.threads, **extra)
    return {}


def _prune_on_cpu(model, args, *a, **kw) -> dict:
    """``secateurs.prune`` with the model on this CPU, channels-last, and an input at ``--latency-batch``:
    whatever the rows train on, latency tables and searches time the CPU and the layout the report's
    latencies come from (`latency_ratio`)."""
    import secateurs

    device = next(model.parameters()).device
    try:
        model.cpu().to(memory_format=torch.channels_last)
        return secateurs.prune(model, torch.randn(args.latency_batch, 3, 32, 32), *a, **kw, latency_guard=False)[1]
    finally:
        model.to(device)


def _hfp(model, x, target: float, train, args, seed: int, extra: dict) -> dict:
    """HFP's training phase (the budget loss until the hard count meets the target, at most half
    the budget, or the fraction ``hfp:phase=``), the cut, the rest of the budget fine-tuning;
    ``converged`` False means the lowest gates were cut instead (labelled as a fallback)."""
    import secateurs

    frac = extra.pop("phase", None)
    if frac is not None:  # the phase may take this share, the fine-tuning after the cut the rest
        if not 0 < frac < 1:
            raise ValueError(f"hfp:phase is the share of the step budget HFP's phase may take, in (0, 1), got {frac}")
        extra["steps"] = max(1, int(args.steps * frac))
    # without it, half the budget bounds the phase and is the fine-tuning after the cut
    phase = finetune(args, seed, args.steps - extra["steps"] if frac is not None else args.steps // 2, args.distill)
    _, rep = secateurs.prune(model, x, "hfp", target, data=train, finetune=phase,
                             method_options={"lam": args.hfp_lam, "warmup_steps": max(1, args.steps // 20),
                                             "epochs": 10_000, **extra}, latency_guard=False)
    out = rep["method_output"]
    return {"converged": out["hfp_converged"], "converged_step": out["hfp_steps"] if out["hfp_converged"] else "",
            "fallback": "" if out["hfp_converged"] else "lowest gates cut: training did not meet the target"}


def _latency(model, x, target: float, args, blocks_first=None, train=None) -> dict:
    """L2 to a latency target: ``--latency-gain`` times what Torch-Pruning's magnitude prune at the
    same MACs target leaves (per-layer tables of this CPU, one confirming timing). With
    ``blocks_first`` (a fine-tuning config), PLS-VIP residual blocks go first, to 80% of the MACs: at
    32px much of a block's time is per-layer cost that narrower channels do not remove."""
    import secateurs

    goal = left = _latency_goal(model, x, target, args)
    macs0 = secateurs.count(model, x).macs
    if blocks_first is not None:
        dense = copy.deepcopy(model)
        secateurs.prune(model, x, "dlp", 0.8, data=train, finetune=blocks_first, method_options={"per_class": 20}, latency_guard=False)
        left = goal / latency_ratio(dense, model, args)  # what is left to cut, relative to the model now
    try:
        _prune_on_cpu(model, args, "l2", {"latency": min(left, 1.0)}, round_to="auto", latency_threads=args.threads)
        return {"latency_target": round(goal, 4)}
    except secateurs.PruningError as err:  # channels alone cannot get there (fixed per-layer costs)
        _prune_on_cpu(model, args, "l2", min(1.0, target * macs0 / secateurs.count(model, x).macs))
        return {"latency_target": round(goal, 4), "fallback": f"latency target unreachable, MACs target used: {err}"[:120]}


def _latency_goal(model, x, target: float, args) -> float:
    """``--latency-gain`` times the latency Torch-Pruning's magnitude prune at ``target`` MACs leaves."""
    from benchmarks.compare import tp_ratio_for_macs

    ref = copy.deepcopy(model)
    _tp_pruner(ref, x, "tp_magnitude", tp_ratio_for_macs(ref, x, "tp_magnitude", target)).step()
    return args.latency_gain * latency_ratio(model, ref, args)


def _blocks_to_latency(model, x, target: float, args, train) -> dict:
    """Whole residual blocks only: secateurs' ``dlp`` to the latency goal (lowest PLS-VIP first, as
    few as meet it, each count timed): at 32px much of a block's time is per-layer cost that
    narrower channels do not remove."""
    import secateurs

    goal = _latency_goal(model, x, target, args)
    options = {"min_per_stage": 0, "per_class": 20}
    out = {"latency_target": round(goal, 4)}
    try:
        rep = _prune_on_cpu(model, args, "dlp", {"latency": goal}, data=train, method_options=options)
    except secateurs.PruningError:  # every block that may go is not enough: they all go, labelled
        rep = _prune_on_cpu(model, args, "dlp", None, data=train, method_options={**options, "fraction": 1.0})
        out["fallback"] = "latency goal not met with every removable block removed"
    steps = rep.get("steps", [])
    gone = len(steps[1]["removed"]) if len(steps) > 1 else 0
    if not gone:
        return {**out, "fallback": f"no block removed: {rep.get('stopped', '')}"[:120]}
    return {**out, "stopped": f"{gone} blocks removed"}


# -- the grid ----------------------------------------------------------------------------------
def data(args):
    """(train less the held-out split, held-out split, test set), as the protocol says."""
    from secateurs.data import load_dataset

    train, val = load_dataset("cifar10", "train", root=args.data_root).holdout(args.holdout)
    test = load_dataset("cifar10", "test", root=args.data_root)
    if args.subset:
        train = train.subset(args.subset, 0)
    if args.test_subset:
        val, test = val.subset(args.test_subset, 0), test.subset(args.test_subset, 0)
    return train, val, test


def one_row(name: str, base, base_top1: float, method: str, target: float, seed: int, train, val, test, args) -> dict:
    import secateurs
    from secateurs.latency import cpu_name
    from secateurs.train import evaluate

    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    ours = not method.startswith("tp_") and method != "control"
    args, opts = copy.copy(args), variant(method)[1]  # its distillation: "l2:distill=0", "l1:temperature=2"
    args.distill = float(opts.get("distill", args.distill)) if ours else 0.0
    args.temperature = float(opts.get("temperature", args.temperature))
    with StepCounter() as n:
        info = {} if method == "control" else (run_tp(method, model, x, target, train, args, seed) if not ours
                                               else run_ours(method, model, x, target, train, val, args, seed))
    used = n.n
    left = args.steps - used
    if left > 0:  # the teacher a copy: fit readies it (memory format) and the base must stay as it is
        _fit(model, train, finetune(args, seed, left, args.distill, call=FINAL), copy.deepcopy(base) if args.distill else None)
    cost, cost0 = secateurs.count(model, x), secateurs.count(base, x)
    row = {"model": name, "target": target, "method": method, "tool": "secateurs" if ours or method == "control"
           else "torch_pruning", "seed": seed, "steps": args.steps, "steps_used": max(used, args.steps),
           "phase_steps": used, "over_budget": used > args.steps, "kept_macs": round(cost.macs / cost0.macs, 4),
           "kept_params": round(cost.params / cost0.params, 4), "top1_before": round(base_top1, 2),
           "top1": round(evaluate(model, test)["top1"], 2), "val_top1": round(evaluate(model, val)["top1"], 2),
           "converged": info.get("converged", ""), "converged_step": info.get("converged_step", ""),
           "fallback": info.get("fallback", ""), "stopped": info.get("stopped", ""), "distill": args.distill,
           "missed_target": "@" not in method and method != "control" and cost.macs > cost0.macs * target * 1.01,
           "train_images": len(train),
           "test_images": len(test), "seconds": round(time.perf_counter() - t0, 1),
           "latency_ratio": "" if method == "control" else round(latency_ratio(base, model, args), 4),
           "latency_target": info.get("latency_target", ""), "cpu": cpu_name()}
    return row


SETTINGS = ("rounds", "lr", "batch_size", "distill", "tolerance", "hfp_lam", "latency_batch", "latency_gain", "holdout",
            "subset", "test_subset", "threads")


def settings(args, name: str) -> str:
    """What else a row's numbers depend on (besides model, target, method, seed and steps), with the
    checkpoint's hash: rows of other settings must not be resumed from or pooled."""
    from secateurs.models import list_pretrained

    entry = list_pretrained().get(name, {})
    t = [f"temperature={args.temperature}"] if getattr(args, "temperature", 4.0) != 4.0 else []  # rows before it ran at 4
    return ";".join([*(f"{k}={getattr(args, k)}" for k in SETTINGS), *t, f"device={DEVICE.type}",
                     f"sha={entry.get('sha256', '?')[:12]}"])


def check_baseline(name: str, args) -> None:
    """The held-out split must be images the baseline never trained on, or the tolerance and the
    held-out picks read training data: refuse a checkpoint whose recipe did not hold them out."""
    from secateurs.models import list_pretrained

    recipe = list_pretrained().get(name, {}).get("recipe", "")
    if not args.quick and f"--holdout {args.holdout}" not in recipe:
        raise SystemExit(f"{name}: its zoo recipe does not hold out the {args.holdout}-image split (`--holdout "
                         f"{args.holdout}` not in {recipe[:80]!r}...); train it with scripts/baselines.sh first")


def control_twin(rows: list[dict], name: str, method: str, seed: int, steps: int) -> dict | None:
    """The control trains the unpruned model, which no MACs target touches: its row at another
    target is this one (training it again would spend a row's time on the same numbers)."""
    if method != "control":
        return None
    return next(({k: v for k, v in r.items() if k != "settings"} for r in rows
                 if (r["model"], r["method"], str(r["seed"]), str(r["steps"])) == (name, method, str(seed), str(steps))
                 and not r.get("error")), None)


def run(args) -> Path:
    from secateurs.models import load_pretrained
    from secateurs.train import evaluate

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "accuracy.csv"
    rows = read_rows(path)
    if rows and list(rows[0]) != FIELDS:  # written before a column was added: rewritten with it, blank
        write_rows(path, [{f: r.get(f, "") for f in FIELDS} for r in rows])
    done = {(r["model"], r["target"], r["method"], r["seed"], r["steps"]) for r in rows if not r.get("error")}
    mine, commit = {name: settings(args, name) for name in args.models}, source_commit()
    for name in args.models:  # every refusal before any data is read
        check_baseline(name, args)
        other = {r.get("settings") for r in rows if r["model"] == name} - {mine[name]}
        if other:
            raise SystemExit(f"{path} holds {name} rows made with other settings ({sorted(map(str, other))[0]}, now "
                             f"{mine[name]}): pass another --out, or the same settings")
    train, val, test = data(args)
    for name in args.models:
        base = load_pretrained(name).eval().to(DEVICE)
        top1 = evaluate(base, test)["top1"]
        for target in args.targets:
            for method in args.methods:
                for seed in args.seeds:
                    if (name, str(target), method, str(seed), str(args.steps)) in done:
                        continue
                    twin = control_twin(rows, name, method, seed, args.steps)
                    try:
                        row = {**twin, "target": target} if twin else one_row(name, base, top1, method, target, seed,
                                                                             train, val, test, args)
                    except Exception as err:  # noqa: BLE001 - one broken row must not stall the grid; it is rerun next time
                        row = {"model": name, "target": target, "method": method, "seed": seed, "steps": args.steps,
                               "error": f"{type(err).__name__}: {err}"[:200]}
                    append_row(path, {**row, "commit": commit, "settings": mine[name]}, FIELDS)
                    rows.append({k: str(v) for k, v in row.items()})
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cifar_resnet20_cifar10", "cifar_resnet56_cifar10"])
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--methods", nargs="+", default=GRID_ORDER,
                   help="also variants with options: hfp:tie=shared, importance-weights:rank=scale, l2:allocation=latency")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=800, help="optimizer steps per row, pruning phase + fine-tuning")
    p.add_argument("--rounds", type=int, default=4, help="prune/fine-tune rounds of the iterative methods")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--distill", type=float, default=0.5,
                   help="distillation weight in our fine-tuning (0: off; a row 'l2:distill=0' overrides it)")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature ('l1:temperature=2' overrides it)")
    p.add_argument("--tolerance", type=float, default=1.0, help="importance-weights@tol: top-1 points on the held-out split")
    p.add_argument("--hfp-lam", type=float, default=10.0,
                   help="HFP's budget-loss weight: 10 met the target within its phase on ResNet-20 (step 172 of 250) "
                        "and kept the best held-out top-1 of 5 (never met), 10, 20 and 50 (seed 0, 50%% MACs)")
    p.add_argument("--latency-batch", type=int, default=8, help="batch size latency is timed and searched at")
    p.add_argument("--latency-gain", type=float, default=0.8,
                   help="l2@latency: latency target as this fraction of Torch-Pruning's MACs-equal prune's")
    p.add_argument("--holdout", type=int, default=5000)
    p.add_argument("--subset", type=int, default=0, help="training images (0: all but the held-out split)")
    p.add_argument("--test-subset", type=int, default=0, help="test and held-out images (0: all)")
    add_run_args(p, ROOT / "docs")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.targets, args.seeds = ["cifar_resnet20_cifar10"], [0.5], [0]
        args.steps, args.rounds, args.subset, args.test_subset, args.batch_size = 8, 2, 256, 200, 32
        if args.out == str(ROOT / "docs"):
            args.out = str(ROOT / "runs" / "accuracy-quick")
    path = Path(args.out) / "accuracy.csv"
    if not args.report_only:
        path = run(args)
    write_report(path, Path(args.out) / "accuracy.md", args)


if __name__ == "__main__":
    main()
