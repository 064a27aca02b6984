"""The book's `DeepConvNet` (chapter 8), on any backend:

    conv - relu - conv - relu - pool - conv - relu - conv(pad 2) - relu - pool -
          conv - relu - conv - relu - pool - affine - relu - dropout - affine - dropout - softmax

(each "relu - pool" is computed as "pool - relu": they commute, as in `SimpleConvNet`).
"""

from __future__ import annotations

import math

import numpy as np

from .. import checks
from ..backend.devices import Backend
from ..errors import ShapeError
from ..nn.layers import Affine, Convolution, Dropout, Pooling, ReLU, SoftmaxWithLoss
from ..nn.network import Network, merge_conv_param
from ..ops.geometry import conv_output_size

DEEP_CONV_PARAMS = (
    {"filter_num": 16, "filter_size": 3, "pad": 1, "stride": 1},
    {"filter_num": 16, "filter_size": 3, "pad": 1, "stride": 1},
    {"filter_num": 32, "filter_size": 3, "pad": 1, "stride": 1},
    {"filter_num": 32, "filter_size": 3, "pad": 2, "stride": 1},
    {"filter_num": 64, "filter_size": 3, "pad": 1, "stride": 1},
    {"filter_num": 64, "filter_size": 3, "pad": 1, "stride": 1},
)


def _conv_param(given: dict | None, default: dict, index: int) -> dict:
    conv = merge_conv_param(given, default, "DeepConvNet", f"conv_param_{index}")
    for key in ("filter_num", "filter_size", "stride"):
        conv[key] = checks.positive_int(conv[key], f"conv_param_{index}['{key}']", "DeepConvNet")
    return conv


