"""Fixtures shared by the tests of `xpcnn serve` (test_serve.py, test_serve_limits.py): a
checkpoint trained once per module, and the model served from it. A test module may define
its own `checkpoint` (test_export.py does)."""

import pytest

from xpcnn.app.serve import ServedModel

from trained import trained_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def model(checkpoint):
    return ServedModel.from_checkpoint(checkpoint)
