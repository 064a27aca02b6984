"""Compiled CPU kernels (Numba) for NumPy's operation table: each fused pass is one kernel.

Beside `fast_numpy` (NumPy calls) and `fast_cupy` (CUDA kernels), with the same signatures,
each function here replaces an operation of the table with compiled loops that make one pass
over memory where NumPy makes several:

    operation                               kernel
    conv2d_relu_maxpool2d_*, one channel    the convolution computed row by row, its bias,
                                            ReLU and the pooling's maximum (with the window
                                            offset of the maximum) while the rows are in
                                            cache; backward: dW and db only at the pooled
                                            maxima that passed the ReLU (a quarter of the
                                            products of the dense dW for 2x2 pooling)
    conv2d_relu_*, one channel              the same convolution with its bias and ReLU
    softmax_cross_entropy_*                 one pass per row: probabilities, loss, and the
                                            gradient for ``dout = 1`` (backward returns it)
    count_correct                           argmax and comparison in one pass
    sgd / momentum / adagrad / adam         one pass over the flat parameter buffer

Multi-channel convolutions and matrix products stay in `fast_numpy` (BLAS); this module's
entries are laid over that table. Cases without a kernel here (pooling that does not tile,
one-hot labels, ...) return ``NotImplemented`` and take the table's other path.

**Threads.** The kernels release the GIL (``nogil``) and run on the slices of the batch (or
of the flat buffer) of `cpu_threads.run_in_slices`: one pool of threads for the whole fast
path, the same one the BLAS products use, never Numba's own parallel loops beside it (two
pools would wait on each other's spinning threads). Sums over the batch are kept per slice
and added in slice order, so runs with the same number of threads are bit-identical.

**NaN rules** as the reference: a NaN in a pooling window wins it and stays visible through
the ReLU (its gradient is zero, as the reference's ReLU gives); argmax takes the first NaN.

**Compilation.** Each kernel is compiled on its first call for each dtype (a few seconds in
all, the first time) and cached on disk (`kernel_cache`); a cache that cannot be read is
discarded and the kernel compiled again. Imported only where Numba imports
(`xpcnn.ops.table`); ``XPCNN_CPU_KERNELS=numpy`` selects NumPy's path instead.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

import numpy as np

from . import kernel_cache, reference
from .cpu_threads import run_in_slices
from .functions import one_hot
from .reference import store_gradient

njit, kernel = kernel_cache.njit, kernel_cache.kernel

#: Fast-math flags for the sums of products (reassociation lets LLVM vectorise them; no
#: "nnan"/"ninf": NaN and infinity must stay visible).
_SUMS = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: The tag of this module's caches (a backward tells its own forward's cache by it).
_TAG = "numba"


# --------------------------------------------------------------------- one-channel convolution

@njit(nogil=True, fastmath=_SUMS)
def _conv1_rows(image, W, b, f, first_row, rows, stride, rows_out):
    """Rows ``first_row .. first_row+rows-1`` of filter `f`'s output on one padded image:
    ``rows_out[r, ow] = b[f] + sum_ij W[f, 0, i, j] * image[(first_row+r)*stride + i, ow*stride + j]``."""
    filter_h, filter_w = W.shape[2], W.shape[3]
    out_w = rows_out.shape[1]
    for r in range(rows):
        top = (first_row + r) * stride
        row = rows_out[r]
        for ow in range(out_w):
            row[ow] = b[f]
        for i in range(filter_h):
            source = image[top + i]
            for j in range(filter_w):
                weight = W[f, 0, i, j]
                for ow in range(out_w):
                    row[ow] += weight * source[ow * stride + j]


@njit(nogil=True)
def _pad_image(x, n, pad, image):
    """Image `n` of ``x (N, 1, H, W)`` into the middle of ``image`` (its border stays zero)."""
    height, width = x.shape[2], x.shape[3]
    for y in range(height):
        for z in range(width):
            image[pad + y, pad + z] = x[n, 0, y, z]


@kernel(nogil=True, fastmath=_SUMS)
def _conv1_relu_pool_forward(x, W, b, stride, pad, out_w, pool, start, end, out, arg):
    """Images ``start..end-1``: ``out[n, f] = maxpool(relu(conv(x[n], W[f]) + b[f]))`` for a
    tiling ``pool x pool`` window; ``arg`` is the offset ``r * pool + c`` of the window's first
    maximum, or -1 where the ReLU passed nothing back (maximum <= 0 or NaN)."""
    filter_num = W.shape[0]
    pooled_h, pooled_w = out.shape[2], out.shape[3]
    image = np.zeros((x.shape[2] + 2 * pad, x.shape[3] + 2 * pad), dtype=x.dtype)
    rows = np.empty((pool, out_w), dtype=x.dtype)
    for n in range(start, end):
        _pad_image(x, n, pad, image)
        for f in range(filter_num):
            for ph in range(pooled_h):
                _conv1_rows(image, W, b, f, ph * pool, pool, stride, rows)
                for pw in range(pooled_w):
                    best = rows[0, pw * pool]
                    offset = 0
                    for r in range(pool):
                        for c in range(pool):
                            value = rows[r, pw * pool + c]
                            if (value > best or (np.isnan(value) and not np.isnan(best))) and r * pool + c > 0:
                                best = value
                                offset = r * pool + c
                    passed = best > 0
                    out[n, f, ph, pw] = best if passed or np.isnan(best) else 0
                    arg[n, f, ph, pw] = offset if passed else -1


@njit(nogil=True, fastmath=_SUMS)
def _conv1_window_backward(g, W, f, image, top, left, pad, dW, dx, n):
    """One output pixel's gradient `g` of filter `f`, whose window starts at ``(top, left)`` of
    the padded image: into dW (``g * window``) and, where `dx` has images, dx (``g * W[f]``)."""
    filter_h, filter_w = W.shape[2], W.shape[3]
    for i in range(filter_h):
        for j in range(filter_w):
            dW[f, 0, i, j] += g * image[top + i, left + j]
    if dx.shape[0] > 0:
        for i in range(filter_h):
            y = top + i - pad
            if 0 <= y < dx.shape[2]:
                for j in range(filter_w):
                    z = left + j - pad
                    if 0 <= z < dx.shape[3]:
                        dx[n, 0, y, z] += g * W[f, 0, i, j]


@kernel(nogil=True, fastmath=_SUMS)
def _conv1_relu_pool_backward(x, W, dout, arg, stride, pad, pool, start, end, dW, db, dx):
    """Images ``start..end-1``: dW and db summed (into `dW`, `db`) over the pooled maxima that
    passed the ReLU; `dx` (zeros, or no images when not wanted) gets each one's ``g * W``."""
    filter_num = dout.shape[1]
    pooled_h, pooled_w = dout.shape[2], dout.shape[3]
    image = np.zeros((x.shape[2] + 2 * pad, x.shape[3] + 2 * pad), dtype=x.dtype)
    for n in range(start, end):
        _pad_image(x, n, pad, image)
        for f in range(filter_num):
            for ph in range(pooled_h):
                for pw in range(pooled_w):
                    offset = arg[n, f, ph, pw]
                    if offset < 0:
                        continue
                    g = dout[n, f, ph, pw]
                    db[f] += g
                    _conv1_window_backward(g, W, f, image, (ph * pool + offset // pool) * stride,
                                           (pw * pool + offset % pool) * stride, pad, dW, dx, n)


@kernel(nogil=True, fastmath=_SUMS)
def _conv1_relu_forward(x, W, b, stride, pad, start, end, out):
    """Images ``start..end-1``: ``out[n, f] = relu(conv(x[n], W[f]) + b[f])`` (NaN stays NaN)."""
    filter_num, out_h = W.shape[0], out.shape[2]
    image = np.zeros((x.shape[2] + 2 * pad, x.shape[3] + 2 * pad), dtype=x.dtype)
    for n in range(start, end):
        _pad_image(x, n, pad, image)
        for f in range(filter_num):
            plane = out[n, f]
            _conv1_rows(image, W, b, f, 0, out_h, stride, plane)
            for oh in range(out_h):
                row = plane[oh]
                for ow in range(row.shape[0]):
                    if row[ow] <= 0:
                        row[ow] = 0


@kernel(nogil=True, fastmath=_SUMS)
def _conv1_relu_backward(x, W, dout, out, stride, pad, start, end, dW, db, dx):
    """Images ``start..end-1``: dW and db summed where the output passed the ReLU; `dx` as in
    `_conv1_relu_pool_backward`."""
    filter_num, out_h, out_w = dout.shape[1], dout.shape[2], dout.shape[3]
    image = np.zeros((x.shape[2] + 2 * pad, x.shape[3] + 2 * pad), dtype=x.dtype)
    for n in range(start, end):
        _pad_image(x, n, pad, image)
        for f in range(filter_num):
            for oh in range(out_h):
                for ow in range(out_w):
                    if out[n, f, oh, ow] > 0:
                        g = dout[n, f, oh, ow]
                        db[f] += g
                        _conv1_window_backward(g, W, f, image, oh * stride, ow * stride, pad, dW, dx, n)


# ------------------------------------------------------------------ softmax with cross-entropy

@kernel(nogil=True)
def _softmax_cross_entropy(scores, labels, scale, probs, grad):
    """Row by row: the softmax into `probs`, ``(probs - onehot) * scale`` into `grad`; returns
    the sum of the rows' losses ``-log softmax[label]`` (NaN rows stay NaN)."""
    total_loss = scores.dtype.type(0)
    for r in range(scores.shape[0]):
        row = scores[r]
        top = row[0]
        for j in range(1, row.shape[0]):
            if row[j] > top or np.isnan(row[j]):
                top = row[j]
                if np.isnan(top):
                    break
        total = row.dtype.type(0)
        for j in range(row.shape[0]):
            total += np.exp(row[j] - top)
        log_total = np.log(total)
        for j in range(row.shape[0]):
            probs[r, j] = np.exp(row[j] - top - log_total)
            grad[r, j] = (probs[r, j] - (1 if j == labels[r] else 0)) * scale
        total_loss -= row[labels[r]] - top - log_total
    return total_loss


@kernel(nogil=True)
def _count_correct(scores, labels):
    """Rows whose first maximum (or first NaN) is at their label."""
    hits = 0
    for r in range(scores.shape[0]):
        row = scores[r]
        best = 0
        for j in range(1, row.shape[0]):
            if np.isnan(row[best]):
                break
            if row[j] > row[best] or np.isnan(row[j]):
                best = j
        hits += best == labels[r]
    return hits


# ------------------------------------------------------------------------------ optimizers
# The reference's formulas in its order of operations, with the hyper-parameters in the
# buffer's dtype (as NumPy computes them): elementwise, so any slicing gives the same bits.

@kernel(nogil=True)
def _sgd(param, grad, lr, start, end):
    for i in range(start, end):
        param[i] -= lr * grad[i]


@kernel(nogil=True)
def _momentum(param, grad, v, lr, momentum, start, end):
    for i in range(start, end):
        v[i] = v[i] * momentum - lr * grad[i]
        param[i] += v[i]


@kernel(nogil=True)
def _adagrad(param, grad, h, lr, eps, start, end):
    for i in range(start, end):
        h[i] += grad[i] * grad[i]
        param[i] -= grad[i] / (np.sqrt(h[i]) + eps) * lr


@kernel(nogil=True)
def _adam(param, grad, m, v, lr_t, one_minus_beta1, one_minus_beta2, eps, start, end):
    for i in range(start, end):
        m[i] += one_minus_beta1 * (grad[i] - m[i])
        v[i] += one_minus_beta2 * (grad[i] * grad[i] - v[i])
        param[i] -= lr_t * m[i] / (np.sqrt(v[i]) + eps)


# --------------------------------------------------------------------------- the table's entries

def _tiling_pool(pool: tuple, out_h: int, out_w: int) -> int:
    """The window size of a pooling whose square windows tile the convolution's output (0 if not)."""
    pool_h, pool_w, pool_stride, pool_pad, _, _ = pool
    tiles = pool_h == pool_w == pool_stride and pool_pad == 0 and out_h % pool_h == 0 and out_w % pool_w == 0
    return pool_h if tiles and pool_h <= 11 else 0


def _sum_slices(sums: dict, slices: int) -> tuple:
    """The per-slice ``(dW, db)`` sums added in slice order."""
    dW, db = sums[0]
    for part in range(1, slices):
        dW += sums[part][0]
        db += sums[part][1]
    return dW, db


def conv2d_relu_maxpool2d_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int, out_h: int,
                                  out_w: int, pool: tuple) -> Any:
    """One input channel and a tiling pooling: one kernel (see the module docstring)."""
    size = _tiling_pool(pool, out_h, out_w)
    if W.shape[1] != 1 or not size:
        return NotImplemented
    x = np.ascontiguousarray(x)
    n, filter_num = x.shape[0], W.shape[0]
    out = np.empty((n, filter_num, out_h // size, out_w // size), dtype=x.dtype)
    arg = np.empty(out.shape, dtype=np.int8)
    run_in_slices(n, lambda part, start, end: _conv1_relu_pool_forward(
        x, W, b, stride, pad, out_w, size, start, end, out, arg), 8 * out.nbytes * size * size, uses_blas=False)
    return out, (_TAG, x, arg, size)


def conv2d_relu_maxpool2d_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                                   need_input_grad: bool, dW_out: Any = None, db_out: Any = None) -> Any:
    """dW and db from the pooled maxima that passed the ReLU; dx where asked for."""
    if cache[0] != _TAG:
        return NotImplemented
    _, x, arg, size = cache
    dout = np.ascontiguousarray(dout)
    dx = np.zeros_like(x) if need_input_grad else np.empty((0,) + x.shape[1:], dtype=x.dtype)
    sums: dict[int, tuple] = {}

    def one_slice(part: int, start: int, end: int) -> None:
        sums[part] = (np.zeros(W.shape, dtype=dout.dtype), np.zeros(W.shape[0], dtype=dout.dtype))
        _conv1_relu_pool_backward(x, W, dout, arg, stride, pad, size, start, end, *sums[part], dx)

    dW, db = _sum_slices(sums, run_in_slices(x.shape[0], one_slice, 8 * dout.nbytes * size * size,
                                             uses_blas=False))
    return (dx if need_input_grad else None), store_gradient(dW_out, dW), store_gradient(db_out, db)


def conv2d_relu_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int,
                        out_h: int, out_w: int) -> Any:
    """One input channel: one kernel for the convolution, its bias and ReLU."""
    if W.shape[1] != 1:
        return NotImplemented
    x = np.ascontiguousarray(x)
    out = np.empty((x.shape[0], W.shape[0], out_h, out_w), dtype=x.dtype)
    run_in_slices(x.shape[0], lambda part, start, end: _conv1_relu_forward(x, W, b, stride, pad, start, end, out),
                  8 * out.nbytes, uses_blas=False)
    return out, (_TAG, x, out)


