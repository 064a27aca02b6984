#!/usr/bin/env python
"""How far NumPy can go on DeepConvNet's convolutions: two measurements behind issue 18.

    python scripts/conv_floor.py                 # both parts (about a minute; needs torch)
    python scripts/conv_floor.py --part floor    # or: --part winograd

* ``floor``: the matrix products of every im2col convolution in a DeepConvNet training step
  (forward, dW, and dx except the first layer's), *and nothing else*: no window copies, no
  padding, no ReLU, pooling or optimizer. Each half of the batch runs on its own core with
  BLAS at one thread, chunk by chunk from one buffer per thread that stays in cache, exactly
  as `xpcnn/ops/fast_numpy.py` multiplies. Timed against PyTorch's *whole* training step
  (the book's DeepConvNet + Adam, `scripts/torch_models.py`), interleaved in one process,
  5 steps back to back per sample after a 0.3 s pause. If the products alone take most of
  PyTorch's step, no arrangement of NumPy calls around OpenBLAS reaches PyTorch's speed.
* ``winograd``: Winograd F(2x2, 3x3) written with NumPy (input transform as slice
  arithmetic on channels-last tiles, 16 batched products, output transform), against the
  im2col chunk it would replace (window copy + one product), one thread, per layer shape;
  prints the time of its batched product alone and its error against im2col.

Prints the BLAS kernel (threadpoolctl). Run with the machine's OpenBLAS pin removed where
one is set: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/conv_floor.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided
from threadpoolctl import threadpool_info, threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from xpcnn.ops.cpu_threads import run_over  # noqa: E402

N = 100
#: DeepConvNet's convolutions: (input channels, filters, input size, pad); 3x3, stride 1.
LAYERS = [(1, 16, 28, 1), (16, 16, 28, 1), (16, 32, 14, 1), (32, 32, 14, 2), (32, 64, 8, 1), (64, 64, 8, 1)]
CHUNK_BYTES = 2 << 20
#: Winograd F(2x2, 3x3): filter transform G (the input and output transforms are written out below).
G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def median_ms(function, repeats: int = 30) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# ------------------------------------------------------------------------------ floor

def products_of_a_step():
    """A function doing every product of one step's convolutions, halves of the batch on two cores."""
    layers = []
    for channels, filters, size, pad in LAYERS:
        rows_per_image = (size + 2 * pad - 2) ** 2
        chunk = max(1, CHUNK_BYTES // (rows_per_image * 9 * channels * 4))
        half = N // 2
        sizes = [min(chunk, half - start) * rows_per_image for start in range(0, half, chunk)]
        rng = np.random.default_rng(0)
        buffers = [(rng.random((max(sizes), 9 * channels), dtype=np.float32),     # im2col rows of x
                    rng.random((max(sizes), 9 * filters), dtype=np.float32),      # of the padded dout
                    rng.random((max(sizes), filters), dtype=np.float32),          # dout rows
                    np.empty((9 * channels, filters), dtype=np.float32)) for _ in range(2)]
        w_cols = rng.random((9 * channels, filters), dtype=np.float32)
        flipped = rng.random((9 * filters, channels), dtype=np.float32)

        def one_half(part, start, end, buffers=buffers, sizes=sizes, w_cols=w_cols, flipped=flipped,
                     input_gradient=channels > 1):
            columns, dout_columns, dout_rows, dW = buffers[part]
            for rows in sizes:
                columns[:rows] @ w_cols                              # forward
                np.matmul(columns[:rows].T, dout_rows[:rows], out=dW)   # dW
                if input_gradient:
                    dout_columns[:rows] @ flipped                    # dx
        layers.append(one_half)

    def step():
        for one_half in layers:
            run_over([(0, 1), (1, 2)], one_half)
    return step


def torch_step_function():
    import torch

    from xpcnn import DeepConvNet
    from xpcnn.backend import RandomSource, get_backend
    from xpcnn.nn.network import DROPOUT_STREAM, derived_seed

    from torch_models import TorchDeepConvNet

    net = DeepConvNet(backend="cpu", dtype="float32", seed=0)
    masks = RandomSource(get_backend("cpu"), derived_seed(0, DROPOUT_STREAM))
    twin = TorchDeepConvNet({k: np.asarray(v) for k, v in net.params.items()}, dropout_ratio=0.5,
                            mask_source=masks, dtype="float32", device="cpu")
    optimizer = torch.optim.Adam(twin.parameters(), lr=0.001)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((N, 1, 28, 28), dtype=np.float32))
    t = torch.from_numpy(rng.integers(0, 10, N))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(twin.forward(x, train=True), t).backward()
        optimizer.step()
    return step, torch


def floor(rounds: int) -> None:
    torch_step, torch = torch_step_function()
    torch.set_num_threads(2)
    contenders = {"products alone (xpcnn's slices)": products_of_a_step(), "torch whole step": torch_step}
    samples = {name: [] for name in contenders}
    for r in range(rounds):
        order = list(contenders.items())
        for name, step in (order if r % 2 else order[::-1]):
            time.sleep(0.3)
            step()
            start = time.perf_counter()
            for _ in range(5):
                step()
            samples[name].append((time.perf_counter() - start) / 5 * 1e3)
    print(f"\nDeepConvNet step, batch {N}, float32, {rounds} interleaved rounds of 5 steps (the first two dropped):")
    medians = {}
    for name, values in samples.items():
        medians[name] = statistics.median(values[2:])
        print(f"  {name:34s} median {medians[name]:6.1f} ms   min {min(values[2:]):6.1f} ms")
    products, whole = medians.values()
    print(f"  products alone / torch's whole step: {products / whole:.2f}")


