"""Test helpers: the book's numerical gradient, a relative error, naive loop reference ops."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def isolated_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for an xpcnn subprocess: one BLAS thread (bit-reproducible, no
    oversubscription), a fresh HOME and cache, no XPCNN_* settings, the checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XPCNN_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env

#: The largest gradient-check relative error seen in this test run (reported by a final test).
MAX_GRAD_ERROR = {"value": 0.0, "where": ""}


def numerical_gradient(f, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Central differences of the scalar function `f` at host float64 array `x`."""
    grad = np.zeros_like(x)
    flat_x, flat_g = x.reshape(-1), grad.reshape(-1)
    for i in range(flat_x.size):
        keep = flat_x[i]
        flat_x[i] = keep + h
        plus = f(x)
        flat_x[i] = keep - h
        minus = f(x)
        flat_x[i] = keep
        flat_g[i] = (plus - minus) / (2 * h)
    return grad


def relative_error(analytic: np.ndarray, numeric: np.ndarray, where: str = "") -> float:
    """``||a - n|| / (||a|| + ||n||)``; also records the worst one seen."""
    analytic, numeric = np.asarray(analytic, dtype=np.float64), np.asarray(numeric, dtype=np.float64)
    denom = np.linalg.norm(analytic) + np.linalg.norm(numeric)
    err = 0.0 if denom == 0 else float(np.linalg.norm(analytic - numeric) / denom)
    if err > MAX_GRAD_ERROR["value"]:
        MAX_GRAD_ERROR.update(value=err, where=where)
    return err


def naive_conv(x, W, b, stride, pad):
    """Convolution by explicit loops over output pixels: (N,C,H,W) -> (N,FN,OH,OW)."""
    n, c, h, w = x.shape
    fn, _, fh, fw = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
    out = np.zeros((n, fn, oh, ow), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            window = xp[:, :, i * stride:i * stride + fh, j * stride:j * stride + fw]
            out[:, :, i, j] = np.tensordot(window, W, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


def naive_maxpool(x, ph, pw, stride, pad):
    """Max pooling by explicit loops, padding with -inf: (N,C,H,W) -> (N,C,OH,OW)."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    oh, ow = (h + 2 * pad - ph) // stride + 1, (w + 2 * pad - pw) // stride + 1
    out = np.empty((n, c, oh, ow), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = xp[:, :, i * stride:i * stride + ph, j * stride:j * stride + pw].max(axis=(2, 3))
    return out


def naive_im2col(x, fh, fw, stride, pad):
    """Row (n, oh, ow), column (c, i, j): the book's im2col layout, by loops."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
    col = np.empty((n, oh, ow, c * fh * fw), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            col[:, i, j, :] = xp[:, :, i * stride:i * stride + fh, j * stride:j * stride + fw].reshape(n, -1)
    return col.reshape(n * oh * ow, -1)


def tie_free(rng, shape) -> np.ndarray:
    """Float64 values that are all distinct and well separated (for max pooling checks)."""
    values = rng.permutation(int(np.prod(shape))).astype(np.float64)
    return (values / values.size - 0.5).reshape(shape) * 4.0
