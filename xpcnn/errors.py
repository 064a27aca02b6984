"""Exception types. Every error xpcnn raises on purpose derives from `XpcnnError`.

The shape and value errors also derive from `ValueError` (and the backend mix-up
from `TypeError`), so code written against the book's plain exceptions still works.
"""


class XpcnnError(Exception):
    """Base class of every error raised on purpose by xpcnn."""


class BackendUnavailable(XpcnnError, RuntimeError):
    """The requested array backend (e.g. CuPy or a CUDA device) is not usable here."""


class BackendMismatch(XpcnnError, TypeError):
    """Arrays from two different namespaces or devices were mixed in one call."""


class ShapeError(XpcnnError, ValueError):
    """An array has the wrong rank, size or geometry."""


class DTypeError(XpcnnError, ValueError):
    """An array has a dtype other than the one expected (e.g. int or float16 input)."""


class ConfigError(XpcnnError, ValueError):
    """A hyper-parameter, option or input value is invalid (stride 0, lr <= 0, NaN images, ...)."""


class DatasetError(XpcnnError):
    """A dataset is missing, corrupted, or does not match its checksum."""


class CheckpointError(XpcnnError):
    """A checkpoint cannot be written, read, or does not fit the model."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permission, ...); the old file is intact."""


class OutputError(XpcnnError):
    """An output (run folder, history, figure) cannot be written."""


class TrainingError(XpcnnError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


class DeviceMemoryError(XpcnnError, MemoryError):
    """A batch did not fit in the device's (or the host's) memory; lower the batch size."""


class ImageFileError(XpcnnError, ValueError):
    """An input file to classify cannot be used: missing, unreadable, not an image, too large,
    or an array of the wrong shape or dtype (``xpcnn predict`` reports it and goes on)."""


class ServeError(XpcnnError):
    """``xpcnn serve`` cannot start: the optional web server is not installed, or the address is taken."""


class MissingDependency(XpcnnError, ImportError):
    """An optional extra that a command needs is not installed (e.g. Optuna for ``xpcnn tune``)."""


class StorageError(XpcnnError):
    """A study's storage (SQLite file, PostgreSQL server, ...) cannot be reached or used."""


class ExportError(XpcnnError):
    """An exported model failed its checks (``onnx.checker``, shape inference, or agreement with
    the network in ONNX Runtime); nothing was written. A bug in xpcnn, never the user's input."""
