"""Training and evaluation throughput (images/s) of CIFAR ResNets on CIFAR-10 (JPEG).

Measures the project's own loop pieces: in-memory uint8 batches, batched tensor augmentation,
forward/backward/SGD step (training) and forward only (evaluation). CPU with the given thread
count; on a GPU too when one is present (bf16 autocast and channels-last, as ``--amp
--channels-last`` would train).

    python -m benchmarks.train_throughput                 # writes docs/train_throughput.md
    python -m benchmarks.train_throughput --steps 5 --models cifar_resnet20
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import secateurs
from secateurs.data import Batches, load_dataset
from secateurs.models import create_model


def measure(model_name: str, ds, device: torch.device, batch: int, steps: int, amp: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    model = create_model(model_name).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batches = iter(Batches(ds, batch, train=True, seed=0))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_step():
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(2):
        train_step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    train_ips = steps * batch / (time.perf_counter() - t)

    model.eval()
    x = next(iter(Batches(ds, batch, train=False)))[0].to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        model(x)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync()
    eval_ips = steps * batch / (time.perf_counter() - t)
    return train_ips, eval_ips


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ds = load_dataset("cifar10", "train", root=args.data_root)
    load_s = time.perf_counter() - t0
    rows = []
    devices = [("cpu", torch.device("cpu"), False)]
    if torch.cuda.is_available():
        devices.append((torch.cuda.get_device_name(), torch.device("cuda"), True))
    for label, device, amp in devices:
        for name in args.models:
            tr, ev = measure(name, ds, device, args.batch_size, args.steps, amp)
            epoch_min = len(ds) / tr / 60
            rows.append((name, label, tr, ev, epoch_min))
            print(f"{name:16s} {label:24s} train {tr:8.1f} img/s  eval {ev:8.1f} img/s  epoch {epoch_min:6.1f} min", flush=True)
    lines = ["# Training throughput", "",
             f"`python -m benchmarks.train_throughput --steps {args.steps} --batch-size {args.batch_size} "
             f"--threads {args.threads}` on {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, "
             f"secateurs {secateurs.__version__}. Data: {ds.name}, {len(ds)} training images decoded into memory "
             f"({load_s:.1f} s including the one-time decode when not cached). Training = batch from memory + "
             "batched crop/flip + forward + backward + SGD step; evaluation = forward only.", "",
             "| model | device | train img/s | eval img/s | one epoch (min) |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {d} | {tr:.0f} | {ev:.0f} | {em:.1f} |" for n, d, tr, ev, em in rows]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_throughput.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
