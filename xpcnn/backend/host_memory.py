"""The C library's allocator under NumPy on Linux (glibc): large freed blocks kept for reuse.

NumPy allocates each array with ``malloc``. glibc maps a block of 128 KiB or more straight
from the system and unmaps it when it is freed (that threshold rises to the largest such block
freed so far), and gives the top of its heap back once twice the threshold is free there. A
training step allocates and frees the same large arrays every step, so their pages are
mapped again and faulted in again, 4 KiB at a time, every step. DeepConvNet's 5 MB
gradients and channels-last copies sit right at the threshold: 1,000-1,300 page faults and
a quarter of its step here (45 against 34 ms, docs/performance.md).

`keep_freed_memory` sets both thresholds (glibc's ``mallopt``): blocks up to
`MMAP_THRESHOLD` come from the heap, and up to `TRIM_THRESHOLD` of freed heap is kept for the
next ones (in each of glibc's heaps: the main one, and one per thread that allocates, such as
the CPU pool's workers). A process's peak memory is unchanged (189 against 187 MiB for that
run); after a peak it keeps the freed memory up to those amounts. The NumPy backend applies it
when it is made (`xpcnn.backend.get_backend`), once per process.

``XPCNN_HOST_MEMORY=system`` leaves glibc's own settings, and so do glibc's own variables
where the user set any (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``, or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``);
elsewhere than glibc (macOS, Windows, musl) nothing is changed.

    >>> keep_freed_memory()
    'glibc malloc, freed blocks kept (mmap threshold 32 MiB, trim threshold 128 MiB)'
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

from .. import checks

#: Environment variable: ``keep`` (the default) or ``system`` (glibc's own settings).
HOST_MEMORY_VARIABLE = "XPCNN_HOST_MEMORY"
CHOICES = ("keep", "system")

#: Blocks below this come from the heap (glibc's own limit for its moving threshold).
MMAP_THRESHOLD = 32 << 20
#: Freed memory at the top of the heap kept before any is given back.
TRIM_THRESHOLD = 128 << 20

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

#: glibc's own environment variables for its thresholds: where the user set any, theirs stand.
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_LOCK = threading.Lock()
_APPLIED: dict[str, str] = {}


def requested() -> str:
    """``XPCNN_HOST_MEMORY``, or ``keep``."""
    return checks.env_choice(HOST_MEMORY_VARIABLE, CHOICES)


def keep_freed_memory() -> str:
    """Set glibc's thresholds (see the module docstring) unless ``XPCNN_HOST_MEMORY=system``
    or the C library is not glibc; once per process. Returns a line saying what is in force."""
    with _LOCK:
        if "line" not in _APPLIED:
            _APPLIED["line"] = _apply(requested())
        return _APPLIED["line"]


def _users_own_settings() -> str:
    """The environment variables through which the user set glibc's thresholds already, if any."""
    named = [name for name in _GLIBC_VARIABLES if os.environ.get(name)]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        named.append("GLIBC_TUNABLES")
    return ", ".join(named)


def _apply(choice: str) -> str:
    if platform.libc_ver()[0] != "glibc":
        return "the system's allocator, as it is (not glibc)"
    if choice == "system":
        return f"glibc malloc, its own settings ({HOST_MEMORY_VARIABLE}=system)"
    own = _users_own_settings()
    if own:
        return f"glibc malloc, the environment's settings ({own})"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "glibc malloc, its own settings (mallopt not found)"
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    kept = [f"{name} {value >> 20} MiB" for name, parameter, value in (
        ("mmap threshold", _M_MMAP_THRESHOLD, MMAP_THRESHOLD), ("trim threshold", _M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        if mallopt(parameter, value) == 1]                       # glibc: 1 done, 0 refused
    if not kept:
        return "glibc malloc, its own settings (mallopt refused)"
    return f"glibc malloc, freed blocks kept ({', '.join(kept)})"


def describe() -> str:
    """What `keep_freed_memory` put in force, or that it has not run in this process."""
    return _APPLIED.get("line", "the allocator's own settings (no NumPy backend made yet)")
