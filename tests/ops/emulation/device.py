"""The emulated GPU behind the stand-in for CuPy (`emulator.StandInCupy`): device memory, the
stream with CUDA-graph capture and CuPy's capture rules, device arrays, their array-API
namespace, and a random generator whose state lives on the device.

What happens on a GPU is one of three things here:

- a **launch** (a kernel, or a library call that runs one: a product, a reduction, a copy, a
  fill, a draw of the generator): counted with `xpcnn.backend.counting.add`, then run at once,
  or, while the current stream captures, recorded into the graph being captured and run only
  when that graph is launched (capture runs nothing, as on a GPU: the arrays hold what they
  held before until the graph runs);
- an **allocation**, through the current allocator: CuPy's memory pool, or one a caller set with
  `using_allocator` (how a captured step serves its allocations from buffers made before);
- a **transfer** between host and device or a **synchronisation**.

While the current stream captures, these raise where CuPy (and CUDA under it) refuses:
cuBLAS (`matmul`, `tensordot`, `dot`, the ``@`` operator: cupy/cupy#6290), transfers between
host and device (``get()``, ``asnumpy``, ``asarray`` or a store of host data, ``float()``,
``int()``, ``bool()`` and ``item()`` of a device array), synchronisation; and, more strictly
than CuPy, any allocation from the memory pool: a graph keeps the addresses it was captured
with, and after the capture the pool hands memory freed during it to other arrays, which each
replay would then overwrite. An error during capture invalidates it, as CUDA does: the
stream's `end_capture` then raises too.

A `DeviceArray` is not a NumPy array (so `xpcnn.backend.arrays.values_are_free_to_read` is
False for it, as for a CuPy array); NumPy functions and operators on it are intercepted
(``__array_ufunc__``/``__array_function__``): a result that shares memory with an input is a
view (free, as on a GPU), any other result is a launch into a new allocation.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Callable, Iterator

import array_api_compat.numpy as compat_numpy
import numpy as np

from xpcnn.backend import counting


class EmulationError(RuntimeError):
    """A kernel did something a GPU would not do right (an access out of bounds, a barrier not
    every thread reached, a launch CUDA would refuse, an argument of the wrong size)."""


class CUDARuntimeError(RuntimeError):
    """CuPy's name for an error of the CUDA runtime (`cupy_backends.cuda.api.runtime.CUDARuntimeError`)."""


class OutOfMemoryError(MemoryError):
    """CuPy's `cupy.cuda.memory.OutOfMemoryError` (a MemoryError)."""


#: CuPy's words for a cuBLAS call during capture (cupy/cupy#6290, CuPy 14.2).
CUBLAS_DURING_CAPTURE = "calling cuBLAS API during stream capture is currently unsupported"
#: CUDA's words for an operation a capturing stream does not permit.
NOT_PERMITTED = "cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing"


# ------------------------------------------------------------------------------- memory

class MemoryPointer:
    """A block of device memory (`cupy.cuda.MemoryPointer`): `size` bytes, held in `buffer`."""

    def __init__(self, size: int):
        self.size = int(size)
        self.buffer = np.empty(max(self.size, 1), dtype=np.uint8)


