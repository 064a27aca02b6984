"""Skips with the reason (failures under CI=true) where what the CUDA checks need is missing."""

from __future__ import annotations

from . import cupy_internals, emulator
from helpers import unavailable


def require_cupy_wheels(need_nvrtc: bool = False) -> None:
    """Skip (fail under CI) unless CuPy `cupy_internals.CUPY_VERSION` is importable, and NVRTC
    with CUDA's runtime headers too when `need_nvrtc`. A different CuPy version skips here:
    tests/ops/test_cuda_kernels.py::test_cupy_is_the_pinned_version fails for it."""
    try:
        cupy = cupy_internals.cupy_module()
    except ImportError as exc:
        unavailable(f"CuPy is not installed ({exc}); pip install -e '.[dev,cuda-check]'")
    if cupy.__version__ != cupy_internals.CUPY_VERSION:
        unavailable(f"CuPy {cupy.__version__} is installed; the CUDA checks are written for "
                    f"{cupy_internals.CUPY_VERSION}")
    if need_nvrtc:
        try:
            cupy_internals.nvrtc_version()
            cupy_internals.compile_options("90")
        except Exception as exc:   # CuPy reports a missing NVRTC or header wheel in several ways
            unavailable(f"NVRTC or CUDA's runtime headers are unavailable ({type(exc).__name__}: {exc}); "
                        f"pip install -e '.[dev,cuda-check]'")


def require_gxx() -> None:
    """Skip (fail under CI) unless g++ is on PATH: the emulation compiles kernels with it."""
    if emulator.gxx() is None:
        unavailable("g++ is not installed (apt-get install g++): the CUDA emulation compiles kernels with it")
