"""The settings of NumPy's compiled CPU kernels (`fast_numba`), readable without Numba.

``XPCNN_CPU_KERNELS`` chooses: ``numba`` (the default: compiled kernels where Numba is
installed and imports) or ``numpy`` (NumPy's calls only, for comparison). Where Numba is
missing or fails to import (an unsupported platform), NumPy's path runs without an error
(`xpcnn.ops.table`, whose `describe` says which ran and why). ``XPCNN_KERNEL_CACHE`` names the
folder the compiled kernels are kept in (`cache_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import checks

#: Environment variable that selects the CPU kernels.
KERNELS_VARIABLE = "XPCNN_CPU_KERNELS"
CHOICES = ("numba", "numpy")
#: Environment variable naming the folder the compiled kernels are kept in.
CACHE_VARIABLE = "XPCNN_KERNEL_CACHE"


def requested() -> str:
    """The kernels asked for: ``XPCNN_CPU_KERNELS``, or ``numba``."""
    return checks.env_choice(KERNELS_VARIABLE, CHOICES)


def cache_dir() -> Path:
    """The folder the compiled kernels are kept in: ``XPCNN_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/xpcnn/numba`` (by default ``~/.cache/xpcnn/numba``): the user's, never
    inside the installed package, which may be read-only."""
    given = os.environ.get(CACHE_VARIABLE)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xpcnn" / "numba"
