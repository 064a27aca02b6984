"""Which kernels NumPy's fast path runs: the compiled ones (`fast_numba`, where Numba imports)
or NumPy's own calls only (`fast_numpy`).

``XPCNN_CPU_KERNELS`` chooses: ``numba`` (the default: compiled kernels where Numba is
installed and imports) or ``numpy`` (NumPy's calls only, for comparison). Where Numba is
missing or fails to import (an unsupported platform), NumPy's path runs without an error and
`describe()` says why, for `xpcnn train`'s banner and `scripts/bench.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError

#: Environment variable that selects the CPU kernels.
KERNELS_VARIABLE = "XPCNN_CPU_KERNELS"
CHOICES = ("numba", "numpy")
#: Environment variable naming the folder the compiled kernels are kept in.
CACHE_VARIABLE = "XPCNN_KERNEL_CACHE"

_IMPORT: dict[str, Any] = {}


def requested() -> str:
    """The kernels asked for: ``XPCNN_CPU_KERNELS``, or ``numba``."""
    value = os.environ.get(KERNELS_VARIABLE, "").strip().lower() or "numba"
    if value not in CHOICES:
        raise ConfigError(f"{KERNELS_VARIABLE} must be one of {', '.join(CHOICES)}, "
                          f"got {os.environ[KERNELS_VARIABLE]!r}")
    return value


def cache_dir() -> Path:
    """The folder the compiled kernels are kept in: ``XPCNN_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/xpcnn/numba`` (by default ``~/.cache/xpcnn/numba``): the user's, never
    inside the installed package, which may be read-only."""
    given = os.environ.get(CACHE_VARIABLE)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xpcnn" / "numba"


def _compiled_module() -> Any:
    """`fast_numba`, or None with the reason kept (Numba missing or failing to import)."""
    if "module" not in _IMPORT:
        try:
            from . import fast_numba  # Numba: an optional heavy library, imported where it is used
        except Exception as error:  # noqa: BLE001 - any failure to import means "not available here"
            _IMPORT.update(module=None, reason=f"{type(error).__name__}: {error}")
        else:
            _IMPORT.update(module=fast_numba, reason="")
    return _IMPORT["module"]


def compiled_ops() -> dict[str, Callable[..., Any]]:
    """The compiled entries for NumPy's table, or none (NumPy's path) where not asked for or
    not available."""
    if requested() != "numba":
        return {}
    module = _compiled_module()
    return module.fast_ops() if module is not None else {}


def describe() -> str:
    """One line: which CPU kernels a NumPy backend runs now, and why."""
    if requested() == "numpy":
        return f"NumPy calls ({KERNELS_VARIABLE}=numpy)"
    module = _compiled_module()
    if module is None:
        return f"NumPy calls (compiled kernels unavailable: {_IMPORT['reason']})"
    return f"compiled kernels (Numba {module.numba_version()}; compiled on first use, kept in {cache_dir()})"