def conv2d_relu_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                         need_input_grad: bool, dW_out: Any = None, db_out: Any = None) -> Any:
    """dW and db where the output passed the ReLU; dx where asked for."""
    if cache[0] != _TAG:
        return NotImplemented
    _, x, out = cache
    dout = np.ascontiguousarray(dout)
    dx = np.zeros_like(x) if need_input_grad else np.empty((0,) + x.shape[1:], dtype=x.dtype)
    sums: dict[int, tuple] = {}

    def one_slice(part: int, start: int, end: int) -> None:
        sums[part] = (np.zeros(W.shape, dtype=dout.dtype), np.zeros(W.shape[0], dtype=dout.dtype))
        _conv1_relu_backward(x, W, dout, out, stride, pad, start, end, *sums[part], dx)

    dW, db = _sum_slices(sums, run_in_slices(x.shape[0], one_slice, 8 * dout.nbytes, uses_blas=False))
    return (dx if need_input_grad else None), store_gradient(dW_out, dW), store_gradient(db_out, db)


def softmax_cross_entropy_forward(xp: ModuleType, scores: Any, t: Any) -> Any:
    """Integer labels: one pass; one-hot labels take the reference."""
    if t.ndim != 1:
        return NotImplemented
    scores = np.ascontiguousarray(scores)
    n = scores.shape[0]
    probs, grad = np.empty_like(scores), np.empty_like(scores)
    labels = np.ascontiguousarray(t, dtype=np.int64)
    loss = _softmax_cross_entropy(scores, labels, scores.dtype.type(1 / n), probs, grad)
    return np.asarray(loss / scores.dtype.type(n), dtype=scores.dtype), (probs, labels, grad)


