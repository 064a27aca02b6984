#!/usr/bin/env python
"""Benchmark one xpcnn training step against the book's algorithm and PyTorch.

    python scripts/bench.py                      # CPU, float32, batch 100
    python scripts/bench.py --backend gpu        # CuPy vs book-on-CuPy vs torch CUDA
    python scripts/bench.py --backend torch      # xpcnn on torch tensors vs torch eager (CPU)
    python scripts/bench.py --backend torch:cuda # the same on a CUDA GPU (torch:mps on Apple)
    python scripts/bench.py --dtype float64 --repeats 50 --json out/bench.json
    python scripts/bench.py --model deep --no-memory  # DeepConvNet + Adam vs torch (no book code)

What is timed, in one process, interleaved round-robin (the order rotates every round,
warm-up steps excluded):

* ``xpcnn``    ``net.gradient(x, t)`` + ``AdaGrad(lr=0.06).update(net.params, grads)`` on
               SimpleConvNet with the book's defaults, on the chosen backend (with
               ``--backend torch``: xpcnn's array-API code running on torch tensors, and
               ``xpcnn-numpy``, the same code on NumPy, for comparison on the CPU);
* ``book-f64`` the book's own algorithm (K*K-slice im2col/col2im through the
               ``(N, C, FH, FW, OH, OW)`` buffer and its transpose, argmax pooling with
               an index scatter, Affine/ReLU/SoftmaxWithLoss and AdaGrad as in the book),
               written out in this file, in float64 as the seed ran it; ``book-f32`` is the
               same code in float32 (added when ``--dtype float32``; NumPy/CuPy only);
* ``xpcnn-graph`` (``--backend gpu``) the same step replayed as a CUDA graph
               (``net.compile_step``, what ``xpcnn train --cuda-graph`` runs);
* ``torch``    the same network in PyTorch eager mode (nn.Conv2d/MaxPool2d/Linear,
               F.cross_entropy, torch.optim.Adagrad), same initial weights, batch, dtype and
               device, when torch is importable.

Then evaluation throughput on 10,000 images (xpcnn ``net.accuracy`` vs torch ``no_grad``
forward in batches), and peak memory of each contender measured in a fresh subprocess
(RSS from ``resource.getrusage`` on the CPU; CuPy's memory pool and
``torch.cuda.max_memory_allocated`` on the GPU). Data are random, with a fixed seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="cpu",
                   help="cpu (NumPy), gpu (CuPy), torch, torch:cuda or torch:mps (xpcnn on torch tensors)")
    p.add_argument("--model", choices=["simple", "deep"], default="simple",
                   help="simple: SimpleConvNet + AdaGrad (default); deep: the book's DeepConvNet + Adam lr 0.001, "
                        "dropout 0.5 with identical masks on both sides")
    p.add_argument("--batch-size", type=int, default=100, help="training batch (default 100)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds per contender (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per contender first (default 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numpy's BLAS and for torch (default: what numpy's BLAS uses)")
    p.add_argument("--eval-images", type=int, default=10_000)
    p.add_argument("--eval-batch-size", type=int, nargs="+", default=[100, 500],
                   help="evaluation batch size(s) (default: 100, accuracy()'s default, and 500, the Trainer's)")
    p.add_argument("--eval-repeats", type=int, default=5)
    p.add_argument("--no-book", action="store_true", help="skip the book reference")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--profile", action="store_true",
                   help="also time xpcnn's step layer by layer (forward/backward of each, the optimizer) "
                        "and count its array-library calls per step")
    p.add_argument("--reference", action="store_true",
                   help="run xpcnn on the array-API reference code (no fast paths of the backend)")
    p.add_argument("--cpu-kernels", choices=["numba", "numpy"], default=None,
                   help="NumPy's fast path: compiled kernels (numba, the default) or NumPy's calls only (numpy); "
                        "sets XPCNN_CPU_KERNELS")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-sample", type=int, default=None,
                   help="training steps timed back to back in each sample (default: 1 on the CPU, about 20 ms "
                        "of steps on a GPU); several measure the steady state of a training loop, where no "
                        "pause ever lets the cores go idle")
    p.add_argument("--settle", type=float, default=None,
                   help="seconds of pause before each timed sample, so the previous contender's idle "
                        "worker threads (OpenBLAS and OpenMP spin for up to ~0.1-0.2 s after a call) stop "
                        "taking the cores (default: 0.3 on the CPU, 0 on a GPU)")
    p.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch_size", "repeats", "eval_images", "eval_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.eval_batch_size) < 1:
        p.error(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    if args.settle is not None and args.settle < 0:
        p.error(f"--settle must be >= 0, got {args.settle}")
    if args.steps_per_sample is not None and args.steps_per_sample < 1:
        p.error(f"--steps-per-sample must be >= 1, got {args.steps_per_sample}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.backend not in ("cpu", "gpu") and args.backend.partition(":")[0] != "torch":
        p.error(f"--backend must be cpu, gpu, torch or torch:DEVICE, got {args.backend!r}")
    return args


def torch_backend(args) -> bool:
    """Whether xpcnn itself runs on torch tensors (``--backend torch[:DEVICE]``)."""
    return args.backend.partition(":")[0] == "torch"


def device_kind(args) -> str:
    """Where the contenders run: ``"cpu"``, ``"cuda"`` or ``"mps"``."""
    if args.backend == "gpu":
        return "cuda"
    if torch_backend(args):
        return get_backend(args.backend).device.type
    return "cpu"


ARGS = parse_args()
if ARGS.cpu_kernels is not None:
    os.environ["XPCNN_CPU_KERNELS"] = ARGS.cpu_kernels
if ARGS.threads is not None:
    # Must happen before numpy (and its OpenBLAS) is first imported.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import resource  # noqa: E402

import numpy as np  # noqa: E402

try:
    import xpcnn  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from xpcnn.backend import get_backend  # noqa: E402
from xpcnn.models import SimpleConvNet  # noqa: E402
from xpcnn.nn.optim import AdaGrad  # noqa: E402
from xpcnn.ops import ops_of  # noqa: E402

try:
    from xpcnn.ops.table import describe as describe_table  # noqa: E402
except ImportError:  # an xpcnn from before 2026-12-06 (one kind of CPU kernels)
    describe_table = None

try:
    from xpcnn.ops import cpu_threads  # noqa: E402
except ImportError:  # an xpcnn from before 2026-11-29 (scripts/bench.py run against an older checkout)
    cpu_threads = None

LR = 0.06


# =========================================================================== the book
# The book's code ("Deep Learning from Scratch", common/util.py and common/layers.py),
# kept as close to it as the comparison allows. `np` is a parameter so the same code runs
# on CuPy, as the book's GPU configuration does with `import cupy as np`; `dtype` is
# float64 for the book as written (its np.zeros default).

def book_im2col(np, input_data, filter_h, filter_w, stride=1, pad=0):
    N, C, H, W = input_data.shape
    out_h = (H + 2 * pad - filter_h) // stride + 1
    out_w = (W + 2 * pad - filter_w) // stride + 1
    img = np.pad(input_data, [(0, 0), (0, 0), (pad, pad), (pad, pad)], "constant")
    col = np.zeros((N, C, filter_h, filter_w, out_h, out_w), dtype=input_data.dtype)
    for y in range(filter_h):
        y_max = y + stride * out_h
        for x in range(filter_w):
            x_max = x + stride * out_w
            col[:, :, y, x, :, :] = img[:, :, y:y_max:stride, x:x_max:stride]
    col = col.transpose(0, 4, 5, 1, 2, 3).reshape(N * out_h * out_w, -1)
    return col


def book_col2im(np, col, input_shape, filter_h, filter_w, stride=1, pad=0):
    N, C, H, W = input_shape
    out_h = (H + 2 * pad - filter_h) // stride + 1
    out_w = (W + 2 * pad - filter_w) // stride + 1
    col = col.reshape(N, out_h, out_w, C, filter_h, filter_w).transpose(0, 3, 4, 5, 1, 2)
    img = np.zeros((N, C, H + 2 * pad + stride - 1, W + 2 * pad + stride - 1), dtype=col.dtype)
    for y in range(filter_h):
        y_max = y + stride * out_h
        for x in range(filter_w):
            x_max = x + stride * out_w
            img[:, :, y:y_max:stride, x:x_max:stride] += col[:, :, y, x, :, :]
    return img[:, :, pad:H + pad, pad:W + pad]


class BookConvolution:
    def __init__(self, np, W, b, stride=1, pad=0):
        self.np, self.W, self.b, self.stride, self.pad = np, W, b, stride, pad

    def forward(self, x):
        np = self.np
        FN, C, FH, FW = self.W.shape
        N, C, H, W = x.shape
        out_h = 1 + int((H + 2 * self.pad - FH) / self.stride)
        out_w = 1 + int((W + 2 * self.pad - FW) / self.stride)
        col = book_im2col(np, x, FH, FW, self.stride, self.pad)
        col_W = self.W.reshape(FN, -1).T
        out = np.dot(col, col_W) + self.b
        out = out.reshape(N, out_h, out_w, -1).transpose(0, 3, 1, 2)
        self.x, self.col, self.col_W = x, col, col_W
        return out

    def backward(self, dout):
        np = self.np
        FN, C, FH, FW = self.W.shape
        dout = dout.transpose(0, 2, 3, 1).reshape(-1, FN)
        self.db = np.sum(dout, axis=0)
        self.dW = np.dot(self.col.T, dout)
        self.dW = self.dW.transpose(1, 0).reshape(FN, C, FH, FW)
        dcol = np.dot(dout, self.col_W.T)
        # The book computes the first layer's input gradient too.
        return book_col2im(np, dcol, self.x.shape, FH, FW, self.stride, self.pad)


class BookPooling:
    def __init__(self, np, pool_h, pool_w, stride=1, pad=0):
        self.np, self.pool_h, self.pool_w, self.stride, self.pad = np, pool_h, pool_w, stride, pad

    def forward(self, x):
        np = self.np
        N, C, H, W = x.shape
        out_h = int(1 + (H - self.pool_h) / self.stride)
        out_w = int(1 + (W - self.pool_w) / self.stride)
        col = book_im2col(np, x, self.pool_h, self.pool_w, self.stride, self.pad)
        col = col.reshape(-1, self.pool_h * self.pool_w)
        arg_max = np.argmax(col, axis=1)
        out = np.max(col, axis=1)
        out = out.reshape(N, out_h, out_w, C).transpose(0, 3, 1, 2)
        self.x, self.arg_max = x, arg_max
        return out

    def backward(self, dout):
        np = self.np
        dout = dout.transpose(0, 2, 3, 1)
        pool_size = self.pool_h * self.pool_w
        dmax = np.zeros((dout.size, pool_size), dtype=dout.dtype)
        dmax[np.arange(self.arg_max.size), self.arg_max.flatten()] = dout.flatten()
        dmax = dmax.reshape(dout.shape + (pool_size,))
        dcol = dmax.reshape(dmax.shape[0] * dmax.shape[1] * dmax.shape[2], -1)
        return book_col2im(np, dcol, self.x.shape, self.pool_h, self.pool_w, self.stride, self.pad)


class BookRelu:
    def forward(self, x):
        self.mask = (x <= 0)
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):
        dout[self.mask] = 0
        return dout


class BookAffine:
    def __init__(self, np, W, b):
        self.np, self.W, self.b = np, W, b

    def forward(self, x):
        self.original_x_shape = x.shape
        x = x.reshape(x.shape[0], -1)
        self.x = x
        return self.np.dot(self.x, self.W) + self.b

    def backward(self, dout):
        np = self.np
        dx = np.dot(dout, self.W.T)
        self.dW = np.dot(self.x.T, dout)
        self.db = np.sum(dout, axis=0)
        return dx.reshape(*self.original_x_shape)


class BookSoftmaxWithLoss:
    def __init__(self, np):
        self.np = np

    def forward(self, x, t):
        np = self.np
        self.t = t
        xt = x.T
        xt = xt - np.max(xt, axis=0)
        self.y = (np.exp(xt) / np.sum(np.exp(xt), axis=0)).T
        batch_size = self.y.shape[0]
        self.loss = -np.sum(np.log(self.y[np.arange(batch_size), t] + 1e-7)) / batch_size
        return self.loss

    def backward(self, dout=1):
        np = self.np
        batch_size = self.t.shape[0]
        dx = self.y.copy()
        dx[np.arange(batch_size), self.t] -= 1
        return dx / batch_size


class BookAdaGrad:
    def __init__(self, np, lr=0.01):
        self.np, self.lr, self.h = np, lr, None

    def update(self, params, grads):
        np = self.np
        if self.h is None:
            self.h = {key: np.zeros_like(val) for key, val in params.items()}
        for key in params.keys():
            self.h[key] += grads[key] * grads[key]
            params[key] -= self.lr * grads[key] / (np.sqrt(self.h[key]) + 1e-7)


class BookSimpleConvNet:
    """The book's SimpleConvNet with the given initial weights (host NumPy arrays)."""

    def __init__(self, np, host_params: dict, dtype: str):
        self.np = np
        self.params = {k: np.asarray(v, dtype=dtype) for k, v in host_params.items()}
        p = self.params
        self.layers = [BookConvolution(np, p["W1"], p["b1"], 1, 0), BookRelu(),
                       BookPooling(np, 2, 2, stride=2), BookAffine(np, p["W2"], p["b2"]),
                       BookRelu(), BookAffine(np, p["W3"], p["b3"])]
        self.last_layer = BookSoftmaxWithLoss(np)

    def predict(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def loss(self, x, t):
        return self.last_layer.forward(self.predict(x), t)

    def gradient(self, x, t):
        self.loss(x, t)
        dout = self.last_layer.backward(1)
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        conv, a1, a2 = self.layers[0], self.layers[3], self.layers[5]
        return {"W1": conv.dW, "b1": conv.db, "W2": a1.dW, "b2": a1.db, "W3": a2.dW, "b3": a2.db}


# ======================================================================= contenders

class Contender:
    """A named training step (`step`), a batched evaluation (`evaluate`) and a clock sync."""

    name = ""
    note = ""

    def step(self) -> None:
        raise NotImplementedError

    def loss_value(self) -> float:
        raise NotImplementedError

    def evaluate(self) -> float:
        return float("nan")

    def can_evaluate(self) -> bool:
        return False

    def sync(self) -> None:
        pass


class XpcnnContender(Contender):
    name = "xpcnn"

    def __init__(self, args, host_params, x, t, x_eval, t_eval, backend_name=None, name="xpcnn"):
        self.name = name
        self.backend = get_backend(backend_name or args.backend, reference=args.reference)
        self.note = f"xpcnn on {self.backend} {args.dtype}" + (" (reference path)" if args.reference else "")
        if args.model == "deep":
            from xpcnn.models import DeepConvNet
            from xpcnn.nn.optim import Adam

            self.net = DeepConvNet(backend=self.backend, dtype=args.dtype, seed=args.seed)
            self.opt = Adam(lr=0.001)
        else:
            self.net = SimpleConvNet(backend=self.backend, dtype=args.dtype, seed=args.seed)
            self.opt = AdaGrad(lr=LR)
        self.net.set_params(host_params)
        self.x = self.backend.asarray(x, dtype=args.dtype)
        self.t = self.backend.asarray(t)
        self.x_eval = self.backend.asarray(x_eval, dtype=args.dtype)
        self.t_eval = self.backend.asarray(t_eval)
        self.eval_batch = args.eval_batch_size[0]

    def step(self):
        grads = self.net.gradient(self.x, self.t)
        self.opt.update(self.net.params, grads)

    def loss_value(self):
        # Inference mode (no Dropout), as torch's loss_value, so the first losses compare.
        return self.backend.to_float(self.net.last_layer.forward(self.net.predict(self.x), self.t))

    def can_evaluate(self):
        return True

    def evaluate(self):
        return self.net.accuracy(self.x_eval, self.t_eval, batch_size=self.eval_batch)

    def sync(self):
        self.backend.synchronize()


class XpcnnGraphContender(XpcnnContender):
    """The same step replayed as a CUDA graph (`net.compile_step`, CuPy's fast path): one launch
    per step once the graph is captured (the warm-up steps capture it)."""

    def __init__(self, *a):
        super().__init__(*a, name="xpcnn-graph")
        self.note = self.note.replace("xpcnn on", "xpcnn replayed as a CUDA graph on")
        self.compiled = self.net.compile_step(self.opt)

    def step(self):
        self.compiled(self.x, self.t)


class BookContender(Contender):
    def __init__(self, args, host_params, x, t, dtype):
        if args.backend == "gpu":
            import cupy as xp_module
        else:
            xp_module = np
        self.np = xp_module
        self.name = "book-f64" if dtype == "float64" else "book-f32"
        self.note = f"book's algorithm, {'CuPy' if args.backend == 'gpu' else 'NumPy'} {dtype}"
        self.net = BookSimpleConvNet(xp_module, host_params, dtype)
        self.opt = BookAdaGrad(xp_module, lr=LR)
        self.x = xp_module.asarray(x, dtype=dtype)
        self.t = xp_module.asarray(t)

    def step(self):
        grads = self.net.gradient(self.x, self.t)
        self.opt.update(self.net.params, grads)

    def loss_value(self):
        return float(self.net.loss(self.x, self.t))

    def sync(self):
        if self.np is not np:
            self.np.cuda.get_current_stream().synchronize()


class TorchContender(Contender):
    name = "torch"

    def __init__(self, args, host_params, x, t, x_eval, t_eval):
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        if torch_backend(args):
            self.device = get_backend(args.backend).device     # the device xpcnn runs on
        else:
            self.device = torch.device("cuda" if args.backend == "gpu" else "cpu")
        dtype = getattr(torch, args.dtype)
        self.note = f"torch {torch.__version__} eager, {self.device.type} {args.dtype}"
        if args.model == "deep":
            self._init_deep(args, host_params, dtype)
        else:
            self._init_simple(args, host_params, dtype)
        self.x = torch.from_numpy(x).to(self.device, dtype)
        self.t = torch.from_numpy(t).to(self.device, torch.int64)
        self.x_eval = torch.from_numpy(x_eval).to(self.device, dtype)
        self.t_eval = torch.from_numpy(t_eval).to(self.device, torch.int64)
        self.eval_batch = args.eval_batch_size[0]

    def _init_deep(self, args, host_params, dtype):
        sys.path.insert(0, str(ROOT / "scripts"))
        from xpcnn.backend import RandomSource, get_backend
        from xpcnn.nn.network import DROPOUT_STREAM, derived_seed

        from torch_models import TorchDeepConvNet

        masks = RandomSource(get_backend("cpu"), derived_seed(args.seed, DROPOUT_STREAM))
        twin = TorchDeepConvNet({k: v.astype(args.dtype) for k, v in host_params.items()}, dropout_ratio=0.5,
                                mask_source=masks, dtype=args.dtype, device=self.device.type)
        self.model = lambda x: twin.forward(x, train=True)
        self.eval_model = twin.forward
        self.opt = self.torch.optim.Adam(twin.parameters(), lr=0.001)

    def _init_simple(self, args, host_params, dtype):
        torch, nn = self.torch, self.torch.nn
        fn, c, fh, fw = host_params["W1"].shape
        conv = nn.Conv2d(c, fn, (fh, fw), stride=1, padding=0)
        fc1 = nn.Linear(*host_params["W2"].shape)
        fc2 = nn.Linear(*host_params["W3"].shape)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(host_params["W1"]))
            conv.bias.copy_(torch.from_numpy(host_params["b1"]))
            fc1.weight.copy_(torch.from_numpy(host_params["W2"].T.copy()))
            fc1.bias.copy_(torch.from_numpy(host_params["b2"]))
            fc2.weight.copy_(torch.from_numpy(host_params["W3"].T.copy()))
            fc2.bias.copy_(torch.from_numpy(host_params["b3"]))
        self.model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(),
                                   fc1, nn.ReLU(), fc2).to(self.device, dtype)
        self.eval_model = self.model
        self.opt = torch.optim.Adagrad(self.model.parameters(), lr=LR,
                                       initial_accumulator_value=0, eps=1e-7)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.F.cross_entropy(self.model(self.x), self.t)
        loss.backward()
        self.opt.step()

    def loss_value(self):
        with self.torch.no_grad():
            return float(self.F.cross_entropy(self.eval_model(self.x), self.t))

    def can_evaluate(self):
        return True

    def evaluate(self):
        torch = self.torch
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        n = self.x_eval.shape[0]
        with torch.no_grad():
            for start in range(0, n, self.eval_batch):
                xb = self.x_eval[start:start + self.eval_batch]
                tb = self.t_eval[start:start + self.eval_batch]
                correct += (self.eval_model(xb).argmax(dim=1) == tb).sum()
        return float(correct) / n

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
        elif self.device.type == "mps":
            self.torch.mps.synchronize()


