"""Networks built from the layers. `SimpleConvNet` is the book's chapter-7 network:

    conv - relu - pool(2x2, stride 2) - affine - relu - affine - softmax

(computed as conv - pool - relu - ..., which is the same function with the same gradients;
see `SimpleConvNet._build_layers`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import Backend, get_backend, namespace_of
from .errors import ConfigError, ShapeError
from .functional import conv_output_size, positive_int
from .layers import Affine, Convolution, Pooling, ReLU, SoftmaxWithLoss
from .params import make_params

DEFAULT_CONV_PARAM = {"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1}


def _positive_int(name: str, value: Any) -> int:
    return positive_int(value, name, "SimpleConvNet")


class SimpleConvNet:
    """The book's SimpleConvNet, on any backend.

    Args:
        input_dim: ``(C, H, W)`` of one image.
        conv_param: ``filter_num``, ``filter_size``, ``pad``, ``stride`` of the convolution.
        hidden_size: units of the hidden affine layer.
        output_size: number of classes.
        weight_init_std: standard deviation of the Gaussian initial weights.
        backend: ``"cpu"``, ``"gpu"``, ``"array_api_strict"`` or a `Backend`.
        dtype: ``"float32"`` (default) or ``"float64"``.
        seed: seed of the host generator that draws the weights, so every backend starts
            from identical weights.
        reference: run the array-API reference code for every hot operation, never a
            backend's fast path (the fast paths are tested against it).

    ``params`` holds ``W1 b1`` (convolution), ``W2 b2`` (hidden affine), ``W3 b3`` (output
    affine), shared by reference with the layers so optimizers update them in place; all six
    are views of one buffer, ``params.flat`` (see `xpcnn.params`).
    """

    def __init__(self, input_dim: tuple = (1, 28, 28), conv_param: dict | None = None,
                 hidden_size: int = 100, output_size: int = 10, weight_init_std: float = 0.01,
                 *, backend: "str | Backend" = "cpu", dtype: str = "float32", seed: int | None = None,
                 reference: bool = False):
        conv = dict(DEFAULT_CONV_PARAM)
        if conv_param:
            unknown = set(conv_param) - set(conv)
            if unknown:
                raise ConfigError(f"SimpleConvNet: unknown conv_param keys {sorted(unknown)}; expected {sorted(conv)}")
            conv.update(conv_param)
        if len(input_dim) != 3:
            raise ShapeError(f"SimpleConvNet: input_dim must be (C, H, W), got {tuple(input_dim)}")
        channels, height, width = (_positive_int("input_dim", v) for v in input_dim)
        filter_num = _positive_int("filter_num", conv["filter_num"])
        filter_size = _positive_int("filter_size", conv["filter_size"])
        hidden_size = _positive_int("hidden_size", hidden_size)
        output_size = _positive_int("output_size", output_size)
        conv_h = conv_output_size(height, filter_size, conv["stride"], conv["pad"], what="SimpleConvNet convolution (height)")
        conv_w = conv_output_size(width, filter_size, conv["stride"], conv["pad"], what="SimpleConvNet convolution (width)")
        pool_h = conv_output_size(conv_h, 2, 2, 0, what="SimpleConvNet 2x2 pooling (height)")
        pool_w = conv_output_size(conv_w, 2, 2, 0, what="SimpleConvNet 2x2 pooling (width)")
        pool_output_size = filter_num * pool_h * pool_w

        self.backend = get_backend(backend, reference=reference)
        self.dtype = self.backend.dtype(dtype)
        self.config = {
            "input_dim": [channels, height, width], "conv_param": conv, "hidden_size": hidden_size,
            "output_size": output_size, "weight_init_std": float(weight_init_std),
        }

        if seed is not None and (isinstance(seed, bool) or not hasattr(seed, "__index__") or int(seed) < 0):
            raise ConfigError(f"SimpleConvNet: seed must be None or an integer >= 0, got {seed!r}")
        rng = np.random.default_rng(seed)
        host = {
            "W1": weight_init_std * rng.standard_normal((filter_num, channels, filter_size, filter_size)),
            "b1": np.zeros(filter_num),
            "W2": weight_init_std * rng.standard_normal((pool_output_size, hidden_size)),
            "b2": np.zeros(hidden_size),
            "W3": weight_init_std * rng.standard_normal((hidden_size, output_size)),
            "b3": np.zeros(output_size),
        }
        self.params = make_params(host, self.backend, self.dtype)   # views of one flat buffer
        self._build_layers(conv)

    def _build_layers(self, conv: dict) -> None:
        p, ops = self.params, self.backend.ops
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
        # Gradients land in one flat buffer laid out like the parameters, so the optimizer
        # takes them whole (no gathering) and no gradient array is allocated per step.
        self.grads = p.zeros_like()
        g = self.grads
        for layer, (w, b) in (("Conv1", ("W1", "b1")), ("Affine1", ("W2", "b2")), ("Affine2", ("W3", "b3"))):
            self.layers[layer].bind_gradients(g[w], g[b])

    @property
    def xp(self):
        return self.backend.xp

    def set_params(self, params: dict[str, Any]) -> None:
        """Copy `params` (host or backend arrays of the same shapes) into the network, in place."""
        for key, current in self.params.items():
            if key not in params:
                raise ConfigError(f"set_params: missing parameter {key!r}")
            value = params[key]
            if tuple(value.shape) != tuple(current.shape):
                raise ShapeError(f"set_params: {key} must have shape {tuple(current.shape)}, got {tuple(value.shape)}")
            current[...] = self.backend.asarray(self.backend.to_numpy(value), dtype=self.dtype)

    def predict(self, x: Any) -> Any:
        """Class scores ``(N, output_size)`` for images ``(N, C, H, W)``."""
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def predict_proba(self, x: Any, batch_size: int = 100) -> Any:
        """Class probabilities ``(N, output_size)`` (softmax of `predict`), `batch_size` images
        at a time; `x` may be on the host. See `xpcnn.inference.predict_proba`."""
        from .inference import predict_proba

        return predict_proba(self, x, batch_size)

    def loss(self, x: Any, t: Any) -> Any:
        """Mean cross-entropy on a batch, as a 0-d array on the backend."""
        return self.last_layer.forward(self.predict(x), t)

    def gradient(self, x: Any, t: Any) -> dict[str, Any]:
        """Forward and backward on a batch: the gradients, keyed like `params`.

        The returned dict is ``self.grads``, a `ParamDict` over one buffer that every call
        overwrites (copy an entry to keep it). The batch loss stays available as
        ``self.last_layer.loss`` (on the device).
        """
        self.loss(x, t)
        dout = self.last_layer.backward(1)
        for layer in reversed(list(self.layers.values())):
            dout = layer.backward(dout)
        return self.grads

    def accuracy(self, x: Any, t: Any, batch_size: int = 100) -> float:
        """Fraction of correct predictions, evaluated `batch_size` images at a time.

        `x` and `t` may be backend arrays or host NumPy arrays (host batches are moved one at
        a time, so a large host set never sits on the device at once). Correct counts are
        summed on the device; one number comes back at the end.
        """
        batch_size = _positive_int("batch_size", batch_size)
        n = x.shape[0]
        if t.shape[0] != n:
            raise ShapeError(f"accuracy: {n} images but {t.shape[0]} labels")
        if n == 0:
            raise ShapeError("accuracy: no images given (N = 0)")
        xp, ops = self.xp, self.backend.ops
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
            raise ConfigError(f"accuracy: the images contain {non_finite} NaN or infinite values; expected finite pixels")
        if bad_labels:
            labels = self.backend.to_numpy(t) if not isinstance(t, np.ndarray) else t
            labels = labels.argmax(axis=1) if labels.ndim == 2 else labels
            raise ShapeError(f"accuracy: {bad_labels} labels are outside the classes 0..{num_classes - 1} "
                             f"(got values from {labels.min()} to {labels.max()})")
        return correct / n

    def _bad_input_counts(self, x: Any, t: Any, num_classes: int) -> list[Any]:
        """[non-finite pixels, labels outside 0..K-1] of a whole set, as 0-d arrays on the backend."""
        xp = self.xp
        if isinstance(x, np.ndarray) and isinstance(t, np.ndarray):      # host data: free to read here
            labels = t.argmax(axis=1) if t.ndim == 2 else t
            counts = [np.count_nonzero(~np.isfinite(x)), np.count_nonzero((labels < 0) | (labels >= num_classes))]
            return [self.backend.asarray(np.asarray(c, dtype=np.int64)) for c in counts]
        x, t = self._on_backend(x), self._on_backend(t)
        labels = xp.argmax(t, axis=1) if t.ndim == 2 else t
        return [xp.sum(xp.astype(xp.logical_not(xp.isfinite(x)), xp.int64)),
                xp.sum(xp.astype(xp.logical_or(labels < 0, labels >= num_classes), xp.int64))]

    def _on_backend(self, array: Any) -> Any:
        if isinstance(array, np.ndarray) and self.backend.name != "numpy":
            # The array's own dtype travels (no silent cast), so every backend gives the same
            # verdict: a float64 batch into a float32 network is a DTypeError everywhere.
            return self.backend.asarray(array, dtype=array.dtype.name if array.dtype.kind == "f" and array.dtype.name in ("float32", "float64") else None)
        namespace_of(array, self.params["W1"])  # BackendMismatch on a foreign array
        return array
