"""onnxruntime timing in a process of its own: ``python -m secateurs._ort_timer DIR REPEATS WARMUP THREADS NAME...``.

Sessions that are timed interleaved need one shared intra-op pool: with a pool per session, the
idle session's workers spin and steal the cores from the one being timed, and with spinning off
every parallel op pays a thread wake-up (mobilenet_v2 at batch 1, 2 threads: 6.0-7.7 ms dense
without spinning, 5.0-5.4 ms with one shared spinning pool, as a deployed session runs). A shared
pool must be made before onnxruntime's first session in a process and then binds every later
session to it, so it lives here, in a fresh process, not in the user's.

Reads ``DIR/NAME.onnx`` and ``DIR/inputs.npz``; prints ``{name: [seconds per round]}`` as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    import numpy as np
    import onnxruntime as ort

    from .latency import time_callables

    folder, repeats, warmup, threads, names = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), argv[4:]
    ort.set_global_thread_pool_sizes(threads, 1)
    opts = ort.SessionOptions()
    opts.use_per_session_threads = False
    inputs = np.load(folder / "inputs.npz")
    run = {}
    for name in names:
        sess = ort.InferenceSession(str(folder / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
        feeds = {i.name: inputs[f"arr_{k}"] for k, i in enumerate(sess.get_inputs())}
        run[name] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
    print(json.dumps(time_callables(run, repeats, warmup)))


if __name__ == "__main__":
    main(sys.argv[1:])