class TorchForeachContender(TorchContender):
    """torch eager, the same net, with AdaGrad written as a few `torch._foreach_*` calls over
    all parameters at once (what a user tuning the optimizer would write)."""

    name = "torch-foreach"

    def __init__(self, *a):
        super().__init__(*a)
        self.note = self.note.replace("eager", "eager + _foreach AdaGrad")
        self.params = list(self.model.parameters())
        self.sums = [self.torch.zeros_like(p) for p in self.params]

    def adagrad(self):
        torch = self.torch
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            torch._foreach_addcmul_(self.sums, grads, grads, value=1.0)
            std = torch._foreach_sqrt(self.sums)
            torch._foreach_add_(std, 1e-7)
            torch._foreach_addcdiv_(self.params, grads, std, value=-LR)

    def step(self):
        for p in self.params:
            p.grad = None
        loss = self.F.cross_entropy(self.model(self.x), self.t)
        loss.backward()
        self.adagrad()


class TorchGraphContender(TorchForeachContender):
    """Forward + backward + the _foreach AdaGrad captured once as a CUDA graph (static batch)
    and replayed: the fastest a PyTorch user can make this step without writing kernels."""

    name = "torch-graph"

    def __init__(self, *a):
        super().__init__(*a)
        self.note = self.note.replace("eager + _foreach AdaGrad", "CUDA graph of fwd+bwd+_foreach AdaGrad")
        self.graph = None

    def _capture(self):
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):          # warm-up outside the graph, as torch's docs ask
            for _ in range(3):
                self.F.cross_entropy(self.model(self.x), self.t).backward()
                self.adagrad()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            # The warm-up left .grad buffers; backward accumulates into them, so the graph
            # zeroes them first. Every replay reuses the same buffers and the same batch.
            for p in self.params:
                p.grad.zero_()
            self.F.cross_entropy(self.model(self.x), self.t).backward()
            self.adagrad()

    def step(self):
        if self.graph is None:
            self._capture()
        self.graph.replay()


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


