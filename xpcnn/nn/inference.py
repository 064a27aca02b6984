"""Batched inference for any network of the book's protocol: ``predict(x)``, ``backend``.

An image's probabilities do not depend on the images batched with it: every batch is padded
with zero images to a multiple of `ROW_BLOCK` rows before the forward pass (and the padding
dropped after). A matrix library sums a row of a product differently by its place in the batch
(OpenBLAS: a batch of 1 takes a matrix-vector kernel, the rows of an edge tile another order),
up to 6e-7 apart on these models; with whole blocks of rows each row is summed the same way
wherever it sits (measured on OpenBLAS; `tests/nn/test_inference.py`). So ``xpcnn predict a.png``
and ``xpcnn predict a.png b.png`` agree bit for bit, and ``xpcnn serve`` can gather requests
into one forward pass and still answer each exactly as it would alone.

Written against that protocol only (not `SimpleConvNet`), so deeper networks whose
``predict(x, train_flg=False)`` takes a train flag work unchanged: it is called with `x` alone.

    >>> proba = predict_proba(net, x_test, batch_size=500)      # (N, K) on net's backend
    >>> net.predict_proba(x_test)                                # the same, as a method
"""

from __future__ import annotations

from typing import Any, Iterator

import array_api_compat
import numpy as np

from .. import checks
from ..errors import ShapeError
from ..ops.functions import softmax

#: Batches are padded with zero images to a multiple of this many rows (see the docstring).
ROW_BLOCK = 16


def device_batches(network: Any, x: Any, batch_size: int) -> Iterator[tuple[int, Any]]:
    """``(start, batch)`` for consecutive batches of `x` ``(N, ...)``, each on the network's
    backend (host batches are moved one at a time, so a large host set never sits on the
    device at once)."""
    batch_size = checks.positive_int(batch_size, "batch_size", "predict")
    n = x.shape[0]
    if n == 0:
        raise ShapeError("predict: no images given (N = 0)")
    for start in range(0, n, batch_size):
        # the standard has no out-of-range stops
        yield start, network.backend.adopt(x[start:min(start + batch_size, n), ...])


def predict_proba(network: Any, x: Any, batch_size: int = 100) -> Any:
    """Class probabilities ``(N, K)``: the softmax of ``network.predict``, `batch_size` images
    at a time. `x` ``(N, C, H, W)`` may be a host NumPy array or a backend array; the result
    is on the network's backend (``network.backend.to_numpy`` brings it back)."""
    parts = [softmax(network.predict(_padded(network, batch)))[:batch.shape[0], ...]
             for _, batch in device_batches(network, x, batch_size)]
    return parts[0] if len(parts) == 1 else network.backend.xp.concat(parts, axis=0)


def _padded(network: Any, batch: Any) -> Any:
    """`batch` followed by zero images up to a multiple of `ROW_BLOCK` rows."""
    n = batch.shape[0]
    missing = -n % ROW_BLOCK
    if not missing:
        return batch
    xp = network.backend.xp
    zeros = xp.zeros((missing, *batch.shape[1:]), dtype=batch.dtype, device=array_api_compat.device(batch))
    return xp.concat([batch, zeros], axis=0)


def top_k(proba: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The `k` most probable classes of each row of host ``(N, K)`` probabilities:
    ``(classes (N, k) int64, probabilities (N, k))``, most probable first (ties: lower class)."""
    k = min(checks.positive_int(k, "k", "top_k"), proba.shape[1])
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(proba, order, axis=1)