class MemoryPool:
    """CuPy's default memory pool, without reuse: every `malloc` is a new block. `set_limit`
    bounds the bytes held by live blocks (as ``CUPY_GPU_MEMORY_LIMIT`` does)."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self._used = 0

    def set_limit(self, size: int | None = None) -> None:
        self.limit = size or None

    def used_bytes(self) -> int:
        return self._used

    def _release(self, size: int) -> None:
        self._used -= size

    def malloc(self, size: int) -> MemoryPointer:
        if self.limit is not None and self._used + size > self.limit:
            raise OutOfMemoryError(f"Out of memory allocating {size:,} bytes (allocated so far: {self._used:,} bytes, "
                                   f"limit set to: {self.limit:,} bytes).")
        block = MemoryPointer(size)
        self._used += size
        weakref.finalize(block.buffer, self._release, size)
        return block


POOL = MemoryPool()


class _State:
    allocator: Callable[[int], MemoryPointer] | None = None
    streams: list["Stream"] = []          # the current stream is the last (the null stream when empty)
    capturing: set["Stream"] = set()      # streams in the middle of a capture


@contextlib.contextmanager
def using_allocator(allocator: Callable[[int], MemoryPointer] | None = None) -> Iterator[None]:
    """`cupy.cuda.using_allocator`: allocations inside the block come from `allocator(size)`."""
    saved = _State.allocator
    _State.allocator = allocator
    try:
        yield
    finally:
        _State.allocator = saved


def allocate(shape: Any, dtype: Any) -> "DeviceArray":
    """A new, uninitialised device array, from the current allocator (see the module docstring)."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes == 0:
        return DeviceArray(np.empty(shape, dtype=dtype))
    allocator = _State.allocator
    if allocator is None:
        if capturing() is not None:
            refuse(CUDARuntimeError(
                f"{NOT_PERMITTED}: an allocation of {nbytes:,} bytes from the memory pool during capture (a replay "
                f"would write into memory the pool hands to other arrays after the capture); serve the step's "
                f"allocations from buffers made before the capture"))
        block = POOL.malloc(nbytes)
    else:
        block = allocator(nbytes)
        if block.size < nbytes:
            raise EmulationError(f"the allocator gave {block.size} bytes for an allocation of {nbytes}")
    return DeviceArray(np.frombuffer(block.buffer, dtype=dtype, count=count).reshape(shape))


# ------------------------------------------------------------------------ stream, graphs

class _Capture:
    def __init__(self) -> None:
        self.nodes: list[Callable[[], None]] = []
        self.invalidated = False


class Stream:
    """`cupy.cuda.Stream`: `with stream:` makes it current; `begin_capture`/`end_capture` turn
    what is launched on it meanwhile into a `Graph`."""

    null: "Stream"

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False):
        self.is_null = null
        self._capture: _Capture | None = None

    def __enter__(self) -> "Stream":
        _State.streams.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _State.streams.pop()

    def begin_capture(self, mode: Any = None) -> None:
        if self.is_null:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: the legacy default stream cannot be captured")
        if self._capture is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is already capturing")
        self._capture = _Capture()
        _State.capturing.add(self)

    def end_capture(self) -> "Graph":
        capture, self._capture = self._capture, None
        _State.capturing.discard(self)
        if capture is None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
        if capture.invalidated:
            raise CUDARuntimeError("cudaErrorStreamCaptureInvalidated: the capture was invalidated by an earlier "
                                   "error")
        return Graph(capture.nodes)

    def is_capturing(self) -> bool:
        return self._capture is not None

    def synchronize(self) -> None:
        synchronize("Stream.synchronize")


Stream.null = Stream(null=True)


def get_current_stream() -> Stream:
    """`cupy.cuda.get_current_stream`."""
    return _State.streams[-1] if _State.streams else Stream.null


def capturing() -> _Capture | None:
    """The capture of the current stream, or None."""
    return get_current_stream()._capture


def open_captures() -> int:
    """How many streams are in the middle of a capture (one left open breaks later work)."""
    return len(_State.capturing)


class Graph:
    """`cupy.cuda.Graph`: the launches recorded during a capture, run in order by `launch`."""

    def __init__(self, nodes: list[Callable[[], None]]):
        self.nodes = tuple(nodes)

    def launch(self, stream: Stream | None = None) -> None:
        if (stream or get_current_stream())._capture is not None:
            raise EmulationError("launching a graph inside a capture (a child graph) is not emulated")
        counting.add(1)
        with np.errstate(all="ignore"):
            for node in self.nodes:
                node()


def refuse(error: BaseException) -> None:
    """Raise `error` for a call the capturing stream does not permit, invalidating the capture."""
    capture = capturing()
    if capture is not None:
        capture.invalidated = True
    raise error


def launch(run: Callable[[], None]) -> None:
    """One launch: counted; run now, or recorded into the capture of the current stream."""
    counting.add(1)
    capture = capturing()
    if capture is None:
        with np.errstate(all="ignore"):
            run()
    else:
        capture.nodes.append(run)


