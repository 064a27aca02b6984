"""Devices: the one module that knows NumPy, CuPy, PyTorch, array_api_strict and ndonnx apart.

Everything above the backend package receives an array namespace `xp` (from
`array_api_compat`) and writes standard array-API code against it. This module picks the
namespace and device, moves data between the host and that device, turns an allocation
failure of any library into one `DeviceMemoryError`, and holds the guarded CuPy and PyTorch
imports (`random.py` beside it draws on their generators).

    >>> be = get_backend("cpu")
    >>> x = be.asarray(numpy_images, dtype="float32")   # host -> backend, once
    >>> be.to_numpy(x)                                   # backend -> host, at the edges
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Callable, Iterator

import array_api_compat
import numpy as np

from ..errors import BackendUnavailable, ConfigError, DeviceMemoryError, DTypeError, XpcnnError
from .arrays import FLOAT_DTYPES, _same_device, dtype_name, namespace_of, resolve_dtype, values_are_free_to_read

#: Names accepted by `get_backend`, mapped to the canonical backend name.
BACKEND_ALIASES = {
    "cpu": "numpy",
    "numpy": "numpy",
    "gpu": "cupy",
    "cupy": "cupy",
    "cuda": "cupy",
    "array_api_strict": "array_api_strict",
    "strict": "array_api_strict",
    "torch": "torch",
    "pytorch": "torch",
    "ndonnx": "ndonnx",
}

#: Devices a ``torch:DEVICE`` backend may name (``cuda`` may carry an index: ``cuda:1``).
TORCH_DEVICE_TYPES = ("cpu", "cuda", "mps")

GPU_INSTALL_HINT = (
    "install the GPU extra with `pip install 'xpcnn[gpu]'` (CUDA 12) or "
    "`pip install xpcnn cupy-cuda13x` (CUDA 13), on a machine with an NVIDIA GPU and driver"
)

NDONNX_INSTALL_HINT = "install it with `pip install 'xpcnn[export]'`"

TORCH_INSTALL_HINT = (
    "install it with `pip install 'xpcnn[torch]'` (for the small CPU-only build: "
    "`pip install torch --index-url https://download.pytorch.org/whl/cpu`; for CUDA or Apple "
    "MPS builds see https://pytorch.org/get-started/locally/)"
)


@dataclass(frozen=True)
class Backend:
    """An array namespace bound to one device.

    Attributes:
        name: canonical name: ``"numpy"``, ``"cupy"``, ``"torch"``, ``"array_api_strict"`` or
            ``"ndonnx"``.
        xp: the array-API namespace (``array_api_compat.numpy``, ``array_api_compat.cupy``,
            ``array_api_compat.torch``, ``array_api_strict`` or ``ndonnx``).
        device: the device arrays are created on (``"cpu"``, a ``cupy.cuda.Device``, a
            ``torch.device`` such as ``cuda:0``, or an ``array_api_strict.Device``).
        reference: True forces the array-API reference code for every hot operation (no
            fast paths); used by the tests and the benchmark to check the fast paths.
        float_dtypes: the floating dtypes this device computes in (Apple's MPS has no float64).
    """

    name: str
    xp: ModuleType
    device: Any
    reference: bool = False
    float_dtypes: tuple[str, ...] = FLOAT_DTYPES

    def dtype(self, dtype: Any) -> Any:
        """The namespace's dtype object for ``"float32"``/``"float64"`` (or a dtype object)."""
        resolved = resolve_dtype(self.xp, dtype)
        if dtype_name(resolved) not in self.float_dtypes:
            raise DTypeError(
                f"backend {self} has no {dtype_name(resolved)}: it computes in {', '.join(self.float_dtypes)} "
                f"only (Apple's MPS has no float64); use dtype float32 (--dtype float32)"
            )
        return resolved

    def asarray(self, host_array: Any, dtype: Any = None) -> Any:
        """Copy a host (NumPy) array, or anything array-like, onto this backend's device."""
        dtype = None if dtype is None else self.dtype(dtype)
        if self.name == "torch" and values_are_free_to_read(host_array):
            # Cast on the host (MPS cannot even hold the float64 source of a float32 copy),
            # and copy a read-only array (e.g. read from a file) rather than share memory
            # that torch would treat as writable.
            if dtype is not None:
                host_array = host_array.astype(dtype_name(dtype), copy=False)
            return self.xp.asarray(host_array, device=self.device,
                                   copy=None if host_array.flags.writeable else True)
        return self.xp.asarray(host_array, dtype=dtype, device=self.device)

    def adopt(self, array: Any) -> Any:
        """A host NumPy array copied onto this backend keeping its float dtype (so a float64
        batch into a float32 network is the layers' `DTypeError` on every backend, never a
        silent cast); any other array as given."""
        if values_are_free_to_read(array) and self.name != "numpy":
            return self.asarray(array, dtype=array.dtype.name if array.dtype.name in FLOAT_DTYPES else None)
        return array

    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy a backend array (or a Python scalar) back to a host NumPy array."""
        array = getattr(array, "_array", array)     # a counting.CountedArray: the array inside
        if values_are_free_to_read(array):
            return array
        if self.name == "cupy":
            import cupy

            return cupy.asnumpy(array)
        if self.name == "torch" and array_api_compat.is_torch_array(array):
            if array.device.type == "cpu":
                # .numpy() of a CPU tensor shares its memory: copy, so that a later in-place
                # update (an optimizer step) cannot change what was returned.
                return array.detach().numpy().copy()
            return array.detach().cpu().numpy()       # .cpu() copies off the device
        if self.name == "array_api_strict" and hasattr(array, "to_device"):
            array = array.to_device(self.xp.Device("CPU_DEVICE"))
        if self.name == "ndonnx" and hasattr(array, "unwrap_numpy"):
            try:
                return array.unwrap_numpy()
            except ValueError as exc:
                raise ConfigError("this ndonnx array is part of a graph (it depends on an ndonnx.argument) and "
                                  "has no values: build the graph with ndonnx.build and run it") from exc
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
        elif self.name == "torch" and self.device.type != "cpu":
            import torch

            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            else:
                torch.mps.synchronize()

    def owns(self, array: Any) -> bool:
        """Whether `array` lives in this backend's namespace and on its device."""
        try:
            xp = array_api_compat.array_namespace(array)
        except TypeError:
            return False
        return xp is self.xp and _same_device(array_api_compat.device(array), self.device)

    def __str__(self) -> str:
        return f"{self.name} ({self.device})"



def get_backend(name: "str | Backend" = "cpu", device: Any = None, *, reference: bool = False) -> Backend:
    """Return the backend called `name`: ``cpu``/``numpy``, ``gpu``/``cupy``,
    ``torch[:DEVICE]`` (``torch``, ``torch:cuda``, ``torch:cuda:1``, ``torch:mps``),
    ``array_api_strict`` or ``ndonnx``.

    ``ndonnx`` arrays are ONNX graphs: on constant arrays its operations are computed at once
    (slowly: an inference check), and a network's forward pass on an ``ndonnx.argument``
    writes the ONNX graph of that pass (`xpcnn.app.export`, ``via="ndonnx"``).

    Args:
        name: a backend name, or an existing `Backend` (returned unchanged).
        device: for ``gpu``, the CUDA device number (default: the current device), which
            also becomes the current CUDA device;
            for ``torch``, a device (``"cuda:1"``, a ``torch.device``), or, with
            ``torch:cuda``, the CUDA device number;
            for ``array_api_strict``, an ``array_api_strict.Device`` (default ``"device1"``,
            a non-default device, so that a NumPy-only call on its arrays fails loudly).
        reference: use the array-API reference code for every hot operation (no fast paths).

    Raises:
        ConfigError: unknown backend or device name.
        BackendUnavailable: CuPy, PyTorch or ndonnx is not installed, or the device cannot be used.
    """
    if isinstance(name, Backend):
        return replace(name, reference=True) if reference and not name.reference else name
    base, _, device_part = str(name).lower().partition(":")
    key = BACKEND_ALIASES.get(base)
    if key is None or (device_part and key != "torch"):
        raise ConfigError(
            f"unknown backend {name!r}: expected one of 'cpu', 'gpu', 'numpy', 'cupy', "
            f"'torch', 'torch:cuda', 'torch:mps', 'array_api_strict', 'ndonnx'"
        )
    if key == "torch":
        return _torch_backend(device_part, device, reference)
    if key == "ndonnx":
        return _ndonnx_backend(reference)
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


def _ndonnx_backend(reference: bool) -> Backend:
    try:
        import ndonnx
    except ImportError as exc:
        raise BackendUnavailable(f"backend 'ndonnx' needs ndonnx, which is not installed: {NDONNX_INSTALL_HINT}") \
            from exc
    # No fast table exists for ndonnx: every operation is the array-API reference.
    return Backend("ndonnx", ndonnx, ndonnx.__array_namespace_info__().default_device(), reference)


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
        raise BackendUnavailable(f"backend 'gpu': device {index} requested, but only {count} CUDA device(s) found "
                                 f"(0..{count - 1})")
    import array_api_compat.cupy as xp_cupy

    # array_api_compat honours device= only in asarray; zeros/full/arange use the current
    # device. Making the chosen device current keeps every array of a run on it.
    cuda_device = cupy.cuda.Device(index)
    cuda_device.use()
    return Backend("cupy", xp_cupy, cuda_device)


def _torch_device_name(device_part: str, device: Any) -> str:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"`` from ``torch:DEVICE`` and `device`."""
    if isinstance(device, int) and not isinstance(device, bool):
        # A device number (the CLI's --device) names a CUDA device, as for --backend gpu.
        if device_part != "cuda" or device < 0:
            raise ConfigError(f"backend 'torch:{device_part or 'cpu'}': a device number applies to CUDA "
                              f"devices only (e.g. --backend torch:cuda --device 1), got {device}")
        return f"cuda:{device}"
    if device is not None:
        given = str(device).lower()                   # a string or a torch.device
        if device_part and given.partition(":")[0] != device_part.partition(":")[0]:
            raise ConfigError(f"backend 'torch:{device_part}' but device {given!r}: give the device once")
        device_part = given
    text = device_part or "cpu"
    kind, _, index = text.partition(":")
    if kind not in TORCH_DEVICE_TYPES or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"unknown torch device {text!r}: expected 'cpu', 'cuda', 'cuda:N' or 'mps' "
                          f"(as in --backend torch:cuda)")
    return text


