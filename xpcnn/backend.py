"""Array backends: the one place that knows NumPy, CuPy and array_api_strict apart.

Everything above this module receives an array namespace `xp` (from
`array_api_compat`) and writes standard array-API code against it. This module
picks the namespace and device, moves data between the host and that device, and
holds the only library-specific code (the guarded CuPy import).

    >>> be = get_backend("cpu")
    >>> x = be.asarray(numpy_images, dtype="float32")   # host -> backend, once
    >>> be.to_numpy(x)                                   # backend -> host, at the edges
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np
import array_api_compat

from .errors import BackendMismatch, BackendUnavailable, ConfigError, DTypeError

#: Names accepted by `get_backend`, mapped to the canonical backend name.
BACKEND_ALIASES = {
    "cpu": "numpy",
    "numpy": "numpy",
    "gpu": "cupy",
    "cupy": "cupy",
    "cuda": "cupy",
    "array_api_strict": "array_api_strict",
    "strict": "array_api_strict",
}

#: Floating dtypes a model may compute in.
FLOAT_DTYPES = ("float32", "float64")

GPU_INSTALL_HINT = (
    "install the GPU extra with `pip install 'xpcnn[gpu]'` (CUDA 12) or "
    "`pip install xpcnn cupy-cuda13x` (CUDA 13), on a machine with an NVIDIA GPU and driver"
)


@dataclass(frozen=True)
class Backend:
    """An array namespace bound to one device.

    Attributes:
        name: canonical name: ``"numpy"``, ``"cupy"`` or ``"array_api_strict"``.
        xp: the array-API namespace (``array_api_compat.numpy``, ``array_api_compat.cupy``
            or ``array_api_strict``).
        device: the device arrays are created on (``"cpu"``, a ``cupy.cuda.Device``, or an
            ``array_api_strict.Device``).
        reference: True forces the array-API reference code for every hot operation (no
            fast paths); used by the tests and the benchmark to check the fast paths.
    """

    name: str
    xp: ModuleType
    device: Any
    reference: bool = False

    @property
    def ops(self) -> Any:
        """The table of hot operations (`xpcnn.ops.Ops`): fast where this library has them."""
        from .ops import ops_for   # ops sits above this module (it imports functional)

        return ops_for(self.xp, self.reference)

    def dtype(self, dtype: Any) -> Any:
        """The namespace's dtype object for ``"float32"``/``"float64"`` (or a dtype object)."""
        return resolve_dtype(self.xp, dtype)

    def asarray(self, host_array: Any, dtype: Any = None) -> Any:
        """Copy a host (NumPy) array, or anything array-like, onto this backend's device."""
        dtype = None if dtype is None else self.dtype(dtype)
        return self.xp.asarray(host_array, dtype=dtype, device=self.device)

    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy a backend array (or a Python scalar) back to a host NumPy array."""
        array = getattr(array, "_array", array)     # a counting.CountedArray: the array inside
        if isinstance(array, np.ndarray):
            return array
        if self.name == "cupy":
            import cupy

            return cupy.asnumpy(array)
        if self.name == "array_api_strict" and hasattr(array, "to_device"):
            array = array.to_device(self.xp.Device("CPU_DEVICE"))
        return np.asarray(array)

    def to_float(self, scalar_array: Any) -> float:
        """A 0-d backend array as a Python float (the only per-log host sync)."""
        return float(self.to_numpy(scalar_array))

    def synchronize(self) -> None:
        """Wait until queued device work has finished (a no-op on the CPU)."""
        if self.name == "cupy":
            import cupy

            with self.device:
                cupy.cuda.get_current_stream().synchronize()

    def owns(self, array: Any) -> bool:
        """Whether `array` lives in this backend's namespace and on its device."""
        try:
            xp = array_api_compat.array_namespace(array)
        except TypeError:
            return False
        return xp is self.xp and _same_device(array_api_compat.device(array), self.device)

    def __str__(self) -> str:
        return f"{self.name} ({self.device})"


def _same_device(a: Any, b: Any) -> bool:
    if a == b:
        return True
    # CuPy devices compare by id; NumPy reports "cpu".
    return getattr(a, "id", a) == getattr(b, "id", b)


