"""Shared fixtures: every test that takes `backend` runs on NumPy, array_api_strict, PyTorch
(CPU, and CUDA where a GPU is present) and CuPy; the unavailable ones skip with the reason.

array_api_strict arrays live on the non-default device "device1": there a NumPy function
given a strict array raises instead of silently converting it, so any NumPy-only call in
the library fails the strict run.
"""

from pathlib import Path

import numpy as np
import pytest

from xpcnn import data
from xpcnn.backend import get_backend
from xpcnn.data import write_idx
from xpcnn.errors import BackendUnavailable

from helpers import FASHION_FILES, MAX_GRAD_ERROR, make_learnable_set, unavailable

BACKEND_NAMES = ["numpy", "array_api_strict", "torch", "torch:cuda", "cupy"]


#: Backends `.ci/run` installs (PyTorch's CPU build; ndonnx with the extra ``export``): under CI=true they
#: must be usable.
CI_BACKENDS = ("numpy", "array_api_strict", "torch", "ndonnx")


def _backend_or_skip(name):
    try:
        return get_backend(name)
    except BackendUnavailable as exc:
        if name in CI_BACKENDS:
            unavailable(f"{name} unavailable: {exc}")
        pytest.skip(f"{name} unavailable: {exc}")


@pytest.fixture(params=BACKEND_NAMES)
def backend(request):
    """Each available backend in turn (PyTorch, its CUDA device and CuPy skipped with the reason
    where they are missing)."""
    return _backend_or_skip(request.param)


@pytest.fixture(params=[*BACKEND_NAMES, "ndonnx"])
def inference_backend(request):
    """`backend`'s list and ndonnx, whose arrays are ONNX graphs (its operations on constant arrays
    are computed at once, slowly): for inference tests only (ndonnx trains nothing)."""
    return _backend_or_skip(request.param)


@pytest.fixture
def gpu_backend():
    """The CuPy backend, or a skip saying why it is unavailable."""
    return _backend_or_skip("cupy")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="module")
def fashion_like_dir(tmp_path_factory):
    """A --data-dir with generated 28x28 IDX files under Fashion-MNIST's file names."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("data")
    arrays = []
    for n in (600, 200):
        x, t = make_learnable_set(rng, n, size=28)
        arrays += [np.clip(x[:, 0] * 120 + 60, 0, 255).astype(np.uint8), t.astype(np.uint8)]
    for name, array in zip(FASHION_FILES, arrays):
        write_idx(root / name, array)
    return root


@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MNIST-named dataset (40 train / 10 test images, 28x28) for CLI runs."""
    folder = tmp_path_factory.mktemp("cli-data")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        data.write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        data.write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))
    return folder


def pytest_terminal_summary(terminalreporter):
    """The worst gradient-check relative error of this run (each check asserts its own bound;
    this says how close to it the worst came). Per process: under xdist, each worker's own."""
    if MAX_GRAD_ERROR["value"] > 0:
        terminalreporter.write_line(f"largest gradient-check relative error: {MAX_GRAD_ERROR['value']:.3e} "
                                    f"({MAX_GRAD_ERROR['where']})")
