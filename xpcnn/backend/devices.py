"""Devices: the one module that knows NumPy, CuPy, PyTorch, array_api_strict and ndonnx apart.

Everything above the backend package receives an array namespace `xp` (from
`array_api_compat`) and writes standard array-API code against it. This module picks the
namespace and device, moves data between the host and that device, draws random numbers on
it, turns an allocation failure of any library into one `DeviceMemoryError`, and holds the
guarded CuPy and PyTorch imports.

One class per kind of device, as Chainer has (`backends/_cpu.py` CpuDevice, `backends/cuda.py`
GpuDevice): `Backend` is the generic array-API device, and `NumpyBackend`, `CupyBackend`,
`TorchBackend`, `StrictBackend` and `NdonnxBackend` each override only what their library
does differently.
`get_backend` picks the class by name and `backend_of` by namespace, both from
`BACKEND_CLASSES`: adding a backend is adding a class to that tuple.

    >>> be = get_backend("cpu")
    >>> x = be.asarray(numpy_images, dtype="float32")   # host -> backend, once
    >>> be.to_numpy(x)                                   # backend -> host, at the edges
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Callable, ClassVar, Iterator

import array_api_compat
import numpy as np

from ..errors import BackendUnavailable, ConfigError, DeviceMemoryError, DTypeError, XpcnnError
from . import host_memory
from .arrays import FLOAT_DTYPES, dtype_name, namespace_of, resolve_dtype, same_device, values_are_free_to_read
from .counting import unwrap

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
    """An array namespace bound to one device: the generic array-API device, and the base of
    one class per library (subclasses add no fields: `dataclasses.replace` keeps the class).

    Attributes:
        name: canonical name: ``"numpy"``, ``"cupy"``, ``"torch"``, ``"array_api_strict"``
            (a class attribute), or, for a namespace xpcnn has no class for, the namespace's.
        xp: the array-API namespace (``array_api_compat.numpy``, ``array_api_compat.cupy``,
            ``array_api_compat.torch`` or ``array_api_strict``).
        device: the device arrays are created on (``"cpu"``, a ``cupy.cuda.Device``, a
            ``torch.device`` such as ``cuda:0``, or an ``array_api_strict.Device``).
        reference: True forces the array-API reference code for every hot operation (no
            fast paths); used by the tests and the benchmark to check the fast paths.
        float_dtypes: the floating dtypes this device computes in (Apple's MPS has no float64).

    A subclass says how `get_backend` and `backend_of` find it (`aliases`, `create`,
    `is_namespace`, `of_array`) and overrides what its library does differently: copies to
    and from the host (`asarray`, `_to_host`), `synchronize`, and the random generator
    (`new_generator`, `uniform`, `generator_state`, `restore_generator`, used by `RandomSource`).
    """

    xp: ModuleType
    device: Any
    reference: bool = False
    float_dtypes: tuple[str, ...] = FLOAT_DTYPES

    #: The names `get_backend` takes for this class (the first is the short one shown in
    #: messages when it differs from `name`).
    aliases: ClassVar[tuple[str, ...]] = ()
    #: ``NAME:DEVICE`` forms shown in messages (only a class that parses a device suffix).
    device_forms: ClassVar[tuple[str, ...]] = ()

    @property
    def name(self) -> str:
        return getattr(self.xp, "__name__", "unknown")

    # ------------------------------------------------------------- finding the class

    @classmethod
    def create(cls, device_part: str, device: Any, reference: bool) -> "Backend":
        """The backend for ``get_backend(NAME[:device_part], device)``; a subclass sets it up."""
        raise ConfigError(f"{cls.__name__} is not made by name")

    @staticmethod
    def is_namespace(xp: Any) -> bool:
        """Whether `xp` is this class's namespace (for `backend_of`)."""
        return False

    @classmethod
    def of_array(cls, xp: Any, array: Any) -> "Backend":
        """The backend an `array` of namespace `xp` lives on."""
        return cls(xp, array_api_compat.device(array))

    # --------------------------------------------------------------------- dtypes

    def dtype(self, dtype: Any) -> Any:
        """The namespace's dtype object for ``"float32"``/``"float64"`` (or a dtype object)."""
        resolved = resolve_dtype(self.xp, dtype)
        if dtype_name(resolved) not in self.float_dtypes:
            raise DTypeError(
                f"backend {self} has no {dtype_name(resolved)}: it computes in {', '.join(self.float_dtypes)} "
                f"only (Apple's MPS has no float64); use dtype float32 (--dtype float32)"
            )
        return resolved

    # ------------------------------------------------------------ host <-> device

    def asarray(self, host_array: Any, dtype: Any = None) -> Any:
        """Copy a host (NumPy) array, or anything array-like, onto this backend's device."""
        dtype = None if dtype is None else self.dtype(dtype)
        return self.xp.asarray(host_array, dtype=dtype, device=self.device)

    def adopt(self, array: Any) -> Any:
        """A host NumPy array copied onto this backend keeping its float dtype (so a float64
        batch into a float32 network is the layers' `DTypeError` on every backend, never a
        silent cast); any other array as given."""
        if values_are_free_to_read(array):
            return self.asarray(array, dtype=array.dtype.name if array.dtype.name in FLOAT_DTYPES else None)
        return array

    def to_numpy(self, array: Any) -> np.ndarray:
        """Copy a backend array (or a Python scalar) back to a host NumPy array."""
        array = unwrap(array)                       # a counting.CountedArray: the array inside
        if values_are_free_to_read(array):
            return array
        return self._to_host(array)

    def _to_host(self, array: Any) -> np.ndarray:
        """`to_numpy` of an array that is not already a host NumPy array."""
        return np.asarray(array)

    def to_float(self, scalar_array: Any) -> float:
        """A 0-d backend array as a Python float (the only per-log host sync)."""
        return float(self.to_numpy(scalar_array))

    def synchronize(self) -> None:
        """Wait until queued device work has finished (a no-op on the CPU)."""

    def owns(self, array: Any) -> bool:
        """Whether `array` lives in this backend's namespace and on its device."""
        try:
            xp = array_api_compat.array_namespace(array)
        except TypeError:
            return False
        return xp is self.xp and same_device(array_api_compat.device(array), self.device)

    # ------------------------------------------------------------- random numbers

    def new_generator(self, seed: Any) -> Any:
        """A generator of uniform numbers for `RandomSource`: here NumPy's PCG64 on the host."""
        return np.random.default_rng(seed)

    def uniform(self, generator: Any, shape: tuple, dtype: str) -> Any:
        """Uniform numbers in [0, 1) of `shape` and float `dtype` (a name), on this device."""
        return self.adopt(generator.random(shape, dtype=dtype))

    def generator_state(self, generator: Any) -> dict[str, Any]:
        """The generator's state as JSON-able entries of a `RandomSource` snapshot."""
        return {"bit_generator": generator.bit_generator.state}

    def restore_generator(self, snapshot: dict[str, Any]) -> Any:
        """A generator continuing from a snapshot's state, or None if it holds none of this kind."""
        if snapshot.get("bit_generator") is None:
            return None
        bit_generator = np.random.PCG64()
        try:
            bit_generator.state = snapshot["bit_generator"]
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"RandomSource.set_state: invalid generator state: {exc}") from exc
        return np.random.Generator(bit_generator)

    def __str__(self) -> str:
        return f"{self.name} ({self.device})"


