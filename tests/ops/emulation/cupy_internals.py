"""Everything that depends on CuPy's private internals, in one place, pinned to one version.

Two things need CuPy's internals: the full CUDA source CuPy generates for an
`ElementwiseKernel` call (`cupy._core._kernel._get_elementwise_kernel_code`, fed with the
argument kinds of the call), and NVRTC compilation for an explicit architecture without a
device (`cupy.cuda.compiler._NVRTCProgram` with CuPy's own compile options: the public
`compile_using_nvrtc` asks the driver for the device's architecture and fails without one).

Written for CuPy `CUPY_VERSION`: `check_version` (called by every entry point, and by
tests/ops/test_cuda_kernels.py) fails loudly on any other version, because these internals
change without notice. When CuPy is upgraded: rerun the tests, adapt this module (argument
kind numbers, function signatures), then move the pin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: The CuPy release this module was written and checked against.
CUPY_VERSION = "14.2.0"

# `_ArgInfo.arg_kind` values of CuPy 14.2.0 (an enum of `_kernel.pyx`, not exported).
_ARG_KIND_NDARRAY = 1
_ARG_KIND_INDEXER = 2
_ARG_KIND_SCALAR = 3

#: The architectures every kernel is compiled for (Ampere, Hopper).
ARCHS = ("80", "90")


class CupyVersionMismatch(RuntimeError):
    """The installed CuPy is not the version this module was written for."""


class CudaCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds its log."""


_REAL: dict[str, Any] = {}


def cupy_module() -> Any:
    """The real `cupy` module, imported lazily (an optional heavy library) with the private
    modules used here, and kept: while fast_cupy.py is loaded on the emulation's stand-in,
    ``sys.modules["cupy"]`` is not CuPy."""
    if "cupy" not in _REAL:
        import cupy
        import cupy._core._carray  # noqa: F401 (kept loaded for the calls below)
        import cupy._core._kernel  # noqa: F401
        import cupy._core._scalar  # noqa: F401
        import cupy._core.core  # noqa: F401
        import cupy.cuda.compiler  # noqa: F401

        _REAL["cupy"] = cupy
    return _REAL["cupy"]


def check_version() -> None:
    """Raise `CupyVersionMismatch` unless the installed CuPy is `CUPY_VERSION`."""
    installed = cupy_module().__version__
    if installed != CUPY_VERSION:
        raise CupyVersionMismatch(
            f"tests/ops/emulation/cupy_internals.py uses CuPy {CUPY_VERSION}'s private internals, but CuPy "
            f"{installed} is installed: check the code generator and compiler calls against the new version, "
            f"then update CUPY_VERSION (and the pins in pyproject.toml)")


@dataclass(frozen=True)
class ArrayArg:
    """An ndarray argument of an elementwise kernel as CuPy's code generator sees it."""

    dtype: np.dtype
    ndim: int
    c_contiguous: bool
    index_32_bits: bool


@dataclass(frozen=True)
class ScalarArg:
    """A scalar argument (already cast to the parameter's dtype)."""

    dtype: np.dtype


def elementwise_kernel(in_params: str, out_params: str, operation: str, name: str, **kwargs: Any) -> Any:
    """A real `cupy.ElementwiseKernel` (constructing one needs no device): the code generator's input."""
    check_version()
    return cupy_module().ElementwiseKernel(in_params, out_params, operation, name, **kwargs)


def parameters(kernel: Any) -> list[tuple[str, bool, Any]]:
    """(name, raw, dtype or None for a type placeholder) of each parameter, `_ind` excluded."""
    return [(p.name, bool(p.raw), p.dtype) for p in kernel.params if p.name != "_ind"]


def decide_types(kernel: Any, in_dtypes: tuple, out_dtypes: tuple) -> tuple[tuple, tuple, Any]:
    """CuPy's own choice of each parameter's dtype for a call: (in types, out types, type map).

    `in_dtypes` holds an ndarray argument's dtype or None for a scalar, as CuPy passes them.
    """
    check_version()
    return kernel._decide_params_type(tuple(in_dtypes), tuple(out_dtypes))


def elementwise_source(kernel: Any, type_map: Any, args: list, indexer_ndim: int, indexer_32_bits: bool) -> str:
    """The complete CUDA source CuPy compiles for a call of `kernel` with arguments of the
    kinds `args` (`ArrayArg`/`ScalarArg`, in parameter order) and an indexer of `indexer_ndim`
    dimensions: CuPy's header includes followed by the generated kernel."""
    check_version()
    cupy = cupy_module()
    from cupy._core import _carray, _kernel, _scalar, core

    infos = []
    for arg in args:
        if isinstance(arg, ArrayArg):
            infos.append(_kernel._ArgInfo(_ARG_KIND_NDARRAY, cupy.ndarray, np.dtype(arg.dtype), arg.ndim,
                                          arg.c_contiguous, arg.index_32_bits))
        else:
            infos.append(_kernel._ArgInfo(_ARG_KIND_SCALAR, _scalar.CScalar, np.dtype(arg.dtype), 0, True, True))
    infos.append(_kernel._ArgInfo(_ARG_KIND_INDEXER, _carray.Indexer, None, indexer_ndim, True, indexer_32_bits))
    code = _kernel._get_elementwise_kernel_code(tuple(infos), type_map, kernel.params, kernel.operation,
                                                kernel.name, kernel.preamble, **kernel.kwargs)
    headers = "".join(f"#include <{header}>\n" for header in core._cupy_header_list)
    return headers + code


def compile_options(arch: str) -> tuple[str, ...]:
    """The options CuPy passes NVRTC (include paths, C++ standard, -ftz=true, ...) with `-arch=sm_<arch>`."""
    check_version()
    from cupy._core import core

    return core.assemble_cupy_compiler_options(()) + (
        "-ftz=true", "--device-as-default-execution-space", f"-arch=sm_{arch}")


def nvrtc_compile(source: str, arch: str) -> bytes:
    """Compile `source` for `sm_<arch>` with NVRTC, no device needed; the cubin, or
    `CudaCompileError` with NVRTC's log."""
    check_version()
    from cupy.cuda import compiler

    program = compiler._NVRTCProgram(source, "kern.cu", method="cubin")
    try:
        cubin, _ = program.compile(compile_options(arch))
    except compiler.CompileException as exc:
        raise CudaCompileError(f"NVRTC (sm_{arch}) rejected the kernel:\n{exc}") from None
    return cubin


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library CuPy loads."""
    from cupy.cuda import compiler

    return compiler._get_nvrtc_version()
