"""The book's layers, written once for any array-API namespace.

Each layer keeps what its backward pass needs on itself, exposes `forward` and
`backward(dout)`, and puts parameter gradients in `dW`/`db`. Layers never write into
the arrays they are given. A layer whose input gradient nobody needs (the network's first
layer) can be told so with ``need_input_grad = False``; its `backward` then returns None
and skips that work (for a convolution, the whole col2im).
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from .backend import check_same_device, dtype_name, namespace_of
from .errors import ConfigError, DTypeError, ShapeError
from .functional import (
    as_one_hot, check_rank, check_stride_pad, col2im_nchw, conv_output_size, im2col_nchw,
    pad_nchw, positive_int, softmax_cross_entropy, spatial_slices, window_offsets,
)


def _check_input(x: Any, weight: Any, what: str) -> Any:
    """Namespace of `x` and `weight`, after checking they share a backend, device and dtype."""
    xp = namespace_of(x, weight)
    check_same_device(x, weight, f"{what} input")
    if x.dtype != weight.dtype:
        raise DTypeError(f"{what}: expected {dtype_name(weight.dtype)} input (the layer's dtype), got {dtype_name(x.dtype)}")
    return xp


class Convolution:
    """2-D convolution by im2col: ``(N, C, H, W) -> (N, FN, OH, OW)``.

    Args:
        W: filters ``(FN, C, FH, FW)``.
        b: biases ``(FN,)``.
        stride, pad: as in the book; ``(H + 2*pad - FH)`` must be a multiple of stride.
    """

    def __init__(self, W: Any, b: Any, stride: int = 1, pad: int = 0):
        if W.ndim != 4:
            raise ShapeError(f"Convolution: W must be (FN, C, FH, FW), got shape {tuple(W.shape)}")
        if tuple(b.shape) != (W.shape[0],):
            raise ShapeError(f"Convolution: b must have shape ({W.shape[0]},) to match W, got {tuple(b.shape)}")
        check_stride_pad(stride, pad, "Convolution")
        self.W, self.b, self.stride, self.pad = W, b, stride, pad
        self.need_input_grad = True
        self.x_shape: tuple | None = None
        self.col: Any = None        # (N, C*FH*FW, OH*OW) windows of the last input, per image
        self.dW: Any = None
        self.db: Any = None

    def forward(self, x: Any) -> Any:
        xp = _check_input(x, self.W, "Convolution")
        check_rank(x, 4, "Convolution", "(N, C, H, W)")
        filter_num, channels, filter_h, filter_w = self.W.shape
        n, c, h, w = x.shape
        if c != channels:
            raise ShapeError(f"Convolution: input has {c} channels, but the filters expect {channels} (W shape {tuple(self.W.shape)})")
        out_h = conv_output_size(h, filter_h, self.stride, self.pad, what="Convolution (height)")
        out_w = conv_output_size(w, filter_w, self.stride, self.pad, what="Convolution (width)")

        self.x_shape = (n, c, h, w)
        self.col = im2col_nchw(x, filter_h, filter_w, self.stride, self.pad, out_h, out_w)
        # One (FN, C*FH*FW) @ (C*FH*FW, OH*OW) product per image lands in NCHW order.
        out = xp.reshape(self.W, (filter_num, -1)) @ self.col
        out += xp.reshape(self.b, (filter_num, 1))
        return xp.reshape(out, (n, filter_num, out_h, out_w))

    def backward(self, dout: Any) -> Any:
        """``dout (N, FN, OH, OW) -> dx (N, C, H, W)``; sets `dW` and `db`."""
        xp = namespace_of(dout)
        filter_num, _, filter_h, filter_w = self.W.shape
        n, _, out_h, out_w = dout.shape
        dout_mat = xp.reshape(dout, (n, filter_num, out_h * out_w))
        self.db = xp.sum(dout_mat, axis=(0, 2))
        self.dW = xp.reshape(xp.sum(dout_mat @ xp.matrix_transpose(self.col), axis=0), self.W.shape)
        if not self.need_input_grad:
            return None
        dcol = xp.matrix_transpose(xp.reshape(self.W, (filter_num, -1))) @ dout_mat
        return col2im_nchw(dcol, self.x_shape, filter_h, filter_w, self.stride, self.pad, out_h, out_w)


class Pooling:
    """Max pooling: ``(N, C, H, W) -> (N, C, OH, OW)``.

    Padding is filled with -inf, so it never wins the max (pad must be < the window size,
    so every window holds a real pixel). On ties the first maximum in the window (row-major)
    gets the gradient, as with the book's argmax.
    """

    def __init__(self, pool_h: int, pool_w: int, stride: int = 1, pad: int = 0):
        pool_h, pool_w = positive_int(pool_h, "pool_h", "Pooling"), positive_int(pool_w, "pool_w", "Pooling")
        check_stride_pad(stride, pad, "Pooling")
        if pad >= min(pool_h, pool_w):
            raise ConfigError(f"Pooling: pad must be smaller than the window ({pool_h}x{pool_w}) so no window is all padding, got pad {pad}")
        self.pool_h, self.pool_w, self.stride, self.pad = pool_h, pool_w, stride, pad
        self.x_shape: tuple | None = None
        self.windows: list | None = None  # per offset (i, j): (N, C, OH, OW) view of the input
        self.out: Any = None        # (N, C, OH, OW) window maxima

    def _tiles(self, h: int, w: int) -> bool:
        """Whether the windows tile the input exactly (e.g. 2x2, stride 2, even sizes)."""
        return (self.pad == 0 and self.stride == self.pool_h == self.pool_w
                and h % self.pool_h == 0 and w % self.pool_w == 0)

    def forward(self, x: Any) -> Any:
        xp = namespace_of(x)
        check_rank(x, 4, "Pooling", "(N, C, H, W)")
        if x.dtype not in (xp.float32, xp.float64):
            raise DTypeError(f"Pooling: expected a float32 or float64 input, got {dtype_name(x.dtype)}")
        n, c, h, w = x.shape
        out_h = conv_output_size(h, self.pool_h, self.stride, self.pad, what="Pooling (height)")
        out_w = conv_output_size(w, self.pool_w, self.stride, self.pad, what="Pooling (width)")

        self.x_shape = (n, c, h, w)
        offsets = list(window_offsets(self.pool_h, self.pool_w))
        if self._tiles(h, w):
            # Non-overlapping windows: a reshape exposes them without slicing with steps.
            x6 = xp.reshape(x, (n, c, out_h, self.pool_h, out_w, self.pool_w))
            self.windows = [x6[:, :, :, i, :, j] for i, j in offsets]
        else:
            x_pad = pad_nchw(x, self.pad, fill=-math.inf)
            self.windows = [x_pad[(slice(None), slice(None)) + spatial_slices(i, j, self.stride, out_h, out_w)]
                            for i, j in offsets]
        out = self.windows[0]
        for window in self.windows[1:]:
            out = xp.maximum(out, window)
        self.out = out
        return out

    def backward(self, dout: Any) -> Any:
        """``dout (N, C, OH, OW) -> dx (N, C, H, W)``: each window's gradient goes to its max."""
        xp = namespace_of(dout)
        n, c, h, w = self.x_shape
        _, _, out_h, out_w = dout.shape
        device = array_api_compat.device(dout)
        tiles = self._tiles(h, w)
        if tiles:
            # Every input pixel is in exactly one window: each is written once, no zero fill.
            dx = xp.empty((n, c, out_h, self.pool_h, out_w, self.pool_w), dtype=dout.dtype, device=device)
        else:
            dx = xp.zeros((n, c, h + 2 * self.pad, w + 2 * self.pad), dtype=dout.dtype, device=device)
        remaining = dout  # gradient of windows whose max has not been found yet
        last = len(self.windows) - 1
        for k, (i, j) in enumerate(window_offsets(self.pool_h, self.pool_w)):
            if k == last:
                # The max is in the window, so if no earlier pixel held it the last one does.
                grad = remaining
            else:
                # A multiply by the 0/1 mask, not `where` (NumPy's where is ~10x slower here),
                # done in place on temporaries this method owns: fewer large allocations.
                grad = xp.astype(self.windows[k] == self.out, dout.dtype)
                grad *= remaining
                if remaining is dout:
                    remaining = dout - grad  # never write into the caller's dout
                else:
                    remaining -= grad
            if tiles:
                dx[:, :, :, i, :, j] = grad
            else:
                dx[(slice(None), slice(None)) + spatial_slices(i, j, self.stride, out_h, out_w)] += grad
        if tiles:
            return xp.reshape(dx, (n, c, h, w))
        return dx[:, :, self.pad:self.pad + h, self.pad:self.pad + w] if self.pad else dx