class NumpyBackend(Backend):
    """NumPy on the CPU (``cpu``, ``numpy``): host arrays are already its arrays."""

    name: ClassVar[str] = "numpy"
    aliases = ("cpu", "numpy")

    @classmethod
    def create(cls, device_part: str, device: Any, reference: bool) -> "NumpyBackend":
        import array_api_compat.numpy as xp_numpy

        host_memory.keep_freed_memory()          # large freed arrays reused, not faulted in again each step
        return cls(xp_numpy, "cpu", reference)

    @staticmethod
    def is_namespace(xp: Any) -> bool:
        return array_api_compat.is_numpy_namespace(xp)

    @classmethod
    def of_array(cls, xp: Any, array: Any) -> "NumpyBackend":
        return cls.create("", None, False)

    def adopt(self, array: Any) -> Any:
        return array


class CupyBackend(Backend):
    """CuPy on one CUDA device (``gpu``, ``cupy``, ``cuda``), made the current device."""

    name: ClassVar[str] = "cupy"
    aliases = ("gpu", "cupy", "cuda")

    @classmethod
    def create(cls, device_part: str, device: Any, reference: bool) -> "CupyBackend":
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
            raise BackendUnavailable(f"backend 'gpu': device {index} requested, but only {count} CUDA device(s) "
                                     f"found (0..{count - 1})")
        import array_api_compat.cupy as xp_cupy

        # array_api_compat honours device= only in asarray; zeros/full/arange use the current
        # device. Making the chosen device current keeps every array of a run on it.
        cuda_device = cupy.cuda.Device(index)
        cuda_device.use()
        return cls(xp_cupy, cuda_device, reference)

    @staticmethod
    def is_namespace(xp: Any) -> bool:
        return array_api_compat.is_cupy_namespace(xp)

    def _to_host(self, array: Any) -> np.ndarray:
        import cupy

        return cupy.asnumpy(array)

    def synchronize(self) -> None:
        import cupy

        with self.device:
            cupy.cuda.get_current_stream().synchronize()

    def new_generator(self, seed: Any) -> Any:
        import cupy

        with self.device:
            return cupy.random.default_rng(seed)

    def uniform(self, generator: Any, shape: tuple, dtype: str) -> Any:
        with self.device:
            return generator.random(shape, dtype=dtype)

    def generator_state(self, generator: Any) -> dict[str, Any]:
        return {}               # CuPy's generator state cannot be read back (see RandomSource)

    def restore_generator(self, snapshot: dict[str, Any]) -> Any:
        return None