# ============================================================================ setup

def make_data(args) -> tuple:
    """Fixed-seed random images in [0, 1) and labels: a training batch and an eval set."""
    rng = np.random.default_rng(args.seed + 1)
    x = rng.random((args.batch_size, 1, 28, 28), dtype=np.float64).astype(args.dtype)
    t = rng.integers(0, 10, size=args.batch_size, dtype=np.int64)
    x_eval = rng.random((args.eval_images, 1, 28, 28), dtype=np.float64).astype(args.dtype)
    t_eval = rng.integers(0, 10, size=args.eval_images, dtype=np.int64)
    return x, t, x_eval, t_eval


def initial_params(args) -> dict:
    """xpcnn's initial weights (host float64), which every contender starts from."""
    if args.model == "deep":
        from xpcnn.models import DeepConvNet

        net = DeepConvNet(backend="cpu", dtype="float64", seed=args.seed)
    else:
        net = SimpleConvNet(backend="cpu", dtype="float64", seed=args.seed)
    return {k: np.array(v, dtype=np.float64) for k, v in net.params.items()}


def build(args, which: str, host_params, data):
    x, t, x_eval, t_eval = data
    if which == "xpcnn":
        return XpcnnContender(args, host_params, x, t, x_eval, t_eval)
    if which == "xpcnn-graph":
        return XpcnnGraphContender(args, host_params, x, t, x_eval, t_eval)
    if which == "xpcnn-numpy":
        return XpcnnContender(args, host_params, x, t, x_eval, t_eval, backend_name="cpu", name="xpcnn-numpy")
    if which == "book-f64":
        return BookContender(args, host_params, x, t, "float64")
    if which == "book-f32":
        return BookContender(args, host_params, x, t, "float32")
    if which == "torch":
        return TorchContender(args, host_params, x, t, x_eval, t_eval)
    if which == "torch-foreach":
        return TorchForeachContender(args, host_params, x, t, x_eval, t_eval)
    if which == "torch-graph":
        return TorchGraphContender(args, host_params, x, t, x_eval, t_eval)
    raise ValueError(f"unknown contender {which!r}")