# --------------------------------------------------------------------------- winograd

def winograd_forward(x_pad, U, out, V, M, S):
    """F(2x2, 3x3) on channels-last ``x_pad (n, H+2, W+2, C)`` (H, W even) into ``out (n, H, W, K)``."""
    n, padded_h, padded_w, channels = x_pad.shape
    tiles_h, tiles_w = (padded_h - 2) // 2, (padded_w - 2) // 2
    filters = U.shape[2]
    d = [x_pad[:, r:r + 2 * tiles_h:2] for r in range(4)]
    u = [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]        # B^T d, along rows
    tiles = V.reshape(16, n, tiles_h, tiles_w, channels)
    for a in range(4):                                               # ... B, along columns
        e = [u[a][:, :, s:s + 2 * tiles_w:2] for s in range(4)]
        np.subtract(e[0], e[2], out=tiles[4 * a])
        np.add(e[1], e[2], out=tiles[4 * a + 1])
        np.subtract(e[2], e[1], out=tiles[4 * a + 2])
        np.subtract(e[1], e[3], out=tiles[4 * a + 3])
    np.matmul(V, U, out=M)                                           # 16 products (tiles, C) @ (C, K)
    m = M.reshape(4, 4, -1)
    first, second = S[0], S[1]                                       # A^T m, along rows
    np.add(m[0], m[1], out=first)
    first += m[2]
    np.subtract(m[1], m[2], out=second)
    second -= m[3]
    y = out.reshape(n, tiles_h, 2, tiles_w, 2, filters)
    for i, s in enumerate((first, second)):                          # ... A, along columns
        s = s.reshape(4, n, tiles_h, tiles_w, filters)
        np.add(s[0], s[1], out=y[:, :, i, :, 0])
        y[:, :, i, :, 0] += s[2]
        np.subtract(s[1], s[2], out=y[:, :, i, :, 1])
        y[:, :, i, :, 1] -= s[3]


def winograd() -> None:
    print("\nForward of one chunk (about 2 MB of im2col rows), one thread; ms, medians of 30:")
    print(f"  {'layer':24s} {'im2col':>8s} {'winograd':>9s} {'its products':>13s} {'ratio':>6s} {'rel. error':>11s}")
    rng = np.random.default_rng(0)
    with threadpool_limits(limits=1, user_api="blas"):
        for channels, filters, size, pad in LAYERS[1:]:
            out_size = size + 2 * pad - 2
            images = max(1, CHUNK_BYTES // (out_size * out_size * 9 * channels * 4))
            x_pad = rng.random((images, out_size + 2, out_size + 2, channels), dtype=np.float32)
            weights = rng.standard_normal((filters, channels, 3, 3))
            U = np.einsum("ai,kcij,bj->abck", G, weights, G).reshape(16, channels, filters).astype(np.float32)
            tiles = images * (out_size // 2) ** 2
            V = np.empty((16, tiles, channels), np.float32)
            M = np.empty((16, tiles, filters), np.float32)
            S = np.empty((2, 4, tiles * filters), np.float32)
            out = np.empty((images, out_size, out_size, filters), np.float32)
            s = x_pad.strides
            windows = as_strided(x_pad, (images, out_size, out_size, 3, 3, channels),
                                 (s[0], s[1], s[2], s[1], s[2], s[3]))
            buffer = np.empty(windows.shape, np.float32)
            w_cols = np.ascontiguousarray(weights.transpose(2, 3, 1, 0)).reshape(-1, filters).astype(np.float32)
            rows = np.empty((images * out_size * out_size, filters), np.float32)

            def im2col():
                np.copyto(buffer, windows)
                np.matmul(buffer.reshape(-1, 9 * channels), w_cols, out=rows)

            im2col()
            winograd_forward(x_pad, U, out, V, M, S)
            error = float(np.abs(out.reshape(-1, filters) - rows).max() / np.abs(rows).max())
            plain = median_ms(im2col)
            fast = median_ms(lambda: winograd_forward(x_pad, U, out, V, M, S))
            products = median_ms(lambda: np.matmul(V, U, out=M))
            layer = f"{channels}->{filters}, {out_size}x{out_size}, n={images}"
            print(f"  {layer:24s} {plain:8.3f} {fast:9.3f} {products:13.3f} {fast / plain:6.2f} {error:11.1e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["floor", "winograd", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds of the floor part (default 12)")
    args = parser.parse_args()
    for pool in threadpool_info():
        if pool["user_api"] == "blas":
            print(f"BLAS: {pool['internal_api']} {pool['version']}, {pool.get('architecture')} kernel, "
                  f"{pool['num_threads']} threads ({pool['filepath'].rsplit('/', 1)[-1]})")
    if args.part in ("floor", "both"):
        floor(args.rounds)
    if args.part in ("winograd", "both"):
        winograd()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
