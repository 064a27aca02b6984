"""The book's `SimpleConvNet` (chapter 7), on any backend:

    conv - relu - pool(2x2, stride 2) - affine - relu - affine - softmax

(computed as conv - pool - relu - ..., which is the same function with the same gradients;
see `SimpleConvNet._build_layers`).
"""

from __future__ import annotations

import numpy as np

from .. import checks
from ..backend.devices import Backend
from ..errors import ShapeError
from ..nn.layers import Affine, Convolution, Pooling, ReLU, SoftmaxWithLoss
from ..nn.network import Network, merge_conv_param
from ..ops.geometry import conv_output_size

DEFAULT_CONV_PARAM = {"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1}


class SimpleConvNet(Network):
    """The book's SimpleConvNet, on any backend.

    Args:
        input_dim: ``(C, H, W)`` of one image.
        conv_param: ``filter_num``, ``filter_size``, ``pad``, ``stride`` of the convolution.
        hidden_size: units of the hidden affine layer.
        output_size: number of classes.
        weight_init_std: standard deviation of the Gaussian initial weights.
        backend: a backend name (``cpu``, ``gpu``, ``torch``, ``torch:cuda``, ``torch:mps``,
            ``array_api_strict``: see `get_backend`) or a `Backend`.
        dtype: ``"float32"`` (default) or ``"float64"``.
        seed: seed of the host generator that draws the weights, so every backend starts
            from identical weights.
        reference: run the array-API reference code for every hot operation, never a
            backend's fast path (the fast paths are tested against it).

    ``params`` holds ``W1 b1`` (convolution), ``W2 b2`` (hidden affine), ``W3 b3`` (output
    affine), shared by reference with the layers so optimizers update them in place; all six
    are views of one buffer, ``params.flat`` (see `xpcnn.nn.params`).
    """

    def __init__(self, input_dim: tuple = (1, 28, 28), conv_param: dict | None = None,
                 hidden_size: int = 100, output_size: int = 10, weight_init_std: float = 0.01,
                 *, backend: "str | Backend" = "cpu", dtype: str = "float32", seed: int | None = None,
                 reference: bool = False):
        conv = merge_conv_param(conv_param, DEFAULT_CONV_PARAM, "SimpleConvNet")
        if len(input_dim) != 3:
            raise ShapeError(f"SimpleConvNet: input_dim must be (C, H, W), got {tuple(input_dim)}")
        channels, height, width = (checks.positive_int(v, "input_dim", "SimpleConvNet") for v in input_dim)
        filter_num = checks.positive_int(conv["filter_num"], "filter_num", "SimpleConvNet")
        filter_size = checks.positive_int(conv["filter_size"], "filter_size", "SimpleConvNet")
        hidden_size = checks.positive_int(hidden_size, "hidden_size", "SimpleConvNet")
        output_size = checks.positive_int(output_size, "output_size", "SimpleConvNet")
        conv_h = conv_output_size(height, filter_size, conv["stride"], conv["pad"],
                                  what="SimpleConvNet convolution (height)")
        conv_w = conv_output_size(width, filter_size, conv["stride"], conv["pad"],
                                  what="SimpleConvNet convolution (width)")
        pool_h = conv_output_size(conv_h, 2, 2, 0, what="SimpleConvNet 2x2 pooling (height)")
        pool_w = conv_output_size(conv_w, 2, 2, 0, what="SimpleConvNet 2x2 pooling (width)")
        pool_output_size = filter_num * pool_h * pool_w

        rng = self._init_backend(backend, dtype, seed, reference)
        self.config = {
            "input_dim": [channels, height, width], "conv_param": conv, "hidden_size": hidden_size,
            "output_size": output_size, "weight_init_std": float(weight_init_std),
        }

        self._init_params({
            "W1": weight_init_std * rng.standard_normal((filter_num, channels, filter_size, filter_size)),
            "b1": np.zeros(filter_num),
            "W2": weight_init_std * rng.standard_normal((pool_output_size, hidden_size)),
            "b2": np.zeros(hidden_size),
            "W3": weight_init_std * rng.standard_normal((hidden_size, output_size)),
            "b3": np.zeros(output_size),
        })
        self._build_layers(conv)

    def _build_layers(self, conv: dict) -> None:
        p, ops = self.params, self.ops
        # The book applies ReLU before the pooling. Max pooling and ReLU commute (max is
        # monotonic: relu(max(w)) == max(relu(w)), and both send a window's gradient to its
        # first maximum, or nowhere when it is <= 0), so pooling first gives identical outputs
        # and gradients while ReLU touches 4x fewer values: about 20% off a training step.
        self.layers = {
            "Conv1": Convolution(p["W1"], p["b1"], conv["stride"], conv["pad"], ops=ops),
            "Pool1": Pooling(pool_h=2, pool_w=2, stride=2, ops=ops),
            "Relu1": ReLU(ops=ops),
            "Affine1": Affine(p["W2"], p["b2"], ops=ops),
            "Relu2": ReLU(ops=ops),
            "Affine2": Affine(p["W3"], p["b3"], ops=ops),
        }
        # Nobody needs d(loss)/d(images) in training: skip the col2im of the first layer.
        self.layers["Conv1"].need_input_grad = False
        self.last_layer = SoftmaxWithLoss(ops=ops)
        self.grad_sources = {"W1": ("Conv1", "dW"), "b1": ("Conv1", "db"), "W2": ("Affine1", "dW"),
                             "b2": ("Affine1", "db"), "W3": ("Affine2", "dW"), "b3": ("Affine2", "db")}
        self._bind_gradients()
