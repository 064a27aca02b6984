"""Test ids must be the same on every collection, or `pytest -n 8` (pytest-xdist) refuses to
run: each worker collects on its own and compares the ids."""

import subprocess
import sys
import time

from helpers import REPO


def _collect() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    return [line for line in done.stdout.splitlines() if "::" in line]


def test_ids_are_the_same_on_every_collection():
    first = _collect()
    time.sleep(1.1)           # ids that embed a time stamp (e.g. gzip's mtime) would now differ
    second = _collect()
    assert first and first == second, sorted(set(first) ^ set(second))[:10]
