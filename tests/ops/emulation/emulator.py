"""Run `xpcnn/ops/fast_cupy.py`'s own wrappers on the CPU: a stand-in for `cupy` whose kernel
calls compile the kernels' CUDA source as C++ (g++, `xpcnn_emulation.h` in place of CuPy's
device headers) and run them on NumPy arrays, on an emulated GPU (`device.py`: memory, the
stream and CUDA-graph capture with CuPy's capture rules, device arrays).

    standin = StandInCupy(GxxRunner())          # or Recorder(): keep the sources, run nothing
    fast_cupy = load_fast_cupy(standin)         # the module's code, unmodified, on the stand-in
    loss, cache = fast_cupy.softmax_cross_entropy_forward(xp, scores, labels)

Two ways to run it:

- `use_fast_module(module)`: NumPy's backend whose fast table is the module's entries; each
  entry gets its arguments as device arrays (sharing the NumPy arrays' memory) and gives NumPy
  arrays back. The layers' own code runs on NumPy. For comparing kernels with the reference.
- `use_emulated_device(module)`: a backend named "cupy" whose arrays are the emulated device's
  arrays everywhere (`device.DeviceArray`, not NumPy arrays), whose namespace is theirs, whose
  random source draws on the device, and whose fast table and CUDA graphs are the module's:
  a whole training step runs on the emulated GPU, so capture and replay can be checked.

Calls are counted from outside fast_cupy.py, as CuPy's cost model has them: each kernel, each
library call that launches one (products, reductions, `zeros`, copies) and each operator,
in-place update, store and `astype` on a device array adds one call to a running
`xpcnn.backend.counting.count_calls` block; allocations (`empty`) and views (slices,
reshapes, ``.T``) are free, as on a GPU.

The stand-in follows CuPy's rules for a kernel call: an `ElementwiseKernel`'s non-raw array
arguments are broadcast together (outputs must have the broadcast shape; missing outputs are
allocated), raw arrays are passed whole, scalars are cast to the parameter's type as CuPy
decides it (`cupy_internals.decide_types`); the source is the one CuPy generates for the
call. All-contiguous, unbroadcast arguments are viewed as 1-d, as CuPy does; otherwise every
array keeps the broadcast shape's dimensions (CuPy may merge some; same elements, another
indexing path). `matmul`, `tensordot`, `sum` and the allocations are NumPy's.

Elementwise kernels run serially, block after block and thread after thread, each thread
through its grid-stride loop (exact: their iterations are independent). A `RawKernel` runs
block after block; the threads of a block are cooperative fibers switched at
`__syncthreads()` (see `xpcnn_emulation.h`); a raw kernel without a barrier runs its threads
one after the other (nothing can pass between them). Raw kernels get pointers: each array is
copied into a buffer with guard zones (NaN for floats, -1 for integers) and its writes
outside the array are reported; its reads outside come back as NaN or -1. The same array
passed twice shares one buffer, as one pointer would; two different views that overlap are
refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path
from typing import Any, Iterator

import array_api_compat
import numpy as np

from xpcnn.backend import get_backend
from xpcnn.backend.devices import Backend, CupyBackend
from xpcnn.ops import table

from . import cupy_internals, device
from .device import DeviceArray, EmulationError, unwrap

HERE = Path(__file__).resolve().parent
SHIM = HERE / "xpcnn_emulation.h"
FAST_CUPY = HERE.parents[2] / "xpcnn" / "ops" / "fast_cupy.py"

#: g++ flags: no contraction into fused multiply-adds and no fast-math, so the host computes
#: each operation as written (a GPU may contract; see docs/cuda-emulation.md). No GNU-unique
#: symbols: a template's `__shared__` array (a static) would otherwise be one object for every
#: loaded kernel library, float's and double's alike.
GXX_FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-fno-gnu-unique", "-w")

ELEMENTWISE_BLOCK = 128          # CuPy's default block size for elementwise kernels
ELEMENTWISE_MAX_GRID = 64        # a small grid, so long arrays take several grid-stride turns
GUARD_ELEMENTS = 4096            # guard zone around each raw-kernel array


def gxx() -> str | None:
    """The path of g++, or None."""
    return shutil.which("g++")


class _ArrayDesc(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("itemsize", ctypes.c_longlong), ("size", ctypes.c_longlong),
                ("ndim", ctypes.c_longlong), ("shape", ctypes.c_longlong * 16), ("strides", ctypes.c_longlong * 16),
                ("low", ctypes.c_longlong), ("high", ctypes.c_longlong)]


def _owner(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _describe(array: np.ndarray) -> _ArrayDesc:
    if array.ndim > 16:
        raise EmulationError(f"arrays of more than 16 dimensions are not emulated (got {array.ndim})")
    desc = _ArrayDesc()
    desc.data = array.ctypes.data
    desc.itemsize = array.itemsize
    desc.size = array.size
    desc.ndim = array.ndim
    for d, (extent, stride) in enumerate(zip(array.shape, array.strides)):
        desc.shape[d], desc.strides[d] = extent, stride
    low, high = np.lib.array_utils.byte_bounds(_owner(array))
    desc.low, desc.high = low - array.ctypes.data, high - array.ctypes.data
    return desc


# ------------------------------------------------------------------------ C++ launcher

_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')


def _split_params(text: str) -> list[str]:
    params, depth, start = [], 0, 0
    for k, char in enumerate(text):
        depth += char == "<"
        depth -= char == ">"
        if char == "," and depth == 0:
            params.append(text[start:k].strip())
            start = k + 1
    if text.strip():
        params.append(text[start:].strip())
    return params


def _argument(k: int, param: str) -> tuple[str, str]:
    """(C++ expression converting args[k] to the parameter's type, size check) for `param`."""
    kind = re.sub(r"\s*\b\w+$", "", param).strip()          # the type: the declaration less its name
    bare = re.sub(r"^const\s+", "", kind)
    desc = f"((const xpcnn_emu::ArrayDesc*)args[{k}])"
    if bare.startswith(("CArray<", "CIndexer<")):
        return f"{bare}::from({desc})", ""
    if kind.endswith("*"):
        return (f"({kind})({desc}->data)",
                f"if ({desc}->itemsize != (long long)sizeof(std::remove_pointer_t<{kind}>)) "
                f"return bad_argument({k}, \"{param}\", (long long)sizeof(std::remove_pointer_t<{kind}>), "
                f"{desc}->itemsize);")
    return (f"*(const {bare}*)({desc}->data)",
            f"if ({desc}->itemsize != (long long)sizeof({bare})) "
            f"return bad_argument({k}, \"{param}\", (long long)sizeof({bare}), {desc}->itemsize);")


def launcher_source(source: str) -> str:
    """`source` (a CUDA kernel source, its includes of CuPy's headers dropped) plus the shim
    and an `extern "C"` launcher `xpcnn_launch(args, grid, block, cooperative)`."""
    found = _SIGNATURE.findall(source)
    if len(found) != 1:
        raise EmulationError(f"expected one __global__ kernel in the source, found {len(found)}")
    name, params = found[0]
    converted = [_argument(k, param) for k, param in enumerate(_split_params(params))]
    body = re.sub(r"^\s*#include\s*<cupy/[^>]*>\s*$", "", source, flags=re.MULTILINE)
    return "\n".join([
        '#include "xpcnn_emulation.h"',
        "#line 1 \"kernel.cu\"",
        body,
        "namespace {",
        "void** xpcnn_args = nullptr;",
        f"void xpcnn_call() {{ void** args = xpcnn_args; {name}({', '.join(expr for expr, _ in converted)}); }}",
        "int bad_argument(int k, const char* param, long long want, long long got) {",
        "    std::snprintf(xpcnn_emu::message, sizeof xpcnn_emu::message,",
        "                  \"argument %d (%s): the kernel takes %lld bytes, the call passed %lld\",",
        "                  k, param, want, got);",
        "    return 1;",
        "}",
        "}  // namespace",
        'extern "C" const char* xpcnn_message() { return xpcnn_emu::message; }',
        'extern "C" int xpcnn_launch(void** args, long long grid, long long block, int cooperative) {',
        "    xpcnn_emu::failed = 0;",
        "    xpcnn_emu::message[0] = 0;",
        *[f"    {check}" for _, check in converted if check],
        "    xpcnn_args = args;",
        "    xpcnn_emu::grid_dim = {(unsigned)grid, 1, 1};",
        "    xpcnn_emu::block_dim = {(unsigned)block, 1, 1};",
        "    for (long long b = 0; b < grid && !xpcnn_emu::failed; ++b) {",
        "        xpcnn_emu::block_index = {(unsigned)b, 0, 0};",
        "        if (cooperative) { xpcnn_emu::run_block((int)block, xpcnn_call); continue; }",
        "        for (long long t = 0; t < block && !xpcnn_emu::failed; ++t) {",
        "            xpcnn_emu::thread_index = {(unsigned)t, 0, 0};",
        "            xpcnn_call();",
        "        }",
        "    }",
        "    xpcnn_emu::thread_index = {0, 0, 0};",
        "    return xpcnn_emu::failed;",
        "}",
        "",
    ])


# --------------------------------------------------------------------------- runners

class Recorder:
    """A runner that keeps each kernel's source (by name and element type) and runs nothing:
    outputs stay uninitialised. For compiling every kernel a call path uses."""

    def __init__(self) -> None:
        self.sources: dict[tuple[str, str], str] = {}
        self.geometry: dict[str, tuple[int, int]] = {}

    def launch(self, name: str, source: str, dtype: str, arrays: list, grid: int, block: int,
               cooperative: bool) -> None:
        self.sources.setdefault((name, dtype), source)
        self.geometry[name] = (grid, block)


class GxxRunner:
    """A runner that compiles each source once with g++ (cached on disk by content) and runs it."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        compiler = gxx()
        if compiler is None:
            raise EmulationError("g++ not found on PATH")
        self.compiler = compiler
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / f"xpcnn-cuda-emulation-{os.getuid()}"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._libraries: dict[str, ctypes.CDLL] = {}
        self._rejected: dict[str, str] = {}
        self._lock = threading.Lock()
        self.launches: dict[str, int] = {}
        self.sources: dict[tuple[str, str], str] = {}
        self.geometry: dict[str, tuple[int, int]] = {}     # the last launch of each kernel: (grid, block)

    def library(self, source: str) -> ctypes.CDLL:
        """The compiled launcher of `source`; `EmulationError` with g++'s messages when it fails."""
        code = launcher_source(source)
        key = hashlib.sha256("\0".join([code, SHIM.read_text(), " ".join(GXX_FLAGS)]).encode()).hexdigest()[:24]
        with self._lock:
            if key in self._libraries:
                return self._libraries[key]
            if key in self._rejected:               # a broken source fails once per session, then at once
                raise EmulationError(self._rejected[key])
            target = self.cache_dir / f"{key}.so"
            if not target.exists():
                cpp = self.cache_dir / f"{key}.{os.getpid()}.cpp"
                cpp.write_text(code)
                partial = self.cache_dir / f"{key}.{os.getpid()}.so"
                done = subprocess.run([self.compiler, *GXX_FLAGS, f"-I{HERE}", "-o", str(partial), str(cpp)],
                                      capture_output=True, text=True)
                cpp.unlink()
                if done.returncode != 0:
                    self._rejected[key] = f"g++ rejected the kernel:\n{done.stderr[-4000:]}"
                    raise EmulationError(self._rejected[key])
                os.replace(partial, target)
            library = ctypes.CDLL(str(target))
            library.xpcnn_launch.restype = ctypes.c_int
            library.xpcnn_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_longlong, ctypes.c_longlong,
                                             ctypes.c_int]
            library.xpcnn_message.restype = ctypes.c_char_p
            self._libraries[key] = library
            return library

    def launch(self, name: str, source: str, dtype: str, arrays: list, grid: int, block: int,
               cooperative: bool) -> None:
        self.sources.setdefault((name, dtype), source)
        self.geometry[name] = (grid, block)
        library = self.library(source)
        descs = [_describe(array) for array in arrays]
        pointers = (ctypes.c_void_p * len(descs))(*[ctypes.addressof(desc) for desc in descs])
        self.launches[name] = self.launches.get(name, 0) + 1
        if library.xpcnn_launch(pointers, grid, block, int(cooperative)):
            raise EmulationError(f"{name}: {library.xpcnn_message().decode()}")