class Affine:
    """Fully connected layer: ``(N, ...) -> (N, out)``; inputs are flattened per sample.

    Args:
        W: weights ``(in, out)``; ``in`` must equal the product of the input's trailing dims.
        b: biases ``(out,)``.
    """

    def __init__(self, W: Any, b: Any):
        if W.ndim != 2:
            raise ShapeError(f"Affine: W must be (in, out), got shape {tuple(W.shape)}")
        if tuple(b.shape) != (W.shape[1],):
            raise ShapeError(f"Affine: b must have shape ({W.shape[1]},) to match W, got {tuple(b.shape)}")
        self.W, self.b = W, b
        self.need_input_grad = True
        self.x_shape: tuple | None = None
        self.x: Any = None          # (N, in) flattened input
        self.dW: Any = None
        self.db: Any = None

    def forward(self, x: Any) -> Any:
        xp = _check_input(x, self.W, "Affine")
        if x.ndim < 2:
            raise ShapeError(f"Affine: expected input (N, ...) with a batch axis, got shape {tuple(x.shape)}")
        features = math.prod(x.shape[1:])
        if features != self.W.shape[0]:
            raise ShapeError(f"Affine: input has {features} features per sample (shape {tuple(x.shape)}), but W expects {self.W.shape[0]}")
        self.x_shape = tuple(x.shape)
        self.x = xp.reshape(x, (x.shape[0], features))
        return self.x @ self.W + self.b

    def backward(self, dout: Any) -> Any:
        """``dout (N, out) -> dx`` of the input's original shape; sets `dW` and `db`."""
        xp = namespace_of(dout)
        self.dW = self.x.T @ dout
        self.db = xp.sum(dout, axis=0)
        if not self.need_input_grad:
            return None
        return xp.reshape(dout @ self.W.T, self.x_shape)


