"""Run the CLI and SIGKILL the process at a chosen point: ``python -m tests.kill_driver
MODULE.ATTR N -- CLI ARGS`` replaces ``MODULE.ATTR`` by a wrapper that calls it and kills the
process right after its N-th call (``before`` instead of a number's sign: ``-N`` kills just
before the N-th call). A real kill -9: no exception handler, no ``finally`` runs."""
from __future__ import annotations

import importlib
import os
import signal
import sys


def arm(target: str, n: int) -> None:
    mod_name, _, attr = target.rpartition(".")
    module = importlib.import_module(mod_name)
    real = getattr(module, attr)
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == -n:
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kwargs)
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(module, attr, wrapped)


if __name__ == "__main__":
    target, n, sep, *cli = sys.argv[1:]
    assert sep == "--", "usage: MODULE.ATTR N -- CLI ARGS"
    arm(target, int(n))
    from secateurs.cli import main

    sys.exit(main(cli))
