"""What every network shares: parameters made on the host then moved, the book's
`predict`/`loss`/`gradient` over an ordered dict of layers, batched `accuracy` counted on the
device, `set_params`, and the state a checkpoint needs besides the parameters (BatchNorm
running statistics, the Dropout random source).

A network subclass builds ``self.layers`` (name -> layer, in order), ``self.last_layer``
(a `SoftmaxWithLoss`) and ``self.grad_sources`` (parameter name -> ``(layer name,
gradient attribute)``, e.g. ``"W1": ("Conv1", "dW")``); it calls `_init_params` once with
all its host arrays and `_bind_gradients` once its layers exist (gradients then land in one
flat buffer, ``self.grads``, which `gradient` returns).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import checks
from ..backend.arrays import namespace_of, values_are_free_to_read
from ..backend.devices import Backend, get_backend
from ..backend.random import RandomSource
from ..errors import ConfigError, ShapeError
from ..ops.functions import host_class_labels
from ..ops.table import Ops, ops_of
from . import fusion
from .compiled_step import CompiledStep
from .inference import predict_proba
from .layers import BatchNormalization
from .params import make_params


def derived_seed(seed: int | None, stream: int) -> int | None:
    """An independent 32-bit seed for another random stream of the same model (e.g. Dropout)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


#: Stream number of the Dropout masks (the weights use the model's seed itself).
DROPOUT_STREAM = 1


def merge_conv_param(given: dict | None, default: dict, what: str, name: str = "conv_param") -> dict:
    """`default` updated with `given` (the book's ``conv_param`` dicts); `ConfigError` naming
    any key the convolution does not have."""
    conv = dict(default)
    if given:
        unknown = set(given) - set(conv)
        if unknown:
            raise ConfigError(f"{what}: unknown {name} keys {sorted(unknown)}; expected {sorted(conv)}")
        conv.update(given)
    return conv


