"""The C library's allocator under the NumPy backend (`xpcnn/backend/host_memory.py`): with glibc,
large freed blocks are kept for reuse (a 5 MB array comes from the heap, not from a fresh
mapping whose pages fault in again), unless ``XPCNN_HOST_MEMORY=system``; a bad value says
what it wants, from the library and from the CLI."""

import ctypes
import json
import platform
import subprocess
import sys

import pytest

from xpcnn.backend import host_memory
from xpcnn.errors import ConfigError

from helpers import error_line, isolated_env

GLIBC = platform.libc_ver()[0] == "glibc"
MALLINFO2 = GLIBC and hasattr(ctypes.CDLL(None), "mallinfo2")      # glibc 2.33 and later

# In a fresh process: make the NumPy backend, then allocate a 5 MB array and read glibc's count
# of bytes in blocks mapped straight from the system (mallinfo2's hblkhd) before and after.
_PROBE = """
import ctypes, json, numpy as np
import xpcnn

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
line = xpcnn.get_backend("cpu") and xpcnn.backend.host_memory.describe()
before = mallinfo2().hblkhd
array = np.ones(5 << 18, dtype=np.float32)          # 5 MiB
print(json.dumps({"line": line, "mapped": mallinfo2().hblkhd - before}))
"""


def _probe(tmp_path, **env):
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                            env=isolated_env(tmp_path, **env))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(not MALLINFO2, reason="the setting is glibc's (Linux); the test reads glibc 2.33's mallinfo2")
def test_large_arrays_come_from_the_heap_unless_the_system_setting_is_asked_for(tmp_path):
    kept = _probe(tmp_path)
    assert kept["line"] == ("glibc malloc, freed blocks kept (mmap threshold 32 MiB, trim threshold 128 MiB)")
    assert kept["mapped"] == 0                          # from the heap: its freed pages are reused
    system = _probe(tmp_path, XPCNN_HOST_MEMORY="system")
    assert system["line"] == "glibc malloc, its own settings (XPCNN_HOST_MEMORY=system)"
    assert system["mapped"] >= 5 << 20                  # glibc's default: a fresh mapping
    users = _probe(tmp_path, MALLOC_MMAP_THRESHOLD_="1048576")
    assert users["line"] == "glibc malloc, the environment's settings (MALLOC_MMAP_THRESHOLD_)"
    assert users["mapped"] >= 5 << 20                   # theirs stand: 5 MiB is above their 1 MiB


@pytest.mark.parametrize("value", ["off", "1", "kept"])
def test_a_bad_value_says_what_it_wants(monkeypatch, value):
    monkeypatch.setenv(host_memory.HOST_MEMORY_VARIABLE, value)
    with pytest.raises(ConfigError, match=rf"XPCNN_HOST_MEMORY must be one of keep, system, got '{value}'"):
        host_memory.requested()


def test_the_cli_says_so_in_one_line(tmp_path, cli_dataset):
    result = subprocess.run([sys.executable, "-m", "xpcnn.cli", "train", "--dataset", "mnist", "--data-dir",
                             str(cli_dataset), "--batch-size", "10", "--epochs", "1", "--quiet",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path,
                            env=isolated_env(tmp_path, XPCNN_HOST_MEMORY="off"), timeout=120)
    assert result.returncode != 0
    assert error_line(result.stderr, result.returncode) == (
        "xpcnn: error: XPCNN_HOST_MEMORY must be one of keep, system, got 'off'")