def _torch_backend(device_part: str, device: Any, reference: bool = False) -> Backend:
    text = _torch_device_name(device_part, device)
    what = f"backend 'torch:{text}'" if text != "cpu" else "backend 'torch'"
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(f"{what} needs PyTorch, which is not installed: {TORCH_INSTALL_HINT}") from exc
    except Exception as exc:  # a broken install (e.g. missing CUDA libraries) fails at import
        raise BackendUnavailable(f"{what}: PyTorch failed to import ({exc}); {TORCH_INSTALL_HINT}") from exc
    kind = text.partition(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"{what}: this PyTorch ({torch.__version__}) sees no CUDA device (a CPU-only build, or "
                f"no NVIDIA GPU and driver); install a CUDA build (https://pytorch.org/get-started/locally/) "
                f"or use --backend torch"
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if text == "cuda" else int(text.partition(":")[2])
        if not 0 <= index < count:
            raise BackendUnavailable(f"{what}: device {index} requested, but only {count} CUDA device(s) found "
                                     f"(0..{count - 1})")
        text = f"cuda:{index}"
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise BackendUnavailable(
                f"{what}: this PyTorch ({torch.__version__}) cannot use Apple's MPS here (it needs Apple "
                f"silicon, macOS 12.3 or later and a PyTorch built with MPS); use --backend torch"
            )
    import array_api_compat.torch as xp_torch

    # The device as tensors report it (mps -> mps:0), so that `owns` compares equal.
    torch_device = torch.empty(0, device=text).device
    float_dtypes = ("float32",) if kind == "mps" else FLOAT_DTYPES
    # Tensors made here never have requires_grad, so autograd records nothing: no global
    # torch.set_grad_enabled(False), which would change the caller's own torch code.
    return Backend("torch", xp_torch, torch_device, reference, float_dtypes)


def backend_of(array: Any) -> Backend:
    """The `Backend` an array lives on (namespace and device)."""
    xp = namespace_of(array)
    if array_api_compat.is_numpy_namespace(xp):
        return get_backend("numpy")
    if array_api_compat.is_cupy_namespace(xp):
        return Backend("cupy", xp, array_api_compat.device(array))
    if array_api_compat.is_array_api_strict_namespace(xp):
        return Backend("array_api_strict", xp, array_api_compat.device(array))
    if array_api_compat.is_torch_namespace(xp):
        return get_backend("torch", device=array_api_compat.device(array))
    return Backend(getattr(xp, "__name__", "unknown"), xp, array_api_compat.device(array))


#: How PyTorch's Apple-GPU (MPS) allocator words its failure; it raises a plain RuntimeError.
_MPS_OUT_OF_MEMORY = "MPS backend out of memory"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: NumPy's MemoryError, CuPy's OutOfMemoryError
    (a MemoryError), an accelerator library's ``OutOfMemoryError`` of another base (PyTorch's
    CUDA), or the RuntimeError of PyTorch's MPS allocator."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or (type(exc) is RuntimeError and str(exc).startswith(_MPS_OUT_OF_MEMORY)))


def out_of_memory_message(exc: BaseException) -> str:
    """The library's own one-line account of an allocation failure (without its traceback)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__module__.split('.')[0]}: {text[0] if text else type(exc).__name__}"


@contextlib.contextmanager
def out_of_memory_as_error(backend: Any, describe: Callable[[], tuple[str, str]]) -> Iterator[None]:
    """Inside the block, an allocation failure of any library becomes one `DeviceMemoryError`:
    ``out of memory on BACKEND while DOING (the library's words); ADVICE``, where
    ``describe()`` gives ``(DOING, ADVICE)`` at the moment of the failure. Errors of xpcnn's
    own pass unchanged."""
    try:
        yield
    except XpcnnError:
        raise
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        doing, advice = describe()
        raise DeviceMemoryError(f"out of memory on {backend} while {doing} ({out_of_memory_message(exc)}); "
                                f"{advice}") from exc