def get_backend(name: "str | Backend" = "cpu", device: Any = None, *, reference: bool = False) -> Backend:
    """Return the backend called `name` (``cpu``/``numpy``, ``gpu``/``cupy``, ``array_api_strict``).

    Args:
        name: a backend name, or an existing `Backend` (returned unchanged).
        device: for ``gpu``, the CUDA device number (default: the current device), which
            also becomes the current CUDA device;
            for ``array_api_strict``, an ``array_api_strict.Device`` (default ``"device1"``,
            a non-default device, so that a NumPy-only call on its arrays fails loudly).
        reference: use the array-API reference code for every hot operation (no fast paths).

    Raises:
        ConfigError: unknown backend name.
        BackendUnavailable: CuPy is not installed or no CUDA device can be used.
    """
    if isinstance(name, Backend):
        return replace(name, reference=True) if reference and not name.reference else name
    key = BACKEND_ALIASES.get(str(name).lower())
    if key is None:
        raise ConfigError(
            f"unknown backend {name!r}: expected one of 'cpu', 'gpu', 'numpy', 'cupy', "
            f"'array_api_strict'"
        )
    if key == "numpy":
        import array_api_compat.numpy as xp_numpy

        return Backend("numpy", xp_numpy, "cpu", reference)
    if key == "array_api_strict":
        try:
            import array_api_strict
        except ImportError as exc:  # pragma: no cover - dev extra
            raise BackendUnavailable(
                "backend 'array_api_strict' needs the package array-api-strict: "
                "pip install 'xpcnn[dev]'"
            ) from exc
        strict_device = array_api_strict.Device("device1") if device is None else device
        return Backend("array_api_strict", array_api_strict, strict_device, reference)
    return replace(_cupy_backend(device), reference=reference)


def _cupy_backend(device: Any) -> Backend:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailable(f"backend 'gpu' needs CuPy, which is not installed: {GPU_INSTALL_HINT}") from exc
    except Exception as exc:  # a broken CUDA install can fail at import time
        raise BackendUnavailable(f"backend 'gpu': CuPy failed to import ({exc}); {GPU_INSTALL_HINT}") from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendUnavailable(
            f"backend 'gpu': CuPy is installed but no CUDA device is usable ({exc}); "
            f"run on a machine with an NVIDIA GPU and driver, or use --backend cpu"
        ) from exc
    if count == 0:
        raise BackendUnavailable(
            "backend 'gpu': CuPy is installed but found no CUDA device; use --backend cpu"
        )
    index = cupy.cuda.runtime.getDevice() if device is None else int(device)
    if not 0 <= index < count:
        raise BackendUnavailable(f"backend 'gpu': device {index} requested, but only {count} CUDA device(s) found (0..{count - 1})")
    import array_api_compat.cupy as xp_cupy

    # array_api_compat honours device= only in asarray; zeros/full/arange use the current
    # device. Making the chosen device current keeps every array of a run on it.
    cuda_device = cupy.cuda.Device(index)
    cuda_device.use()
    return Backend("cupy", xp_cupy, cuda_device)


def resolve_dtype(xp: ModuleType, dtype: Any) -> Any:
    """Map ``"float32"``/``"float64"`` (or a dtype object of `xp`) to `xp`'s dtype object."""
    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise DTypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        return getattr(xp, dtype)
    for name in FLOAT_DTYPES:
        if dtype == getattr(xp, name):
            return dtype
    raise DTypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for any namespace's float32 dtype object (and so on)."""
    text = str(dtype)
    found = re.search(r"(u?int\d+|float\d+|complex\d+|bool)", text)
    return found.group(1) if found else text


def namespace_of(*arrays: Any) -> ModuleType:
    """The common array namespace of `arrays`; `BackendMismatch` if they come from different ones."""
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        kinds = sorted({type(a).__module__.split(".")[0] + "." + type(a).__name__ for a in arrays})
        raise BackendMismatch(
            f"arrays from different backends were mixed in one call ({', '.join(kinds)}); "
            f"move them to one backend first, e.g. with get_backend(...).asarray(x)"
        ) from exc


def values_are_free_to_read(array: Any) -> bool:
    """Whether reading `array`'s values costs nothing extra: it is a NumPy array in host memory.

    Validation that must look at values (label ranges, NaN checks) runs only where this is
    true; on a device it would force a host synchronisation every step, so there the Trainer
    checks the data once, on the host, before moving it.
    """
    return isinstance(array, np.ndarray)


def check_same_device(x: Any, reference: Any, what: str = "input") -> None:
    """Raise `BackendMismatch` if `x` is not on the device of `reference` (e.g. a weight)."""
    dx, dr = array_api_compat.device(x), array_api_compat.device(reference)
    if not _same_device(dx, dr):
        raise BackendMismatch(f"{what} is on device {dx}, but the layer's weights are on {dr}")


def backend_of(array: Any) -> Backend:
    """The `Backend` an array lives on (namespace and device)."""
    xp = namespace_of(array)
    if array_api_compat.is_numpy_namespace(xp):
        return get_backend("numpy")
    if array_api_compat.is_cupy_namespace(xp):
        return Backend("cupy", xp, array_api_compat.device(array))
    if array_api_compat.is_array_api_strict_namespace(xp):
        return Backend("array_api_strict", xp, array_api_compat.device(array))
    return Backend(getattr(xp, "__name__", "unknown"), xp, array_api_compat.device(array))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: NumPy's MemoryError, CuPy's OutOfMemoryError
    (a MemoryError), or an accelerator library's ``OutOfMemoryError`` of another base."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def out_of_memory_message(exc: BaseException) -> str:
    """The library's own one-line account of an allocation failure (without its traceback)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__module__.split('.')[0]}: {text[0] if text else type(exc).__name__}"
