"""Numba's compiler for xpcnn's CPU kernels (`fast_numba`): where the compiled kernels are
kept, and a kept kernel that cannot be read is compiled again, never an error.

Kernels compile on their first call for each dtype and are kept on disk, so that later
processes load them in a fraction of a second. They are kept in a folder of the user's
(``$XDG_CACHE_HOME/xpcnn/numba``, by default ``~/.cache/xpcnn/numba``; ``XPCNN_KERNEL_CACHE``
names another), never inside the installed package, which may be read-only. A user who set
``NUMBA_CACHE_DIR`` keeps it. Numba recompiles by itself when the source changed (it stamps
each entry with the source file's time and size); a file it cannot read (a disk that filled
up, a copy cut short) makes the first call fail: that call then discards the kernel's index
and runs again, which compiles it afresh and writes a new entry.

    @kernel_cache.kernel(nogil=True)          # a kernel called from Python
    def _scale(x, factor): ...
    @kernel_cache.njit(nogil=True)            # a helper called only from other kernels
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numba
from numba.core import config as numba_config

from .cpu_kernels import cache_dir


@contextlib.contextmanager
def _caching_into(folder: Path) -> Iterator[None]:
    """Numba's cache folder is `folder` for the kernels made inside the block (its setting is
    read when a kernel is made); a folder the user gave Numba is left as it is."""
    if numba_config.CACHE_DIR:
        yield
        return
    numba_config.CACHE_DIR = str(folder)
    try:
        yield
    finally:
        numba_config.CACHE_DIR = ""


def njit(**options: Any) -> Callable[[Callable], Any]:
    """``numba.njit(cache=True, **options)``, kept in `cache_dir()`: for helpers that other
    kernels call."""
    def decorate(function: Callable) -> Any:
        with _caching_into(cache_dir()):
            return numba.njit(cache=True, **options)(function)
    return decorate


def kernel(**options: Any) -> Callable[[Callable], "Kernel"]:
    """`njit` for a kernel called from Python: a `Kernel`, whose first call survives a
    kept entry that cannot be read."""
    def decorate(function: Callable) -> Kernel:
        return Kernel(njit(**options)(function))
    return decorate


class Kernel:
    """A compiled kernel called from Python. Its first call with each argument types either
    loads the kept entry or compiles; if that call fails, the kernel's index of kept entries
    is discarded and the call made once more (then compiling afresh)."""

    def __init__(self, dispatcher: Any):
        self.dispatcher = dispatcher
        self.__name__ = dispatcher.py_func.__name__
        self.__doc__ = dispatcher.py_func.__doc__
        self._ready: set = set()
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        key = tuple(_type_key(a) for a in args)
        if key in self._ready:
            return self.dispatcher(*args)
        with self._lock:                      # one compile at a time (slices of a batch call at once)
            try:
                result = self.dispatcher(*args)
            except Exception:
                cache = getattr(self.dispatcher, "_cache", None)
                if cache is None or not hasattr(cache, "flush"):
                    raise
                cache.flush()                  # forget the kept entries: the call compiles
                result = self.dispatcher(*args)
            self._ready.add(key)
            return result


def _type_key(value: Any) -> Any:
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        return (dtype.str, getattr(value, "ndim", 0), bool(getattr(getattr(value, "flags", None), "c_contiguous", 0)))
    return type(value)
