#!/usr/bin/env python
"""DeepConvNet's 3 x 3 convolutions one by one: forward and backward ms of the compiled
kernels' Winograd path (`fast_numba.WINOGRAD = True`) against the chunked window copies
(False), alternating in one process; batch 100, float32, the fused conv + ReLU (+ 2 x 2
pooling) entries as the net calls them (backward with the input gradient, as layers 2-6).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/conv3x3_study.py --rounds 30
    python scripts/conv3x3_study.py --chunk-bytes 262144 524288 1048576 2097152   # Winograd chunk sizes
"""

from __future__ import annotations

import argparse
import statistics
import time

import array_api_compat.numpy as xp
import numpy as np

from xpcnn.ops import fast_numba

#: (name, C, H, K, pad, pooled) of DeepConvNet's multi-channel convolutions (and its first).
#: conv4's pad of 2 makes its output 16 x 16, so conv5 and conv6 run at 8 x 8 (until commit
#: 3d2857f this list had them at 7 x 7, conv6 with its pooling apart: not the net's shapes).
LAYERS = [("conv1 1->16 28", 1, 28, 16, 1, False), ("conv2 16->16 28 +pool", 16, 28, 16, 1, True),
          ("conv3 16->32 14", 16, 14, 32, 1, False), ("conv4 32->32 14 pad2 +pool", 32, 14, 32, 2, True),
          ("conv5 32->64 8", 32, 8, 64, 1, False), ("conv6 64->64 8 +pool", 64, 8, 64, 1, True)]


def layer_times(layer: tuple, rng, batch: int, dtype: str) -> tuple:
    """One forward and one backward (seconds) of `layer` on the current path."""
    _, c, h, k, pad, pooled = layer
    out = h + 2 * pad - 2
    x = rng.standard_normal((batch, h, h, c)).astype(dtype).transpose(0, 3, 1, 2)   # channels-last, as handed on
    W, b = (rng.standard_normal((k, c, 3, 3)) * 0.1).astype(dtype), rng.standard_normal(k).astype(dtype)
    t0 = time.perf_counter()
    if pooled:
        y, cache = fast_numba.conv2d_relu_maxpool2d_forward(xp, x, W, b, 1, pad, out, out,
                                                             (2, 2, 2, 0, out // 2, out // 2))
    else:
        y, cache = fast_numba.conv2d_relu_forward(xp, x, W, b, 1, pad, out, out)
    t1 = time.perf_counter()
    dout = np.ones_like(y)
    backward = fast_numba.conv2d_relu_maxpool2d_backward if pooled else fast_numba.conv2d_relu_backward
    backward(xp, dout, cache, W, 1, pad, c > 1)
    return t1 - t0, time.perf_counter() - t1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk-bytes", type=int, nargs="*", default=[],
                   help="Winograd chunk sizes (WINOGRAD_CHUNK_BYTES) to compare instead of the chunked path")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    variants = ([("winograd %d" % size, True, size) for size in args.chunk_bytes] if args.chunk_bytes else
                [("winograd", True, fast_numba.WINOGRAD_CHUNK_BYTES), ("chunked", False, None)])
    times = {(layer[0], v[0]): ([], []) for layer in LAYERS for v in variants}
    for r in range(args.rounds + 2):                   # two warm-up rounds (compilation)
        for layer in LAYERS:
            for name, on, size in variants[r % len(variants):] + variants[:r % len(variants)]:
                fast_numba.WINOGRAD = on
                fast_numba.WINOGRAD_CHUNK_BYTES = size or fast_numba.WINOGRAD_CHUNK_BYTES
                forward, backward = layer_times(layer, rng, args.batch, args.dtype)
                if r >= 2:
                    times[layer[0], name][0].append(forward)
                    times[layer[0], name][1].append(backward)
    print(f"median ms over {args.rounds} rounds, batch {args.batch}, {args.dtype}")
    print(f"{'layer':28s}" + "".join(f"{name:>24s}" for name, _, _ in variants) + "   (forward / backward)")
    for layer in LAYERS:
        cells = [times[layer[0], name] for name, _, _ in variants]
        print(f"{layer[0]:28s}" + "".join(f"{1e3 * statistics.median(f):11.2f} /{1e3 * statistics.median(b):9.2f} "
                                          for f, b in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