class ReLU:
    """``max(x, 0)`` elementwise; backward passes the gradient where the input was > 0."""

    def __init__(self):
        self.out: Any = None        # the last output; out > 0 exactly where x > 0

    @property
    def mask(self) -> Any:
        """Where the last input was > 0 (the book's mask, inverted), derived from the output."""
        return None if self.out is None else self.out > 0

    def forward(self, x: Any) -> Any:
        xp = namespace_of(x)
        # Only the output is kept: the mask is derived in backward, so an evaluation-only
        # forward pass does not pay for it.
        self.out = xp.maximum(x, 0.0)
        return self.out

    def backward(self, dout: Any) -> Any:
        # A new array: the book's version zeroed the caller's `dout` in place. A multiply by
        # the 0/1 mask rather than `where`, which NumPy runs ~10x slower on random masks.
        xp = namespace_of(dout)
        dx = xp.astype(self.out > 0, dout.dtype)
        dx *= dout  # in place on our own temporary: one large allocation instead of two
        return dx


class SoftmaxWithLoss:
    """Softmax followed by the mean cross-entropy loss.

    `forward(x, t)` takes scores ``(N, K)`` and labels as ``(N,)`` class indices or
    ``(N, K)`` one-hot rows (the book's form), and returns the loss as a 0-d array (it stays
    on the device; convert with ``float()`` only when you log it).
    """

    def __init__(self):
        self.loss: Any = None
        self.y: Any = None          # softmax probabilities (N, K)
        self.t: Any = None          # one-hot labels (N, K)

    def forward(self, x: Any, t: Any) -> Any:
        if x.ndim != 2:
            raise ShapeError(f"SoftmaxWithLoss: expected scores (N, K), got shape {tuple(x.shape)}")
        xp = namespace_of(x, t)
        if not xp.isdtype(x.dtype, "real floating"):
            raise DTypeError(f"SoftmaxWithLoss: expected float32 or float64 scores, got {dtype_name(x.dtype)}")
        self.t = as_one_hot(t, x)
        self.loss, self.y = softmax_cross_entropy(x, self.t)
        return self.loss

    def backward(self, dout: Any = 1) -> Any:
        """``(N, K)`` gradient of the loss with respect to the scores."""
        return (self.y - self.t) * (dout / self.y.shape[0])
