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

import array_api_compat

from .. import checks
from ..backend.arrays import check_same_device, dtype_name, namespace_of
from ..backend.devices import backend_of
from ..backend.random import RandomSource
from ..errors import ConfigError, DTypeError, ShapeError
from ..ops.functions import check_labels
from ..ops.geometry import check_rank, check_stride_pad, conv_output_size
from ..ops.table import Ops, ops_for


def _check_input(x: Any, weight: Any, what: str) -> None:
    """Check that `x` shares `weight`'s backend, device and dtype (cheaply: this runs every call)."""
    if type(x) is not type(weight):
        namespace_of(x, weight)              # BackendMismatch for arrays of another library
    x_device, w_device = getattr(x, "device", None), getattr(weight, "device", None)
    if x_device is not w_device and x_device != w_device:
        check_same_device(x, weight, f"{what} input")
    if x.dtype != weight.dtype:
        raise DTypeError(f"{what}: expected {dtype_name(weight.dtype)} input (the layer's dtype), "
                         f"got {dtype_name(x.dtype)}")


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

    Operations: ``conv2d_forward`` / ``conv2d_backward`` of the backend's operation table
    (`xpcnn.ops.table`: the reference in `xpcnn.ops.reference`, or the backend's fast variant).

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
        out_h, out_w = self.output_size(x)
        out, self.cache = self.ops.conv2d_forward(x, self.W, self.b, self.stride, self.pad, out_h, out_w)
        return out

    def output_size(self, x: Any) -> tuple[int, int]:
        """``(OH, OW)`` of the output for input `x`, after checking `x` against the filters."""
        _check_input(x, self.W, "Convolution")
        check_rank(x, 4, "Convolution", "(N, C, H, W)")
        _, channels, filter_h, filter_w = self.W.shape
        _, c, h, w = x.shape
        if c != channels:
            raise ShapeError(f"Convolution: input has {c} channels, but the filters expect {channels} "
                             f"(W shape {tuple(self.W.shape)})")
        return (conv_output_size(h, filter_h, self.stride, self.pad, what="Convolution (height)"),
                conv_output_size(w, filter_w, self.stride, self.pad, what="Convolution (width)"))

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

    Operations: ``maxpool2d_forward`` / ``maxpool2d_backward`` of the backend's operation table.
    """

    def __init__(self, pool_h: int, pool_w: int, stride: int = 1, pad: int = 0, *, ops: Ops | None = None):
        pool_h = checks.positive_int(pool_h, "pool_h", "Pooling")
        pool_w = checks.positive_int(pool_w, "pool_w", "Pooling")
        check_stride_pad(stride, pad, "Pooling")
        if pad >= min(pool_h, pool_w):
            raise ConfigError(f"Pooling: pad must be smaller than the window ({pool_h}x{pool_w}) so no window is all "
                              f"padding, got pad {pad}")
        super().__init__(ops)
        self.pool_h, self.pool_w, self.stride, self.pad = pool_h, pool_w, stride, pad
        self.cache: Any = None
        self.out: Any = None        # (N, C, OH, OW) window maxima

    def forward(self, x: Any) -> Any:
        ops = self._ops_of(x)
        check_rank(x, 4, "Pooling", "(N, C, H, W)")
        if x.dtype not in (ops.xp.float32, ops.xp.float64):
            raise DTypeError(f"Pooling: expected a float32 or float64 input, got {dtype_name(x.dtype)}")
        self.out, self.cache = ops.maxpool2d_forward(x, *self.geometry(x.shape[2], x.shape[3]))
        return self.out

    def geometry(self, height: int, width: int) -> tuple[int, int, int, int, int, int]:
        """``(pool_h, pool_w, stride, pad, OH, OW)`` for an input of `height` x `width`."""
        return (self.pool_h, self.pool_w, self.stride, self.pad,
                conv_output_size(height, self.pool_h, self.stride, self.pad, what="Pooling (height)"),
                conv_output_size(width, self.pool_w, self.stride, self.pad, what="Pooling (width)"))

    def backward(self, dout: Any) -> Any:
        """``dout (N, C, OH, OW) -> dx (N, C, H, W)``: each window's gradient goes to its max."""
        return self.ops.maxpool2d_backward(dout, self.cache)


class Affine:
    """Fully connected layer: ``(N, ...) -> (N, out)``; inputs are flattened per sample.

    Operations: ``affine_forward`` / ``affine_backward`` of the backend's operation table.

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
        return self.ops.affine_forward(self.keep_input(x), self.W, self.b)

    def backward(self, dout: Any) -> Any:
        """``dout (N, out) -> dx`` of the input's original shape; sets `dW` and `db`."""
        dx, self.dW, self.db = self.ops.affine_backward(dout, self.x, self.W, self.need_input_grad, *self.grad_out)
        return self.input_shaped(dx)

    def keep_input(self, x: Any) -> Any:
        """`x` checked against the weights and flattened to ``(N, in)``, kept for backward."""
        _check_input(x, self.W, "Affine")
        if x.ndim < 2:
            raise ShapeError(f"Affine: expected input (N, ...) with a batch axis, got shape {tuple(x.shape)}")
        features = math.prod(x.shape[1:])
        if features != self.W.shape[0]:
            raise ShapeError(f"Affine: input has {features} features per sample (shape {tuple(x.shape)}), "
                             f"but W expects {self.W.shape[0]}")
        self.x_shape = tuple(x.shape)
        # -1: the batch size may be unknown (None) when the forward pass is traced into a graph.
        self.x = self.ops.xp.reshape(x, (-1, features)) if x.ndim != 2 else x
        return self.x

    def input_shaped(self, dx: Any) -> Any:
        """The input gradient ``(N, in)`` in the shape of the last input (None stays None)."""
        if dx is None or len(self.x_shape) == 2:
            return dx
        return self.ops.xp.reshape(dx, self.x_shape)

    def bind_gradients(self, dW: Any, db: Any) -> None:
        """Write `dW`/`db` into these arrays from now on (a network's flat gradient buffer)."""
        self.grad_out = (dW, db)


class ReLU(_OpsFromInput):
    """``max(x, 0)`` elementwise; backward passes the gradient where the input was > 0.

    Operations: ``relu_forward`` / ``relu_backward`` of the backend's operation table."""

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

    Operations: ``softmax_cross_entropy_forward`` / ``softmax_cross_entropy_backward`` of the
    backend's operation table (the reference is built on `xpcnn.ops.functions`).
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
        t = check_labels(xp, t, x)
        self.loss, self.cache = ops.softmax_cross_entropy_forward(x, t)
        return self.loss

    def backward(self, dout: Any = 1) -> Any:
        """``(N, K)`` gradient of the loss with respect to the scores."""
        return self.ops.softmax_cross_entropy_backward(self.cache, dout)


# ------------------------------------------------------------- chapter 6 layers


class Sigmoid:
    """``1 / (1 + exp(-x))`` elementwise; backward is ``dout * out * (1 - out)``."""

    def __init__(self):
        self.out: Any = None

    def forward(self, x: Any) -> Any:
        xp = namespace_of(x)
        self.out = 1.0 / (1.0 + xp.exp(-x))
        return self.out

    def backward(self, dout: Any) -> Any:
        return dout * (1.0 - self.out) * self.out


class Dropout:
    """The book's dropout: in training each unit is kept with probability ``1 - dropout_ratio``
    (``x * mask``, no rescaling); at inference every unit is scaled by ``1 - dropout_ratio``.

    Shapes: any ``(N, ...) -> (N, ...)``. The mask is drawn on the input's device from `rng`
    (a `RandomSource`, seeded by the network); without one, an unseeded source is made for
    the input's backend. ``dropout_ratio=0`` is the identity and draws nothing.
    """

    def __init__(self, dropout_ratio: float = 0.5, *, rng: RandomSource | None = None):
        self.dropout_ratio = checks.dropout_ratio(dropout_ratio, "Dropout")
        self.rng = rng
        self.mask: Any = None       # 0/1 mask of the last training forward, in the input's dtype

    def forward(self, x: Any, train_flg: bool = True) -> Any:
        xp = namespace_of(x)
        if not xp.isdtype(x.dtype, "real floating"):
            raise DTypeError(f"Dropout: expected a float32 or float64 input, got {dtype_name(x.dtype)}")
        if not checks.flag(train_flg, "train_flg", "Dropout"):
            return x * (1.0 - self.dropout_ratio) if self.dropout_ratio else x
        if self.dropout_ratio == 0.0:
            self.mask = None
            return x
        if self.rng is None:
            self.rng = RandomSource(backend_of(x))
        # u >= ratio keeps a unit with probability exactly 1 - ratio for u uniform in [0, 1).
        self.mask = xp.astype(self.rng.uniform(tuple(x.shape), x.dtype) >= self.dropout_ratio, x.dtype)
        return x * self.mask

    def backward(self, dout: Any) -> Any:
        return dout if self.mask is None else dout * self.mask


class BatchNormalization:
    """Batch normalisation (Ioffe & Szegedy), the book's layer with its signature.

    Shapes: ``(N, D) -> (N, D)`` normalised per feature (the book), and ``(N, C, H, W) ->
    (N, C, H, W)`` normalised per channel over ``N*H*W`` values (what CNNs use, like
    PyTorch's BatchNorm2d; `gamma` is then ``(C,)``). ``per_activation=True`` gives the book's
    4-D form instead: every one of the ``C*H*W`` activations is its own feature.

    Args:
        gamma, beta: scale and shift ``(D,)`` or ``(C,)`` (trained; updated in place).
        momentum: running statistics follow ``r = momentum * r + (1 - momentum) * batch``
            (PyTorch's ``momentum`` is ``1 -`` this).
        running_mean, running_var: initial running statistics (default 0 and 1); the
            running variance is the batch's biased variance, as in the book (PyTorch keeps
            the unbiased one).
        eps: added to the variance (the book's ``10e-7``).
    """

    def __init__(self, gamma: Any, beta: Any, momentum: float = 0.9, running_mean: Any = None,
                 running_var: Any = None, *, per_activation: bool = False, eps: float = 10e-7):
        if gamma.ndim != 1:
            raise ShapeError(f"BatchNormalization: gamma must be 1-D (D,) or (C,), got shape {tuple(gamma.shape)}")
        xp = namespace_of(gamma, beta)
        check_same_device(beta, gamma, "BatchNormalization beta")
        for name, value in (("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
            if value is not None and tuple(value.shape) != tuple(gamma.shape):
                raise ShapeError(f"BatchNormalization: {name} must have gamma's shape {tuple(gamma.shape)}, "
                                 f"got {tuple(value.shape)}")
        momentum = checks.number_in(momentum, "momentum", "BatchNormalization", low=0.0, high=1.0,
                                    low_open=False, high_open=False)
        eps = checks.number_in(eps, "eps", "BatchNormalization")
        device = array_api_compat.device(gamma)
        self.gamma, self.beta, self.momentum, self.eps = gamma, beta, float(momentum), float(eps)
        self.per_activation = bool(per_activation)
        self.running_mean = (xp.zeros(gamma.shape, dtype=gamma.dtype, device=device) if running_mean is None
                             else running_mean)
        self.running_var = (xp.ones(gamma.shape, dtype=gamma.dtype, device=device) if running_var is None
                            else running_var)
        self.input_shape: tuple | None = None
        self.axes: tuple = (0,)
        self.xn: Any = None         # normalised input of the last training forward
        self.std: Any = None        # sqrt(batch variance + eps), broadcastable to the input
        self.dgamma: Any = None
        self.dbeta: Any = None

    def _layout(self, x: Any, xp: Any) -> tuple[Any, tuple, tuple]:
        """The input as the 2-D or 4-D array to normalise, its reduction axes, the parameters' broadcast shape."""
        _check_input(x, self.gamma, "BatchNormalization")
        features = self.gamma.shape[0]
        if x.ndim == 4 and not self.per_activation:
            if x.shape[1] != features:
                raise ShapeError(f"BatchNormalization: input has {x.shape[1]} channels, gamma has {features} "
                                 f"(input shape {tuple(x.shape)})")
            return x, (0, 2, 3), (1, features, 1, 1)
        if x.ndim not in (2, 4):
            raise ShapeError(f"BatchNormalization: expected a 2-D (N, D) or 4-D (N, C, H, W) input, "
                             f"got shape {tuple(x.shape)}")
        if math.prod(x.shape[1:]) != features:
            raise ShapeError(f"BatchNormalization: input has {math.prod(x.shape[1:])} features per sample "
                             f"(shape {tuple(x.shape)}), gamma has {features}")
        # -1: the batch size may be unknown (None) when the forward pass is traced into a graph.
        return (xp.reshape(x, (-1, features)) if x.ndim != 2 else x), (0,), (1, features)

    def forward(self, x: Any, train_flg: bool = True) -> Any:
        xp = namespace_of(x)
        train_flg = checks.flag(train_flg, "train_flg", "BatchNormalization")
        self.input_shape = tuple(x.shape)
        x_in, axes, shape = self._layout(x, xp)
        gamma, beta = xp.reshape(self.gamma, shape), xp.reshape(self.beta, shape)
        if train_flg:
            count = math.prod(x_in.shape[a] for a in axes)
            if count < 2:
                raise ShapeError(f"BatchNormalization: training needs at least 2 values per feature, "
                                 f"got input shape {tuple(x.shape)}")
            mu = xp.mean(x_in, axis=axes, keepdims=True)
            xc = x_in - mu
            var = xp.mean(xc * xc, axis=axes, keepdims=True)
            self.std = xp.sqrt(var + self.eps)
            self.xn = xc / self.std
            self.axes = axes
            keep = self.momentum
            # In place: the network's view of the running statistics stays the same array.
            self.running_mean *= keep
            self.running_mean += (1.0 - keep) * xp.reshape(mu, self.gamma.shape)
            self.running_var *= keep
            self.running_var += (1.0 - keep) * xp.reshape(var, self.gamma.shape)
            out = gamma * self.xn + beta
        else:
            mean, var = xp.reshape(self.running_mean, shape), xp.reshape(self.running_var, shape)
            out = gamma * ((x_in - mean) / xp.sqrt(var + self.eps)) + beta
        return out if x_in is x else xp.reshape(out, (-1, *self.input_shape[1:]))

    def backward(self, dout: Any) -> Any:
        """``dout -> dx`` of the input's shape; sets `dgamma` and `dbeta`."""
        xp = namespace_of(dout)
        dout_in = xp.reshape(dout, tuple(self.xn.shape))
        axes = self.axes
        self.dbeta = xp.reshape(xp.sum(dout_in, axis=axes), self.gamma.shape)
        self.dgamma = xp.reshape(xp.sum(self.xn * dout_in, axis=axes), self.gamma.shape)
        shape = (1, self.gamma.shape[0], 1, 1) if len(axes) == 3 else (1, self.gamma.shape[0])
        dxn = xp.reshape(self.gamma, shape) * dout_in
        # The book's chain through xc, std, var and mu, collapsed into one expression.
        dx = (dxn - xp.mean(dxn, axis=axes, keepdims=True)
              - self.xn * xp.mean(dxn * self.xn, axis=axes, keepdims=True)) / self.std
        return xp.reshape(dx, self.input_shape)