def contender_names(args) -> list[str]:
    names = ["xpcnn"]
    if args.backend == "gpu" and not args.reference:
        names.append("xpcnn-graph")             # the same step as one CUDA graph (xpcnn train --cuda-graph)
    if torch_backend(args):
        # The book's code calls NumPy functions (np.pad, transpose) that torch lacks; on the
        # CPU the same xpcnn code on NumPy is the comparison instead.
        if device_kind(args) == "cpu":
            names.append("xpcnn-numpy")
    elif not args.no_book and args.model == "simple":   # the book's code here is SimpleConvNet's
        names.append("book-f64")
        if args.dtype == "float32":
            names.append("book-f32")
    if not args.no_torch and torch_available():
        import torch

        if args.backend == "gpu" and not torch.cuda.is_available():
            print("note: torch is installed without CUDA support; skipping it on --backend gpu", file=sys.stderr)
        else:
            names.append("torch")
        if args.backend == "gpu" and torch.cuda.is_available() and args.model == "simple":   # AdaGrad twins
            names += ["torch-foreach", "torch-graph"]
        else:
            print("note: torch-foreach and torch-graph (the stronger PyTorch contenders) run only on "
                  "--backend gpu with a CUDA build of torch; skipped here", file=sys.stderr)
    return names


def set_torch_threads(threads: int) -> None:
    if torch_available():
        import torch

        torch.set_num_threads(threads)


