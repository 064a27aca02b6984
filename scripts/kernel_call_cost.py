#!/usr/bin/env python
"""What a call of a compiled CPU kernel costs from Python: `kernel_cache.Kernel` (the wrapper
every fast_numba kernel is called through) against Numba's dispatcher alone, on a kernel
that does almost nothing (`fast_numba._sgd` over 10 values), best of 5 runs of 20,000 calls.

    python scripts/kernel_call_cost.py

DeepConvNet's step calls about 600 kernels, from two threads that share Python's GIL: what
the wrapper spends in Python, both threads wait for (docs/performance.md, 2026-12-07).
"""

from __future__ import annotations

import time

import numpy as np

from xpcnn.ops import fast_numba


def per_call(function, args: tuple, calls: int = 20_000, runs: int = 5) -> float:
    """Seconds per call, the best of `runs` runs."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            function(*args)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> int:
    param, grad = np.zeros(1000, dtype=np.float32), np.ones(1000, dtype=np.float32)
    args = (param, grad, np.float32(0.1), 0, 10)
    kernel = fast_numba._sgd
    kernel(*args)                                     # compiled (or loaded) before timing
    wrapped, bare = per_call(kernel, args), per_call(kernel.dispatcher, args)
    print(f"kernel_cache.Kernel   {wrapped * 1e6:6.2f} us a call")
    print(f"Numba's dispatcher    {bare * 1e6:6.2f} us a call")
    print(f"the wrapper's own     {(wrapped - bare) * 1e6:6.2f} us a call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
