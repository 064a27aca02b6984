"""Numba's compiler for xpcnn's CPU kernels (`fast_numba`): where the compiled kernels are
kept, and a kept kernel that cannot be read is compiled again, never an error.

Kernels compile on their first call for each dtype and are kept on disk, so that later
processes load them in a fraction of a second. They are kept in a folder of the user's
(``$XDG_CACHE_HOME/xpcnn/numba``, by default ``~/.cache/xpcnn/numba``; ``XPCNN_KERNEL_CACHE``
names another, `cpu_kernels.cache_dir`), never inside the installed package, which may be
read-only (Numba's own cache would fall back to the source's folder). Numba recompiles by
itself when the source changed (it stamps each entry with the source file's time and size);
a file it cannot read (a disk that filled up, a copy cut short) makes the first call fail:
that call then discards the kept entries of every xpcnn kernel and runs again, which compiles
afresh and writes new entries; where the folder cannot be made or written, the kernels are
compiled in memory, each process anew.

    @kernel_cache.kernel(nogil=True)          # a kernel called from Python
    def _scale(x, factor): ...
    @kernel_cache.njit(nogil=True)            # a helper called only from other kernels
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import numba
from numba.core.caching import (
    CompileResultCacheImpl,
    FunctionCache,
    NullCache,
    _CacheLocator,
    _SourceFileBackedLocatorMixin,
)

from .cpu_kernels import cache_dir


class _UserFolderLocator(_SourceFileBackedLocatorMixin, _CacheLocator):
    """Numba's cache locator for xpcnn's kernels: `cache_dir()`, in a subfolder named after the
    source file's folder (as Numba's own locators name theirs); never the source's folder."""

    def __init__(self, py_func: Callable, py_file: str):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(str(cache_dir()), self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self) -> str:
        return self._cache_path


class _UserFolderCacheImpl(CompileResultCacheImpl):
    _locator_classes = [_UserFolderLocator]


class _UserFolderCache(FunctionCache):
    """Numba's per-function cache of compiled code, kept only where `_UserFolderLocator` says."""
    _impl_class = _UserFolderCacheImpl


class _KernelCache(_UserFolderCache):
    """`_UserFolderCache` for a kernel called only from Python (a `Kernel`, which compiled code
    cannot call): once its code is loaded or kept, the library lets go of the copy of its LLVM
    IR that Numba holds for linking it into other compiled functions. (DeepConvNet's 21 kernels
    held 7 MiB of such copies: docs/performance.md.)"""

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        result = super().load_overload(sig, target_context)
        if result is not None:
            _release_linking_copy(result.library)
        return result

    def save_overload(self, sig: Any, data: Any) -> None:
        super().save_overload(sig, data)
        _release_linking_copy(data.library)


def _release_linking_copy(library: Any) -> None:
    """Drops Numba's linking copy of a library's IR (freed with its last reference; a module
    an execution engine owns is not freed by it)."""
    library._shared_module = None


#: Every dispatcher made here (kernels and the helpers compiled into them).
_DISPATCHERS: list = []


def njit(**options: Any) -> Callable[[Callable], Any]:
    """``numba.njit(cache=True, **options)``, kept in `cache_dir()`: for helpers that other
    kernels call."""
    return _compiler(_UserFolderCache, options)


def _compiler(cache: type, options: dict) -> Callable[[Callable], Any]:
    def decorate(function: Callable) -> Any:
        dispatcher = numba.njit(**options)(function)
        try:
            dispatcher._cache = cache(function)     # what cache=True does, with our locator
        except RuntimeError:        # no folder can be made there: compiled in memory, each process anew
            pass
        _DISPATCHERS.append(dispatcher)
        return dispatcher
    return decorate


def _forget_kept_kernels() -> None:
    """Discard the kept entries of every kernel (an empty index each); a kernel whose folder
    cannot be written is compiled in memory from now on."""
    for dispatcher in _DISPATCHERS:
        try:
            dispatcher._cache.flush()
        except Exception:  # noqa: BLE001 - an unwritable or unreadable folder: no cache for it
            _compile_in_memory(dispatcher)


def _compile_in_memory(dispatcher: Any) -> None:
    dispatcher._cache = NullCache()


def kernel(**options: Any) -> Callable[[Callable], "Kernel"]:
    """`njit` for a kernel called from Python: a `Kernel`, whose first call survives a
    kept entry that cannot be read."""
    def decorate(function: Callable) -> Kernel:
        return Kernel(_compiler(_KernelCache, options)(function))
    return decorate


class Kernel:
    """A compiled kernel called from Python. Its first call with each argument types either
    loads the kept entry or compiles; if that call fails, the kernel's index of kept entries
    is discarded and the call made once more (then compiling afresh).

    A call goes straight to Numba's dispatcher (which picks the compiled code by the
    arguments' types, and compiles under Numba's own lock): the wrapper costs nothing until
    a call fails. A failure with argument types already compiled is the kernel's own error
    and is raised as it is; any other is a first call that could not load or compile.
    (Checking each call's types in Python first cost 2.5 us a call, 1.5 ms of DeepConvNet's
    step of about 600 calls: docs/performance.md.)"""

    def __init__(self, dispatcher: Any):
        self.dispatcher = dispatcher
        self.__name__ = dispatcher.py_func.__name__
        self.__doc__ = dispatcher.py_func.__doc__
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        try:
            return self.dispatcher(*args)
        except Exception:
            if self._compiled_for(args):
                raise                          # the kernel's own error (these types ran before)
        return self._first_call(args)

    def _compiled_for(self, args: tuple) -> bool:
        """Whether the dispatcher holds compiled code for these arguments' types."""
        try:
            types = tuple(self.dispatcher.typeof_pyval(a) for a in args)
        except Exception:  # noqa: BLE001 - a value Numba cannot type: nothing compiled for it
            return False
        return types in self.dispatcher.overloads

    def _first_call(self, args: tuple) -> Any:
        """A first call that failed: discard the kept entries and compile afresh; where that
        fails too, compile every kernel in memory from now on."""
        with self._lock:                      # one rebuild at a time (slices of a batch call at once)
            try:
                return self.dispatcher(*args)   # another slice may have rebuilt it meanwhile
            except Exception:
                pass
            _forget_kept_kernels()             # a damaged entry: compile afresh
            try:
                return self.dispatcher(*args)
            except Exception:
                for dispatcher in _DISPATCHERS:
                    _compile_in_memory(dispatcher)
            return self.dispatcher(*args)      # an error of the kernel itself is raised here