def blas_threads() -> tuple[int | None, str]:
    """Threads numpy's BLAS uses, and how that was found."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        env = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        if env:
            return int(env), "OPENBLAS_NUM_THREADS/OMP_NUM_THREADS"
        return os.cpu_count(), "assumed = cores (threadpoolctl not installed)"
    for pool in threadpool_info():
        if pool.get("user_api") == "blas" and "numpy" in pool.get("filepath", "") + pool.get("prefix", ""):
            return int(pool["num_threads"]), (f"threadpoolctl ({pool.get('internal_api')} {pool.get('version')}, "
                                              f"{pool.get('architecture')} kernel)")
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return int(pool["num_threads"]), (f"threadpoolctl ({pool.get('internal_api')} {pool.get('version')}, "
                                              f"{pool.get('architecture')} kernel)")
    return None, "no BLAS found by threadpoolctl"


def _host_memory_line() -> str:
    """What xpcnn's NumPy backend set the C library's allocator to (it applies to torch in this
    process too), or that this xpcnn has no such setting (a base revision)."""
    try:
        from xpcnn.backend import host_memory
    except ImportError:
        return "the allocator's own settings (an xpcnn without backend.host_memory)"
    return host_memory.describe()


def load_average() -> str:
    """1/5/15-minute load averages: other work on the machine skews every timing."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def machine_info(args, threads_numpy, threads_how) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = "unknown"
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        blas = f"{b.get('name')} {b.get('version')}"
    except Exception:
        pass
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas,
        "numpy_blas_threads": threads_numpy,
        "numpy_blas_threads_source": threads_how,
        "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")},
        "xpcnn_cpu_threads": cpu_threads.thread_count() if cpu_threads else "n/a (no xpcnn.ops.cpu_threads)",
        "xpcnn_runs": (describe_table(ops_of(get_backend(args.backend, reference=args.reference)))
                       if describe_table else "n/a (an xpcnn without ops.table.describe)"),
        "xpcnn_backend": args.backend,
        "host_memory": _host_memory_line(),
        "dtype": args.dtype,
        "batch_size": args.batch_size,
    }
    if torch_available():
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device_kind(args) == "cuda" and torch.cuda.is_available():
            info["torch_cuda"] = torch.version.cuda
            if torch_backend(args):
                info["gpu"] = torch.cuda.get_device_name(get_backend(args.backend).device)
    if args.backend == "gpu":
        try:
            import cupy

            info["cupy"] = cupy.__version__
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
            info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        except Exception as exc:  # reported, not fatal: xpcnn's own backend check says more
            info["cupy"] = f"unavailable ({exc})"
    return info


