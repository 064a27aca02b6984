"""The book's layers, written once for any array-API namespace.

Each layer keeps what its backward pass needs on itself, exposes `forward` and
`backward(dout)`, and puts parameter gradients in `dW`/`db`. Layers never write into
the arrays they are given. A layer whose input gradient nobody needs (the network's first
layer) can be told so with ``need_input_grad = False``; its `backward` then returns None
and skips that work (for a convolution, the whole col2im).

The arithmetic itself comes from an operation table (`xpcnn.ops`): the array-API reference
code, or a backend's fast version of the same operation. A layer with weights finds its
namespace and table once, from its weights; the others from their first input (or from the
`ops` argument, which is how a network hands every layer its backend's table).
"""

from __future__ import annotations

import math
from typing import Any

from .backend import check_same_device, dtype_name, namespace_of
from .errors import ConfigError, DTypeError, ShapeError
from .functional import check_label_range, check_rank, check_stride_pad, conv_output_size, positive_int
from .ops import Ops, ops_for


def _check_input(x: Any, weight: Any, what: str) -> None:
    """Check that `x` shares `weight`'s backend, device and dtype (cheaply: this runs every call)."""
    if type(x) is not type(weight):
        namespace_of(x, weight)              # BackendMismatch for arrays of another library
    x_device, w_device = getattr(x, "device", None), getattr(weight, "device", None)
    if x_device is not w_device and x_device != w_device:
        check_same_device(x, weight, f"{what} input")
    if x.dtype != weight.dtype:
        raise DTypeError(f"{what}: expected {dtype_name(weight.dtype)} input (the layer's dtype), got {dtype_name(x.dtype)}")


class _OpsFromInput:
    """For layers without weights: the operation table, found from the first input's type."""

    def __init__(self, ops: Ops | None):
        self.ops = ops
        self._ops_type: type | None = None if ops is None else object   # object: given, never re-resolved

    def _ops_of(self, x: Any) -> Ops:
        if self._ops_type is not object and type(x) is not self._ops_type:
            # The namespace is a function of the array type (numpy, cupy, strict, torch).
            self.ops, self._ops_type = ops_for(namespace_of(x)), type(x)
        return self.ops


class Convolution:
    """2-D convolution by im2col: ``(N, C, H, W) -> (N, FN, OH, OW)``.

    Args:
        W: filters ``(FN, C, FH, FW)``.
        b: biases ``(FN,)``.
        stride, pad: as in the book; ``(H + 2*pad - FH)`` must be a multiple of stride.
        ops: the operation table (default: the fast table of W's namespace).
    """

    def __init__(self, W: Any, b: Any, stride: int = 1, pad: int = 0, *, ops: Ops | None = None):
        if W.ndim != 4:
            raise ShapeError(f"Convolution: W must be (FN, C, FH, FW), got shape {tuple(W.shape)}")
        if tuple(b.shape) != (W.shape[0],):
            raise ShapeError(f"Convolution: b must have shape ({W.shape[0]},) to match W, got {tuple(b.shape)}")
        check_stride_pad(stride, pad, "Convolution")
        self.W, self.b, self.stride, self.pad = W, b, stride, pad
        self.ops = ops or ops_for(namespace_of(W, b))
        self.need_input_grad = True
        self.cache: Any = None      # what backward needs (the im2col windows on the reference path)
        self.dW: Any = None
        self.db: Any = None
        self.grad_out: tuple = (None, None)   # (dW, db) arrays to write into; see bind_gradients

    def forward(self, x: Any) -> Any:
        _check_input(x, self.W, "Convolution")
        check_rank(x, 4, "Convolution", "(N, C, H, W)")
        _, channels, filter_h, filter_w = self.W.shape
        _, c, h, w = x.shape
        if c != channels:
            raise ShapeError(f"Convolution: input has {c} channels, but the filters expect {channels} (W shape {tuple(self.W.shape)})")
        out_h = conv_output_size(h, filter_h, self.stride, self.pad, what="Convolution (height)")
        out_w = conv_output_size(w, filter_w, self.stride, self.pad, what="Convolution (width)")
        out, self.cache = self.ops.conv2d_forward(x, self.W, self.b, self.stride, self.pad, out_h, out_w)
        return out

    def backward(self, dout: Any) -> Any:
        """``dout (N, FN, OH, OW) -> dx (N, C, H, W)``; sets `dW` and `db`."""
        dx, self.dW, self.db = self.ops.conv2d_backward(dout, self.cache, self.W, self.stride, self.pad,
                                                        self.need_input_grad, *self.grad_out)
        return dx

    def bind_gradients(self, dW: Any, db: Any) -> None:
        """Write `dW`/`db` into these arrays from now on (a network's flat gradient buffer)."""
        self.grad_out = (dW, db)


