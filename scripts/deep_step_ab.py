#!/usr/bin/env python
"""DeepConvNet's training step on the CPU (gradient + Adam, batch 100, float32, compiled
kernels) with Winograd's 3 x 3 convolutions (`fast_numba.WINOGRAD = True`) and without
(the chunked window copies), and torch eager's step on the same net, in ONE process,
alternating rounds (the order rotating), with the contenders, data and timing of
scripts/bench.py.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/deep_step_ab.py --rounds 30

Prints each contender's median ms per step (quartiles), and the ratios winograd / chunked,
winograd / torch and chunked / torch (< 1: faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2, help="BLAS, xpcnn and torch threads (default 2)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed sample (default 5)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--settle", type=float, default=0.3, help="pause before each sample (as scripts/bench.py)")
    return p.parse_args()


ARGS = parse_args()
# scripts/bench.py reads its options from the command line when imported (and sets the BLAS
# threads before NumPy loads): it is handed DeepConvNet's.
sys.argv = [sys.argv[0], "--model", "deep", "--threads", str(ARGS.threads), "--eval-images", "100"]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from xpcnn.ops import fast_numba  # noqa: E402


class Switched(bench.XpcnnContender):
    """xpcnn's step with `fast_numba.WINOGRAD` set for it."""

    def __init__(self, winograd: bool, *a):
        super().__init__(*a, name="winograd" if winograd else "chunked")
        self.winograd = winograd

    def step(self):
        fast_numba.WINOGRAD = self.winograd
        super().step()


def main() -> int:
    args, bench_args = ARGS, bench.ARGS
    threadpool_limits(limits=args.threads, user_api="blas")
    bench.set_torch_threads(args.threads)
    params, data = bench.initial_params(bench_args), bench.make_data(bench_args)
    contenders = [Switched(True, bench_args, params, *data), Switched(False, bench_args, params, *data),
                  bench.build(bench_args, "torch", params, data)]
    for c in contenders:
        for _ in range(args.warmup):
            c.step()
    samples = bench.round_robin(contenders, args.rounds, lambda c: bench.time_samples(c, args.steps, args.settle))
    medians = {}
    print(f"DeepConvNet step, batch 100, float32, {args.threads} threads, {args.rounds} rounds x {args.steps} "
          f"steps, load average {bench.load_average()}")
    for name, values in samples.items():
        s = bench.summarize(values)
        medians[name] = s["median"]
        print(f"  {name:9s} {1e3 * s['median']:7.2f} ms  (q1 {1e3 * s['q1']:.2f}, q3 {1e3 * s['q3']:.2f})")
    for a, b in (("winograd", "chunked"), ("winograd", "torch"), ("chunked", "torch")):
        print(f"  {a} / {b}: {medians[a] / medians[b]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