# ========================================================================== timing

def steps_per_sample(c: Contender, target_s: float) -> int:
    """How many steps one timing sample holds, so that a sample lasts about `target_s`."""
    c.sync()
    t0 = time.perf_counter()
    c.step()
    c.sync()
    once = time.perf_counter() - t0
    return max(1, min(100, int(target_s / max(once, 1e-6))))


def time_samples(c: Contender, steps: int, settle: float = 0.0) -> float:
    """Seconds per step over one sample of `steps` steps (device synchronised), after a
    pause of `settle` seconds and one untimed step (so each contender's own worker threads
    are awake, as in a training loop, and the other's are parked)."""
    c.sync()
    if settle:
        time.sleep(settle)
        c.step()
        c.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        c.step()
    c.sync()
    return (time.perf_counter() - t0) / steps


def round_robin(contenders: list[Contender], repeats: int, run: Callable[[Contender], float]) -> dict:
    """`repeats` rounds over all contenders, rotating who goes first each round."""
    samples: dict[str, list[float]] = {c.name: [] for c in contenders}
    k = len(contenders)
    for r in range(repeats):
        for i in range(k):
            c = contenders[(r + i) % k]
            samples[c.name].append(run(c))
    return samples


def summarize(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "iqr": q[2] - q[0],
            "min": min(values), "n": len(values)}


def profile_layers(c: "XpcnnContender", repeats: int) -> dict:
    """Median seconds of each step's forward and backward (a layer, or a fused run of layers)
    and of the optimizer update."""
    net, opt = c.net, c.opt
    parts: dict[str, list[float]] = {}

    def timed(key, fn, *a):
        c.sync()
        t0 = time.perf_counter()
        result = fn(*a)
        c.sync()
        parts.setdefault(key, []).append(time.perf_counter() - t0)
        return result

    # The network's steps as its gradient() runs them (fused runs of layers where the table has
    # one operation for them); an xpcnn from before 2026-12-06 runs its layers one by one.
    names = {id(layer): name for name, layer in net.layers.items()}
    if hasattr(net, "_steps"):
        steps = [("+".join(names[id(layer)] for layer in step.layers), step) for step in net._steps()]
    else:
        steps = [(name, layer) for name, layer in net.layers.items()]

    def forward(step, h):
        return step.forward(h, True) if hasattr(net, "_steps") else step.forward(h)

    for _ in range(repeats):
        h = c.x
        for name, step in steps:
            h = timed(f"{name} forward", forward, step, h)
        timed("SoftmaxWithLoss forward", net.last_layer.forward, h, c.t)
        d = timed("SoftmaxWithLoss backward", net.last_layer.backward, 1)
        for name, step in reversed(steps):
            d = timed(f"{name} backward", step.backward, d)
        timed(f"{type(opt).__name__} update", opt.update, net.params, net.grads)   # the layers wrote into net.grads
    return {key: statistics.median(v) for key, v in parts.items()}


def count_step_calls(args, host_params, data) -> int:
    """Array-library calls of one xpcnn training step (after a warm-up step), counted by
    wrapping the backend's namespace (`xpcnn.backend.counting`); each fast entry of the table
    counts one call (the CUDA emulation counts CuPy's launches one by one)."""
    from xpcnn.backend.counting import count_calls, counting_backend

    x, t, _, _ = data
    backend = counting_backend(get_backend(args.backend, reference=args.reference))
    with count_calls() as counter:
        net = SimpleConvNet(backend=backend, dtype=args.dtype, seed=args.seed)
        net.set_params(host_params)
        opt = AdaGrad(lr=LR)
        xb, tb = backend.asarray(x, dtype=args.dtype), backend.asarray(t)
        opt.update(net.params, net.gradient(xb, tb))
        counter.reset()
        opt.update(net.params, net.gradient(xb, tb))
        return counter.calls


