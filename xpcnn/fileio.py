"""Atomic file writes: readers see the old file or the whole new one, never a torn one.

Used for checkpoints, downloaded datasets, history files and figures. The bytes go to a
temporary file in the target's folder, are flushed and fsync'ed, then renamed over the target
with ``os.replace``; the folder is fsync'ed so the rename survives a crash. On any failure the
temporary file is removed and the error propagates (callers turn ``OSError`` into their own
`xpcnn.errors` type). A process killed mid-write leaves at most a ``.<name>.<random>.tmp``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator


def _open_temp(directory: Path, basename: str) -> tuple[Path, int]:
    """Create ``<directory>/.<basename>.<random>.tmp`` exclusively (mode 0o666 minus umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        candidate = directory / f".{basename}.{secrets.token_hex(6)}.tmp"
        try:
            return candidate, os.open(candidate, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary file", str(directory))


def fsync_directory(directory: "str | os.PathLike[str]") -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be fsync'ed)."""
    if os.name == "nt":  # no directory handles on Windows; os.replace is durable enough there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: "str | os.PathLike[str]") -> Iterator[BinaryIO]:
    """``with atomic_write(path) as fh: fh.write(...)`` replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp_path, fd = _open_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: "str | os.PathLike[str]", text: str) -> None:
    """Replace `path` with `text` (UTF-8), atomically (see `atomic_write`)."""
    with atomic_write(path) as fh:
        fh.write(text.encode("utf-8"))