class Pooling(_OpsFromInput):
    """Max pooling: ``(N, C, H, W) -> (N, C, OH, OW)``.

    Padding is filled with -inf, so it never wins the max (pad must be < the window size,
    so every window holds a real pixel). On ties the first maximum in the window (row-major)
    gets the gradient, as with the book's argmax.
    """

    def __init__(self, pool_h: int, pool_w: int, stride: int = 1, pad: int = 0, *, ops: Ops | None = None):
        pool_h, pool_w = positive_int(pool_h, "pool_h", "Pooling"), positive_int(pool_w, "pool_w", "Pooling")
        check_stride_pad(stride, pad, "Pooling")
        if pad >= min(pool_h, pool_w):
            raise ConfigError(f"Pooling: pad must be smaller than the window ({pool_h}x{pool_w}) so no window is all padding, got pad {pad}")
        super().__init__(ops)
        self.pool_h, self.pool_w, self.stride, self.pad = pool_h, pool_w, stride, pad
        self.cache: Any = None
        self.out: Any = None        # (N, C, OH, OW) window maxima

    def forward(self, x: Any) -> Any:
        ops = self._ops_of(x)
        check_rank(x, 4, "Pooling", "(N, C, H, W)")
        if x.dtype not in (ops.xp.float32, ops.xp.float64):
            raise DTypeError(f"Pooling: expected a float32 or float64 input, got {dtype_name(x.dtype)}")
        _, _, h, w = x.shape
        out_h = conv_output_size(h, self.pool_h, self.stride, self.pad, what="Pooling (height)")
        out_w = conv_output_size(w, self.pool_w, self.stride, self.pad, what="Pooling (width)")
        self.out, self.cache = ops.maxpool2d_forward(x, self.pool_h, self.pool_w, self.stride, self.pad, out_h, out_w)
        return self.out

    def backward(self, dout: Any) -> Any:
        """``dout (N, C, OH, OW) -> dx (N, C, H, W)``: each window's gradient goes to its max."""
        return self.ops.maxpool2d_backward(dout, self.cache)


class Affine:
    """Fully connected layer: ``(N, ...) -> (N, out)``; inputs are flattened per sample.

    Args:
        W: weights ``(in, out)``; ``in`` must equal the product of the input's trailing dims.
        b: biases ``(out,)``.
    """

    def __init__(self, W: Any, b: Any, *, ops: Ops | None = None):
        if W.ndim != 2:
            raise ShapeError(f"Affine: W must be (in, out), got shape {tuple(W.shape)}")
        if tuple(b.shape) != (W.shape[1],):
            raise ShapeError(f"Affine: b must have shape ({W.shape[1]},) to match W, got {tuple(b.shape)}")
        self.W, self.b = W, b
        self.ops = ops or ops_for(namespace_of(W, b))
        self.need_input_grad = True
        self.x_shape: tuple | None = None
        self.x: Any = None          # (N, in) flattened input
        self.dW: Any = None
        self.db: Any = None
        self.grad_out: tuple = (None, None)   # (dW, db) arrays to write into; see bind_gradients

    def forward(self, x: Any) -> Any:
        _check_input(x, self.W, "Affine")
        if x.ndim < 2:
            raise ShapeError(f"Affine: expected input (N, ...) with a batch axis, got shape {tuple(x.shape)}")
        features = math.prod(x.shape[1:])
        if features != self.W.shape[0]:
            raise ShapeError(f"Affine: input has {features} features per sample (shape {tuple(x.shape)}), but W expects {self.W.shape[0]}")
        self.x_shape = tuple(x.shape)
        self.x = self.ops.xp.reshape(x, (x.shape[0], features)) if x.ndim != 2 else x
        return self.ops.affine_forward(self.x, self.W, self.b)

    def backward(self, dout: Any) -> Any:
        """``dout (N, out) -> dx`` of the input's original shape; sets `dW` and `db`."""
        dx, self.dW, self.db = self.ops.affine_backward(dout, self.x, self.W, self.need_input_grad, *self.grad_out)
        if dx is None or len(self.x_shape) == 2:
            return dx
        return self.ops.xp.reshape(dx, self.x_shape)

    def bind_gradients(self, dW: Any, db: Any) -> None:
        """Write `dW`/`db` into these arrays from now on (a network's flat gradient buffer)."""
        self.grad_out = (dW, db)


