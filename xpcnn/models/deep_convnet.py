"""The book's deeper networks: `MultiLayerNetExtend` (chapter 6: weight decay, Dropout,
Batch Normalization, He/Xavier initialisation) and `DeepConvNet` (chapter 8).

    DeepConvNet:  conv - relu - conv - relu - pool - conv - relu - conv(pad 2) - relu - pool -
                  conv - relu - conv - relu - pool - affine - relu - dropout - affine - dropout - softmax

(each "relu - pool" is computed as "pool - relu": they commute, as in `SimpleConvNet`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backend import Backend
from .errors import ConfigError, ShapeError
from .functional import conv_output_size, positive_int
from .layers import (
    Affine, BatchNormalization, Convolution, Dropout, Pooling, ReLU, Sigmoid, SoftmaxWithLoss, check_dropout_ratio,
)
from .network import Network, merge_conv_param

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
        conv[key] = positive_int(conv[key], f"conv_param_{index}['{key}']", "DeepConvNet")
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
        channels, height, width = (positive_int(v, "input_dim", "DeepConvNet") for v in input_dim)
        hidden_size = positive_int(hidden_size, "hidden_size", "DeepConvNet")
        output_size = positive_int(output_size, "output_size", "DeepConvNet")
        dropout_ratio = check_dropout_ratio(dropout_ratio, "DeepConvNet")

        # Shapes through the net: every second convolution is followed by a 2x2 pooling.
        shapes, c, h, w = [], channels, height, width
        for i, conv in enumerate(convs, start=1):
            h = conv_output_size(h, conv["filter_size"], conv["stride"], conv["pad"], what=f"DeepConvNet conv{i} (height)")
            w = conv_output_size(w, conv["filter_size"], conv["stride"], conv["pad"], what=f"DeepConvNet conv{i} (width)")
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
        p, layers, ops = self.params, {}, self.backend.ops
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


ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid}


def init_scale(weight_init_std: Any, fan_in: int) -> float:
    """The book's rule: 'relu'/'he' -> sqrt(2/fan_in), 'sigmoid'/'xavier' -> sqrt(1/fan_in), or a number."""
    if isinstance(weight_init_std, str):
        name = weight_init_std.lower()
        if name in ("relu", "he"):
            return math.sqrt(2.0 / fan_in)
        if name in ("sigmoid", "xavier"):
            return math.sqrt(1.0 / fan_in)
        raise ConfigError(f"weight_init_std must be 'relu'/'he', 'sigmoid'/'xavier' or a number > 0, got {weight_init_std!r}")
    if isinstance(weight_init_std, bool) or not isinstance(weight_init_std, (int, float)) or not weight_init_std > 0 \
            or not math.isfinite(weight_init_std):
        raise ConfigError(f"weight_init_std must be 'relu'/'he', 'sigmoid'/'xavier' or a number > 0, got {weight_init_std!r}")
    return float(weight_init_std)