def softmax_cross_entropy_backward(xp: ModuleType, cache: Any, dout: Any) -> Any:
    """``dout = 1``: the gradient the forward pass wrote; any other ``dout``: the reference's
    formula on the one-hot labels."""
    if len(cache) != 3:
        return NotImplemented
    probs, labels, grad = cache
    if isinstance(dout, (int, float)) and dout == 1:
        return grad
    return reference.softmax_cross_entropy_backward(xp, (probs, one_hot(labels, probs.shape[1], probs.dtype, xp=xp)),
                                                    dout)


def count_correct(xp: ModuleType, scores: Any, t: Any) -> Any:
    return np.asarray(_count_correct(np.ascontiguousarray(scores), np.ascontiguousarray(t, dtype=np.int64)),
                      dtype=np.int64)


def _elementwise(param: Any, work: Callable[[int, int], None], arrays: int) -> None:
    """`work(start, end)` over the flat buffer in slices, one per thread."""
    run_in_slices(param.shape[0], lambda part, start, end: work(start, end), arrays * param.nbytes, uses_blas=False)


def sgd_update(xp: ModuleType, param: Any, grad: Any, lr: float) -> Any:
    if param.ndim != 1:
        return NotImplemented
    t = param.dtype.type
    _elementwise(param, lambda start, end: _sgd(param, grad, t(lr), start, end), 2)


