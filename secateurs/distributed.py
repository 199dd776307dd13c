"""Running under torchrun: the process group, which process writes, and decisions every process
must share (one cut everywhere, or DDP breaks)."""
from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_main_process", "from_first_process", "all_sum", "mark_failed", "barrier"]


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment, or a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            _close_at_exit()  # ours to close; a group the caller opened is theirs
        return rank, world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


_EXIT = {"crashed": False}


def _close_at_exit() -> None:
    """Left open, the backend's threads outlive the interpreter and a finished torchrun job can
    abort on exit ('terminate called without an active exception'), so the group is closed while
    Python is whole. Not after an uncaught exception: closing waits on work that peers blocked in a
    collective will never finish (NCCL drains it), and torchrun could not reap the job."""
    previous = sys.excepthook

    def note_crash(*exc_info):
        mark_failed()
        previous(*exc_info)

    sys.excepthook = note_crash
    atexit.register(_close_process_group)


def mark_failed() -> None:
    """This process is failing (e.g. a command turning an error into ``SystemExit``, which skips
    the except hook): it leaves the process group open for torchrun to reap."""
    _EXIT["crashed"] = True


def _close_process_group() -> None:
    """Close the group while Python is whole, once every process is done: without the collection and
    the barrier a 2-process CPU job still aborted at exit now and then ('terminate called without an
    active exception': 3 of 8 runs on this loaded machine, 1 of 8 with the barrier alone, 0 of 22 with both)."""
    if dist.is_initialized() and not _EXIT["crashed"]:
        gc.collect()  # a DDP wrapper left for collection holds the group: it would be freed at teardown
        try:
            dist.barrier()
        except RuntimeError:  # a peer that failed has left: close ours all the same
            pass
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Under torchrun, wait until every process is here (e.g. until the first one has written a
    folder the others read); a single process goes straight on."""
    if dist.is_initialized():
        dist.barrier()


def from_first_process(value: Any) -> Any:
    """Under torchrun, the first process's ``value`` on every process: a decision that timing
    made (a latency plan, a measured width step) may differ between processes, and one cut must
    be the same everywhere or DDP breaks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """A sum over the processes, carried on the device the backend reduces (NCCL refuses CPU
    tensors, gloo GPU ones) and returned where ``t`` was."""
    if not dist.is_initialized():
        return t
    out = t.to(_collective_device())
    dist.all_reduce(out)
    return out.to(t.device)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
