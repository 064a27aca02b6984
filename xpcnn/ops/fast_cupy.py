"""CuPy fast paths for the hot operations of `xpcnn.ops.reference` (float32 and float64).

Each function here replaces one reference operation of the table with one or a few kernel
launches: where the reference code makes several array-library calls (each a kernel launch
and ~20 us of Python on the host), these make one. The results match the reference within
rounding (tests/ops/test_fast_ops.py). Deterministic by construction: nothing that feeds a
gradient uses atomics. col2im and the pooling backward are gathers (each input pixel sums the
windows that contain it, in a fixed order), and pooling backward uses the window index
stored by its forward pass, so two runs from the same seed give bit-identical weights.

Imported only when CuPy is in use (`xpcnn.ops.table._fast_table`).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Callable

import cupy
import numpy as np

from . import reference
from .functions import one_hot

_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double", np.dtype(np.int64): "long long"}


def _c_type(dtype: Any) -> str:
    return _C_TYPES[np.dtype(dtype)]


# -------------------------------------------------------------------------- im2col / col2im

_im2col_kernel = cupy.ElementwiseKernel(
    "raw T x, int32 C, int32 H, int32 W, int32 FH, int32 FW, int32 OH, int32 OW, int32 stride, int32 pad",
    "T col",
    """
    // col (N, C*FH*FW, OH*OW): element i is window offset (c, fi, fj) of output pixel (oh, ow)
    const int P = OH * OW;
    const int K = C * FH * FW;
    const int p = i % P;
    const int k = (i / P) % K;
    const int n = i / (P * K);
    const int c = k / (FH * FW);
    const int fi = (k / FW) % FH;
    const int fj = k % FW;
    const int y = (p / OW) * stride + fi - pad;
    const int xx = (p % OW) * stride + fj - pad;
    col = (y >= 0 && y < H && xx >= 0 && xx < W) ? x[((ptrdiff_t)(n * C + c) * H + y) * W + xx] : (T)0;
    """,
    "xpcnn_im2col",
)

_col2im_kernel = cupy.ElementwiseKernel(
    "raw T col, int32 C, int32 H, int32 W, int32 FH, int32 FW, int32 OH, int32 OW, int32 stride, int32 pad",
    "T dx",
    """
    // dx (N, C, H, W): pixel (y, x) sums, in a fixed order, every window entry that reads it.
    const int xx = i % W;
    const int y = (i / W) % H;
    const int c = (i / (W * H)) % C;
    const int n = i / (W * H * C);
    const int P = OH * OW;
    const ptrdiff_t base = (ptrdiff_t)(n * C + c) * FH * FW * P;
    T sum = 0;
    for (int fi = 0; fi < FH; ++fi) {
        const int ty = y + pad - fi;
        if (ty < 0 || ty % stride != 0) continue;
        const int oh = ty / stride;
        if (oh >= OH) continue;
        for (int fj = 0; fj < FW; ++fj) {
            const int tx = xx + pad - fj;
            if (tx < 0 || tx % stride != 0) continue;
            const int ow = tx / stride;
            if (ow >= OW) continue;
            sum += col[base + (ptrdiff_t)(fi * FW + fj) * P + oh * OW + ow];
        }
    }
    dx = sum;
    """,
    "xpcnn_col2im",
)


def conv2d_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int,
                   out_h: int, out_w: int) -> tuple[Any, Any]:
    """im2col kernel, one batched matrix product, bias added in place: 3 calls."""
    n, c, h, w = x.shape
    filter_num, _, filter_h, filter_w = W.shape
    x = cupy.ascontiguousarray(x)
    col = cupy.empty((n, c * filter_h * filter_w, out_h * out_w), dtype=x.dtype)
    _im2col_kernel(x, c, h, w, filter_h, filter_w, out_h, out_w, stride, pad, col)
    out = cupy.matmul(W.reshape(filter_num, -1), col)
    out += b.reshape(filter_num, 1)
    return out.reshape(n, filter_num, out_h, out_w), (col, (n, c, h, w))


def conv2d_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                    need_input_grad: bool, dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """db: one reduction; dW: one matrix product over the whole batch; dx: one product + col2im."""
    col, (n, c, h, w) = cache
    filter_num, _, filter_h, filter_w = W.shape
    _, _, out_h, out_w = dout.shape
    p = col.shape[2]
    dout_mat = cupy.ascontiguousarray(dout).reshape(n, filter_num, p)
    db = cupy.sum(dout_mat, axis=(0, 2), out=db_out)
    # dW[f, k] = sum over images and pixels of dout[n, f, p] * col[n, k, p]: one GEMM of
    # (FN, N*P) by (N*P, K) through tensordot over both axes.
    dW = cupy.tensordot(dout_mat, col, axes=([0, 2], [0, 2])).reshape(W.shape)
    if dW_out is not None:
        dW_out[...] = dW
        dW = dW_out
    if not need_input_grad:
        return None, dW, db
    dcol = cupy.matmul(W.reshape(filter_num, -1).T, dout_mat)      # (N, K, P)
    dx = cupy.empty((n, c, h, w), dtype=dout.dtype)
    _col2im_kernel(dcol, c, h, w, filter_h, filter_w, out_h, out_w, stride, pad, dx)
    return dx, dW, db


# ----------------------------------------------------------------------------------- Affine

def affine_forward(xp: ModuleType, x: Any, W: Any, b: Any) -> Any:
    """One product, the bias added in place: 2 calls (the reference makes a third array)."""
    out = cupy.matmul(x, W)
    out += b
    return out


def affine_backward(xp: ModuleType, dout: Any, x: Any, W: Any, need_input_grad: bool,
                    dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """Products written straight into the gradient buffer's views (cuBLAS handles the
    transposed operands without copies)."""
    dW = cupy.matmul(x.T, dout, out=dW_out)
    db = cupy.sum(dout, axis=0, out=db_out)
    if not need_input_grad:
        return None, dW, db
    return cupy.matmul(dout, W.T), dW, db


# ------------------------------------------------------------------------------ max pooling

_maxpool_forward_kernel = cupy.ElementwiseKernel(
    "raw T x, int32 H, int32 W, int32 PH, int32 PW, int32 OH, int32 OW, int32 stride, int32 pad",
    "T out, int32 arg",
    """
    // out (N, C, OH, OW): the window's first maximum (row-major); padding never wins. A NaN
    // wins over any number, as in the reference's `maximum` (the first NaN; its gradient goes
    // to that pixel), so a NaN stays visible.
    const int ow = i % OW;
    const int oh = (i / OW) % OH;
    const ptrdiff_t plane = i / (OW * OH);
    const ptrdiff_t image = plane * H * W;
    int best = -1;
    T best_value = 0;
    for (int pi = 0; pi < PH; ++pi) {
        const int y = oh * stride + pi - pad;
        if (y < 0 || y >= H) continue;
        for (int pj = 0; pj < PW; ++pj) {
            const int xx = ow * stride + pj - pad;
            if (xx < 0 || xx >= W) continue;
            const T value = x[image + y * W + xx];
            if (best < 0 || value > best_value || (isnan(value) && !isnan(best_value))) {
                best = pi * PW + pj;
                best_value = value;
            }
        }
    }
    out = best_value;
    arg = best;
    """,
    "xpcnn_maxpool_forward",
)

_maxpool_backward_kernel = cupy.ElementwiseKernel(
    "raw T dout, raw int32 arg, int32 H, int32 W, int32 PH, int32 PW, int32 OH, int32 OW, int32 stride, int32 pad",
    "T dx",
    """
    // dx (N, C, H, W): a pixel gathers the gradient of every window whose maximum it was.
    const int xx = i % W;
    const int y = (i / W) % H;
    const ptrdiff_t plane = i / (W * H);
    const ptrdiff_t base = plane * OH * OW;
    T sum = 0;
    for (int pi = 0; pi < PH; ++pi) {
        const int ty = y + pad - pi;
        if (ty < 0 || ty % stride != 0) continue;
        const int oh = ty / stride;
        if (oh >= OH) continue;
        for (int pj = 0; pj < PW; ++pj) {
            const int tx = xx + pad - pj;
            if (tx < 0 || tx % stride != 0) continue;
            const int ow = tx / stride;
            if (ow >= OW) continue;
            const ptrdiff_t o = base + oh * OW + ow;
            if (arg[o] == pi * PW + pj) sum += dout[o];
        }
    }
    dx = sum;
    """,
    "xpcnn_maxpool_backward",
)


def maxpool2d_forward(xp: ModuleType, x: Any, pool_h: int, pool_w: int, stride: int, pad: int,
                      out_h: int, out_w: int) -> tuple[Any, Any]:
    """One kernel: the maxima and, per window, the offset of its first maximum."""
    n, c, h, w = x.shape
    x = cupy.ascontiguousarray(x)
    out = cupy.empty((n, c, out_h, out_w), dtype=x.dtype)
    arg = cupy.empty((n, c, out_h, out_w), dtype=cupy.int32)
    _maxpool_forward_kernel(x, h, w, pool_h, pool_w, out_h, out_w, stride, pad, out, arg)
    return out, (arg, (n, c, h, w), pool_h, pool_w, stride, pad)


def maxpool2d_backward(xp: ModuleType, dout: Any, cache: Any) -> Any:
    """One kernel: each pixel gathers the gradients of the windows it was the maximum of."""
    arg, (n, c, h, w), pool_h, pool_w, stride, pad = cache
    _, _, out_h, out_w = dout.shape
    dx = cupy.empty((n, c, h, w), dtype=dout.dtype)
    _maxpool_backward_kernel(cupy.ascontiguousarray(dout), arg, h, w, pool_h, pool_w, out_h, out_w, stride, pad, dx)
    return dx


# ------------------------------------------------------------------------------------- ReLU

_relu_backward_kernel = cupy.ElementwiseKernel(
    "T out, T dout", "T dx", "dx = out > (T)0 ? dout : (T)0", "xpcnn_relu_backward")


def relu_forward(xp: ModuleType, x: Any) -> Any:
    return cupy.maximum(x, 0)


def relu_backward(xp: ModuleType, out: Any, dout: Any) -> Any:
    return _relu_backward_kernel(out, dout)


# ------------------------------------------------------------ softmax with cross-entropy

# The two row reductions (softmax-CE's loss, scoring's count) spread their rows over blocks,
# so that they scale with N: thread t of block b takes rows b * 256 + t, then strides over the
# grid; each block adds its threads' values in a fixed tree order. One block writes the result
# itself; several write one sum each, which `xpcnn_sum_blocks` adds in a fixed order. The grid
# depends only on N, so the result is the same every run (no atomics).
_THREADS = 256
_MAX_BLOCKS = 1024

_SOFTMAX_CE_SOURCE = r"""
extern "C" __global__ void xpcnn_softmax_ce(const T* scores, const long long* labels, T* probs,
                                            T* loss_sums, const int n, const int k) {
    __shared__ T partial[256];
    T mine = 0;
    for (long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x; row < n;
         row += (long long)gridDim.x * blockDim.x) {
        const T* s = scores + row * k;
        T* y = probs + row * k;
        T top = s[0];
        for (int j = 1; j < k; ++j) top = s[j] > top ? s[j] : top;
        T total = 0;
        for (int j = 0; j < k; ++j) total += exp(s[j] - top);
        const T log_total = log(total);
        for (int j = 0; j < k; ++j) y[j] = exp(s[j] - top - log_total);
        mine -= s[labels[row]] - top - log_total;
    }
    partial[threadIdx.x] = mine;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    // One block: the mean loss itself; several: this block's sum, for xpcnn_sum_blocks.
    if (threadIdx.x == 0) loss_sums[blockIdx.x] = gridDim.x == 1 ? partial[0] / (T)n : partial[0];
}
"""

_SUM_BLOCKS_SOURCE = r"""
extern "C" __global__ void xpcnn_sum_blocks(const T* block_sums, T* result, const int blocks, const T divisor) {
    // One block: the per-block sums of a reduction added in a fixed order, over `divisor`.
    __shared__ T partial[256];
    T mine = 0;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x) mine += block_sums[b];
    partial[threadIdx.x] = mine;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) result[0] = partial[0] / divisor;
}
"""


def _blocks(rows: int) -> int:
    """Blocks of `_THREADS` threads for a row reduction over `rows` rows: a row per thread up
    to `_MAX_BLOCKS` blocks (then the threads stride over the rest)."""
    return max(1, min(-(-rows // _THREADS), _MAX_BLOCKS))


def _row_reduction(source: str, name: str, c_type: str, result_dtype: Any, inputs: tuple, rows: int,
                   divisor: Any) -> Any:
    """Launch the row reduction `name` on `_blocks(rows)` blocks and return its 0-d result:
    1 launch for one block, 2 (the per-block sums, then `xpcnn_sum_blocks`) for more."""
    blocks = _blocks(rows)
    result = cupy.empty((), dtype=result_dtype)
    if blocks == 1:
        _raw_kernel(source, name, c_type)((1,), (_THREADS,), (*inputs[:-2], result, *inputs[-2:]))
        return result
    block_sums = cupy.empty(blocks, dtype=result_dtype)
    _raw_kernel(source, name, c_type)((blocks,), (_THREADS,), (*inputs[:-2], block_sums, *inputs[-2:]))
    _raw_kernel(_SUM_BLOCKS_SOURCE, "xpcnn_sum_blocks", _c_type(result_dtype))(
        (1,), (_THREADS,), (block_sums, result, np.int32(blocks), divisor))
    return result


_softmax_ce_backward_kernel = cupy.ElementwiseKernel(
    "raw T probs, raw int64 labels, int32 k, T scale", "T dx",
    "const int row = i / k; dx = (probs[i] - (T)((i % k) == labels[row])) * scale;",
    "xpcnn_softmax_ce_backward",
)


@functools.lru_cache(maxsize=None)
def _raw_kernel(source: str, name: str, c_type: str) -> Any:
    """`source` compiled with ``T`` standing for `c_type` (float, double or long long), once per type."""
    return cupy.RawKernel(f"typedef {c_type} T;\n{source}", name)


def softmax_cross_entropy_forward(xp: ModuleType, scores: Any, t: Any) -> tuple[Any, Any]:
    """One kernel for integer labels (probabilities and the mean loss; a second one adds the
    blocks' sums above 256 rows); one-hot labels take the reference path."""
    if t.ndim != 1:
        return NotImplemented
    n, k = scores.shape
    scores = cupy.ascontiguousarray(scores)
    labels = t if t.dtype == cupy.int64 else t.astype(cupy.int64)
    probs = cupy.empty_like(scores)
    loss = _row_reduction(_SOFTMAX_CE_SOURCE, "xpcnn_softmax_ce", _c_type(scores.dtype), scores.dtype,
                          (scores, cupy.ascontiguousarray(labels), probs, np.int32(n), np.int32(k)), n,
                          scores.dtype.type(n))
    return loss, (probs, labels, "labels")


def softmax_cross_entropy_backward(xp: ModuleType, cache: Any, dout: Any) -> Any:
    """One kernel: ``(y - onehot(t)) * dout / N``."""
    if len(cache) != 3:            # the reference's forward ran (one-hot labels)
        return NotImplemented
    if not isinstance(dout, (int, float)):
        probs, labels, _ = cache   # an array dout: the reference's formula on the one-hot labels
        t_hot = one_hot(labels, probs.shape[1], probs.dtype, xp=xp)
        return reference.softmax_cross_entropy_backward(xp, (probs, t_hot), dout)
    probs, labels, _ = cache
    n, k = probs.shape
    dx = cupy.empty_like(probs)
    _softmax_ce_backward_kernel(probs, labels, k, probs.dtype.type(dout / n), dx)
    return dx


# ---------------------------------------------------------------------------------- scoring

_COUNT_CORRECT_SOURCE = r"""
extern "C" __global__ void xpcnn_count_correct(const T* scores, const long long* labels,
                                               long long* counts, const int n, const int k) {
    __shared__ long long partial[256];
    long long mine = 0;
    for (long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x; row < n;
         row += (long long)gridDim.x * blockDim.x) {
        const T* s = scores + row * k;
        int best = 0;
        // The first maximum, as argmax; a NaN counts as the maximum (argmax picks the first NaN).
        for (int j = 1; j < k && !isnan(s[best]); ++j) if (s[j] > s[best] || isnan(s[j])) best = j;
        mine += (best == labels[row]);
    }
    partial[threadIdx.x] = mine;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) counts[blockIdx.x] = partial[0];
}
"""


def count_correct(xp: ModuleType, scores: Any, t: Any) -> Any:
    """Argmax of each row against its label, counted in a fixed order: one kernel (a second
    one adds the blocks' counts above 256 rows)."""
    n, k = scores.shape
    labels = t if t.dtype == cupy.int64 else t.astype(cupy.int64)
    return _row_reduction(_COUNT_CORRECT_SOURCE, "xpcnn_count_correct", _c_type(scores.dtype), np.dtype(np.int64),
                          (cupy.ascontiguousarray(scores), cupy.ascontiguousarray(labels), np.int32(n), np.int32(k)),
                          n, np.int64(1))


# ------------------------------------------------------------------------------- optimizers
# One fused kernel over the whole (flat) parameter buffer each, in the reference's order of
# operations.

_sgd_kernel = cupy.ElementwiseKernel("T grad, T lr", "T param", "param -= lr * grad", "xpcnn_sgd")
_momentum_kernel = cupy.ElementwiseKernel(
    "T grad, T lr, T momentum", "T param, T v", "v = v * momentum - lr * grad; param += v", "xpcnn_momentum")
_adagrad_kernel = cupy.ElementwiseKernel(
    "T grad, T lr, T eps", "T param, T h",
    "h += grad * grad; param -= (grad / (sqrt(h) + eps)) * lr;", "xpcnn_adagrad")
# `1 - beta` comes computed on the host in double and rounded once, as the reference does:
# computed in float from the rounded 0.999f it is 9.99987e-4, not 1e-3 (a 1.3e-5 relative error
# in `v`, visible from the zero state).
_adam_kernel = cupy.ElementwiseKernel(
    "T grad, T lr_t, T one_minus_beta1, T one_minus_beta2, T eps", "T param, T m, T v",
    "m += one_minus_beta1 * (grad - m); v += one_minus_beta2 * (grad * grad - v); "
    "param -= lr_t * m / (sqrt(v) + eps);",
    "xpcnn_adam")


def sgd_update(xp: ModuleType, param: Any, grad: Any, lr: float) -> None:
    t = param.dtype.type
    _sgd_kernel(grad, t(lr), param)


def momentum_update(xp: ModuleType, param: Any, grad: Any, v: Any, lr: float, momentum: float) -> None:
    t = param.dtype.type
    _momentum_kernel(grad, t(lr), t(momentum), param, v)


def adagrad_update(xp: ModuleType, param: Any, grad: Any, h: Any, lr: float, eps: float) -> None:
    t = param.dtype.type
    _adagrad_kernel(grad, t(lr), t(eps), param, h)


def adam_update(xp: ModuleType, param: Any, grad: Any, m: Any, v: Any, lr_t: float,
                beta1: float, beta2: float, eps: float) -> None:
    t = param.dtype.type
    _adam_kernel(grad, t(lr_t), t(1.0 - beta1), t(1.0 - beta2), t(eps), param, m, v)


def fast_ops() -> dict[str, Callable[..., Any]]:
    """The entries this module replaces in CuPy's operation table."""
    return {name: globals()[name] for name in (
        "conv2d_forward", "conv2d_backward", "affine_forward", "affine_backward", "maxpool2d_forward",
        "maxpool2d_backward", "relu_forward", "relu_backward", "softmax_cross_entropy_forward",
        "softmax_cross_entropy_backward", "count_correct",
        "sgd_update", "momentum_update", "adagrad_update", "adam_update")}