class TorchBackend(Backend):
    """PyTorch tensors (``torch``, ``torch:cpu``, ``torch:cuda[:N]``, ``torch:mps``).

    Tensors are made without ``requires_grad``, so autograd records nothing, and the global
    grad mode is left alone.
    """

    name: ClassVar[str] = "torch"
    aliases = ("torch", "pytorch")
    device_forms = ("torch:cuda", "torch:mps")

    @classmethod
    def create(cls, device_part: str, device: Any, reference: bool) -> "TorchBackend":
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
                raise BackendUnavailable(f"{what}: device {index} requested, but only {count} CUDA device(s) "
                                         f"found (0..{count - 1})")
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
        return cls(xp_torch, torch_device, reference, float_dtypes)

    @staticmethod
    def is_namespace(xp: Any) -> bool:
        return array_api_compat.is_torch_namespace(xp)

    @classmethod
    def of_array(cls, xp: Any, array: Any) -> "TorchBackend":
        return cls.create("", array_api_compat.device(array), False)

    def asarray(self, host_array: Any, dtype: Any = None) -> Any:
        if not values_are_free_to_read(host_array):
            return super().asarray(host_array, dtype)
        # Cast on the host (MPS cannot even hold the float64 source of a float32 copy), and
        # copy a read-only array (e.g. read from a file) rather than share memory that torch
        # would treat as writable.
        if dtype is not None:
            host_array = host_array.astype(dtype_name(self.dtype(dtype)), copy=False)
        return self.xp.asarray(host_array, device=self.device, copy=None if host_array.flags.writeable else True)

    def _to_host(self, array: Any) -> np.ndarray:
        if not array_api_compat.is_torch_array(array):
            return np.asarray(array)
        if array.device.type == "cpu":
            # .numpy() of a CPU tensor shares its memory: copy, so that a later in-place
            # update (an optimizer step) cannot change what was returned.
            return array.detach().numpy().copy()
        return array.detach().cpu().numpy()       # .cpu() copies off the device

    def synchronize(self) -> None:
        if self.device.type == "cpu":
            return
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            torch.mps.synchronize()

    def new_generator(self, seed: Any) -> Any:
        import torch

        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        return generator

    def uniform(self, generator: Any, shape: tuple, dtype: str) -> Any:
        import torch

        return torch.rand(shape, generator=generator, dtype=getattr(torch, dtype), device=self.device)

    def generator_state(self, generator: Any) -> dict[str, Any]:
        return {"torch_state": generator.get_state().tolist()}

    def restore_generator(self, snapshot: dict[str, Any]) -> Any:
        if snapshot.get("torch_state") is None:
            return None
        import torch

        generator = self.new_generator(None)
        try:
            generator.set_state(torch.tensor(snapshot["torch_state"], dtype=torch.uint8))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(f"RandomSource.set_state: invalid generator state: {exc}") from exc
        return generator


