"""A network's parameters as views of one contiguous buffer.

The book's ``params`` dict stays what it was (``params["W1"]`` is an array the layers share
by reference, updated in place by ``optimizer.update(params, grads)``), but every array in
it is a view of one flat buffer, ``params.flat``. An optimizer then updates the whole
network with a few whole-buffer operations (one fused kernel on CuPy) instead of a few per
parameter, which matters where each array-library call costs a kernel launch.

    >>> params = make_params({"W1": w1_host, "b1": b1_host}, backend, "float32")
    >>> params["W1"]            # (FN, C, FH, FW) view of params.flat
    >>> params.flat             # (P,) every parameter, in the dict's order
"""

from __future__ import annotations

from typing import Any, Iterator

import array_api_compat
import numpy as np

from ..backend.arrays import check_same_device, dtype_name, namespace_of
from ..backend.devices import Backend
from ..errors import DTypeError, ShapeError


class ParamDict(dict):
    """``{name: array}`` whose arrays are views of `flat`, in `layout` order.

    Attributes:
        flat: the 1-D buffer holding every parameter.
        layout: ``((name, start, stop, shape), ...)``: where each parameter lives in `flat`.
        backend: the `Backend` the buffer lives on (its `ops` table does the updates).

    Assigning ``params[name] = value`` copies `value` into the existing view (the layers
    keep seeing the same array); a different shape is a `ShapeError`.
    """

    def __init__(self, flat: Any, layout: tuple, backend: Backend):
        xp = backend.xp
        super().__init__((name, xp.reshape(flat[start:stop], shape)) for name, start, stop, shape in layout)
        self.flat, self.layout, self.backend = flat, layout, backend

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self:
            raise KeyError(f"{key!r}: a flat parameter set cannot gain new entries; it has {list(self)}")
        current = dict.__getitem__(self, key)
        if value is current:          # `params[k] -= step` re-assigns the same array
            return
        if tuple(value.shape) != tuple(current.shape):
            raise ShapeError(f"params[{key!r}] must keep shape {tuple(current.shape)}, got {tuple(value.shape)}")
        current[...] = value

    def zeros_like(self) -> "ParamDict":
        """A `ParamDict` of zeros with this layout (e.g. the network's gradient buffer)."""
        xp = self.backend.xp
        flat = xp.zeros(self.flat.shape, dtype=self.flat.dtype, device=array_api_compat.device(self.flat))
        return ParamDict(flat, self.layout, self.backend)

    def gather(self, arrays: "dict[str, Any]") -> Any:
        """`arrays` (e.g. gradients, keyed like this dict) as one flat buffer in `layout` order.

        A `ParamDict` of the same layout whose views are intact already is one: its buffer
        is returned as it is (no copy, no call). Otherwise raises `ShapeError`/`DTypeError`/
        `BackendMismatch` for an entry of another shape, dtype, library or device, so a flat
        update never misaligns or silently casts.
        """
        if isinstance(arrays, ParamDict) and arrays.layout == self.layout and arrays.flat.dtype == self.flat.dtype \
                and type(arrays.flat) is type(self.flat):
            return arrays.flat
        flat_type = type(self.flat)
        parts = []
        for name, _, _, shape in self.layout:
            array = arrays[name]
            if type(array) is not flat_type:
                namespace_of(array, self.flat)
            check_same_device(array, self.flat, f"gradient {name!r}")
            if tuple(array.shape) != shape:
                raise ShapeError(f"gradient {name!r} has shape {tuple(array.shape)}, the parameter {shape}")
            if array.dtype != self.flat.dtype:
                raise DTypeError(f"gradient {name!r} is {dtype_name(array.dtype)}, the parameters "
                                 f"{dtype_name(self.flat.dtype)}; no silent casts")
            parts.append(self.backend.xp.reshape(array, (-1,)))
        return self.backend.xp.concat(parts)

    def views_of(self, flat: Any) -> Iterator[tuple[str, Any]]:
        """``(name, view)`` pairs cutting another buffer of this layout (e.g. optimizer state)."""
        xp = self.backend.xp
        for name, start, stop, shape in self.layout:
            yield name, xp.reshape(flat[start:stop], shape)


def make_params(host: "dict[str, np.ndarray]", backend: Backend, dtype: Any) -> ParamDict:
    """Move host arrays to `backend` as one buffer of `dtype` (one transfer) and cut the views."""
    layout, start = [], 0
    for name, array in host.items():
        stop = start + int(np.prod(array.shape, dtype=np.int64))
        layout.append((name, start, stop, tuple(int(s) for s in array.shape)))
        start = stop
    flat_host = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in host.values()]) if host \
        else np.zeros(0)
    flat = backend.asarray(flat_host, dtype=dtype)
    return ParamDict(flat, tuple(layout), backend)