class MultiLayerNetExtend(Network):
    """The book's fully connected network of chapter 6, with every option.

    ``affine - [batchnorm] - activation - [dropout]`` per hidden layer, then ``affine - softmax``.

    Args:
        input_size: features per sample (images ``(N, C, H, W)`` are flattened by the first Affine).
        hidden_size_list: units of each hidden layer, e.g. ``[100, 100, 100]``.
        output_size: number of classes.
        activation: ``'relu'`` or ``'sigmoid'``.
        weight_init_std: ``'relu'``/``'he'`` (``sqrt(2/fan_in)``), ``'sigmoid'``/``'xavier'``
            (``sqrt(1/fan_in)``) or a number (a fixed standard deviation).
        weight_decay_lambda: L2 weight decay: the loss adds ``0.5 * lambda * sum(W**2)`` over
            every ``W``, and each ``W``'s gradient adds ``lambda * W`` (the book's way).
        use_dropout: a Dropout layer after each activation.
        dropout_ration: the book's (misspelt) name of the dropout ratio; `dropout_ratio` is
            accepted too (give one, or both equal).
        use_batchnorm: a BatchNormalization layer (``gamma``/``beta`` parameters) after each
            hidden Affine.
        backend, dtype, seed: as in `SimpleConvNet`; `seed` also seeds the Dropout masks.
    """

    def __init__(self, input_size: int, hidden_size_list: list, output_size: int, activation: str = "relu",
                 weight_init_std: Any = "relu", weight_decay_lambda: float = 0, use_dropout: bool = False,
                 dropout_ration: float = 0.5, use_batchnorm: bool = False, *, dropout_ratio: float | None = None,
                 backend: "str | Backend" = "cpu", dtype: str = "float32", seed: int | None = None,
                 reference: bool = False):
        what = "MultiLayerNetExtend"
        input_size = positive_int(input_size, "input_size", what)
        output_size = positive_int(output_size, "output_size", what)
        if isinstance(hidden_size_list, (str, bytes)) or not hasattr(hidden_size_list, "__iter__"):
            raise ConfigError(f"{what}: hidden_size_list must be a list of integers >= 1, got {hidden_size_list!r}")
        hidden = [positive_int(v, "hidden_size_list entries", what) for v in hidden_size_list]
        if activation not in ACTIVATIONS:
            raise ConfigError(f"{what}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if isinstance(weight_decay_lambda, bool) or not isinstance(weight_decay_lambda, (int, float)) \
                or not 0 <= weight_decay_lambda < math.inf:
            raise ConfigError(f"{what}: weight_decay_lambda must be a number >= 0, got {weight_decay_lambda!r}")
        if dropout_ratio is not None and dropout_ration != 0.5 and dropout_ratio != dropout_ration:
            raise ConfigError(f"{what}: dropout_ration={dropout_ration!r} and dropout_ratio={dropout_ratio!r} differ; give one")
        ratio = check_dropout_ratio(dropout_ration if dropout_ratio is None else dropout_ratio, what)
        for name, flag in (("use_dropout", use_dropout), ("use_batchnorm", use_batchnorm)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{what}: {name} must be True or False, got {flag!r}")
        sizes = [input_size, *hidden, output_size]
        scales = [init_scale(weight_init_std, fan_in) for fan_in in sizes[:-1]]

        rng = self._init_backend(backend, dtype, seed, reference)
        self.input_size, self.hidden_size_list, self.output_size = input_size, hidden, output_size
        self.hidden_layer_num = len(hidden)
        self.weight_decay_lambda, self.use_dropout, self.use_batchnorm = float(weight_decay_lambda), use_dropout, use_batchnorm
        self.config = {"input_size": input_size, "hidden_size_list": hidden, "output_size": output_size,
                       "activation": activation, "weight_init_std": weight_init_std,
                       "weight_decay_lambda": float(weight_decay_lambda), "use_dropout": use_dropout,
                       "dropout_ratio": ratio, "use_batchnorm": use_batchnorm}

        host: dict[str, np.ndarray] = {}
        for idx in range(1, len(sizes)):
            host[f"W{idx}"] = scales[idx - 1] * rng.standard_normal((sizes[idx - 1], sizes[idx]))
            host[f"b{idx}"] = np.zeros(sizes[idx])
        if use_batchnorm:
            for idx, units in enumerate(hidden, start=1):
                host[f"gamma{idx}"], host[f"beta{idx}"] = np.ones(units), np.zeros(units)
        self._init_params(host)

        p, layers, self.grad_sources, ops = self.params, {}, {}, self.backend.ops
        activation_kw = {"ops": ops} if activation == "relu" else {}
        for idx in range(1, self.hidden_layer_num + 1):
            layers[f"Affine{idx}"] = Affine(p[f"W{idx}"], p[f"b{idx}"], ops=ops)
            if use_batchnorm:
                layers[f"BatchNorm{idx}"] = BatchNormalization(p[f"gamma{idx}"], p[f"beta{idx}"])
            layers[f"Activation_function{idx}"] = ACTIVATIONS[activation](**activation_kw)
            if use_dropout:
                layers[f"Dropout{idx}"] = Dropout(ratio, rng=self._random_source())
        last = self.hidden_layer_num + 1
        layers[f"Affine{last}"] = Affine(p[f"W{last}"], p[f"b{last}"], ops=ops)
        layers["Affine1"].need_input_grad = False
        for idx in range(1, last + 1):
            self.grad_sources[f"W{idx}"], self.grad_sources[f"b{idx}"] = (f"Affine{idx}", "dW"), (f"Affine{idx}", "db")
            if use_batchnorm and idx != last:
                self.grad_sources[f"gamma{idx}"] = (f"BatchNorm{idx}", "dgamma")
                self.grad_sources[f"beta{idx}"] = (f"BatchNorm{idx}", "dbeta")
        self.layers = layers
        self.last_layer = SoftmaxWithLoss(ops=ops)
        self._bind_gradients()

    def _weight_decay(self) -> Any:
        xp = self.xp
        return sum(0.5 * self.weight_decay_lambda * xp.sum(self.params[f"W{idx}"] ** 2)
                   for idx in range(1, self.hidden_layer_num + 2))

    def loss(self, x: Any, t: Any, train_flg: bool = False) -> Any:
        """Mean cross-entropy plus ``0.5 * lambda * sum(W**2)``; inference mode by default, as in the book."""
        data_loss = self.last_layer.forward(self.predict(x, train_flg), t)
        return data_loss + self._weight_decay() if self.weight_decay_lambda else data_loss

    def gradient(self, x: Any, t: Any) -> dict[str, Any]:
        """Gradients of `loss` in training mode, weight decay included (``dW + lambda * W``).

        ``self.last_layer.loss`` holds the batch's cross-entropy without the decay term.
        """
        self.loss(x, t, train_flg=True)
        self._backward()
        grads = self._collect_grads()
        if self.weight_decay_lambda:
            for idx in range(1, self.hidden_layer_num + 2):
                grads[f"W{idx}"] += self.weight_decay_lambda * self.params[f"W{idx}"]   # in the buffer
        return grads