# ========================================================================== memory

def memory_probe(args) -> None:
    """Child process: build one contender, train and evaluate, print its peak memory as JSON."""
    which = args.memory_probe
    if args.threads is not None:
        set_torch_threads(args.threads)
    host_params = initial_params(args)
    data = make_data(args)
    if which.startswith("torch"):
        import torch  # noqa: F401  (import cost is counted in the baseline, not the contender)
    out: dict[str, Any] = {}
    if device_kind(args) == "mps":
        out = {"error": "peak memory is not measured on MPS"}
    elif device_kind(args) == "cpu":
        base, files_before = current_rss_bytes(), file_rss_bytes()
        c = build(args, which, host_params, data)
        for _ in range(max(args.warmup, 3)):
            c.step()
        if c.can_evaluate():
            c.evaluate()
        # ru_maxrss of a child started by fork+exec can carry the parent's peak (Linux keeps
        # the larger of the two across exec), so prefer this process's own VmHWM.
        peak = peak_rss_bytes()
        out = {"peak_rss_bytes": peak, "rss_before_contender_bytes": base,
               "file_rss_added_bytes": file_rss_bytes() - files_before}
    else:
        uses_torch = which.startswith("torch") or torch_backend(args)
        if uses_torch:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()
        c = build(args, which, host_params, data)
        for _ in range(max(args.warmup, 3)):
            c.step()
        if c.can_evaluate():
            c.evaluate()
        c.sync()
        if uses_torch:
            import torch

            out = {"gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                   "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved()}
        else:
            import cupy

            # The pool keeps every block it ever allocated (we never free it), so what it
            # holds now is its peak: comparable to torch's max_memory_reserved.
            out = {"gpu_pool_total_bytes": cupy.get_default_memory_pool().total_bytes()}
    print("MEMORY " + json.dumps(out))


def proc_status_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (``VmHWM``, ``RssFile``, ...),
    in bytes; None where there is no such file or field."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set of this process: /proc VmHWM, else getrusage's ru_maxrss."""
    peak = proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def file_rss_bytes() -> int:
    """The part of this process's RSS that is pages of mapped files (the code of shared
    libraries, such as LLVM's that Numba loads): clean pages shared with other processes
    that map the same files. 0 where /proc does not say."""
    return proc_status_bytes("RssFile") or 0


def current_rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(args, names: list[str]) -> dict:
    results = {}
    argv = [a for a in sys.argv[1:]]
    skip_next = False
    clean = []
    for a in argv:  # drop --json PATH: children print, the parent writes
        if skip_next:
            skip_next = False
            continue
        if a == "--json":
            skip_next = True
            continue
        if a.startswith("--json="):
            continue
        clean.append(a)
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), *clean, "--_memory-probe", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")), None)
        if proc.returncode != 0 or line is None:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            results[name] = json.loads(line[len("MEMORY "):])
    return results


# ============================================================================ main

