"""Training checkpoints: one ``.npz`` file, no pickle, written atomically.

A checkpoint holds everything needed to stop and resume training bit for bit:

    param/<name>             the network's parameters (``param/W1`` ...), host arrays
    buffer/<layer>/<name>    state that is not a parameter: BatchNorm running statistics
    optim/<state>/<param>    the optimizer's state arrays (``optim/h/W1`` for AdaGrad)
    extra/<name>             any extra arrays the caller passed in `extra`
    metadata                 UTF-8 JSON as a uint8 array: format version, architecture
                             (class and config), dtype, epoch, step, RNG state, history,
                             optimizer name / hyper-parameters / iteration count, backend,
                             the network's Dropout random-source state (``network_rng``),
                             xpcnn version, the non-array part of `extra`

Nothing in the file is a Python object array, so loading never unpickles anything:
`load_checkpoint` uses ``np.load(..., allow_pickle=False)`` and refuses a file that holds
an object array.

Writing goes to a temporary file in the same directory, which is flushed and fsync'ed,
then renamed over the target with `os.replace` (atomic on POSIX and Windows) and the
directory is fsync'ed. A crash, a full disk or a SIGKILL at any moment leaves either the
previous checkpoint or the new one, never a half-written file under the target name (a
killed writer may leave a ``.<name>.<random>.tmp`` file beside it, which is safe to delete).

    >>> save_checkpoint("run/ckpt.npz", net, optimizer, epoch=3, step=1800, rng_state=rng)
    >>> ckpt = load_checkpoint("run/ckpt.npz")
    >>> restore(ckpt, net, optimizer)           # same architecture and dtype, in place
    >>> net = build_from_checkpoint(ckpt, backend="gpu")   # or a fresh network
    >>> trainer = Trainer(network_like(ckpt), ..., optimizer=make_optimizer_from_checkpoint(ckpt))
    >>> trainer.resume_from(ckpt)               # weights, optimizer state, progress: restored once
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._version import __version__
from ..backend.arrays import dtype_name
from ..backend.devices import Backend
from ..errors import BackendUnavailable, CheckpointError, CheckpointWriteError, XpcnnError
from ..fileio import atomic_write
from ..models.registry import MODELS, model_of_class
from ..nn.optim import OPTIMIZERS, make_optimizer

#: Version of the on-disk layout; bump it when the layout changes incompatibly.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

PARAM_PREFIX = "param/"
BUFFER_PREFIX = "buffer/"
OPTIM_PREFIX = "optim/"
EXTRA_PREFIX = "extra/"
METADATA_KEY = "metadata"

#: Config keys that only affect initialisation, not the shape of the network: a checkpoint
#: may be restored into a network built with a different value.
INIT_ONLY_CONFIG_KEYS = frozenset({"weight_init_std"})

# JSON has no integers beyond 2**53 in most readers (the PCG64 state is 128-bit) and no
# arrays: both are tagged objects in the metadata.
_BIG_INT_TAG = "__int__"
_NDARRAY_TAG = "__ndarray__"
_JSON_SAFE_INT = 2 ** 53

# A zip file starts with a local file header, or is an empty archive (end-of-directory record).
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass
class Checkpoint:
    """A loaded checkpoint; every array is a host NumPy array.

    Attributes:
        params: ``{"W1": (FN, C, FH, FW), "b1": (FN,), ...}`` as saved.
        optimizer_name: e.g. ``"adagrad"``, or None if no optimizer was saved.
        optimizer_hparams: constructor arguments of the optimizer (``{"lr": 0.01}``).
        optimizer_state: ``{"<state>/<param>": array}``, the keys of ``Optimizer.state_dict``
            (``"h/W1"``), plus ``"iterations"`` (an int).
        metadata: the decoded JSON metadata (see the module docstring).
        extra: the caller's `extra`: arrays and JSON values together.
    """

    params: dict[str, np.ndarray]
    optimizer_name: str | None
    optimizer_hparams: dict[str, Any]
    optimizer_state: dict[str, Any]
    metadata: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        return int(self.metadata.get("epoch", 0))

    @property
    def step(self) -> int:
        return int(self.metadata.get("step", 0))

    @property
    def rng_state(self) -> dict[str, Any] | None:
        """A ``numpy.random`` bit-generator state dict, or None; see `generator_from_state`."""
        return self.metadata.get("rng_state")

    @property
    def history(self) -> Any:
        return self.metadata.get("history")

    @property
    def config(self) -> dict[str, Any]:
        return self.metadata["architecture"]["config"]

    @property
    def dtype(self) -> str:
        return self.metadata["dtype"]


# --------------------------------------------------------------------------- JSON helpers

def _to_json_safe(value: Any, where: str) -> Any:
    """`value` with big ints, NumPy scalars and arrays turned into plain JSON values."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int):
        return {_BIG_INT_TAG: str(value)} if abs(value) >= _JSON_SAFE_INT else value
    if isinstance(value, np.generic):
        return _to_json_safe(value.item(), where)
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise CheckpointError(f"save_checkpoint: {where} holds an object array, "
                                  f"which cannot be saved without pickle")
        return {_NDARRAY_TAG: _to_json_safe(value.tolist(), where), "dtype": value.dtype.str}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"save_checkpoint: {where} has a non-string key {key!r}; "
                                      f"JSON keys must be strings")
            out[key] = _to_json_safe(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json_safe(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise CheckpointError(
        f"save_checkpoint: {where} holds a {type(value).__name__} ({value!r:.80}); expected JSON values "
        f"(dict, list, str, int, float, bool, None) or NumPy scalars/arrays"
    )


def _from_json_safe(obj: dict[str, Any]) -> Any:
    if set(obj) == {_BIG_INT_TAG}:
        return int(obj[_BIG_INT_TAG])
    if set(obj) == {_NDARRAY_TAG, "dtype"}:
        return np.asarray(obj[_NDARRAY_TAG], dtype=np.dtype(obj["dtype"]))
    return obj


def _rng_state_of(rng_state: Any) -> dict[str, Any] | None:
    if rng_state is None or isinstance(rng_state, dict):
        return rng_state
    if isinstance(rng_state, np.random.Generator):
        return rng_state.bit_generator.state
    if isinstance(rng_state, np.random.BitGenerator):
        return rng_state.state
    raise CheckpointError(
        f"save_checkpoint: rng_state must be a bit-generator state dict, a numpy.random.Generator "
        f"or None, got {type(rng_state).__name__}"
    )


def generator_from_state(state: dict[str, Any]) -> np.random.Generator:
    """A ``numpy.random.Generator`` that continues exactly from a saved bit-generator state."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    bit_generator_cls = getattr(np.random, str(name), None)
    if not (isinstance(bit_generator_cls, type) and issubclass(bit_generator_cls, np.random.BitGenerator)):
        raise CheckpointError(f"RNG state names bit generator {name!r}, which numpy.random does not have")
    bit_generator = bit_generator_cls()
    try:
        bit_generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"RNG state for {name} is invalid: {exc}") from exc
    return np.random.Generator(bit_generator)


# --------------------------------------------------------------------------- saving

def _optimizer_name(optimizer: Any) -> str:
    for name, cls in OPTIMIZERS.items():
        if type(optimizer) is cls:
            return name
    return type(optimizer).__name__.lower()


def _optimizer_hparams(optimizer: Any) -> dict[str, Any]:
    """The optimizer's constructor arguments, read back from its attributes."""
    hparams = {}
    for name in inspect.signature(type(optimizer).__init__).parameters:
        if name != "self" and hasattr(optimizer, name):
            value = getattr(optimizer, name)
            if isinstance(value, (bool, int, float, str)) or value is None:
                hparams[name] = value
    return hparams


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, np.generic)


def _host(backend: Backend, array: Any, what: str) -> np.ndarray:
    host = np.asarray(backend.to_numpy(array))
    if host.dtype.hasobject:
        raise CheckpointError(f"save_checkpoint: {what} is an object array, which cannot be saved without pickle")
    return host


def _collect(network: Any, optimizer: Any, *, epoch: int, step: int, rng_state: Any,
             history: Any, extra: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Every entry of the ``.npz`` file, as host arrays (metadata encoded last)."""
    backend: Backend = network.backend
    arrays: dict[str, np.ndarray] = {}
    for key, value in network.params.items():
        arrays[PARAM_PREFIX + key] = _host(backend, value, f"parameter {key!r}")
    for key, value in (network.buffers() if hasattr(network, "buffers") else {}).items():
        arrays[BUFFER_PREFIX + key] = _host(backend, value, f"buffer {key!r}")
    network_rng = getattr(network, "rng", None)

    metadata: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "architecture": {"class": type(network).__name__, "config": network.config},
        "dtype": dtype_name(network.dtype),
        "epoch": int(epoch),
        "step": int(step),
        "rng_state": _rng_state_of(rng_state),
        "network_rng": None if network_rng is None else network_rng.state(),
        "history": history,
        "backend": backend.name,
        "xpcnn_version": __version__,
        "optimizer": None,
        "extra": {},
        "extra_arrays": [],
    }
    if optimizer is not None:
        state = optimizer.state_dict()
        iterations = int(state.pop("iterations", 0))
        for flat_key, value in state.items():
            arrays[OPTIM_PREFIX + flat_key] = _host(backend, value, f"optimizer state {flat_key!r}")
        metadata["optimizer"] = {
            "name": _optimizer_name(optimizer),
            "class": type(optimizer).__name__,
            "hparams": _optimizer_hparams(optimizer),
            "iterations": iterations,
        }
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key:
            raise CheckpointError(f"save_checkpoint: extra keys must be non-empty strings, got {key!r}")
        if _is_array(value):
            arrays[EXTRA_PREFIX + key] = _host(backend, value, f"extra[{key!r}]")
            metadata["extra_arrays"].append(key)
        else:
            metadata["extra"][key] = value

    text = json.dumps(_to_json_safe(metadata, "metadata"), sort_keys=True)
    arrays[METADATA_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return arrays


def _write_npz(fh: Any, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as an uncompressed ``.npz`` into the open binary file `fh`."""
    np.savez(fh, **arrays)


def _describe_os_error(exc: OSError) -> str:
    if exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
    return str(exc) or type(exc).__name__


def save_checkpoint(path: "str | os.PathLike[str]", network: Any, optimizer: Any = None, *,
                    epoch: int = 0, step: int = 0, rng_state: Any = None, history: Any = None,
                    extra: dict[str, Any] | None = None) -> str:
    """Write `network` (and `optimizer`) to the ``.npz`` file `path`, atomically.

    Args:
        path: target file; its directory must exist. Written exactly as named (no ``.npz``
            is appended).
        network: a model with ``params``, ``config``, ``dtype`` and ``backend`` (e.g.
            `SimpleConvNet`); arrays are copied to the host with ``network.backend.to_numpy``.
        optimizer: an optimizer from `xpcnn.nn.optim`, or None.
        epoch, step: where training stands.
        rng_state: the training RNG: a ``numpy.random.Generator``, a bit generator, or its
            ``.state`` dict (restore with `generator_from_state`).
        history: JSON-able values (e.g. ``{"train_loss": [...]}``); NumPy scalars are accepted.
        extra: more entries: arrays are stored as ``extra/<key>``, other values in the JSON.

    Returns:
        The path written, as a string.

    Raises:
        CheckpointError: something cannot be stored without pickle, or the file cannot be
            written (naming the path and the OS reason); the previous file at `path`, if
            any, is then left untouched and no temporary file remains.
    """
    path = os.fspath(path)
    arrays = _collect(network, optimizer, epoch=epoch, step=step, rng_state=rng_state,
                      history=history, extra=extra)
    if os.path.isdir(path):
        raise CheckpointWriteError(f"cannot write checkpoint {path!r}: it is a directory")
    try:
        with atomic_write(path) as fh:
            _write_npz(fh, arrays)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write checkpoint {path!r}: {_describe_os_error(exc)}") from exc
    return path


# --------------------------------------------------------------------------- loading

def load_checkpoint(path: "str | os.PathLike[str]") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`, without unpickling anything.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated, not an ``.npz``,
            holds an object (pickled) array, lacks metadata, or has an unknown format version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, expected an .npz file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {_describe_os_error(exc)}") from exc
    if not magic:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes)")
    if magic not in _ZIP_MAGICS:
        raise CheckpointError(
            f"checkpoint {path!r} is not an .npz (zip) file: it starts with {magic!r}, "
            f"expected {_ZIP_MAGICS[0]!r}"
        )
    entries: dict[str, np.ndarray] = {}
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CheckpointError(f"checkpoint {path!r} is a single .npy array, expected an .npz archive")
        with loaded as npz:
            for key in npz.files:
                entries[key] = npz[key]
    except CheckpointError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {path!r} contains pickled data (an object array or a pickle file); "
                f"refusing to load it: checkpoints hold only numeric arrays"
            ) from exc
        raise CheckpointError(f"checkpoint {path!r} is not a valid .npz file: {exc}") from exc
    except (zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path!r} is truncated or not an .npz (zip) file: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {_describe_os_error(exc)}") from exc
    except Exception as exc:  # numpy raises assorted types on corrupted headers
        raise CheckpointError(f"checkpoint {path!r} is corrupted: {type(exc).__name__}: {exc}") from exc

    for key, value in entries.items():
        if value.dtype.hasobject:  # pragma: no cover - np.load already refuses these
            raise CheckpointError(f"checkpoint {path!r}: entry {key!r} is an object array; refusing it")
    metadata = _decode_metadata(path, entries.pop(METADATA_KEY, None))
    return _assemble(path, entries, metadata)


def _decode_metadata(path: str, raw: np.ndarray | None) -> dict[str, Any]:
    if raw is None:
        raise CheckpointError(f"checkpoint {path!r} has no {METADATA_KEY!r} entry: not an xpcnn checkpoint")
    try:
        if raw.dtype == np.uint8:
            text = raw.tobytes().decode("utf-8")
        elif raw.dtype.kind == "U" and raw.ndim == 0:
            text = str(raw[()])
        else:
            raise CheckpointError(
                f"checkpoint {path!r}: metadata must be UTF-8 JSON as uint8 or a 0-d string, "
                f"got dtype {raw.dtype} shape {raw.shape}"
            )
        metadata = json.loads(text, object_hook=_from_json_safe)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: metadata is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint {path!r}: metadata must be a JSON object, got {type(metadata).__name__}")
    version = metadata.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {version!r}; this xpcnn reads "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))} (written by xpcnn "
            f"{metadata.get('xpcnn_version', 'unknown')})"
        )
    for key in ("architecture", "dtype"):
        if key not in metadata:
            raise CheckpointError(f"checkpoint {path!r}: metadata lacks {key!r}")
    architecture = metadata["architecture"]
    if not (isinstance(architecture, dict) and isinstance(architecture.get("config"), dict)):
        raise CheckpointError(f"checkpoint {path!r}: metadata 'architecture' must hold a 'config' object")
    return metadata


def _assemble(path: str, entries: dict[str, np.ndarray], metadata: dict[str, Any]) -> Checkpoint:
    params, optim_state, extra_arrays, buffers = {}, {}, {}, {}
    for key, value in entries.items():
        if key.startswith(PARAM_PREFIX):
            params[key[len(PARAM_PREFIX):]] = value
        elif key.startswith(BUFFER_PREFIX):
            buffers[key[len(BUFFER_PREFIX):]] = value
        elif key.startswith(OPTIM_PREFIX):
            optim_state[key[len(OPTIM_PREFIX):]] = value
        elif key.startswith(EXTRA_PREFIX):
            extra_arrays[key[len(EXTRA_PREFIX):]] = value
        else:
            raise CheckpointError(f"checkpoint {path!r}: unexpected entry {key!r}")
    if not params:
        raise CheckpointError(f"checkpoint {path!r} holds no parameters (no 'param/...' entries)")
    saved_dtype = metadata["dtype"]
    for key, value in params.items():
        if value.dtype.name != saved_dtype:
            raise CheckpointError(f"checkpoint {path!r}: parameter {key!r} is {value.dtype.name}, "
                                  f"metadata says {saved_dtype}")

    optimizer = metadata.get("optimizer")
    name, hparams = None, {}
    if optimizer is not None:
        name, hparams = optimizer.get("name"), dict(optimizer.get("hparams") or {})
        optim_state["iterations"] = int(optimizer.get("iterations", 0))
    elif optim_state:
        raise CheckpointError(f"checkpoint {path!r} has optimizer state but no optimizer metadata")
    extra = dict(metadata.get("extra") or {})
    extra.update(extra_arrays)
    return Checkpoint(params=params, optimizer_name=name, optimizer_hparams=hparams,
                      optimizer_state=optim_state, metadata=metadata, extra=extra, buffers=buffers)


# --------------------------------------------------------------------------- restoring

def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): config}


def _architecture_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    saved_flat = _flatten(json.loads(json.dumps(_to_json_safe(saved, "config"))))
    current_flat = _flatten(json.loads(json.dumps(_to_json_safe(current, "config"))))
    diffs = []
    for key in sorted(set(saved_flat) | set(current_flat)):
        if key.split(".")[0] in INIT_ONLY_CONFIG_KEYS:
            continue
        a, b = saved_flat.get(key, "<absent>"), current_flat.get(key, "<absent>")
        if a != b:
            diffs.append(f"{key}: checkpoint has {a!r}, network has {b!r}")
    return diffs


def check_compatible(checkpoint: Checkpoint, network: Any) -> None:
    """Raise `CheckpointError` unless `checkpoint` has `network`'s class, architecture and dtype."""
    saved_class = checkpoint.metadata["architecture"].get("class")
    if saved_class is not None and saved_class != type(network).__name__:
        raise CheckpointError(f"checkpoint is a {saved_class}, but the network is a {type(network).__name__}")
    diffs = _architecture_differences(checkpoint.config, network.config)
    if diffs:
        raise CheckpointError(
            "checkpoint architecture does not match the network: " + "; ".join(diffs)
            + f" (checkpoint config {checkpoint.config}, network config {network.config})"
        )
    network_dtype = dtype_name(network.dtype)
    if checkpoint.dtype != network_dtype:
        raise CheckpointError(
            f"checkpoint dtype is {checkpoint.dtype}, but the network computes in {network_dtype}; "
            f"build the network with dtype={checkpoint.dtype!r}"
        )
    missing = sorted(set(network.params) - set(checkpoint.params))
    unexpected = sorted(set(checkpoint.params) - set(network.params))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint parameters {sorted(checkpoint.params)} do not match the network's "
            f"{sorted(network.params)} (missing {missing}, unexpected {unexpected})"
        )
    for key, current in network.params.items():
        if tuple(checkpoint.params[key].shape) != tuple(current.shape):
            raise CheckpointError(
                f"checkpoint parameter {key} has shape {tuple(checkpoint.params[key].shape)}, "
                f"the network's has {tuple(current.shape)}"
            )
    buffers = network.buffers() if hasattr(network, "buffers") else {}
    if sorted(buffers) != sorted(checkpoint.buffers):
        raise CheckpointError(f"checkpoint buffers {sorted(checkpoint.buffers)} do not match "
                              f"the network's {sorted(buffers)}")
    for key, current in buffers.items():
        if tuple(checkpoint.buffers[key].shape) != tuple(current.shape):
            raise CheckpointError(f"checkpoint buffer {key} has shape {tuple(checkpoint.buffers[key].shape)}, "
                                  f"the network's has {tuple(current.shape)}")


def _optimizer_state_on(checkpoint: Checkpoint, network: Any, optimizer: Any) -> dict[str, Any]:
    """The checkpoint's optimizer state moved to the network's backend, validated first."""
    saved = checkpoint.optimizer_name
    actual = _optimizer_name(optimizer)
    if saved is None:
        raise CheckpointError(f"checkpoint holds no optimizer state, but an optimizer ({type(optimizer).__name__}) "
                              f"was given to restore")
    if saved != actual:
        raise CheckpointError(f"checkpoint optimizer is {saved!r}, but the optimizer given is {actual!r} "
                              f"({type(optimizer).__name__})")
    backend: Backend = network.backend
    state: dict[str, Any] = {"iterations": int(checkpoint.optimizer_state.get("iterations", 0))}
    for flat_key, host in checkpoint.optimizer_state.items():
        if flat_key == "iterations":
            continue
        name, _, key = flat_key.partition("/")
        if name not in optimizer.state:
            raise CheckpointError(f"checkpoint optimizer state {flat_key!r} is unknown to {type(optimizer).__name__} "
                                  f"(it keeps {list(optimizer.state)})")
        if key not in network.params or tuple(host.shape) != tuple(network.params[key].shape):
            raise CheckpointError(f"checkpoint optimizer state {flat_key!r} with shape {tuple(host.shape)} "
                                  f"matches no network parameter")
        state[flat_key] = backend.asarray(host, dtype=network.dtype)
    return state


def restore(checkpoint: Checkpoint, network: Any, optimizer: Any = None) -> None:
    """Put the checkpoint's weights into `network` (in place) and its state into `optimizer`.

    Everything is checked before anything is changed: class, architecture (config, except
    init-only keys such as ``weight_init_std``), dtype, parameter shapes, optimizer type.

    Raises:
        CheckpointError: a mismatch, naming what the checkpoint has and what the network has.
    """
    check_compatible(checkpoint, network)
    state = _optimizer_state_on(checkpoint, network, optimizer) if optimizer is not None else None
    try:
        # set_params copies into the existing arrays, which the layers share by reference.
        network.set_params(checkpoint.params)
        if checkpoint.buffers:
            network.set_buffers(checkpoint.buffers)
        saved_rng = checkpoint.metadata.get("network_rng")
        if saved_rng is not None and getattr(network, "rng", None) is not None:
            network.rng.set_state(saved_rng)
        if state is not None:
            for slot in optimizer.state.values():
                slot.clear()  # state saved before a parameter was ever updated must not linger
            optimizer.load_state_dict(state)
    except XpcnnError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"cannot restore checkpoint: {exc}") from exc


def network_like(checkpoint: Checkpoint, backend: "str | Backend" = "cpu") -> Any:
    """A new network of the checkpoint's class, config and dtype, on `backend`, with fresh
    weights: for a caller that restores the checkpoint into it anyway (`Trainer.resume_from`).
    `build_from_checkpoint` gives it with the checkpoint's weights."""
    class_name = checkpoint.metadata["architecture"].get("class", "SimpleConvNet")
    model = model_of_class(class_name)
    if model is None:
        raise CheckpointError(f"checkpoint is a {class_name!r}; this xpcnn can build "
                              f"{sorted(entry.cls.__name__ for entry in MODELS.values())}")
    cls = MODELS[model].cls
    try:
        network = cls(**checkpoint.config, backend=backend, dtype=checkpoint.dtype)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint config {checkpoint.config} does not fit {class_name}: {exc}") from exc
    except XpcnnError as exc:
        if isinstance(exc, BackendUnavailable):
            raise
        raise CheckpointError(f"checkpoint config {checkpoint.config} is invalid for {class_name}: {exc}") from exc
    return network


def build_from_checkpoint(checkpoint: Checkpoint, backend: "str | Backend" = "cpu") -> Any:
    """A new network with the checkpoint's class, config, dtype and weights, on `backend`."""
    network = network_like(checkpoint, backend)
    restore(checkpoint, network)
    return network


def make_optimizer_from_checkpoint(checkpoint: Checkpoint, network: Any = None) -> Any:
    """The checkpoint's optimizer with its hyper-parameters; with `network`, its state too.

    The state arrays are placed on ``network``'s backend and dtype, so pass the network the
    optimizer will update (e.g. the one from `build_from_checkpoint`).
    """
    if checkpoint.optimizer_name is None:
        raise CheckpointError("checkpoint holds no optimizer")
    try:
        optimizer = make_optimizer(checkpoint.optimizer_name, **checkpoint.optimizer_hparams)
    except XpcnnError as exc:
        raise CheckpointError(f"cannot rebuild the checkpoint's optimizer {checkpoint.optimizer_name!r}: "
                              f"{exc}") from exc
    if network is not None:
        state = _optimizer_state_on(checkpoint, network, optimizer)
        optimizer.load_state_dict(state)
    return optimizer
