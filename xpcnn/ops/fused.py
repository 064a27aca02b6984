"""Fused operations: runs of layers that a fast table can compute in one pass over memory.

A convolution followed by ReLU (and by max pooling) or an Affine layer followed by ReLU is
one operation of the table (`xpcnn.ops.table`), so that a backend can fuse it: add the bias,
clip at zero and pool while the convolution's output is still in cache, and in the backward
pass send the gradient only to the pooled maxima that were positive. The networks run such
runs of layers as one step (`xpcnn.nn.fusion`).

Each function here is the definition of one fused operation: the table's own unfused
entries called in turn (``ops`` is the table, so a backend without a fused kernel still runs
its fast convolution), with the same results as the layers run one by one. A backend's fused
kernel has the same signature with the namespace in place of the table, and returns
``NotImplemented`` for a case it leaves to the definition here; its backward then receives
this module's cache and hands it back too.

    >>> out, cache = ops.conv2d_relu_maxpool2d_forward(x, W, b, 1, 0, 24, 24, (2, 2, 2, 0, 12, 12))
    >>> dx, dW, db = ops.conv2d_relu_maxpool2d_backward(dout, cache, W, 1, 0, False)
"""

from __future__ import annotations

from typing import Any

#: A pooling's geometry as the fused operations take it: (pool_h, pool_w, stride, pad, out_h, out_w).
PoolGeometry = tuple[int, int, int, int, int, int]

#: The tag that starts every cache made here (a fused kernel's backward tells its own from it).
COMPOSED = "composed"


def conv2d_relu_forward(ops: Any, x: Any, W: Any, b: Any, stride: int, pad: int,
                        out_h: int, out_w: int) -> tuple[Any, Any]:
    """``relu(conv(x))``: ``(N, C, H, W) -> (N, FN, OH, OW)``."""
    conv_out, conv_cache = ops.conv2d_forward(x, W, b, stride, pad, out_h, out_w)
    out = ops.relu_forward(conv_out)
    return out, (COMPOSED, conv_cache, out)


def conv2d_relu_backward(ops: Any, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                         need_input_grad: bool, dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """``dout (N, FN, OH, OW) -> (dx or None, dW, db)`` of `conv2d_relu_forward`."""
    _, conv_cache, out = cache
    return ops.conv2d_backward(ops.relu_backward(out, dout), conv_cache, W, stride, pad, need_input_grad,
                               dW_out, db_out)


def conv2d_relu_maxpool2d_forward(ops: Any, x: Any, W: Any, b: Any, stride: int, pad: int, out_h: int,
                                  out_w: int, pool: PoolGeometry) -> tuple[Any, Any]:
    """``maxpool(relu(conv(x)))``: ``(N, C, H, W) -> (N, FN, POH, POW)``; `pool` is
    ``(pool_h, pool_w, stride, pad, out_h, out_w)`` of the pooling.

    ReLU and max pooling commute exactly (both only select values, and a window's first
    maximum above zero is the same before and after the clip), so this pools first: the
    ReLU then works on the pooled values only. Its gradients equal those of the layers in
    either order."""
    conv_out, conv_cache = ops.conv2d_forward(x, W, b, stride, pad, out_h, out_w)
    pooled, pool_cache = ops.maxpool2d_forward(conv_out, *pool)
    out = ops.relu_forward(pooled)
    return out, (COMPOSED, conv_cache, pool_cache, out)


def conv2d_relu_maxpool2d_backward(ops: Any, dout: Any, cache: Any, W: Any, stride: int, pad: int,
                                   need_input_grad: bool, dW_out: Any = None,
                                   db_out: Any = None) -> tuple[Any, Any, Any]:
    """``dout (N, FN, POH, POW) -> (dx or None, dW, db)`` of `conv2d_relu_maxpool2d_forward`."""
    _, conv_cache, pool_cache, out = cache
    dconv = ops.maxpool2d_backward(ops.relu_backward(out, dout), pool_cache)
    return ops.conv2d_backward(dconv, conv_cache, W, stride, pad, need_input_grad, dW_out, db_out)


def affine_relu_forward(ops: Any, x: Any, W: Any, b: Any) -> tuple[Any, Any]:
    """``relu(x @ W + b)``: ``(N, in) -> (N, out)``."""
    out = ops.relu_forward(ops.affine_forward(x, W, b))
    return out, (COMPOSED, out)


def affine_relu_backward(ops: Any, dout: Any, cache: Any, x: Any, W: Any, need_input_grad: bool,
                         dW_out: Any = None, db_out: Any = None) -> tuple[Any, Any, Any]:
    """``dout (N, out) -> (dx (N, in) or None, dW, db)`` of `affine_relu_forward`."""
    _, out = cache
    return ops.affine_backward(ops.relu_backward(out, dout), x, W, need_input_grad, dW_out, db_out)


#: The fused operations, by table entry name.
FUSED = {function.__name__: function for function in (
    conv2d_relu_forward, conv2d_relu_backward, conv2d_relu_maxpool2d_forward, conv2d_relu_maxpool2d_backward,
    affine_relu_forward, affine_relu_backward)}
