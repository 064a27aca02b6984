"""The exit codes of the ``xpcnn`` command: one table, `ExitCode`, each code with its meaning
and the error types that end in it.

docs/cli.md shows the same table; ``tests/app/test_exit_codes.py`` checks that the two agree
row for row.
"""

from __future__ import annotations

import enum

from ..errors import (
    BackendUnavailable,
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    DatasetError,
    DeviceMemoryError,
    DTypeError,
    ImageFileError,
    MissingDependency,
    OutputError,
    ServeError,
    ShapeError,
    StorageError,
    TrainingError,
)


class ExitCode(enum.IntEnum):
    """An exit code of ``xpcnn``, with its `meaning` (as docs/cli.md shows it) and the `errors`
    (`xpcnn.errors` types) that end in it."""

    meaning: str
    errors: tuple[type[BaseException], ...]

    def __new__(cls, code: int, meaning: str, errors: tuple[type[BaseException], ...] = ()) -> "ExitCode":
        member = int.__new__(cls, code)
        member._value_ = code
        member.meaning, member.errors = meaning, errors
        return member

    OK = 0, "success"
    ERROR = 1, "any other xpcnn error"
    USAGE = 2, "bad arguments or options (also argparse's own usage errors)", (ConfigError, ShapeError, DTypeError)
    BACKEND = (3, "backend unavailable (e.g. `--backend gpu` without CuPy or a GPU, `torch` without PyTorch)",
               (BackendUnavailable,))
    DATASET = 4, "dataset unknown, missing, corrupted or failing its checksum", (DatasetError,)
    CHECKPOINT = 5, "checkpoint missing, corrupted or not matching the model", (CheckpointError,)
    TRAINING = 6, "training stopped: the loss became NaN or infinite", (TrainingError,)
    IO = (7, "output directory not writable, or an I/O error while saving (e.g. disk full)",
          (OutputError, CheckpointWriteError))
    MEMORY = (8, "out of (GPU) memory: a batch did not fit; the message names the option to lower",
              (DeviceMemoryError,))
    INPUT_FILE = (9, "predict: a file could not be read or used (the other files were still classified)",
                  (ImageFileError,))
    MISSING_EXTRA = (10, "an optional extra is missing (`xpcnn tune` without Optuna: `pip install 'xpcnn[tune]'`; "
                         "`xpcnn serve` without the web server: `pip install 'xpcnn[serve]'`; `xpcnn export`, or "
                         "an `.onnx` file to `xpcnn predict`, without ONNX or ONNX Runtime: "
                         "`pip install 'xpcnn[export]'`), or serve's address is taken", (MissingDependency, ServeError))
    STORAGE = (11, "tune: the study's storage cannot be reached or used (a server down, a bad URL, a driver "
                   "missing)", (StorageError,))
    INTERRUPTED = (130, "interrupted by Ctrl-C (SIGINT; a checkpoint of the last finished step is saved; tune: "
                        "rerun to resume)")
    TERMINATED = 143, "stopped by SIGTERM (the checkpoint is saved the same way)"


#: Error type -> exit code, read from `ExitCode`.
_CODE_OF_ERROR = {error: code for code in ExitCode for error in code.errors}


def exit_code_for(exc: BaseException) -> ExitCode:
    """The code an error ends ``xpcnn`` with: that of the most specific of its types in the
    table (a `CheckpointWriteError` is an I/O failure before it is a `CheckpointError`), else
    `ExitCode.ERROR`."""
    return next((_CODE_OF_ERROR[kind] for kind in type(exc).__mro__ if kind in _CODE_OF_ERROR), ExitCode.ERROR)
