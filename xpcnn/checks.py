"""Checks of scalar arguments, one function per rule, each raising `ConfigError` that names
the argument, the rule and the value given:

    >>> from xpcnn import checks
    >>> checks.positive_int(0, "batch_size", "predict")
    ConfigError: predict: batch_size must be an integer >= 1, got 0

Layers, optimizers, models, inference, the convolution geometry and the Trainer all check
their settings here (``checks.positive_int(...)``), so a rule reads the same wherever it
applies. Bools are refused where a number is expected (a
``True`` batch size is a mistake, not a 1). Checks of arrays (shapes, dtypes, devices, labels)
live beside the arrays: `xpcnn.backend.arrays`, `xpcnn.ops.functions`, `xpcnn.ops.geometry`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .errors import ConfigError


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and hasattr(value, "__index__")


def positive_int(value: Any, name: str, what: str) -> int:
    """`value` as an int; `ConfigError` unless it is an integer >= 1."""
    if not _is_int(value) or int(value) < 1:
        raise ConfigError(f"{what}: {name} must be an integer >= 1, got {value!r}")
    return int(value)


def non_negative_int(value: Any, name: str, what: str) -> int:
    """`value` as an int; `ConfigError` unless it is an integer >= 0."""
    if not _is_int(value) or int(value) < 0:
        raise ConfigError(f"{what}: {name} must be an integer >= 0, got {value!r}")
    return int(value)


def seed_or_none(seed: Any, what: str) -> int | None:
    """A seed for ``numpy.random.default_rng``: None or an integer >= 0."""
    if seed is not None and (not _is_int(seed) or int(seed) < 0):
        raise ConfigError(f"{what}: seed must be None or an integer >= 0, got {seed!r}")
    return None if seed is None else int(seed)


def number_in(value: Any, name: str, what: str, *, low: float = 0.0, high: float = math.inf,
              low_open: bool = True, high_open: bool = True) -> float:
    """`value` as a float inside the interval from `low` to `high` (each end open unless told
    otherwise; the default is ``> 0``); `ConfigError` for anything else, NaN included."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what}: {name} must be a number, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        bound = f"{'>' if low_open else '>='} {float(low)}"
        if high != math.inf:
            bound += f" and {'<' if high_open else '<='} {float(high)}"
        raise ConfigError(f"{what}: {name} must be {bound}, got {value!r}")
    return value


def dropout_ratio(value: Any, what: str) -> float:
    """A dropout ratio (the share of units dropped) as a float in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{what}: dropout ratio must be a number in [0, 1), got {value!r}")
    return float(value)


def flag(value: Any, name: str, what: str) -> bool:
    """`value` as a bool; `ConfigError` for anything but True/False (NumPy's included): a string
    ``"False"`` would otherwise count as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{what}: {name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def env_choice(variable: str, choices: tuple[str, ...]) -> str:
    """The environment variable `variable`, lower-cased, or ``choices[0]`` where it is unset or
    blank; `ConfigError` unless it is one of `choices`."""
    given = os.environ.get(variable, "")
    value = given.strip().lower() or choices[0]
    if value not in choices:
        raise ConfigError(f"{variable} must be one of {', '.join(choices)}, got {given!r}")
    return value
