"""Fixtures of the fast-operation tests: CuPy's fast path run on the CPU through the CUDA
emulation (tests/ops/emulation, docs/cuda-emulation.md), skipped with the reason where CuPy's
wheels or g++ are missing (a failure under CI=true, where .ci/run installs them)."""

from __future__ import annotations

import pytest

from emulation import emulator
from emulation.available import require_cupy_wheels, require_gxx


@pytest.fixture(scope="session")
def emulation_runner():
    """The g++ runner of the CUDA emulation (kernels compiled once per source, cached on disk)."""
    require_cupy_wheels()
    require_gxx()
    return emulator.GxxRunner()


@pytest.fixture(scope="session")
def emulated_fast_cupy(emulation_runner):
    """xpcnn/ops/fast_cupy.py, unmodified, loaded on the emulation's stand-in for CuPy."""
    return emulator.load_fast_cupy(emulator.StandInCupy(emulation_runner))


@pytest.fixture
def cupy_emulated_backend(emulated_fast_cupy):
    """A backend on NumPy arrays whose fast table is CuPy's, run through the emulation."""
    with emulator.use_fast_module(emulated_fast_cupy) as backend:
        yield backend


@pytest.fixture
def emulated_gpu(emulated_fast_cupy):
    """A "cupy" backend on the emulated GPU: its arrays, random numbers, fast table and CUDA
    graphs are the emulation's (`emulator.use_emulated_device`)."""
    with emulator.use_emulated_device(emulated_fast_cupy) as backend:
        yield backend


#: Tests that run whole training steps: minutes through the emulation (every kernel thread
#: by thread on one core), so marked slow there (CI runs them; deselect with -m 'not slow').
_SLOW_WHEN_EMULATED = {"test_whole_training_steps_fast_equal_reference", "test_two_runs_are_bit_identical"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.originalname in _SLOW_WHEN_EMULATED and "cupy-emulated" in item.name:
            item.add_marker(pytest.mark.slow)
