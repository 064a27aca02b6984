"""Backend selection, host <-> device transfer, and the clear errors around them."""

import importlib.util
import sys

import numpy as np
import pytest

from xpcnn.backend import backend_of, get_backend, namespace_of, resolve_dtype
from xpcnn.errors import BackendMismatch, BackendUnavailable, ConfigError, DTypeError

from helpers import unavailable


@pytest.mark.parametrize("name, canonical", [("cpu", "numpy"), ("numpy", "numpy"), ("CPU", "numpy"),
                                             ("array_api_strict", "array_api_strict"), ("strict", "array_api_strict")])
def test_names_resolve(name, canonical):
    assert get_backend(name).name == canonical


def test_unknown_backend_names_the_choices():
    with pytest.raises(ConfigError, match="unknown backend 'tpu': expected one of 'cpu', 'gpu'"):
        get_backend("tpu")


def test_gpu_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)      # as if CuPy were not installed (CI installs it)
    with pytest.raises(BackendUnavailable, match=r"needs CuPy, which is not installed.*xpcnn\[gpu\]"):
        get_backend("gpu")


def test_ndonnx_without_ndonnx_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ndonnx", None)
    with pytest.raises(BackendUnavailable, match=r"needs ndonnx, which is not installed.*xpcnn\[export\]"):
        get_backend("ndonnx")


def test_ndonnx_computes_constants_and_refuses_to_read_a_graph():
    if importlib.util.find_spec("ndonnx") is None:
        unavailable("ndonnx is not installed (pip install 'xpcnn[export]')")
    backend = get_backend("ndonnx")
    assert backend.name == "ndonnx" and backend.owns(backend.asarray(np.zeros(2, np.float32)))
    values = np.arange(3, dtype=np.float32)
    np.testing.assert_allclose(backend.to_numpy(backend.xp.exp(backend.asarray(values))), np.exp(values), rtol=1e-6)
    lazy = backend.xp.argument(shape=("N",), dtype=backend.xp.float32)
    with pytest.raises(ConfigError, match="part of a graph .* has no values: build the graph"):
        backend.to_numpy(lazy + 1.0)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy is not installed here")
def test_gpu_with_cupy_but_no_usable_device_says_so():
    """CuPy installed without a GPU or driver (CI installs it for the CUDA kernel checks)."""
    try:
        backend = get_backend("gpu")
    except BackendUnavailable as exc:
        assert "CuPy is installed but no CUDA device is usable" in str(exc), exc
    else:
        assert backend.name == "cupy"       # a machine with a GPU


def test_round_trip_keeps_values_and_dtype(backend, rng):
    host = rng.standard_normal((3, 4)).astype(np.float32)
    arr = backend.asarray(host, "float32")
    assert backend.owns(arr)
    assert arr.dtype == backend.xp.float32
    back = backend.to_numpy(arr)
    assert isinstance(back, np.ndarray) and back.dtype == np.float32
    np.testing.assert_array_equal(back, host)
    assert backend_of(arr).name == backend.name
    backend.synchronize()


def test_asarray_converts_dtype_on_request(backend):
    arr = backend.asarray(np.arange(4, dtype=np.uint8), "float64")
    assert arr.dtype == backend.xp.float64


def test_strict_backend_uses_a_non_default_device():
    import array_api_strict
    strict = get_backend("array_api_strict")
    assert strict.device == array_api_strict.Device("device1")
    with pytest.raises(RuntimeError, match="Can't convert array on the .* device to a NumPy array"):
        np.sum(strict.asarray(np.ones(3), "float32"))   # NumPy cannot silently take these arrays


def test_mixing_backends_is_reported():
    strict = get_backend("array_api_strict")
    with pytest.raises(BackendMismatch, match="different backends"):
        namespace_of(np.ones(2), strict.asarray(np.ones(2), "float32"))
    assert not strict.owns(np.ones(2))


@pytest.mark.parametrize("bad", ["float16", "int32", "double"])
def test_resolve_dtype_rejects_non_float32_64(bad):
    with pytest.raises(DTypeError, match="dtype must be one of"):
        resolve_dtype(get_backend("cpu").xp, bad)


def test_no_code_branches_on_a_backend_name():
    """One class per device (docs/architecture.md): what differs between libraries lives in
    each library's `Backend` subclass, so no code compares a backend's name. Reads source only."""
    import re
    from pathlib import Path

    import xpcnn

    pattern = re.compile(r"\.name\s*(==|!=|\bin\b|\bnot in\b)\s*\(?[\"'](numpy|cupy|torch|array_api_strict)[\"']")
    package = Path(xpcnn.__file__).parent
    offenders = [f"{path.relative_to(package)}:{number}: {line.strip()}"
                 for path in sorted(package.rglob("*.py"))
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, "\n".join(offenders)