class ReLU(_OpsFromInput):
    """``max(x, 0)`` elementwise; backward passes the gradient where the input was > 0."""

    def __init__(self, *, ops: Ops | None = None):
        super().__init__(ops)
        self.out: Any = None        # the last output; out > 0 exactly where x > 0

    @property
    def mask(self) -> Any:
        """Where the last input was > 0 (the book's mask, inverted), derived from the output."""
        return None if self.out is None else self.out > 0

    def forward(self, x: Any) -> Any:
        # Only the output is kept: the mask is derived in backward, so an evaluation-only
        # forward pass does not pay for it.
        self.out = self._ops_of(x).relu_forward(x)
        return self.out

    def backward(self, dout: Any) -> Any:
        return self.ops.relu_backward(self.out, dout)


class SoftmaxWithLoss(_OpsFromInput):
    """Softmax followed by the mean cross-entropy loss.

    `forward(x, t)` takes scores ``(N, K)`` and labels as ``(N,)`` class indices or
    ``(N, K)`` one-hot rows (the book's form), and returns the loss as a 0-d array (it stays
    on the device; convert with ``float()`` only when you log it).
    """

    def __init__(self, *, ops: Ops | None = None):
        super().__init__(ops)
        self.loss: Any = None
        self.cache: Any = None

    @property
    def y(self) -> Any:
        """The softmax probabilities ``(N, K)`` of the last forward pass (the book's attribute)."""
        # Every table's cache starts with the probabilities (see ops.softmax_cross_entropy_forward).
        return None if self.cache is None else self.cache[0]

    def forward(self, x: Any, t: Any) -> Any:
        if x.ndim != 2:
            raise ShapeError(f"SoftmaxWithLoss: expected scores (N, K), got shape {tuple(x.shape)}")
        ops = self._ops_of(x)
        xp = ops.xp
        if type(t) is not type(x):
            namespace_of(x, t)
        if not xp.isdtype(x.dtype, "real floating"):
            raise DTypeError(f"SoftmaxWithLoss: expected float32 or float64 scores, got {dtype_name(x.dtype)}")
        n, k = x.shape
        if t.ndim == 1:
            if t.shape[0] != n:
                raise ShapeError(f"labels: expected {n} labels for {n} samples, got {t.shape[0]}")
            if not xp.isdtype(t.dtype, "integral"):
                raise ShapeError(f"labels: 1-D labels must be integers (class indices), got dtype {t.dtype}")
            check_label_range(t, k)
        elif t.ndim == 2:
            if tuple(t.shape) != (n, k):
                raise ShapeError(f"labels: one-hot labels must have shape {(n, k)}, got {tuple(t.shape)}")
            if t.dtype != x.dtype:
                t = xp.astype(t, x.dtype)
        else:
            raise ShapeError(f"labels: expected (N,) class indices or (N, K) one-hot rows, got shape {tuple(t.shape)}")
        self.loss, self.cache = ops.softmax_cross_entropy_forward(x, t)
        return self.loss

    def backward(self, dout: Any = 1) -> Any:
        """``(N, K)`` gradient of the loss with respect to the scores."""
        return self.ops.softmax_cross_entropy_backward(self.cache, dout)