def momentum_update(xp: ModuleType, param: Any, grad: Any, v: Any, lr: float, momentum: float) -> Any:
    if param.ndim != 1:
        return NotImplemented
    t = param.dtype.type
    _elementwise(param, lambda start, end: _momentum(param, grad, v, t(lr), t(momentum), start, end), 3)


def adagrad_update(xp: ModuleType, param: Any, grad: Any, h: Any, lr: float, eps: float) -> Any:
    if param.ndim != 1:
        return NotImplemented
    t = param.dtype.type
    _elementwise(param, lambda start, end: _adagrad(param, grad, h, t(lr), t(eps), start, end), 3)


def adam_update(xp: ModuleType, param: Any, grad: Any, m: Any, v: Any, lr_t: float,
                beta1: float, beta2: float, eps: float) -> Any:
    if param.ndim != 1:
        return NotImplemented
    t = param.dtype.type
    _elementwise(param, lambda start, end: _adam(param, grad, m, v, t(lr_t), t(1.0 - beta1), t(1.0 - beta2), t(eps),
                                                 start, end), 4)


def fast_ops() -> dict[str, Callable[..., Any]]:
    """The entries this module lays over NumPy's table (`xpcnn.ops.table`)."""
    return {name: globals()[name] for name in (
        "conv2d_relu_maxpool2d_forward", "conv2d_relu_maxpool2d_backward", "conv2d_relu_forward",
        "conv2d_relu_backward", "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "count_correct",
        "sgd_update", "momentum_update", "adagrad_update", "adam_update")}
