"""The book's fully connected `MultiLayerNetExtend` (chapter 6: weight decay, Dropout, Batch
Normalization, He/Xavier initialisation), on any backend."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import checks
from ..backend.devices import Backend
from ..errors import ConfigError
from ..nn.layers import Affine, BatchNormalization, Dropout, ReLU, Sigmoid, SoftmaxWithLoss
from ..nn.network import Network

ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid}


def init_scale(weight_init_std: Any, fan_in: int) -> float:
    """The book's rule: 'relu'/'he' -> sqrt(2/fan_in), 'sigmoid'/'xavier' -> sqrt(1/fan_in), or a number."""
    if isinstance(weight_init_std, str):
        name = weight_init_std.lower()
        if name in ("relu", "he"):
            return math.sqrt(2.0 / fan_in)
        if name in ("sigmoid", "xavier"):
            return math.sqrt(1.0 / fan_in)
        raise ConfigError(f"weight_init_std must be 'relu'/'he', 'sigmoid'/'xavier' or a number > 0, "
                          f"got {weight_init_std!r}")
    if isinstance(weight_init_std, bool) or not isinstance(weight_init_std, (int, float)) or not weight_init_std > 0 \
            or not math.isfinite(weight_init_std):
        raise ConfigError(f"weight_init_std must be 'relu'/'he', 'sigmoid'/'xavier' or a number > 0, "
                          f"got {weight_init_std!r}")
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
        input_size = checks.positive_int(input_size, "input_size", what)
        output_size = checks.positive_int(output_size, "output_size", what)
        if isinstance(hidden_size_list, (str, bytes)) or not hasattr(hidden_size_list, "__iter__"):
            raise ConfigError(f"{what}: hidden_size_list must be a list of integers >= 1, got {hidden_size_list!r}")
        hidden = [checks.positive_int(v, "hidden_size_list entries", what) for v in hidden_size_list]
        if activation not in ACTIVATIONS:
            raise ConfigError(f"{what}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        weight_decay_lambda = checks.number_in(weight_decay_lambda, "weight_decay_lambda", what, low_open=False)
        if dropout_ratio is not None and dropout_ration != 0.5 and dropout_ratio != dropout_ration:
            raise ConfigError(f"{what}: dropout_ration={dropout_ration!r} and dropout_ratio={dropout_ratio!r} "
                              f"differ; give one")
        dropout = checks.dropout_ratio(dropout_ration if dropout_ratio is None else dropout_ratio, what)
        use_dropout = checks.flag(use_dropout, "use_dropout", what)
        use_batchnorm = checks.flag(use_batchnorm, "use_batchnorm", what)
        sizes = [input_size, *hidden, output_size]
        scales = [init_scale(weight_init_std, fan_in) for fan_in in sizes[:-1]]

        rng = self._init_backend(backend, dtype, seed, reference)
        self.input_size, self.hidden_size_list, self.output_size = input_size, hidden, output_size
        self.hidden_layer_num = len(hidden)
        self.weight_decay_lambda, self.use_dropout, self.use_batchnorm = weight_decay_lambda, use_dropout, use_batchnorm
        self.config = {"input_size": input_size, "hidden_size_list": hidden, "output_size": output_size,
                       "activation": activation, "weight_init_std": weight_init_std,
                       "weight_decay_lambda": weight_decay_lambda, "use_dropout": use_dropout,
                       "dropout_ratio": dropout, "use_batchnorm": use_batchnorm}
        self._init_params(self._initial_params(sizes, scales, rng))
        self._build_layers(ACTIVATIONS[activation], dropout)

    def _initial_params(self, sizes: list[int], scales: list[float], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``W1 b1 ... Wn bn`` (Gaussian weights of the given scales, zero biases) and, with
        batch normalization, ``gamma1 beta1 ...`` (ones, zeros), on the host."""
        host: dict[str, np.ndarray] = {}
        for idx in range(1, len(sizes)):
            host[f"W{idx}"] = scales[idx - 1] * rng.standard_normal((sizes[idx - 1], sizes[idx]))
            host[f"b{idx}"] = np.zeros(sizes[idx])
        if self.use_batchnorm:
            for idx, units in enumerate(sizes[1:-1], start=1):
                host[f"gamma{idx}"], host[f"beta{idx}"] = np.ones(units), np.zeros(units)
        return host

    def _build_layers(self, activation: type, dropout_ratio: float) -> None:
        """``Affine - [BatchNorm] - activation - [Dropout]`` per hidden layer, then ``Affine``,
        the loss layer, and where each parameter's gradient comes from."""
        p, layers, self.grad_sources, ops = self.params, {}, {}, self.ops
        activation_kw = {"ops": ops} if activation is ReLU else {}

        def affine(idx: int) -> None:
            layers[f"Affine{idx}"] = Affine(p[f"W{idx}"], p[f"b{idx}"], ops=ops)
            self.grad_sources[f"W{idx}"], self.grad_sources[f"b{idx}"] = (f"Affine{idx}", "dW"), (f"Affine{idx}", "db")

        for idx in range(1, self.hidden_layer_num + 1):
            affine(idx)
            if self.use_batchnorm:
                layers[f"BatchNorm{idx}"] = BatchNormalization(p[f"gamma{idx}"], p[f"beta{idx}"])
                self.grad_sources[f"gamma{idx}"] = (f"BatchNorm{idx}", "dgamma")
                self.grad_sources[f"beta{idx}"] = (f"BatchNorm{idx}", "dbeta")
            layers[f"Activation_function{idx}"] = activation(**activation_kw)
            if self.use_dropout:
                layers[f"Dropout{idx}"] = Dropout(dropout_ratio, rng=self._random_source())
        affine(self.hidden_layer_num + 1)
        layers["Affine1"].need_input_grad = False
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
