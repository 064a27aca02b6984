"""Backends: which array library and device a model runs on, and the helpers around that.

    arrays.py    helpers that name no library: `namespace_of`, dtypes, device checks
    devices.py   `Backend` and one class per library (`NumpyBackend`, `CupyBackend`,
                 `TorchBackend`, `StrictBackend`), `get_backend`: host <-> device copies, random
                 generators, out-of-memory mapping (the only module that names CuPy or PyTorch)
    random.py    `RandomSource`: seeded random numbers made on the backend's device
    counting.py  counting the array-library calls of a piece of code (for measuring)
    host_memory.py  the C library's allocator under NumPy (glibc): large freed blocks kept for reuse

    >>> be = get_backend("cpu")
    >>> x = be.asarray(numpy_images, dtype="float32")   # host -> backend, once
    >>> be.to_numpy(x)                                   # backend -> host, at the edges
"""

from .arrays import (
    FLOAT_DTYPES,
    check_same_device,
    dtype_name,
    namespace_of,
    resolve_dtype,
    same_device,
    values_are_free_to_read,
)
from .devices import (
    BACKEND_ALIASES,
    BACKEND_CLASSES,
    GPU_INSTALL_HINT,
    TORCH_DEVICE_TYPES,
    TORCH_INSTALL_HINT,
    Backend,
    CupyBackend,
    NumpyBackend,
    StrictBackend,
    TorchBackend,
    backend_of,
    get_backend,
    is_out_of_memory,
    out_of_memory_as_error,
    out_of_memory_message,
)
from .random import RandomSource

__all__ = [
    "FLOAT_DTYPES", "check_same_device", "dtype_name", "namespace_of", "resolve_dtype", "same_device",
    "values_are_free_to_read",
    "BACKEND_ALIASES", "BACKEND_CLASSES", "GPU_INSTALL_HINT", "TORCH_DEVICE_TYPES", "TORCH_INSTALL_HINT", "Backend",
    "NumpyBackend", "CupyBackend", "TorchBackend", "StrictBackend", "backend_of",
    "get_backend", "is_out_of_memory", "out_of_memory_as_error", "out_of_memory_message", "RandomSource",
]