def fmt_mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def main(args) -> int:
    threads_numpy, threads_how = blas_threads()
    if args.threads is not None:
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=args.threads, user_api="blas")
        except ImportError:
            pass
        threads_numpy, threads_how = blas_threads()
    torch_threads = args.threads or threads_numpy or os.cpu_count()
    set_torch_threads(torch_threads)
    info = machine_info(args, threads_numpy, threads_how)
    info["load_average_at_start"] = load_average()

    host_params = initial_params(args)
    data = make_data(args)
    names = contender_names(args)
    contenders = [build(args, n, host_params, data) for n in names]

    # Same weights, same batch: the first losses must agree (a check on the comparison). The
    # first forward pass and the first step compile (or load) xpcnn's CPU kernels: timed.
    first_loss, first_use = {}, {}
    for c in contenders:
        began = time.perf_counter()
        first_loss[c.name] = c.loss_value()
        c.step()
        c.sync()
        first_use[c.name] = time.perf_counter() - began
        info[f"first_use_s_{c.name}"] = round(first_use[c.name], 3)

    for c in contenders:
        for _ in range(args.warmup):
            c.step()
        c.sync()
    per_sample = {c.name: args.steps_per_sample or steps_per_sample(c, 0.02 if device_kind(args) != "cpu" else 0.0)
                  for c in contenders}
    settle = args.settle if args.settle is not None else (0.3 if device_kind(args) == "cpu" else 0.0)
    info["settle_s"] = settle
    samples = round_robin(contenders, args.repeats, lambda c: time_samples(c, per_sample[c.name], settle))
    step = {name: summarize(v) for name, v in samples.items()}

    evaluators = [c for c in contenders if c.can_evaluate()]
    for c in evaluators:
        c.evaluate()  # warm-up
        c.sync()

    def run_eval(c):
        c.sync()
        if settle:
            time.sleep(settle)
        t0 = time.perf_counter()
        c.evaluate()
        c.sync()
        return time.perf_counter() - t0

    evaluation: dict[int, dict] = {}
    for batch in args.eval_batch_size:
        for c in evaluators:
            c.eval_batch = batch
        eval_samples = round_robin(evaluators, args.eval_repeats, run_eval)
        evaluation[batch] = {name: summarize(v) for name, v in eval_samples.items()}

    profile = profile_layers(contenders[0], args.repeats) if args.profile else {}
    step_calls = count_step_calls(args, host_params, data) if args.profile and args.model == "simple" else None
    info["load_average_after_timing"] = load_average()
    memory = {} if args.no_memory else measure_memory(args, names)

    # ------------------------------------------------------------------ report
    print("# xpcnn training-step benchmark")
    for key in ("date", "command", "cpu", "cores", "cores_usable", "python", "numpy", "blas",
                "numpy_blas_threads", "numpy_blas_threads_source", "torch", "torch_threads",
                "torch_cuda", "cupy", "gpu", "openblas_env", "xpcnn_cpu_threads", "xpcnn_runs", "xpcnn_backend",
                "host_memory", "dtype", "batch_size",
                "load_average_at_start", "load_average_after_timing", "settle_s"):
        if key in info:
            print(f"{key:26s} {info[key]}")
    for key in info:
        if key.startswith("first_use_s_"):         # the first forward pass and step: compile or load
            print(f"{key:26s} {info[key]}")
    print(f"{'initial loss':26s} " + ", ".join(f"{k} {v:.6f}" for k, v in first_loss.items()))
    print()
    base = step["xpcnn"]["median"]
    print(f"Training step, batch {args.batch_size}, {args.repeats} interleaved rounds "
          f"(steps per sample: {', '.join(f'{k} {v}' for k, v in per_sample.items())})")
    print("| contender | what | median ms/step | IQR ms | min ms | time / xpcnn | images/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for c in contenders:
        s = step[c.name]
        print(f"| {c.name} | {c.note} | {s['median'] * 1e3:.2f} | {s['iqr'] * 1e3:.2f} | {s['min'] * 1e3:.2f} | "
              f"{s['median'] / base:.2f}x | {args.batch_size / s['median']:,.0f} |")
    print()
    if evaluators:
        print(f"Evaluation of {args.eval_images:,} images, {args.eval_repeats} interleaved rounds "
              f"(xpcnn: net.accuracy(x, t, batch_size); torch: no_grad forward + argmax, same batches)")
        print("| batch | contender | median s | IQR s | min s | time / xpcnn | images/s |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for batch, results in evaluation.items():
            ebase = results["xpcnn"]["median"]
            for name, s in results.items():
                print(f"| {batch} | {name} | {s['median']:.3f} | {s['iqr']:.3f} | {s['min']:.3f} | "
                      f"{s['median'] / ebase:.2f}x | {args.eval_images / s['median']:,.0f} |")
        print()
    if profile:
        total = sum(profile.values())
        print(f"xpcnn step by layer: median ms over {args.repeats} steps (each part synchronised and timed alone)")
        print("| part | median ms | share |")
        print("| --- | ---: | ---: |")
        for part, seconds in profile.items():
            print(f"| {part} | {seconds * 1e3:.2f} | {seconds / total:.0%} |")
        print(f"| sum of parts | {total * 1e3:.2f} | |")
        print()
        print(f"array-library calls per xpcnn training step: {step_calls}"
              + (" (reference path)" if args.reference or ops_of(get_backend(args.backend)).reference
                 else " (fast path)"))
        print()
    if memory:
        print("Peak memory, each contender alone in a fresh process (build + warm-up steps + one evaluation)")
        if device_kind(args) == "cpu":
            print("| contender | peak RSS | RSS before building it (imports, data) | difference "
                  "| mapped-file pages added, at the end (library code) |")
            print("| --- | ---: | ---: | ---: | ---: |")
            for name, m in memory.items():
                if "error" in m:
                    print(f"| {name} | error: {m['error']} | | | |")
                    continue
                print(f"| {name} | {fmt_mib(m['peak_rss_bytes'])} | {fmt_mib(m['rss_before_contender_bytes'])} | "
                      f"{fmt_mib(m['peak_rss_bytes'] - m['rss_before_contender_bytes'])} | "
                      f"{fmt_mib(m.get('file_rss_added_bytes', 0))} |")
        else:
            print("| contender | GPU memory |")
            print("| --- | --- |")
            for name, m in memory.items():
                if "error" in m:
                    text = f"error: {m['error']}"
                elif "gpu_pool_total_bytes" in m:
                    text = f"CuPy pool held {fmt_mib(m['gpu_pool_total_bytes'])}"
                else:
                    text = (f"max allocated {fmt_mib(m['gpu_peak_allocated_bytes'])}, "
                            f"max reserved {fmt_mib(m['gpu_peak_reserved_bytes'])}")
                print(f"| {name} | {text} |")
        print()
    if "torch" in step:
        print(f"xpcnn / torch step time: {base / step['torch']['median']:.2f} (medians), "
              f"{step['xpcnn']['min'] / step['torch']['min']:.2f} (minima)")
        for batch, results in evaluation.items():
            if "torch" in results:
                print(f"xpcnn / torch evaluation time, batch {batch}: "
                      f"{results['xpcnn']['median'] / results['torch']['median']:.2f}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": info, "initial_loss": first_loss, "steps_per_sample": per_sample,
                   "step_seconds": step, "step_samples": samples, "eval_seconds": evaluation,
                   "memory": memory, "profile_seconds": profile, "step_calls": step_calls,
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from xpcnn.errors import XpcnnError

    try:
        if ARGS.memory_probe:
            memory_probe(ARGS)
            sys.exit(0)
        sys.exit(main(ARGS))
    except XpcnnError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