def cublas(what: str) -> None:
    """A cuBLAS call (CuPy refuses it during capture)."""
    if capturing() is not None:
        refuse(NotImplementedError(f"{CUBLAS_DURING_CAPTURE} ({what})"))


def device_to_host(what: str) -> None:
    """A copy of device values to the host (a synchronisation)."""
    if capturing() is not None:
        refuse(RuntimeError(f"the current stream is capturing, so D2H transfers are disallowed ({what})"))
    counting.add(1)


def host_to_device(what: str) -> None:
    """A copy of host values to the device."""
    if capturing() is not None:
        refuse(RuntimeError(f"the current stream is capturing, so H2D transfers are disallowed ({what})"))
    counting.add(1)


def synchronize(what: str) -> None:
    """Waiting for the device: not while any stream captures (CUDA refuses it even from another
    stream: a capture left open after an error breaks the next synchronisation)."""
    if _State.capturing:
        refuse(CUDARuntimeError(f"{NOT_PERMITTED} ({what})"))


# ------------------------------------------------------------------------ device arrays

def unwrap(value: Any) -> Any:
    """`value` with every `DeviceArray` (in lists, tuples and dicts too) replaced by its memory."""
    if isinstance(value, DeviceArray):
        return value._data
    if isinstance(value, (list, tuple)):
        return type(value)(unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    return value


def _device_arrays(value: Any) -> list["DeviceArray"]:
    if isinstance(value, DeviceArray):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _device_arrays(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _device_arrays(v)]
    return []


def _no_host_arrays(values: Any, what: str) -> None:
    """CuPy refuses NumPy arrays mixed into device operations (no implicit transfer)."""
    for value in values if isinstance(values, (list, tuple)) else (values,):
        if isinstance(value, np.ndarray):
            raise TypeError(f"Unsupported type {type(value)} in {what}: move host arrays to the device first")
        if isinstance(value, (list, tuple)):
            _no_host_arrays(value, what)


def _compute_for_shape(compute: Callable[[], Any], inputs: list["DeviceArray"]) -> Any:
    """`compute()`'s result for its shape and dtype only (during capture the inputs hold stale
    values, which may not even be valid indices)."""
    try:
        with np.errstate(all="ignore"):
            return compute()
    except (IndexError, ValueError, FloatingPointError):
        saved = [a._data.copy() for a in inputs]
        try:
            for a in inputs:
                a._data[...] = 0
            with np.errstate(all="ignore"):
                return compute()
        finally:
            for a, s in zip(inputs, saved):
                a._data[...] = s


def produce(compute: Callable[[], Any], inputs: list["DeviceArray"]) -> Any:
    """The result of `compute()` (NumPy on the inputs' memory, a pure function) as new device
    arrays: one launch writing freshly allocated memory."""
    if capturing() is None:
        with np.errstate(all="ignore"):
            result = compute()
    else:
        result = _compute_for_shape(compute, inputs)
    several = isinstance(result, tuple)
    results = [np.asarray(r) for r in (result if several else (result,))]
    outs = [allocate(r.shape, r.dtype) for r in results]
    targets = [o._data for o in outs]
    if capturing() is None:
        counting.add(1)
        for target, r in zip(targets, results):
            target[...] = r
    else:
        def run() -> None:
            again = compute()
            for target, r in zip(targets, again if several else (again,)):
                target[...] = r
        launch(run)
    return tuple(outs) if several else outs[0]


def _shares(result: Any, inputs: list["DeviceArray"]) -> bool:
    return isinstance(result, np.ndarray) and any(np.may_share_memory(result, a._data) for a in inputs)


def _finish(compute: Callable[[], Any], inputs: list["DeviceArray"]) -> Any:
    """The result of a NumPy function on device arrays: a view where it shares memory with an
    input (free), a value that is not an array as it is, otherwise `produce`."""
    if capturing() is None:
        with np.errstate(all="ignore"):
            result = compute()
    else:
        result = _compute_for_shape(compute, inputs)
    parts = result if isinstance(result, tuple) else (result,)
    if all(_shares(p, inputs) for p in parts if isinstance(p, np.ndarray)) and \
            any(isinstance(p, np.ndarray) for p in parts):
        wrapped = tuple(DeviceArray(p) if isinstance(p, np.ndarray) else p for p in parts)
        return wrapped if isinstance(result, tuple) else wrapped[0]
    if not any(isinstance(p, (np.ndarray, np.generic)) for p in parts):
        return result                                   # shapes, dtypes, flags: no device work
    return produce(compute, inputs)


#: NumPy functions that CuPy runs with cuBLAS.
_CUBLAS_FUNCTIONS = {np.matmul, np.dot, np.vdot, np.tensordot, np.inner, np.outer, np.einsum, np.linalg.norm,
                     np.linalg.solve, np.linalg.inv}


class EmulatedDevice:
    """The emulated GPU as a device (`cupy.cuda.Device`): compares equal only to itself."""

    id = 0

    def __enter__(self) -> "EmulatedDevice":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def use(self) -> None:
        return None

    def synchronize(self) -> None:
        synchronize("Device.synchronize")

    def __repr__(self) -> str:
        return "<emulated CUDA device 0>"


DEVICE = EmulatedDevice()


class _Flags:
    def __init__(self, data: np.ndarray):
        self.c_contiguous = bool(data.flags.c_contiguous)
        self.f_contiguous = bool(data.flags.f_contiguous)


class DeviceArray:
    """A CuPy array on the emulated device: its memory `_data` is a NumPy array (in device
    memory from `allocate`, or a host array the numpy-backed emulation lent it)."""

    __slots__ = ("_data", "__weakref__")
    __array_priority__ = 100

    def __init__(self, data: np.ndarray):
        self._data = data

    # ---------------------------------------------------------------- metadata (free)
    shape = property(lambda self: self._data.shape)
    ndim = property(lambda self: self._data.ndim)
    dtype = property(lambda self: self._data.dtype)
    size = property(lambda self: self._data.size)
    nbytes = property(lambda self: self._data.nbytes)
    itemsize = property(lambda self: self._data.itemsize)
    strides = property(lambda self: self._data.strides)
    flags = property(lambda self: _Flags(self._data))
    device = property(lambda self: DEVICE)
    T = property(lambda self: DeviceArray(self._data.T))
    mT = property(lambda self: DeviceArray(np.swapaxes(self._data, -1, -2)))

    def __len__(self) -> int:
        return len(self._data)

    def __array_namespace__(self, api_version: Any = None) -> "EmulatedNamespace":
        return NAMESPACE

    def __repr__(self) -> str:
        if capturing() is not None:
            return f"<DeviceArray {self.shape} {self.dtype}>"
        return f"DeviceArray({self._data!r})"

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------- values to the host
    def get(self, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
        device_to_host("get()")
        return np.array(self._data, order=order)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        device_to_host("numpy.asarray of a device array")
        return np.array(self._data, dtype=dtype)

    def __float__(self) -> float:
        device_to_host("float() of a device array")
        return float(self._data)

    def __int__(self) -> int:
        device_to_host("int() of a device array")
        return int(self._data)

    def __index__(self) -> int:
        device_to_host("a device array used as an index")
        return int(self._data)

    def __bool__(self) -> bool:
        device_to_host("bool() of a device array")
        return bool(self._data)

    def __complex__(self) -> complex:
        device_to_host("complex() of a device array")
        return complex(self._data)

    def item(self) -> Any:
        device_to_host("item()")
        return self._data.item()

    def tolist(self) -> Any:
        device_to_host("tolist()")
        return self._data.tolist()

    def set(self, host: Any, stream: Any = None) -> None:
        host_to_device("set()")
        self._data[...] = host

    # ----------------------------------------------------------------- device work
    def __getitem__(self, key: Any) -> Any:
        host_key = unwrap(key)
        if isinstance(host_key, tuple) and len(host_key) == self.ndim and \
                all(isinstance(k, (int, np.integer)) for k in host_key):
            host_key = host_key + (Ellipsis,)          # one element: a 0-d view, as CuPy gives
        elif isinstance(host_key, (int, np.integer)) and self.ndim == 1:
            host_key = (host_key, Ellipsis)
        return _finish(lambda: self._data[host_key], [self, *_device_arrays(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, np.ndarray):
            host_to_device("a store of host data into a device array")
            self._data[unwrap(key)] = value
            return
        host_key, host_value, target = unwrap(key), unwrap(value), self._data

        def run() -> None:
            target[host_key] = host_value
        launch(run)

    def astype(self, dtype: Any, order: str = "K", casting: Any = None, subok: Any = None,
               copy: bool = True) -> "DeviceArray":
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return produce(lambda: self._data.astype(dtype), [self])

    def copy(self, order: str = "C") -> "DeviceArray":
        return produce(lambda: self._data.copy(), [self])

    def reshape(self, *shape: Any, order: str = "C") -> "DeviceArray":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _finish(lambda: self._data.reshape(shape), [self])

    def ravel(self) -> "DeviceArray":
        return self.reshape(-1)

    def fill(self, value: Any) -> None:
        target = self._data

        def run() -> None:
            target[...] = value
        launch(run)

    def sum(self, *args: Any, **kwargs: Any) -> "DeviceArray":
        return np.sum(self, *args, **kwargs)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, out: Any = None, **kwargs: Any) -> Any:
        if ufunc is np.matmul:
            cublas("matmul")
        _no_host_arrays(inputs, ufunc.__name__)
        host_inputs, host_kwargs = unwrap(inputs), unwrap(kwargs)
        if out is not None:
            targets = tuple(o._data if isinstance(o, DeviceArray) else o for o in out)
            _no_host_arrays([o for o in targets if not any(o is d._data for d in _device_arrays(out))], ufunc.__name__)

            def run() -> None:
                getattr(ufunc, method)(*host_inputs, out=targets, **host_kwargs)
            launch(run)
            return out[0] if len(out) == 1 else out
        return produce(lambda: getattr(ufunc, method)(*host_inputs, **host_kwargs), _device_arrays(inputs))

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func in _CUBLAS_FUNCTIONS:
            cublas(func.__name__)
        _no_host_arrays(args, func.__name__)
        host_args, host_kwargs = unwrap(args), unwrap(kwargs)
        inputs = _device_arrays(args) + _device_arrays(kwargs)
        if func is np.copyto or "out" in kwargs and kwargs["out"] is not None:
            def run() -> None:
                func(*host_args, **host_kwargs)
            launch(run)
            return kwargs.get("out")
        return _finish(lambda: func(*host_args, **host_kwargs), inputs)


def _binary(ufunc: Any) -> Callable[[DeviceArray, Any], Any]:
    return lambda self, other: ufunc(self, other)


def _reflected(ufunc: Any) -> Callable[[DeviceArray, Any], Any]:
    return lambda self, other: ufunc(other, self)


def _inplace(ufunc: Any) -> Callable[[DeviceArray, Any], Any]:
    def method(self: DeviceArray, other: Any) -> DeviceArray:
        ufunc(self, other, out=(self,))
        return self
    return method


for _name, _ufunc in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply), ("truediv", np.true_divide),
                      ("floordiv", np.floor_divide), ("mod", np.remainder), ("pow", np.power),
                      ("matmul", np.matmul), ("and", np.bitwise_and), ("or", np.bitwise_or),
                      ("xor", np.bitwise_xor), ("lshift", np.left_shift), ("rshift", np.right_shift)):
    setattr(DeviceArray, f"__{_name}__", _binary(_ufunc))
    setattr(DeviceArray, f"__r{_name}__", _reflected(_ufunc))
    setattr(DeviceArray, f"__i{_name}__", _inplace(_ufunc))
for _name, _ufunc in (("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
                      ("gt", np.greater), ("ge", np.greater_equal)):
    setattr(DeviceArray, f"__{_name}__", _binary(_ufunc))
for _name, _ufunc in (("neg", np.negative), ("pos", np.positive), ("abs", np.absolute), ("invert", np.invert)):
    setattr(DeviceArray, f"__{_name}__", lambda self, _u=_ufunc: _u(self))


# -------------------------------------------------------------------- array-API namespace

def asarray(obj: Any, dtype: Any = None, device: Any = None, copy: Any = None) -> DeviceArray:
    """A device array of `obj`: itself (cast or copied if asked) for a device array, else a
    copy of host data (a transfer)."""
    if isinstance(obj, DeviceArray):
        if dtype is not None and np.dtype(dtype) != obj.dtype:
            return obj.astype(dtype)
        return obj.copy() if copy else obj
    if copy is False:
        raise ValueError("asarray(copy=False) of host data: it must be copied to the device")
    host = np.asarray(obj, dtype=dtype)
    host_to_device("asarray of host data")
    out = allocate(host.shape, host.dtype)
    out._data[...] = host
    return out


def _filled(shape: Any, dtype: Any, value: Any) -> DeviceArray:
    out = allocate(shape, dtype)
    out.fill(value)
    return out


class EmulatedNamespace:
    """The array-API namespace of device arrays (what `array_namespace` gives for them):
    `array_api_compat.numpy`'s functions, which reach the arrays' NumPy protocols, with the
    functions that make arrays making them on the device."""

    __name__ = "emulated_cupy_namespace"

    def __getattr__(self, name: str) -> Any:
        return getattr(compat_numpy, name)

    @staticmethod
    def asarray(obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> DeviceArray:
        return asarray(obj, dtype, device, copy)

    @staticmethod
    def empty(shape: Any, *, dtype: Any = None, device: Any = None) -> DeviceArray:
        return allocate(shape, dtype or np.float64)

    @staticmethod
    def zeros(shape: Any, *, dtype: Any = None, device: Any = None) -> DeviceArray:
        return _filled(shape, dtype or np.float64, 0)

    @staticmethod
    def ones(shape: Any, *, dtype: Any = None, device: Any = None) -> DeviceArray:
        return _filled(shape, dtype or np.float64, 1)

    @staticmethod
    def full(shape: Any, fill_value: Any, *, dtype: Any = None, device: Any = None) -> DeviceArray:
        return _filled(shape, dtype or np.asarray(fill_value).dtype, fill_value)

    @staticmethod
    def empty_like(x: DeviceArray, /, *, dtype: Any = None, device: Any = None) -> DeviceArray:
        return allocate(x.shape, dtype or x.dtype)

    @staticmethod
    def zeros_like(x: DeviceArray, /, *, dtype: Any = None, device: Any = None) -> DeviceArray:
        return _filled(x.shape, dtype or x.dtype, 0)

    @staticmethod
    def ones_like(x: DeviceArray, /, *, dtype: Any = None, device: Any = None) -> DeviceArray:
        return _filled(x.shape, dtype or x.dtype, 1)

    @staticmethod
    def full_like(x: DeviceArray, /, fill_value: Any, *, dtype: Any = None, device: Any = None) -> DeviceArray:
        return _filled(x.shape, dtype or x.dtype, fill_value)

    @staticmethod
    def arange(start: Any, /, stop: Any = None, step: Any = 1, *, dtype: Any = None,
               device: Any = None) -> DeviceArray:
        values = np.arange(start, stop, step, dtype=dtype) if stop is not None else np.arange(start, dtype=dtype)
        out = allocate(values.shape, values.dtype)
        target = out._data

        def run() -> None:
            target[...] = values
        launch(run)
        return out


NAMESPACE = EmulatedNamespace()


# ------------------------------------------------------------------ the device generator

class Generator:
    """`cupy.random.default_rng(seed)`: uniform numbers drawn on the device from a state in
    device memory, which each draw advances (so a captured draw gives new numbers at every
    replay, as CuPy's generator does). Not CuPy's numbers: only its behaviour."""

    def __init__(self, seed: Any = None):
        key = np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]
        self._state = asarray(np.array([key, 0], dtype=np.uint64))

    def random(self, size: Any = None, dtype: Any = np.float64, out: Any = None) -> DeviceArray:
        shape = () if size is None else ((size,) if isinstance(size, (int, np.integer)) else tuple(size))
        out = allocate(shape, dtype) if out is None else out
        state, target, dtype = self._state._data, out._data, np.dtype(dtype)

        def run() -> None:
            target[...] = np.random.default_rng([int(state[0]), int(state[1])]).random(shape, dtype=dtype)
            state[1] += 1
        launch(run)
        return out


def default_rng(seed: Any = None) -> Generator:
    return Generator(seed)