class StrictBackend(Backend):
    """``array_api_strict`` (``array_api_strict``, ``strict``): the standard and nothing else, on
    a non-default device by default, so that a NumPy-only call on its arrays fails loudly."""

    name: ClassVar[str] = "array_api_strict"
    aliases = ("array_api_strict", "strict")

    @classmethod
    def create(cls, device_part: str, device: Any, reference: bool) -> "StrictBackend":
        try:
            import array_api_strict
        except ImportError as exc:  # pragma: no cover - dev extra
            raise BackendUnavailable(
                "backend 'array_api_strict' needs the package array-api-strict: "
                "pip install 'xpcnn[dev]'"
            ) from exc
        return cls(array_api_strict, array_api_strict.Device("device1") if device is None else device, reference)

    @staticmethod
    def is_namespace(xp: Any) -> bool:
        return array_api_compat.is_array_api_strict_namespace(xp)

    def _to_host(self, array: Any) -> np.ndarray:
        if hasattr(array, "to_device"):
            array = array.to_device(self.xp.Device("CPU_DEVICE"))
        return np.asarray(array)


class NdonnxBackend(Backend):
    """ndonnx (``ndonnx``): arrays that are ONNX graphs. On constant arrays its operations are
    computed at once (slowly: an inference check); a network's forward pass on an
    ``ndonnx.argument`` writes the ONNX graph of that pass (`xpcnn.app.export`,
    ``via="ndonnx"``). No fast table: every operation is the array-API reference."""

    name: ClassVar[str] = "ndonnx"
    aliases = ("ndonnx",)

    @classmethod
    def create(cls, device_part: str, device: Any, reference: bool) -> "NdonnxBackend":
        try:
            import ndonnx
        except ImportError as exc:
            raise BackendUnavailable(f"backend 'ndonnx' needs ndonnx, which is not installed: {NDONNX_INSTALL_HINT}") \
                from exc
        return cls(ndonnx, ndonnx.__array_namespace_info__().default_device(), reference)

    @staticmethod
    def is_namespace(xp: Any) -> bool:
        return getattr(xp, "__name__", "") == "ndonnx"

    def _to_host(self, array: Any) -> np.ndarray:
        if hasattr(array, "unwrap_numpy"):
            try:
                return array.unwrap_numpy()
            except ValueError as exc:
                raise ConfigError("this ndonnx array is part of a graph (it depends on an ndonnx.argument) and "
                                  "has no values: build the graph with ndonnx.build and run it") from exc
        return np.asarray(array)


#: The backends `get_backend` and `backend_of` know, one class each.
BACKEND_CLASSES: tuple[type[Backend], ...] = (NumpyBackend, CupyBackend, TorchBackend, StrictBackend, NdonnxBackend)

#: Names accepted by `get_backend`, mapped to the canonical backend name.
BACKEND_ALIASES = {alias: cls.name for cls in BACKEND_CLASSES for alias in cls.aliases}

_CLASS_OF_ALIAS = {alias: cls for cls in BACKEND_CLASSES for alias in cls.aliases}

#: The names an unknown backend's message offers: the short ones, then each canonical name and its device forms.
_SHOWN_NAMES = ([cls.aliases[0] for cls in BACKEND_CLASSES if cls.aliases[0] != cls.name]
                + [shown for cls in BACKEND_CLASSES for shown in (cls.name, *cls.device_forms)])


def get_backend(name: "str | Backend" = "cpu", device: Any = None, *, reference: bool = False) -> Backend:
    """Return the backend called `name`: ``cpu``/``numpy``, ``gpu``/``cupy``,
    ``torch[:DEVICE]`` (``torch``, ``torch:cuda``, ``torch:cuda:1``, ``torch:mps``) or
    ``array_api_strict``.

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
        BackendUnavailable: CuPy or PyTorch is not installed, or the device cannot be used.
    """
    if isinstance(name, Backend):
        return replace(name, reference=True) if reference and not name.reference else name
    base, _, device_part = str(name).lower().partition(":")
    cls = _CLASS_OF_ALIAS.get(base)
    if cls is None or (device_part and not cls.device_forms):
        raise ConfigError(f"unknown backend {name!r}: expected one of {', '.join(map(repr, _SHOWN_NAMES))}")
    return cls.create(device_part, device, reference)


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


def backend_of(array: Any) -> Backend:
    """The `Backend` an array lives on (namespace and device): the class whose namespace it
    is, else the generic `Backend`."""
    xp = namespace_of(array)
    for cls in BACKEND_CLASSES:
        if cls.is_namespace(xp):
            return cls.of_array(xp, array)
    return Backend(xp, array_api_compat.device(array))

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