class Network:
    """Base class: see the module docstring. Attributes: ``backend``, ``dtype``, ``params``,
    ``config``, ``layers``, ``last_layer``, ``grad_sources``, ``rng`` (or None)."""

    layers: dict[str, Any]
    last_layer: Any
    grad_sources: dict[str, tuple[str, str]]
    config: dict[str, Any]

    def _init_backend(self, backend: "str | Backend", dtype: str, seed: Any,
                      reference: bool = False) -> np.random.Generator:
        """Set ``backend``, ``dtype`` and ``seed``; returns the host generator for the weights.

        `reference` runs the array-API reference code for every hot operation, never a
        backend's fast path (the fast paths are tested against it)."""
        self.backend = get_backend(backend, reference=reference)
        self.dtype = self.backend.dtype(dtype)
        self.seed = checks.seed_or_none(seed, type(self).__name__)
        self.rng: RandomSource | None = None
        return np.random.default_rng(self.seed)

    def _init_params(self, host: dict[str, np.ndarray]) -> None:
        """The one place parameters are made: host arrays -> views of one flat buffer on the
        backend, in the model's dtype (see `xpcnn.nn.params`)."""
        self.params = make_params(host, self.backend, self.dtype)

    def _bind_gradients(self) -> None:
        """Make ``self.grads``, a zero `ParamDict` laid out like `params` (one flat buffer), and
        have every layer that can (Convolution, Affine) write its ``dW``/``db`` straight into
        it; the other gradients (BatchNorm's ``dgamma``/``dbeta``) are copied in by `gradient`.
        Called once, after the layers and ``grad_sources`` are built."""
        self.grads = self.params.zeros_like()
        by_layer: dict[str, dict[str, str]] = {}
        for key, (name, attr) in self.grad_sources.items():
            by_layer.setdefault(name, {})[attr] = key
        self._copied_grads: list[tuple[str, str, str]] = []
        for name, attrs in by_layer.items():
            layer = self.layers[name]
            if hasattr(layer, "bind_gradients") and set(attrs) == {"dW", "db"}:
                layer.bind_gradients(self.grads[attrs["dW"]], self.grads[attrs["db"]])
            else:
                self._copied_grads += [(key, name, attr) for attr, key in attrs.items()]

    def _random_source(self) -> RandomSource:
        """The model's seeded source of Dropout masks, on its backend (made once)."""
        if self.rng is None:
            self.rng = RandomSource(self.backend, derived_seed(self.seed, DROPOUT_STREAM))
        return self.rng

    @property
    def xp(self):
        return self.backend.xp

    @property
    def ops(self) -> Ops:
        """The backend's table of hot operations (its reference table with ``reference=True``)."""
        return ops_of(self.backend)

    # ------------------------------------------------------------ the book's protocol

    def predict(self, x: Any, train_flg: bool = False) -> Any:
        """Class scores ``(N, output_size)``; `train_flg` switches Dropout/BatchNorm to training."""
        train_flg = checks.flag(train_flg, "train_flg", f"{type(self).__name__}.predict")
        for step in self._steps():
            x = step.forward(x, train_flg)
        return x

    def _steps(self) -> list:
        """The layers as steps, runs of them fused where the table has one operation for them
        (`xpcnn.nn.fusion`); made again when ``self.layers`` changes."""
        key = tuple(map(id, self.layers.values()))
        if getattr(self, "_plan_key", None) != key:
            self._plan, self._plan_key = fusion.steps(list(self.layers.values())), key
        return self._plan

    def loss(self, x: Any, t: Any) -> Any:
        """Mean cross-entropy of a batch in training mode, as a 0-d array on the backend."""
        return self.last_layer.forward(self.predict(x, train_flg=True), t)

    def _backward(self) -> None:
        dout = self.last_layer.backward(1)
        for step in reversed(self._steps()):
            dout = step.backward(dout)

    def gradient(self, x: Any, t: Any) -> dict[str, Any]:
        """Forward (training mode) and backward on a batch: the gradients, keyed like `params`.

        The returned dict is ``self.grads``, a `ParamDict` over one buffer that every call
        overwrites (copy an entry to keep it). The batch loss stays available as
        ``self.last_layer.loss`` (on the device).
        """
        self.loss(x, t)
        self._backward()
        return self._collect_grads()

    def compile_step(self, optimizer: Any) -> CompiledStep:
        """The training step (`gradient`, then ``optimizer.update``) captured as a CUDA graph per
        batch shape and replayed: ``step(x, t)`` returns the loss. CuPy's fast path only
        (`ConfigError` elsewhere); see `xpcnn.nn.compiled_step`."""
        return CompiledStep(self, optimizer)

    def _collect_grads(self) -> Any:
        for key, name, attr in self._copied_grads:
            self.grads[key] = getattr(self.layers[name], attr)     # copied into the buffer's view
        return self.grads

    # ------------------------------------------------------------ scoring

    def predict_proba(self, x: Any, batch_size: int = 100) -> Any:
        """Class probabilities ``(N, output_size)`` (softmax of `predict`, inference mode),
        `batch_size` images at a time; `x` may be on the host. See `xpcnn.nn.inference.predict_proba`."""
        return predict_proba(self, x, batch_size)

    def accuracy(self, x: Any, t: Any, batch_size: int = 100) -> float:
        """Fraction of correct predictions (inference mode), `batch_size` images at a time.

        `x` and `t` may be backend arrays or host NumPy arrays (host batches are moved one at
        a time, so a large host set never sits on the device at once). Correct counts are
        summed on the device; one number comes back at the end.
        """
        batch_size = checks.positive_int(batch_size, "batch_size", type(self).__name__)
        n = x.shape[0]
        if t.shape[0] != n:
            raise ShapeError(f"accuracy: {n} images but {t.shape[0]} labels")
        if n == 0:
            raise ShapeError("accuracy: no images given (N = 0)")
        xp, ops = self.xp, self.ops
        num_classes = self.config["output_size"]
        # Per batch only the correct count, summed on the device (fused on CuPy); pixels and
        # labels are checked once for the whole set; one transfer at the end.
        correct = None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            xb, tb = self._on_backend(x[start:stop, ...]), self._on_backend(t[start:stop, ...])
            if tb.ndim != 1:
                tb = xp.argmax(tb, axis=1)
            hits = ops.count_correct(self.predict(xb), tb)
            correct = hits if correct is None else correct + hits
        counts = xp.stack([correct, *self._bad_input_counts(x, t, num_classes)])
        correct, non_finite, bad_labels = (int(c) for c in self.backend.to_numpy(counts))
        if non_finite:
            raise ConfigError(f"accuracy: the images contain {non_finite} NaN or infinite values; "
                              f"expected finite pixels")
        if bad_labels:                    # counted on the device: say which, from the host copy
            host_class_labels(self.backend.to_numpy(t), num_classes, "accuracy")
        return correct / n

    def _bad_input_counts(self, x: Any, t: Any, num_classes: int) -> list[Any]:
        """[non-finite pixels, labels outside 0..K-1] of a whole set, as 0-d arrays on the backend."""
        xp = self.xp
        if values_are_free_to_read(x) and values_are_free_to_read(t):    # host data: checked here, once
            host_class_labels(t, num_classes, "accuracy")
            return [self.backend.asarray(np.asarray(np.count_nonzero(~np.isfinite(x)), dtype=np.int64)),
                    self.backend.asarray(np.asarray(0, dtype=np.int64))]
        x, t = self._on_backend(x), self._on_backend(t)
        labels = xp.argmax(t, axis=1) if t.ndim == 2 else t
        return [xp.sum(xp.astype(xp.logical_not(xp.isfinite(x)), xp.int64)),
                xp.sum(xp.astype(xp.logical_or(labels < 0, labels >= num_classes), xp.int64))]

    def _on_backend(self, array: Any) -> Any:
        """A host batch moved to the backend (keeping its dtype); `BackendMismatch` on a foreign array."""
        array = self.backend.adopt(array)
        namespace_of(array, self.params["W1"])
        return array

    # ------------------------------------------------------------ state

    def set_params(self, params: dict[str, Any]) -> None:
        """Copy `params` (host or backend arrays of the same shapes) into the network, in place."""
        for key, current in self.params.items():
            if key not in params:
                raise ConfigError(f"set_params: missing parameter {key!r}")
            value = params[key]
            if tuple(value.shape) != tuple(current.shape):
                raise ShapeError(f"set_params: {key} must have shape {tuple(current.shape)}, got {tuple(value.shape)}")
            current[...] = self.backend.asarray(self.backend.to_numpy(value), dtype=self.dtype)

    def buffers(self) -> dict[str, Any]:
        """State that is not trained by the optimizer: ``"<layer>/running_mean"`` and
        ``"<layer>/running_var"`` of every BatchNormalization (the arrays themselves)."""
        out = {}
        for name, layer in self.layers.items():
            if isinstance(layer, BatchNormalization):
                out[f"{name}/running_mean"] = layer.running_mean
                out[f"{name}/running_var"] = layer.running_var
        return out

    def set_buffers(self, buffers: dict[str, Any]) -> None:
        """Copy saved `buffers()` into the layers, in place (same names and shapes)."""
        current = self.buffers()
        if set(buffers) != set(current):
            raise ConfigError(f"set_buffers: expected {sorted(current)}, got {sorted(buffers)}")
        for key, target in current.items():
            if tuple(buffers[key].shape) != tuple(target.shape):
                raise ShapeError(f"set_buffers: {key} must have shape {tuple(target.shape)}, "
                                 f"got {tuple(buffers[key].shape)}")
            target[...] = self.backend.asarray(self.backend.to_numpy(buffers[key]), dtype=self.dtype)