# ------------------------------------------------------------------------ the stand-in

def _scalar_dtype(value: Any) -> np.dtype:
    if isinstance(value, np.generic):
        return value.dtype
    if isinstance(value, bool):
        return np.dtype(np.bool_)
    if isinstance(value, int):
        return np.dtype(np.int64)
    if isinstance(value, float):
        return np.dtype(np.float64)
    raise TypeError(f"unsupported kernel argument of type {type(value).__name__}")


def _arrays_on_device(values: Any, what: str) -> None:
    """A kernel takes device arrays only: a NumPy array would be host memory on a GPU."""
    for value in values:
        if isinstance(value, np.ndarray):
            raise TypeError(f"{what}: a NumPy array was passed to a kernel; kernels take device arrays "
                            f"(cupy.asarray it first)")


class ElementwiseKernel:
    """`cupy.ElementwiseKernel` on the CPU (see the module docstring)."""

    def __init__(self, runner: Any, in_params: str, out_params: str, operation: str, name: str = "kernel",
                 **kwargs: Any) -> None:
        self.runner = runner
        self.kernel = cupy_internals.elementwise_kernel(in_params, out_params, operation, name, **kwargs)
        self.name = name
        self.params = cupy_internals.parameters(self.kernel)
        self.nin = self.kernel.nin
        self.nout = self.kernel.nout
        self._sources: dict[tuple, str] = {}

    def __call__(self, *args: Any, size: int | None = None, block_size: int = ELEMENTWISE_BLOCK) -> Any:
        if size is not None:
            raise NotImplementedError("the emulation does not support ElementwiseKernel(size=...)")
        if len(args) not in (self.nin, self.nin + self.nout):
            raise TypeError(f"{self.name} takes {self.nin} or {self.nin + self.nout} arguments, got {len(args)}")
        _arrays_on_device(args, self.name)
        given_outs = args[self.nin:]
        ins, outs = list(unwrap(args[:self.nin])), list(unwrap(given_outs))
        raw = [is_raw for _, is_raw, _ in self.params]
        in_dtypes = tuple(a.dtype if isinstance(a, np.ndarray) else None for a in ins)
        out_dtypes = tuple(a.dtype for a in outs)
        in_types, out_types, type_map = cupy_internals.decide_types(self.kernel, in_dtypes, out_dtypes)
        shapes = [a.shape for a, is_raw in zip(ins + outs, raw) if isinstance(a, np.ndarray) and not is_raw]
        shape = np.broadcast_shapes(*shapes) if shapes else ()
        for k, out in enumerate(outs):
            if not raw[self.nin + k] and out.shape != shape:
                raise ValueError(f"{self.name}: output {k} has shape {out.shape}, the arguments broadcast to {shape}")
        if given_outs:
            results = list(given_outs)                   # the caller's arrays come back as given
        else:
            results = [device.allocate(shape, t) for t in out_types]
            outs = [r._data for r in results]
        if len(shape) == 0:
            raise NotImplementedError(f"{self.name}: 0-d launches are not emulated")
        values: list[Any] = []
        for k, arg in enumerate(ins):
            if isinstance(arg, np.ndarray):
                if arg.dtype != in_types[k]:
                    raise TypeError(f"{self.name}: argument {k} is {arg.dtype}, the kernel takes {in_types[k]}")
                values.append(arg if raw[k] else np.broadcast_to(arg, shape))
            else:
                values.append(np.asarray(arg).astype(in_types[k]))
        values += outs
        size = int(np.prod(shape))
        if size == 0:
            return results[0] if self.nout == 1 else tuple(results)
        broadcastable = [(k, v) for k, v in enumerate(values) if v.ndim and not raw[k]]
        indexer_shape = shape
        if len(shape) > 1 and all(v.flags.c_contiguous and v.shape == shape for _, v in broadcastable):
            indexer_shape = (size,)
            for k, v in broadcastable:
                values[k] = v.reshape(size)
        scalars = {k for k, arg in enumerate(ins) if not isinstance(arg, np.ndarray)}
        specs = tuple(cupy_internals.ScalarArg(v.dtype) if k in scalars else
                      cupy_internals.ArrayArg(v.dtype, v.ndim, bool(v.flags.c_contiguous),
                                              max(v.nbytes, v.size) < 2**31)
                      for k, v in enumerate(values))
        key = (specs, len(indexer_shape), size < 2**31)
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = cupy_internals.elementwise_source(self.kernel, type_map, list(specs),
                                                                            len(indexer_shape), size < 2**31)
        indexer = np.empty(indexer_shape, dtype=np.int8)       # only its shape is read
        grid = min(-(-size // block_size), ELEMENTWISE_MAX_GRID)
        dtype = str(next((v.dtype for v in values if v.dtype.kind == "f"), values[0].dtype))
        device.launch(lambda: self.runner.launch(self.name, source, dtype, [*values, indexer], grid, block_size,
                                                 cooperative=False))
        return results[0] if self.nout == 1 else tuple(results)


#: NumPy's name of each C type a raw kernel's ``typedef ... T;`` may name.
_C_TYPE_NAMES = {"float": "float32", "double": "float64", "long long": "int64"}


def _guarded_arguments(name: str, args: tuple) -> tuple[list, list]:
    """(values for the launcher, [(array, buffer, inner)] to check and copy back): each array
    copied into a buffer with guard zones; the same memory passed twice shares one buffer."""
    guarded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    values: list[Any] = []
    for k, arg in enumerate(args):
        if not isinstance(arg, np.ndarray):
            values.append(np.asarray(arg, dtype=_scalar_dtype(arg)))
            continue
        if not arg.flags.c_contiguous:
            raise EmulationError(f"{name}: argument {k} is not C-contiguous, but a raw kernel gets only its pointer "
                                 f"and reads it as contiguous")
        same = next((g for g in guarded if g[0].ctypes.data == arg.ctypes.data and g[0].nbytes == arg.nbytes
                     and g[0].dtype == arg.dtype), None)
        if same is not None:
            values.append(same[2])
            continue
        if any(np.may_share_memory(arg, g[0]) for g in guarded):
            raise EmulationError(f"{name}: argument {k} overlaps another argument without being the same array "
                                 f"(not emulated)")
        poison = np.nan if arg.dtype.kind == "f" else -1
        buffer = np.full(arg.size + 2 * GUARD_ELEMENTS, poison, dtype=arg.dtype)
        inner = buffer[GUARD_ELEMENTS:GUARD_ELEMENTS + arg.size]
        inner[...] = arg.reshape(-1)
        guarded.append((arg, buffer, inner))
        values.append(inner)
    return values, guarded


class RawKernel:
    """`cupy.RawKernel` on the CPU: ``kernel((grid,), (block,), args)``."""

    def __init__(self, runner: Any, code: str, name: str, options: tuple = (), **kwargs: Any) -> None:
        self.runner, self.code, self.name = runner, code, name
        typedef = re.search(r"typedef\s+([\w ]+?)\s+T\s*;", code)
        self.dtype = _C_TYPE_NAMES.get(typedef.group(1), typedef.group(1)) if typedef else ""
        # Without a barrier the threads of a block cannot exchange anything: one after the other is exact.
        self.cooperative = "__syncthreads" in code

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0, stream: Any = None) -> None:
        grid, block = tuple(grid) + (1, 1), tuple(block) + (1, 1)
        if grid[1:3] != (1, 1) or block[1:3] != (1, 1):
            raise NotImplementedError(f"{self.name}: only 1-D launches are emulated, got grid {grid} block {block}")
        if not 1 <= block[0] <= 1024 or not 1 <= grid[0] <= 2**31 - 1:
            raise EmulationError(f"{self.name}: CUDA refuses a launch of grid {grid[0]} x block {block[0]}")
        if shared_mem:
            raise NotImplementedError(f"{self.name}: dynamic shared memory is not emulated")
        _arrays_on_device(args, self.name)
        host_args = tuple(unwrap(tuple(args)))

        def run() -> None:
            values, guarded = _guarded_arguments(self.name, host_args)
            self.runner.launch(self.name, self.code, self.dtype, values, grid[0], block[0],
                               cooperative=self.cooperative)
            for arg, buffer, inner in guarded:
                outside = np.concatenate([buffer[:GUARD_ELEMENTS], buffer[GUARD_ELEMENTS + arg.size:]])
                untouched = np.isnan(outside) if arg.dtype.kind == "f" else outside == -1
                if not untouched.all():
                    raise EmulationError(f"{self.name}: an argument was written outside its {arg.size} elements")
                arg.reshape(-1)[...] = inner
        device.launch(run)


def _library_call(function: Any, cublas: bool = False) -> Any:
    """A CuPy library function that launches a kernel on a GPU: NumPy's, on device arrays."""
    def call(*args: Any, **kwargs: Any) -> Any:
        if cublas:
            device.cublas(function.__name__)
        return getattr(np, function.__name__)(*args, **kwargs)
    call.__name__ = function.__name__
    return call


def _ascontiguousarray(array: Any, dtype: Any = None) -> Any:
    """The array itself where it is C-contiguous already (and of `dtype`), else a copy (one launch)."""
    host = unwrap(array)
    if host.flags.c_contiguous and (dtype is None or np.dtype(dtype) == host.dtype):
        return array
    return device.produce(lambda: np.ascontiguousarray(host, dtype=dtype), [array])


class _Namespace(types.SimpleNamespace):
    pass


class StandInCupy(types.ModuleType):
    """A module that answers for `cupy` inside fast_cupy.py (and, under `use_emulated_device`,
    for xpcnn's backend): device arrays of the emulated GPU, kernels run by `runner`.

    Only the names xpcnn uses are here; any other raises AttributeError naming it, so a new
    CuPy call shows up as a missing piece of the emulation, not as NumPy silently doing
    something else.
    """

    def __init__(self, runner: Any) -> None:
        super().__init__("cupy", "stand-in for CuPy on the CPU (tests/ops/emulation/emulator.py)")
        self.runner = runner
        self.__version__ = "emulated"
        # Not DeviceArray: array_api_compat takes a subclass of `cupy.ndarray` for CuPy's and
        # imports its CuPy wrapper; the emulated arrays name their namespace themselves.
        self.ndarray = type("ndarray", (), {"__doc__": "CuPy's array type: no emulated array is one"})
        for name in ("float32", "float64", "int32", "int64", "uint64", "bool_"):
            setattr(self, name, getattr(np, name))
        self.empty = lambda shape, dtype=np.float64: device.allocate(shape, dtype)
        self.empty_like = lambda a, dtype=None: device.allocate(a.shape, dtype or a.dtype)
        self.zeros = lambda shape, dtype=np.float64: device.NAMESPACE.zeros(shape, dtype=dtype)
        self.zeros_like = lambda a, dtype=None: device.NAMESPACE.zeros_like(a, dtype=dtype)
        self.asarray = lambda obj, dtype=None: device.asarray(obj, dtype)
        self.maximum = _library_call(np.maximum)
        self.sum = _library_call(np.sum)
        self.matmul = _library_call(np.matmul, cublas=True)
        self.tensordot = _library_call(np.tensordot, cublas=True)
        self.dot = _library_call(np.dot, cublas=True)
        self.ascontiguousarray = _ascontiguousarray
        self.get_default_memory_pool = lambda: device.POOL
        self.cuda = _Namespace(
            Stream=device.Stream, Graph=device.Graph, Device=lambda index=0: device.DEVICE,
            get_current_stream=device.get_current_stream, using_allocator=device.using_allocator,
            MemoryPointer=device.MemoryPointer,
            memory=_Namespace(OutOfMemoryError=device.OutOfMemoryError, MemoryPointer=device.MemoryPointer),
            runtime=_Namespace(CUDARuntimeError=device.CUDARuntimeError))
        self.random = _Namespace(default_rng=device.default_rng)

    def ElementwiseKernel(self, *args: Any, **kwargs: Any) -> ElementwiseKernel:  # noqa: N802 (CuPy's name)
        return ElementwiseKernel(self.runner, *args, **kwargs)

    def RawKernel(self, *args: Any, **kwargs: Any) -> RawKernel:  # noqa: N802 (CuPy's name)
        return RawKernel(self.runner, *args, **kwargs)

    def asnumpy(self, array: Any) -> np.ndarray:
        if isinstance(array, DeviceArray):
            return array.get()
        return np.asarray(array)


_LOADED = {"count": 0}
_MISSING = object()


def load_fast_cupy(standin: StandInCupy, source: str | None = None) -> types.ModuleType:
    """A fresh copy of xpcnn/ops/fast_cupy.py (or of `source`, a mutated copy of its text)
    executed with `standin` as its `cupy`; `sys.modules['cupy']` is restored afterwards."""
    text = FAST_CUPY.read_text() if source is None else source
    cupy_internals.cupy_module()       # the real CuPy, loaded before the stand-in takes its name
    _LOADED["count"] += 1
    module = types.ModuleType(f"xpcnn.ops._fast_cupy_emulated_{_LOADED['count']}")
    module.__package__ = "xpcnn.ops"
    module.__file__ = str(FAST_CUPY)
    saved = sys.modules.get("cupy", _MISSING)
    sys.modules["cupy"] = standin
    try:
        exec(compile(text, str(FAST_CUPY), "exec"), module.__dict__)
    finally:
        if saved is _MISSING:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
    return module


def _on_device(function: Any) -> Any:
    """A function of the emulated module (a fast entry, ``xp`` first) taking and giving NumPy
    arrays: its arguments are seen as device arrays sharing their memory (so that its calls are
    counted), its results as NumPy arrays."""
    def entry(*args: Any) -> Any:
        originals: dict[int, np.ndarray] = {}

        def to_device(value: Any) -> Any:
            if isinstance(value, np.ndarray):
                view = DeviceArray(value)
                originals[id(view)] = value          # given back as the caller's own array
                return view
            if isinstance(value, np.generic):
                return DeviceArray(np.asarray(value))
            if isinstance(value, (list, tuple)):
                return type(value)(to_device(v) for v in value)
            return value

        def to_host(value: Any) -> Any:
            if isinstance(value, DeviceArray):
                return originals.get(id(value), value._data)
            if isinstance(value, (list, tuple)):
                return type(value)(to_host(v) for v in value)
            return value

        return to_host(function(*to_device(args)))
    entry.__name__ = function.__name__
    return entry


class HostEntries:
    """`module`'s functions taking and giving NumPy arrays (each seen as a device array inside,
    sharing its memory): ``HostEntries(fast_cupy).conv2d_forward(xp, x, ...)``."""

    def __init__(self, module: types.ModuleType):
        self.module = module

    def __getattr__(self, name: str) -> Any:
        return _on_device(getattr(self.module, name))


@contextlib.contextmanager
def use_fast_module(module: types.ModuleType) -> Iterator[Any]:
    """NumPy's backend whose fast table is `module`'s entries (e.g. fast_cupy on the
    emulation) inside the block; the table is restored afterwards."""
    original = table._fast_table
    entries = {name: _on_device(function) for name, function in module.fast_ops().items()}

    def fast_table(xp):
        if array_api_compat.is_numpy_namespace(xp):
            return entries
        return original(xp)

    table._fast_table = fast_table
    table.ops_for.cache_clear()
    try:
        yield get_backend("numpy")
    finally:
        table._fast_table = original
        table.ops_for.cache_clear()


@contextlib.contextmanager
def use_emulated_device(module: types.ModuleType) -> Iterator[Backend]:
    """A backend named "cupy" on the emulated GPU inside the block (see the module docstring):
    `sys.modules['cupy']` is `module`'s stand-in (xpcnn's backend code imports it), the fast
    table of the device's namespace is `module`'s entries, and its CUDA graphs `module`'s."""
    from xpcnn.nn import compiled_step

    standin = module.cupy
    original_table, original_graphs = table._fast_table, compiled_step.graph_support
    saved = sys.modules.get("cupy", _MISSING)

    def fast_table(xp):
        return module.fast_ops() if xp is device.NAMESPACE else original_table(xp)

    def graph_support(xp):
        return module.cuda_graphs() if xp is device.NAMESPACE else original_graphs(xp)

    sys.modules["cupy"] = standin
    table._fast_table, compiled_step.graph_support = fast_table, graph_support
    table.ops_for.cache_clear()
    try:
        yield CupyBackend(device.NAMESPACE, device.DEVICE)
    finally:
        table._fast_table, compiled_step.graph_support = original_table, original_graphs
        table.ops_for.cache_clear()
        if saved is _MISSING:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
