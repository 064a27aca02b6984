#!/usr/bin/env python
"""How long each of the first steps after an idle pause takes: xpcnn's training step
(gradient + optimizer, batch 100, float32, the CPU's fast path) timed one by one after each
of `--pauses` sleeps of `--pause` seconds; prints the median of each position.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/steps_after_pause.py
    XPCNN_CPU_THREADS=1 python scripts/steps_after_pause.py          # one thread, for comparison

scripts/bench.py's default mode times one step after a 0.3 s pause (and one untimed step);
this shows the whole slow start, if there is one: a worker thread that slept through the
pause and was woken onto the calling thread's core runs beside it, not in parallel, until
the scheduler moves it (xpcnn/ops/cpu_threads.py keeps its workers off the caller's CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from xpcnn.backend import get_backend
from xpcnn.models import DeepConvNet, SimpleConvNet
from xpcnn.nn.optim import AdaGrad, Adam
from xpcnn.ops.cpu_threads import thread_count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["simple", "deep"], default="simple")
    p.add_argument("--pause", type=float, default=0.3, help="seconds idle before each series (default 0.3)")
    p.add_argument("--pauses", type=int, default=25, help="series timed (default 25)")
    p.add_argument("--steps", type=int, default=8, help="steps timed after each pause (default 8)")
    args = p.parse_args()
    if args.pause < 0 or args.pauses < 1 or args.steps < 1:
        p.error("--pause must be >= 0, --pauses and --steps >= 1")

    backend = get_backend("cpu")
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.random((100, 1, 28, 28), dtype=np.float32))
    t = backend.asarray(rng.integers(0, 10, 100))
    if args.model == "deep":
        net, optimizer = DeepConvNet(backend=backend, dtype="float32", seed=0), Adam(lr=0.001)
    else:
        net, optimizer = SimpleConvNet(backend=backend, dtype="float32", seed=0), AdaGrad(lr=0.06)

    def step() -> None:
        optimizer.update(net.params, net.gradient(x, t))

    for _ in range(10):                         # compile, warm the caches and the allocator
        step()
    series = []
    for _ in range(args.pauses):
        time.sleep(args.pause)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        series.append(times)
    medians = [statistics.median(column) for column in zip(*series)]
    print(f"{args.model}, {thread_count()} thread(s), {args.pauses} pause(s) of {args.pause} s: median ms of "
          f"steps 1..{args.steps} after the pause")
    print(" ".join(f"{m:.1f}" for m in medians))


if __name__ == "__main__":
    main()
