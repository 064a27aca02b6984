"""Array-API helpers that name no array library: the namespace of arrays, dtypes, devices.

Everything above the backend package writes standard array-API code against a namespace
`xp`; these are the few helpers it needs that the standard lacks. `values_are_free_to_read`
is the one test of "is this a host (NumPy) array" the library uses.
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from ..errors import BackendMismatch, DTypeError

#: Floating dtypes a model may compute in.
FLOAT_DTYPES = ("float32", "float64")


def same_device(a: Any, b: Any) -> bool:
    """Whether two device objects (as `array_api_compat.device` reports them) name one device."""
    if a == b:
        return True
    # CuPy devices compare by id; NumPy reports "cpu".
    return getattr(a, "id", a) == getattr(b, "id", b)


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
    if not same_device(dx, dr):
        raise BackendMismatch(f"{what} is on device {dx}, but the layer's weights are on {dr}")

