#!/usr/bin/env python
"""Time DeepConvNet's convolution shapes (batch 100, float32) with each convolution layout
xpcnn has on NumPy, against PyTorch's F.conv2d, in one process.

    python scripts/bench_conv_layouts.py --threads 2 --repeats 9

per-image:     reference `ops.conv2d_*` with the per-image im2col layout,
               (N, C*FH*FW, OH*OW) columns, N small products, col2im by strided adds;
whole-batch:   reference with the whole-batch layout, (C*FH*FW, N*OH*OW) columns, one large
               product; for stride 1 the input gradient as a convolution of dout;
channels-last: NumPy's fast path (`xpcnn/fast_numpy.py`): (N, H, W, C) memory, the columns
               of a few images at a time, stride-1 input gradient as a convolution;
torch:         F.conv2d forward (no_grad), and forward + backward (input, weight and bias
               gradients) for "fwd+bwd";
products:      only the three matrix products of channels-last's forward and backward
               (columns @ filters, columns.T @ dout for dW, dout's columns @ flipped filters
               for dx) on prebuilt columns: what NumPy's BLAS needs for the arithmetic alone,
               a floor for any im2col convolution on it.
Each input is given in the layout its contender produces for the next layer. Each figure
is the minimum over interleaved repeats, in ms (forward; backward with the input gradient,
except for conv1, the network's first layer, whose input gradient nobody needs). Before
each timing the script pauses `--settle` seconds so the other library's spinning worker
threads have parked.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import array_api_compat.numpy as xp  # noqa: E402

from xpcnn.ops import fast_numpy  # noqa: E402
from xpcnn.ops import reference as ops  # noqa: E402

SHAPES = [  # (layer, C, H=W, FN, pad) of DeepConvNet on 28x28 images
    ("conv1", 1, 28, 16, 1), ("conv2", 16, 28, 16, 1), ("conv3", 16, 14, 32, 1), ("conv4", 32, 14, 32, 2),
    ("conv5", 32, 8, 64, 1), ("conv6", 64, 8, 64, 1),
]
LAYOUTS = ("per-image", "whole-batch", "channels-last")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for NumPy's BLAS (via threadpoolctl, if installed) and torch")
    parser.add_argument("--settle", type=float, default=0.2, help="seconds of pause before each timing")
    args = parser.parse_args()
    if args.threads is not None:
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(limits=args.threads, user_api="blas")
        except ImportError:
            print("threadpoolctl not installed: NumPy's BLAS keeps its own thread count", file=sys.stderr)
    try:
        import torch
        import torch.nn.functional as F
        if args.threads is not None:
            torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print("| layer | input | " + " | ".join(f"{k} fwd | {k} bwd" for k in LAYOUTS + ("products",))
          + " | torch fwd | torch fwd+bwd |")
    print("| --- | --- |" + " ---: |" * (2 * len(LAYOUTS) + 4))
    totals: dict[str, float] = {}
    for name, c, hw, fn, pad in SHAPES:
        x = rng.standard_normal((100, c, hw, hw), dtype=np.float32)
        W = (rng.standard_normal((fn, c, 3, 3)) * 0.1).astype(np.float32)
        b = np.zeros(fn, np.float32)
        oh = hw + 2 * pad - 2
        dout = rng.standard_normal((100, fn, oh, oh), dtype=np.float32)
        need_input_grad = name != "conv1"
        # The layout each contender's previous layer hands on: NCHW, a (C, N, H, W) memory
        # seen as NCHW, an (N, H, W, C) memory seen as NCHW.
        cn = lambda a: np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)  # noqa: E731
        last = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # noqa: E731
        inputs = {"per-image": (x, dout), "whole-batch": (cn(x), cn(dout)), "channels-last": (last(x), last(dout))}
        timings: dict[str, list[float]] = {}
        results = {}

        def run(layout):
            forward, backward = ((fast_numpy.conv2d_forward, fast_numpy.conv2d_backward) if layout == "channels-last"
                                 else (ops.conv2d_forward, ops.conv2d_backward))
            ops.per_image_layout_wins = (lambda channels: layout == "per-image")
            xin, din = inputs[layout]
            time.sleep(args.settle)
            t0 = time.perf_counter()
            out, cache = forward(xp, xin, W, b, 1, pad, oh, oh)
            t1 = time.perf_counter()
            dx, dW, _ = backward(xp, din, cache, W, 1, pad, need_input_grad)
            t2 = time.perf_counter()
            timings.setdefault(layout + " fwd", []).append(t1 - t0)
            timings.setdefault(layout + " bwd", []).append(t2 - t1)
            results[layout] = (np.asarray(out), None if dx is None else np.asarray(dx), dW)

        def run_torch():
            xt = torch.from_numpy(x).requires_grad_(need_input_grad)
            wt = torch.from_numpy(W).requires_grad_()
            bt = torch.from_numpy(b).requires_grad_()
            time.sleep(args.settle)
            t0 = time.perf_counter()
            with torch.no_grad():
                F.conv2d(xt, wt, bt, padding=pad)
            t1 = time.perf_counter()
            wanted = (xt, wt, bt) if need_input_grad else (wt, bt)
            torch.autograd.grad(F.conv2d(xt, wt, bt, padding=pad), wanted, torch.from_numpy(dout))
            t2 = time.perf_counter()
            timings.setdefault("torch fwd", []).append(t1 - t0)
            timings.setdefault("torch fwd+bwd", []).append(t2 - t1)

        # The floor: the products alone, on columns built beforehand (whole batch at once).
        x_pad = fast_numpy._padded(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), pad, pad)
        columns = np.ascontiguousarray(fast_numpy._windows(x_pad, 3, 3, 1, oh, oh)).reshape(-1, 9 * c)
        d_rows = np.ascontiguousarray(dout.transpose(0, 2, 3, 1)).reshape(-1, fn)
        d_pad = fast_numpy._padded(np.ascontiguousarray(dout.transpose(0, 2, 3, 1)), 2 - pad, 2 - pad)
        d_columns = (np.ascontiguousarray(fast_numpy._windows(d_pad, 3, 3, 1, hw, hw)).reshape(-1, 9 * fn)
                     if need_input_grad and pad < 3 else None)
        w_cols = np.ascontiguousarray(W.transpose(2, 3, 1, 0)).reshape(-1, fn)
        flipped = np.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)).reshape(-1, c)

        def run_products():
            time.sleep(args.settle)
            t0 = time.perf_counter()
            np.matmul(columns, w_cols)
            t1 = time.perf_counter()
            np.matmul(columns.T, d_rows)
            if d_columns is not None:
                np.matmul(d_columns, flipped)
            t2 = time.perf_counter()
            timings.setdefault("products fwd", []).append(t1 - t0)
            timings.setdefault("products bwd", []).append(t2 - t1)

        chooser = ops.per_image_layout_wins
        try:
            for _ in range(args.repeats + 1):          # the first round is a warm-up
                for layout in LAYOUTS:
                    run(layout)
                run_products()
                if torch is not None:
                    run_torch()
        finally:
            ops.per_image_layout_wins = chooser
        for layout in LAYOUTS[1:]:
            for a, bb in zip(results["per-image"], results[layout]):
                if a is not None:
                    np.testing.assert_allclose(a, bb, rtol=1e-3, atol=1e-3)
        best = {k: min(v[1:]) * 1e3 for k, v in timings.items()}
        for k, v in best.items():
            totals[k] = totals.get(k, 0.0) + v
        keys = [f"{k} {p}" for k in LAYOUTS + ("products",) for p in ("fwd", "bwd")] + ["torch fwd", "torch fwd+bwd"]
        cells = [f"{best.get(k, float('nan')):.1f}" for k in keys]
        print(f"| {name} | {c}x{hw}x{hw} -> {fn}, pad {pad} | " + " | ".join(cells) + " |", flush=True)
    keys = [f"{k} {p}" for k in LAYOUTS + ("products",) for p in ("fwd", "bwd")] + ["torch fwd", "torch fwd+bwd"]
    print("| sum | | " + " | ".join(f"{totals.get(k, float('nan')):.1f}" for k in keys) + " |")
    for layout in LAYOUTS + ("products",):
        both = totals[f"{layout} fwd"] + totals[f"{layout} bwd"]
        line = f"{layout}: forward + backward {both:.1f} ms"
        if "torch fwd+bwd" in totals:
            line += f", {both / totals['torch fwd+bwd']:.2f}x torch's forward + backward"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
