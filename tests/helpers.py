"""Test helpers: the book's numerical gradient, a relative error, naive loop reference ops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

from xpcnn.ops import cpu_kernels

REPO = Path(__file__).resolve().parents[1]

#: Under CI (``CI=true``, set by the CI runner) what `.ci/run` installs must be there: a test
#: that would skip for want of it fails instead, so a broken install cannot pass as skips.
IN_CI = os.environ.get("CI") == "true"


def unavailable(reason: str) -> None:
    """Skip the test, saying why; under CI (where `.ci/run` installs it) fail instead."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}: .ci/run should have installed it", pytrace=False)
    pytest.skip(reason)


def require_serve_extra() -> None:
    """Skip (fail under CI) unless the `serve` extra and the test client are installed."""
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        unavailable(f"the serve extra is not installed ({exc.name}: pip install 'xpcnn[serve]' httpx)")


def isolated_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for an xpcnn subprocess: one BLAS thread (bit-reproducible, no
    oversubscription), a fresh HOME and cache, no XPCNN_* settings, the checkout importable.
    The compiled CPU kernels are shared with this process (`XPCNN_KERNEL_CACHE`): compiling
    them again in every subprocess would cost seconds each; the tests of the cache itself
    give their own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XPCNN_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", XPCNN_KERNEL_CACHE=str(cpu_kernels.cache_dir()))
    env.update(extra)
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


def naive_col2im(col, input_shape, fh, fw, stride, pad):
    """The adjoint of `naive_im2col` by loops: each row's values added back into its window."""
    n, c, h, w = input_shape
    oh, ow = (h + 2 * pad - fh) // stride + 1, (w + 2 * pad - fw) // stride + 1
    out = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=col.dtype)
    rows = col.reshape(n, oh, ow, c, fh, fw)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i * stride:i * stride + fh, j * stride:j * stride + fw] += rows[:, i, j]
    return out[:, :, pad:pad + h, pad:pad + w]