class DeepConvNet(Network):
    """The book's DeepConvNet (chapter 8), on any backend.

    Args:
        input_dim: ``(C, H, W)`` of one image.
        conv_param_1 ... conv_param_6: ``filter_num``, ``filter_size``, ``pad``, ``stride`` of
            the six convolutions (defaults: 3x3, 16-16-32-32-64-64 filters, pad 1 except
            pad 2 for the fourth); keys not given keep their default.
        hidden_size: units of the hidden affine layer.
        output_size: number of classes.
        dropout_ratio: of both Dropout layers (in [0, 1); 0 turns them off).
        backend, dtype, seed: as in `SimpleConvNet`; `seed` also seeds the Dropout masks.

    ``params``: ``W1``..``W6`` ``(FN, C, FH, FW)`` and ``b1``..``b6`` (convolutions), ``W7``
    ``(in, hidden)``, ``W8`` ``(hidden, out)`` and ``b7``, ``b8`` (affine layers), drawn with
    He initialisation (std ``sqrt(2 / fan_in)``) from ``numpy.random.default_rng(seed)``.
    """

    def __init__(self, input_dim: tuple = (1, 28, 28), conv_param_1: dict | None = None,
                 conv_param_2: dict | None = None, conv_param_3: dict | None = None,
                 conv_param_4: dict | None = None, conv_param_5: dict | None = None,
                 conv_param_6: dict | None = None, hidden_size: int = 50, output_size: int = 10,
                 dropout_ratio: float = 0.5, *, backend: "str | Backend" = "cpu", dtype: str = "float32",
                 seed: int | None = None, reference: bool = False):
        given = (conv_param_1, conv_param_2, conv_param_3, conv_param_4, conv_param_5, conv_param_6)
        convs = [_conv_param(g, d, i + 1) for i, (g, d) in enumerate(zip(given, DEEP_CONV_PARAMS))]
        if len(input_dim) != 3:
            raise ShapeError(f"DeepConvNet: input_dim must be (C, H, W), got {tuple(input_dim)}")
        channels, height, width = (checks.positive_int(v, "input_dim", "DeepConvNet") for v in input_dim)
        hidden_size = checks.positive_int(hidden_size, "hidden_size", "DeepConvNet")
        output_size = checks.positive_int(output_size, "output_size", "DeepConvNet")
        dropout_ratio = checks.dropout_ratio(dropout_ratio, "DeepConvNet")

        # Shapes through the net: every second convolution is followed by a 2x2 pooling.
        shapes, c, h, w = [], channels, height, width
        for i, conv in enumerate(convs, start=1):
            h = conv_output_size(h, conv["filter_size"], conv["stride"], conv["pad"],
                                 what=f"DeepConvNet conv{i} (height)")
            w = conv_output_size(w, conv["filter_size"], conv["stride"], conv["pad"],
                                 what=f"DeepConvNet conv{i} (width)")
            shapes.append(c)
            c = conv["filter_num"]
            if i % 2 == 0:
                h = conv_output_size(h, 2, 2, 0, what=f"DeepConvNet pool{i // 2} (height)")
                w = conv_output_size(w, 2, 2, 0, what=f"DeepConvNet pool{i // 2} (width)")
        flat_size = c * h * w

        rng = self._init_backend(backend, dtype, seed, reference)
        self.config = {"input_dim": [channels, height, width],
                       **{f"conv_param_{i}": conv for i, conv in enumerate(convs, start=1)},
                       "hidden_size": hidden_size, "output_size": output_size, "dropout_ratio": dropout_ratio}

        # He initialisation: fan-in of each layer (the book's pre_node_nums), drawn in its order.
        host: dict[str, np.ndarray] = {}
        for i, (conv, in_channels) in enumerate(zip(convs, shapes), start=1):
            size = conv["filter_size"]
            scale = math.sqrt(2.0 / (in_channels * size * size))
            host[f"W{i}"] = scale * rng.standard_normal((conv["filter_num"], in_channels, size, size))
            host[f"b{i}"] = np.zeros(conv["filter_num"])
        host["W7"] = math.sqrt(2.0 / flat_size) * rng.standard_normal((flat_size, hidden_size))
        host["b7"] = np.zeros(hidden_size)
        host["W8"] = math.sqrt(2.0 / hidden_size) * rng.standard_normal((hidden_size, output_size))
        host["b8"] = np.zeros(output_size)
        self._init_params(host)
        self._build_layers(convs, dropout_ratio)

    def _build_layers(self, convs: list[dict], dropout_ratio: float) -> None:
        p, layers, ops = self.params, {}, self.ops
        for i, conv in enumerate(convs, start=1):
            layers[f"Conv{i}"] = Convolution(p[f"W{i}"], p[f"b{i}"], conv["stride"], conv["pad"], ops=ops)
            if i % 2 == 0:
                # Pooling before ReLU: the same function and gradients, 4x less ReLU work.
                layers[f"Pool{i // 2}"] = Pooling(pool_h=2, pool_w=2, stride=2, ops=ops)
            layers[f"Relu{i}"] = ReLU(ops=ops)
        source = self._random_source()
        layers["Affine1"] = Affine(p["W7"], p["b7"], ops=ops)
        layers["Relu7"] = ReLU(ops=ops)
        layers["Dropout1"] = Dropout(dropout_ratio, rng=source)
        layers["Affine2"] = Affine(p["W8"], p["b8"], ops=ops)
        layers["Dropout2"] = Dropout(dropout_ratio, rng=source)
        layers["Conv1"].need_input_grad = False     # nobody needs d(loss)/d(images)
        self.layers = layers
        self.last_layer = SoftmaxWithLoss(ops=ops)
        self.grad_sources = {}
        for i in range(1, 7):
            self.grad_sources[f"W{i}"], self.grad_sources[f"b{i}"] = (f"Conv{i}", "dW"), (f"Conv{i}", "db")
        for key, name in (("7", "Affine1"), ("8", "Affine2")):
            self.grad_sources[f"W{key}"], self.grad_sources[f"b{key}"] = (name, "dW"), (name, "db")
        self._bind_gradients()
