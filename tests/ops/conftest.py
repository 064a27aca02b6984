"""Fixtures of the fast-operation tests: CuPy's fast path run on the CPU through the CUDA
emulation (tests/ops/emulation, docs/cuda-emulation.md), skipped with the reason where CuPy's
wheels or g++ are missing (a failure under CI=true, where .ci/run installs them)."""

from __future__ import annotations

import array_api_compat
import pytest

from xpcnn.backend import get_backend
from xpcnn.ops import table

from emulation.available import require_cupy_wheels, require_gxx


@pytest.fixture(scope="session")
def emulation_runner():
    """The g++ runner of the CUDA emulation (kernels compiled once per source, cached on disk)."""
    from emulation import emulator

    require_cupy_wheels()
    require_gxx()
    return emulator.GxxRunner()


@pytest.fixture(scope="session")
def emulated_fast_cupy(emulation_runner):
    """xpcnn/ops/fast_cupy.py, unmodified, loaded on the emulation's stand-in for CuPy."""
    from emulation import emulator

    return emulator.load_fast_cupy(emulator.StandInCupy(emulation_runner))


def use_fast_module(module):
    """Generator for a fixture: NumPy's backend whose fast table is `module`'s entries (e.g.
    fast_cupy on the emulation) while the fixture lives; the table is restored afterwards."""
    original = table._fast_table

    def fast_table(xp):
        if array_api_compat.is_numpy_namespace(xp):
            return module.fast_ops()
        return original(xp)

    table._fast_table = fast_table
    table.ops_for.cache_clear()
    try:
        yield get_backend("numpy")
    finally:
        table._fast_table = original
        table.ops_for.cache_clear()


@pytest.fixture
def cupy_emulated_backend(emulated_fast_cupy):
    """A backend on NumPy arrays whose fast table is CuPy's, run through the emulation."""
    yield from use_fast_module(emulated_fast_cupy)


#: Tests that run whole training steps: minutes through the emulation (every kernel thread
#: by thread on one core), so marked slow there (CI runs them; deselect with -m 'not slow').
_SLOW_WHEN_EMULATED = {"test_whole_training_steps_fast_equal_reference", "test_two_runs_are_bit_identical"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.originalname in _SLOW_WHEN_EMULATED and "cupy-emulated" in item.name:
            item.add_marker(pytest.mark.slow)
