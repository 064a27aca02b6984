#!/usr/bin/env python
"""Time DeepConvNet's convolution shapes (batch 100, float32) with each im2col layout of the
reference convolution (`xpcnn.ops`), against PyTorch's F.conv2d, in one process.

    OPENBLAS_NUM_THREADS=1 python scripts/bench_conv_layouts.py --threads 1 --repeats 9

per-image:   (N, C*FH*FW, OH*OW) columns, N small products, col2im by strided adds
             (the layout chosen for SimpleConvNet's single input channel);
whole-batch: (C*FH*FW, N*OH*OW) columns, one large product; for stride 1 the input gradient
             as a convolution of dout with the flipped filters.
Each figure is the minimum over interleaved repeats, in ms (forward; backward with the input
gradient).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import array_api_compat.numpy as xp  # noqa: E402
from xpcnn import ops  # noqa: E402

SHAPES = [  # (layer, C, H=W, FN, pad) of DeepConvNet on 28x28 images
    ("conv2", 16, 28, 16, 1), ("conv3", 16, 14, 32, 1), ("conv4", 32, 14, 32, 2),
    ("conv5", 32, 8, 64, 1), ("conv6", 64, 8, 64, 1),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (set OPENBLAS_NUM_THREADS for numpy)")
    args = parser.parse_args()
    try:
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print("| layer | input | per-image fwd | per-image bwd | whole-batch fwd | whole-batch bwd | torch fwd | torch fwd+bwd |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    chooser = ops.per_image_layout_wins
    for name, c, hw, fn, pad in SHAPES:
        x = rng.standard_normal((100, c, hw, hw), dtype=np.float32)
        W = (rng.standard_normal((fn, c, 3, 3)) * 0.1).astype(np.float32)
        b = np.zeros(fn, np.float32)
        oh = hw + 2 * pad - 2
        dout = rng.standard_normal((100, fn, oh, oh), dtype=np.float32)
        timings: dict[str, list[float]] = {}
        results = {}

        def run(key, per_image):
            ops.per_image_layout_wins = (lambda channels: True) if per_image else chooser
            t0 = time.perf_counter()
            out, cache = ops.conv2d_forward(xp, x, W, b, 1, pad, oh, oh)
            t1 = time.perf_counter()
            dx, dW, _ = ops.conv2d_backward(xp, dout, cache, W, 1, pad, True)
            t2 = time.perf_counter()
            timings.setdefault(key + " fwd", []).append(t1 - t0)
            timings.setdefault(key + " bwd", []).append(t2 - t1)
            results[key] = (np.asarray(out), np.asarray(dx), dW)

        def run_torch():
            xt = torch.from_numpy(x).requires_grad_()
            wt = torch.from_numpy(W).requires_grad_()
            bt = torch.from_numpy(b).requires_grad_()
            t0 = time.perf_counter()
            with torch.no_grad():
                F.conv2d(xt, wt, bt, padding=pad)
            t1 = time.perf_counter()
            torch.autograd.grad(F.conv2d(xt, wt, bt, padding=pad), (xt, wt, bt), torch.from_numpy(dout))
            t2 = time.perf_counter()
            timings.setdefault("torch fwd", []).append(t1 - t0)
            timings.setdefault("torch fwd+bwd", []).append(t2 - t1)

        for _ in range(args.repeats + 1):          # the first round is a warm-up
            run("per-image", True)
            run("whole-batch", False)
            if torch is not None:
                run_torch()
        ops.per_image_layout_wins = chooser
        for a, bb in zip(results["per-image"], results["whole-batch"]):
            np.testing.assert_allclose(a, bb, rtol=1e-3, atol=1e-3)
        best = {k: min(v[1:]) * 1e3 for k, v in timings.items()}
        cells = [f"{best.get(k, float('nan')):.1f}" for k in ("per-image fwd", "per-image bwd", "whole-batch fwd",
                                                               "whole-batch bwd", "torch fwd", "torch fwd+bwd")]
        print(f"| {name} | {c}x{hw}x{hw} -> {fn}, pad {pad} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
