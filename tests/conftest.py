"""Shared fixtures: every test that takes `backend` runs on NumPy, array_api_strict, PyTorch
(CPU, and CUDA where a GPU is present) and CuPy; the unavailable ones skip with the reason.

array_api_strict arrays live on the non-default device "device1": there a NumPy function
given a strict array raises instead of silently converting it, so any NumPy-only call in
the library fails the strict run.
"""

import numpy as np
import pytest

from xpcnn.backend import get_backend
from xpcnn.errors import BackendUnavailable

BACKEND_NAMES = ["numpy", "array_api_strict", "torch", "torch:cuda", "cupy"]


def _backend_or_skip(name):
    try:
        return get_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(f"{name} unavailable: {exc}")


@pytest.fixture(params=BACKEND_NAMES)
def backend(request):
    """Each available backend in turn (PyTorch, its CUDA device and CuPy skipped with the reason
    where they are missing)."""
    return _backend_or_skip(request.param)


@pytest.fixture
def gpu_backend():
    """The CuPy backend, or a skip saying why it is unavailable."""
    return _backend_or_skip("cupy")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
