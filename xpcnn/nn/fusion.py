"""A network's layers as steps: each layer alone, or a run of layers the operation table
computes as one fused operation (`xpcnn.ops.fused`).

    Convolution, ReLU                         -> conv2d_relu_forward / _backward
    Convolution, ReLU, Pooling (max)          -> conv2d_relu_maxpool2d_forward / _backward
    Convolution, Pooling (max), ReLU          -> the same (ReLU and max pooling commute exactly)
    Affine, ReLU                              -> affine_relu_forward / _backward

`Network.predict` and `Network.gradient` run `steps(layers)`; the layers keep their
parameters, checks, gradient buffers and ``need_input_grad``, and a fused step sets the
first layer's ``dW``/``db`` as the layer would. What a fused step does not fill are the
layers' own caches (``Convolution.cache``, ``ReLU.out``, ``Pooling.out``): call the layers
one by one, as the book does, to look at those. Results equal the layers run one by one
(on the reference table bit for bit, tests/nn/test_fusion.py).
"""

from __future__ import annotations

from typing import Any

from .layers import Affine, BatchNormalization, Convolution, Dropout, Pooling, ReLU

#: The table's fused operations the steps call.
FUSED_OPERATIONS = ("conv2d_relu_forward", "conv2d_relu_backward", "conv2d_relu_maxpool2d_forward",
                    "conv2d_relu_maxpool2d_backward", "affine_relu_forward", "affine_relu_backward")


class LayerStep:
    """One layer on its own."""

    def __init__(self, layer: Any):
        self.layers = (layer,)
        self._takes_flag = isinstance(layer, (Dropout, BatchNormalization))

    def forward(self, x: Any, train_flg: bool) -> Any:
        layer = self.layers[0]
        return layer.forward(x, train_flg) if self._takes_flag else layer.forward(x)

    def backward(self, dout: Any) -> Any:
        return self.layers[0].backward(dout)


class ConvReLU:
    """Convolution then ReLU, as ``conv2d_relu_*`` of the convolution's table."""

    def __init__(self, conv: Convolution, relu: ReLU):
        self.layers, self.conv = (conv, relu), conv
        self.cache: Any = None

    def forward(self, x: Any, train_flg: bool) -> Any:
        conv = self.conv
        out, self.cache = conv.ops.conv2d_relu_forward(x, conv.W, conv.b, conv.stride, conv.pad, *conv.output_size(x))
        return out

    def backward(self, dout: Any) -> Any:
        conv = self.conv
        dx, conv.dW, conv.db = conv.ops.conv2d_relu_backward(dout, self.cache, conv.W, conv.stride, conv.pad,
                                                             conv.need_input_grad, *conv.grad_out)
        return dx


class ConvReLUPool:
    """Convolution, ReLU and max pooling (in either order after the convolution), as
    ``conv2d_relu_maxpool2d_*`` of the convolution's table."""

    def __init__(self, conv: Convolution, pool: Pooling, layers: tuple):
        self.layers, self.conv, self.pool = layers, conv, pool
        self.cache: Any = None

    def forward(self, x: Any, train_flg: bool) -> Any:
        conv = self.conv
        out_h, out_w = conv.output_size(x)
        out, self.cache = conv.ops.conv2d_relu_maxpool2d_forward(x, conv.W, conv.b, conv.stride, conv.pad, out_h,
                                                                 out_w, self.pool.geometry(out_h, out_w))
        return out

    def backward(self, dout: Any) -> Any:
        conv = self.conv
        dx, conv.dW, conv.db = conv.ops.conv2d_relu_maxpool2d_backward(dout, self.cache, conv.W, conv.stride,
                                                                       conv.pad, conv.need_input_grad, *conv.grad_out)
        return dx


class AffineReLU:
    """Affine then ReLU, as ``affine_relu_*`` of the Affine layer's table."""

    def __init__(self, affine: Affine, relu: ReLU):
        self.layers, self.affine = (affine, relu), affine
        self.cache: Any = None

    def forward(self, x: Any, train_flg: bool) -> Any:
        affine = self.affine
        out, self.cache = affine.ops.affine_relu_forward(affine.keep_input(x), affine.W, affine.b)
        return out

    def backward(self, dout: Any) -> Any:
        affine = self.affine
        dx, affine.dW, affine.db = affine.ops.affine_relu_backward(dout, self.cache, affine.x, affine.W,
                                                                   affine.need_input_grad, *affine.grad_out)
        return affine.input_shaped(dx)


def _fused(layers: list, at: int) -> Any:
    """The fused step starting at ``layers[at]``, or None."""
    kinds = [type(layer) for layer in layers[at:at + 3]]
    if kinds[:1] == [Convolution]:
        if kinds[1:3] in ([ReLU, Pooling], [Pooling, ReLU]):
            pool = layers[at + 1] if kinds[1] is Pooling else layers[at + 2]
            return ConvReLUPool(layers[at], pool, tuple(layers[at:at + 3]))
        if kinds[1:2] == [ReLU]:
            return ConvReLU(layers[at], layers[at + 1])
    if kinds[:2] == [Affine, ReLU]:
        return AffineReLU(layers[at], layers[at + 1])
    return None


def steps(layers: list) -> list:
    """The steps that run `layers` in order: fused runs where the table has an operation for
    them (exact types only: a subclass may change what a layer does), single layers elsewhere."""
    plan, at = [], 0
    while at < len(layers):
        step = _fused(layers, at) or LayerStep(layers[at])
        plan.append(step)
        at += len(step.layers)
    return plan