def naive_maxpool_backward(x, dout, ph, pw, stride, pad):
    """Each window's gradient to its first maximum (row-major), by loops: dx (N, C, H, W)."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    dx = np.zeros(xp.shape, dtype=dout.dtype)
    for a in range(n):
        for k in range(c):
            for i in range(dout.shape[2]):
                for j in range(dout.shape[3]):
                    window = xp[a, k, i * stride:i * stride + ph, j * stride:j * stride + pw]
                    r, q = divmod(int(np.argmax(window)), pw)      # argmax: the first maximum
                    dx[a, k, i * stride + r, j * stride + q] += dout[a, k, i, j]
    return dx[:, :, pad:pad + h, pad:pad + w]


def tie_free(rng, shape) -> np.ndarray:
    """Float64 values that are all distinct and well separated (for max pooling checks)."""
    values = rng.permutation(int(np.prod(shape))).astype(np.float64)
    return (values / values.size - 0.5).reshape(shape) * 4.0


# ------------------------------------------------------------------ property tests (hypothesis)

def _window_geometry(draw, window_h: int, window_w: int, stride: int, pad: int) -> tuple[int, int, int]:
    """(H, W, pad) that give a whole-number output of 1..4 pixels a side; pad dropped where the
    input would vanish."""
    out_h, out_w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, w = (out_h - 1) * stride + window_h - 2 * pad, (out_w - 1) * stride + window_w - 2 * pad
    if min(h, w) < 1:
        h, w, pad = h + 2 * pad, w + 2 * pad, 0
    return h, w, pad


@st.composite
def conv_geometries(draw):
    """(N, C, H, W, FN, FH, FW, stride, pad) with a whole-number output size."""
    fh, fw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride, pad = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    h, w, pad = _window_geometry(draw, fh, fw, stride, pad)
    return draw(st.integers(1, 3)), draw(st.integers(1, 3)), h, w, draw(st.integers(1, 4)), fh, fw, stride, pad


@st.composite
def pool_geometries(draw):
    """(N, C, H, W, PH, PW, stride, pad) with pad < window and a whole-number output size."""
    ph, pw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    h, w, pad = _window_geometry(draw, ph, pw, stride, draw(st.integers(0, min(ph, pw) - 1)))
    return draw(st.integers(1, 3)), draw(st.integers(1, 3)), h, w, ph, pw, stride, pad


#: A seed for ``numpy.random.default_rng``, drawn by hypothesis.
SEEDS = st.integers(0, 2**32 - 1)


def directional_derivatives(f, analytic_grads, params, directions, h=1e-6) -> tuple[float, float]:
    """``(sum <grad, direction>, d/de f(params + e * directions) at 0)``: the analytic directional
    derivative and its central difference; `params` are host arrays shifted in place and restored."""
    def shifted(eps):
        saved = [p.copy() for p in params]
        for p, d in zip(params, directions):
            p += eps * d
        value = f()
        for p, s in zip(params, saved):
            p[...] = s
        return value

    numeric = (shifted(h) - shifted(-h)) / (2 * h)
    analytic = sum(float(np.sum(g * d)) for g, d in zip(analytic_grads, directions))
    return analytic, numeric


def _find_mnist_dir() -> Path:
    """The real MNIST test set in the ``shared/`` folder beside the checkout (or above it)."""
    for parent in Path(__file__).resolve().parents[1:]:
        candidate = parent / "shared" / "data" / "mnist"
        if (candidate / "t10k-images-idx3-ubyte.gz").exists():
            return candidate
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


MNIST_DIR = _find_mnist_dir()
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")


def make_learnable_set(rng, n, size=12):
    """Four classes: a bright 4x4 square in one of the four quadrants, on noise."""
    t = rng.integers(0, 4, n)
    x = rng.normal(0.0, 0.3, (n, 1, size, size)).astype(np.float32)
    half = size // 2
    for i, label in enumerate(t):
        r, c = divmod(int(label), 2)
        top, left = r * half + rng.integers(0, half - 3), c * half + rng.integers(0, half - 3)
        x[i, 0, top:top + 4, left:left + 4] += 1.0
    return x, t


def cli_env(tmp_path: Path) -> dict[str, str]:
    return isolated_env(tmp_path, PYTHONWARNINGS="ignore")


def run_cli(argv: list[str], tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xpcnn.cli", *argv], capture_output=True, text=True,
                          env=cli_env(tmp_path), cwd=tmp_path, timeout=timeout)


def error_line(stderr: str, exit_code: int) -> str:
    """The one message line: argparse errors (exit 2) may be preceded by its usage lines."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    if exit_code == 2 and lines and lines[0].startswith("usage:"):
        lines = [line for line in lines if "error:" in line]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    return lines[0]


# ------------------------------------------------------------------ xpcnn serve


def start_server(checkpoint, tmp_path, *options, env=None):
    """`xpcnn serve CHECKPOINT --port 0` (a free port of 127.0.0.1): ``(process, base URL, stdout lines)``."""
    process = subprocess.Popen([sys.executable, "-m", "xpcnn.cli", "serve", str(checkpoint), "--port", "0", *options],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env=env or isolated_env(tmp_path))
    # stderr is read all along (a full pipe would stop a server that logs); `process.errors` holds it.
    process.errors = []
    threading.Thread(target=lambda: process.errors.extend(process.stderr), daemon=True).start()
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("listening on "):
            url = line.split()[2]
            return process, url.rstrip("/"), lines
    process.kill()
    process.wait(timeout=10)
    raise AssertionError(f"the server did not start: {lines} {''.join(process.errors)}")


def post_bytes(url, data, timeout=30):
    """POST raw bytes: ``(status, decoded JSON)``."""
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def stop_server(process):
    """Ctrl-C: uvicorn finishes the requests in flight, then exits 130 (the CLI's code for Ctrl-C)."""
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
