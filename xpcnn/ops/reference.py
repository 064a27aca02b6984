"""The reference implementations of the hot operations, written once against the array API.

Each takes the namespace `xp` as its first argument (so nobody resolves a namespace per call)
and is the entry of every backend's operation table (`table.py`) that the backend does not
replace. Faster variants of an operation live in `fast_numpy.py`, `fast_numba.py` (compiled
CPU kernels, laid over fast_numpy's entries) and `fast_cupy.py` under the same name, and each
is tested against the function here (tests/ops/test_fast_ops.py):

    operation                   here  fast_numpy           fast_numba              fast_cupy
    conv2d_forward/backward     yes   yes (channels-last)  -                       yes (product kernels)
    affine_forward/backward     yes   yes (batch slices)   -                       yes (product kernels)
    maxpool2d_forward/backward  yes   yes (2x2 tiles)      -                       yes
    relu_forward/backward       yes   yes (batch slices)   -                       yes
    softmax_cross_entropy_*     yes   -                    yes (one pass)          yes (one fused kernel)
    count_correct               yes   -                    yes                     yes
    sgd/momentum/adagrad/adam   yes   -                    yes (one pass)          yes (one kernel)
    conv2d_relu[_maxpool2d]_*   (the entries above in turn, `fused.py`)
                                      -                    yes (stride 1)          yes

A `cache` is whatever the forward pass keeps for its backward pass; only the matching
backward of the same table reads it. Backward passes take optional `dW_out`/`db_out` arrays:
given, the parameter gradients are written there (a network's flat gradient buffer, see
`xpcnn.nn.params`) and those arrays are returned.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import array_api_compat

from .functions import log_softmax, one_hot
from .geometry import col2im_cnhw, col2im_nchw, im2col_cnhw, im2col_nchw, pad_nchw, spatial_slices, window_offsets


def store_gradient(out: Any, value: Any) -> Any:
    """`value`, written into `out` when one is given (a view of a gradient buffer)."""
    if out is None:
        return value
    out[...] = value
    return out


# ------------------------------------------------------------------------ convolution

def per_image_layout_wins(channels: int) -> bool:
    """Whether the reference convolution uses the per-image im2col layout (True) or the
    whole-batch one (False) for `channels` input channels (measured: docs/performance.md,
    "DeepConvNet on the CPU").

    One input channel (SimpleConvNet, DeepConvNet's first layer): the per-image layout, whose
    product lands in NCHW directly. Several channels: the whole-batch layout, one large
    matrix product instead of N small ones (faster for DeepConvNet's 16-64 channel layers).
    """
    return channels == 1


def conv2d_forward(xp: ModuleType, x: Any, W: Any, b: Any, stride: int, pad: int,
                   out_h: int, out_w: int) -> tuple[Any, Any]:
    """``(N, C, H, W) -> (N, FN, OH, OW)`` by im2col: one matrix product per image for one
    input channel, one product over the whole batch for several."""
    channels = x.shape[1]
    filter_num, _, filter_h, filter_w = W.shape
    w_mat = xp.reshape(W, (filter_num, -1))
    if per_image_layout_wins(channels):
        col = im2col_nchw(x, filter_h, filter_w, stride, pad, out_h, out_w, xp=xp)  # (N, C*FH*FW, OH*OW)
        # (FN, C*FH*FW) @ (N, C*FH*FW, OH*OW) lands in NCHW order: no transpose on the way out.
        out = w_mat @ col
        out += xp.reshape(b, (filter_num, 1))
        # -1, not N, here and below: the batch size may be unknown (a traced graph's dynamic batch).
        return xp.reshape(out, (-1, filter_num, out_h, out_w)), (col, tuple(x.shape))
    col = im2col_cnhw(x, filter_h, filter_w, stride, pad, out_h, out_w, xp=xp)      # (C*FH*FW, N*OH*OW)
    out = w_mat @ col
    out += xp.reshape(b, (filter_num, 1))
    # An (N, FN, OH, OW) view of (FN, N, OH, OW): the next layers work on it as is, and the
    # next convolution's transpose back to (C, N, H, W) reads it contiguously.
    return xp.permute_dims(xp.reshape(out, (filter_num, -1, out_h, out_w)), (1, 0, 2, 3)), (col, tuple(x.shape))


def conv2d_backward(xp: ModuleType, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                    need_input_grad: bool, dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """``dout (N, FN, OH, OW) -> (dx (N, C, H, W) or None, dW, db)``."""
    col, x_shape = cache
    filter_num, channels, filter_h, filter_w = W.shape
    n, _, out_h, out_w = dout.shape
    if per_image_layout_wins(channels):
        dout_mat = xp.reshape(dout, (n, filter_num, out_h * out_w))
        db = store_gradient(db_out, xp.sum(dout_mat, axis=(0, 2)))
        dW = store_gradient(dW_out, xp.reshape(xp.sum(dout_mat @ xp.matrix_transpose(col), axis=0), W.shape))
        if not need_input_grad:
            return None, dW, db
        dcol = xp.matrix_transpose(xp.reshape(W, (filter_num, -1))) @ dout_mat
        return col2im_nchw(dcol, x_shape, filter_h, filter_w, stride, pad, out_h, out_w, xp=xp), dW, db
    dout_mat = xp.reshape(xp.permute_dims(dout, (1, 0, 2, 3)), (filter_num, n * out_h * out_w))
    db = store_gradient(db_out, xp.sum(dout_mat, axis=1))
    dW = store_gradient(dW_out, xp.reshape(dout_mat @ xp.matrix_transpose(col), W.shape))
    if not need_input_grad:
        return None, dW, db
    height, width = x_shape[2], x_shape[3]
    if stride == 1 and filter_h == filter_w and pad < filter_h:
        # dx is a stride-1 convolution of dout with the flipped, transposed filters (padding
        # FH-1-pad): an im2col copy and one product instead of a product and nine strided
        # adds into the input gradient.
        flipped = xp.permute_dims(xp.flip(W, axis=(2, 3)), (1, 0, 2, 3))
        col_d = im2col_cnhw(dout, filter_h, filter_w, 1, filter_h - 1 - pad, height, width, xp=xp)
        dx_cn = xp.reshape(flipped, (channels, -1)) @ col_d
        return xp.permute_dims(xp.reshape(dx_cn, (channels, n, height, width)), (1, 0, 2, 3)), dW, db
    dcol = xp.matrix_transpose(xp.reshape(W, (filter_num, -1))) @ dout_mat
    return col2im_cnhw(dcol, x_shape, filter_h, filter_w, stride, pad, out_h, out_w, xp=xp), dW, db


# ------------------------------------------------------------------------------ Affine

def affine_forward(xp: ModuleType, x: Any, W: Any, b: Any) -> Any:
    """``(N, in) @ (in, out) + (out,)``."""
    return x @ W + b


def affine_backward(xp: ModuleType, dout: Any, x: Any, W: Any, need_input_grad: bool,
                    dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """``dout (N, out) -> (dx (N, in) or None, dW (in, out), db (out,))``."""
    dW = store_gradient(dW_out, xp.matrix_transpose(x) @ dout)
    db = store_gradient(db_out, xp.sum(dout, axis=0))
    if not need_input_grad:
        return None, dW, db
    return dout @ xp.matrix_transpose(W), dW, db


# ------------------------------------------------------------------------ max pooling

def pool_tiles(x_shape: tuple, pool_h: int, pool_w: int, stride: int, pad: int) -> bool:
    """Whether the windows tile the input exactly (e.g. 2x2, stride 2, even sizes)."""
    return (pad == 0 and stride == pool_h == pool_w
            and x_shape[2] % pool_h == 0 and x_shape[3] % pool_w == 0)


def maxpool2d_forward(xp: ModuleType, x: Any, pool_h: int, pool_w: int, stride: int, pad: int,
                      out_h: int, out_w: int) -> tuple[Any, Any]:
    """``(N, C, H, W) -> (N, C, OH, OW)``: the elementwise maximum of the window slices.

    Padding is -inf, so it never wins. The cache keeps the input, the slices (views) and the
    maxima. Only slicing and elementwise operations: the result keeps the input's memory
    layout (on NumPy a channels-last input gives a channels-last output, see `fast_numpy`).
    """
    x_pad = pad_nchw(x, pad, fill=-math.inf)
    windows = [x_pad[(slice(None), slice(None)) + spatial_slices(i, j, stride, out_h, out_w)]
               for i, j in window_offsets(pool_h, pool_w)]
    out = windows[0]
    for window in windows[1:]:
        out = xp.maximum(out, window)
    return out, (x, windows, out, pool_h, pool_w, stride, pad)


def maxpool2d_backward(xp: ModuleType, dout: Any, cache: Any) -> Any:
    """``dout (N, C, OH, OW) -> dx (N, C, H, W)``: each window's gradient goes to its first max."""
    x, windows, out, pool_h, pool_w, stride, pad = cache
    n, c, h, w = x.shape
    _, _, out_h, out_w = dout.shape
    tiles = pool_tiles((n, c, h, w), pool_h, pool_w, stride, pad)
    if tiles:
        # Every input pixel is in exactly one window: each is written once, no zero fill,
        # and dx takes the input's memory layout.
        dx = xp.empty_like(x, dtype=dout.dtype)
    else:
        dx = xp.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=dout.dtype, device=array_api_compat.device(dout))
    remaining = dout  # gradient of windows whose max has not been found yet
    last = len(windows) - 1
    for k, (i, j) in enumerate(window_offsets(pool_h, pool_w)):
        if k == last:
            # The max is in the window, so if no earlier pixel held it the last one does.
            grad = remaining
        else:
            # A multiply by the 0/1 mask, not `where` (NumPy's where is ~10x slower here),
            # done in place on temporaries we own: fewer large allocations.
            grad = xp.astype(windows[k] == out, dout.dtype)
            grad *= remaining
            if remaining is dout:
                remaining = dout - grad  # never write into the caller's dout
            else:
                remaining -= grad
        target = (slice(None), slice(None)) + spatial_slices(i, j, stride, out_h, out_w)
        if tiles:
            dx[target] = grad
        else:
            dx[target] += grad
    return dx[:, :, pad:pad + h, pad:pad + w] if pad else dx


# ------------------------------------------------------------------------------- ReLU

def relu_forward(xp: ModuleType, x: Any) -> Any:
    """``max(x, 0)``; the output doubles as the backward mask (out > 0 exactly where x > 0)."""
    return xp.maximum(x, 0.0)


def relu_backward(xp: ModuleType, out: Any, dout: Any) -> Any:
    """``dout`` where the output was > 0, else 0; a new array (the book zeroed `dout` in place)."""
    # A multiply by the 0/1 mask rather than `where`, which NumPy runs ~10x slower.
    dx = xp.astype(out > 0, dout.dtype)
    dx *= dout
    return dx


# ---------------------------------------------------------- softmax with cross-entropy

def softmax_cross_entropy_forward(xp: ModuleType, scores: Any, t: Any) -> tuple[Any, Any]:
    """Mean cross-entropy of ``(N, K)`` scores against labels ``(N,)`` or one-hot ``(N, K)``.

    Uses log-softmax, so the loss is exact where the book's ``log(y + 1e-7)`` would clip.
    Returns the 0-d loss and ``(softmax probabilities, one-hot labels)``.
    """
    t_hot = one_hot(t, scores.shape[1], scores.dtype, xp=xp) if t.ndim == 1 else t
    log_y = log_softmax(scores, xp=xp)
    loss = -xp.sum(t_hot * log_y) / scores.shape[0]
    return loss, (xp.exp(log_y), t_hot)


def softmax_cross_entropy_backward(xp: ModuleType, cache: Any, dout: Any) -> Any:
    """``(y - t) * dout / N``."""
    y, t_hot = cache
    return (y - t_hot) * (dout / y.shape[0])


def count_correct(xp: ModuleType, scores: Any, t: Any) -> Any:
    """How many rows of ``(N, K)`` scores have their argmax at label ``t`` (0-d int64)."""
    return xp.sum(xp.astype(xp.argmax(scores, axis=1) == t, xp.int64))


# ------------------------------------------------------------------------- optimizers
# In place on `param` and the state arrays; `param` may be a whole flat parameter buffer.

def sgd_update(xp: ModuleType, param: Any, grad: Any, lr: float) -> None:
    param -= lr * grad


def momentum_update(xp: ModuleType, param: Any, grad: Any, v: Any, lr: float, momentum: float) -> None:
    v *= momentum
    v -= lr * grad
    param += v


def adagrad_update(xp: ModuleType, param: Any, grad: Any, h: Any, lr: float, eps: float) -> None:
    h += grad * grad
    step = xp.sqrt(h)
    step += eps
    step = grad / step
    step *= lr                   # in place on our own temporaries: fewer large allocations
    param -= step


def adam_update(xp: ModuleType, param: Any, grad: Any, m: Any, v: Any, lr_t: float,
                beta1: float, beta2: float, eps: float) -> None:
    m += (1.0 - beta1) * (grad - m)
    v += (1.0 - beta2) * (grad * grad - v)
    param -= lr_t * m / (xp.sqrt(v) + eps)
