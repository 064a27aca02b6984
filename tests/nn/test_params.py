"""ParamDict: a network's parameters as views of one flat buffer, and the checks that keep a
flat update aligned (`gather`), on every backend."""

import numpy as np
import pytest

from xpcnn.backend import get_backend
from xpcnn.errors import BackendMismatch, DTypeError, ShapeError
from xpcnn.nn.params import ParamDict, make_params

HOST = {"W": np.arange(6.0).reshape(2, 3), "b": np.array([10.0, 20.0])}


def test_make_params_cuts_views_of_one_buffer_in_the_dict_order(backend):
    params = make_params(HOST, backend, "float32")
    assert params.flat.dtype == backend.xp.float32 and tuple(params.flat.shape) == (8,)
    assert params.layout == (("W", 0, 6, (2, 3)), ("b", 6, 8, (2,)))
    np.testing.assert_array_equal(backend.to_numpy(params.flat), [0, 1, 2, 3, 4, 5, 10, 20])
    params.flat[6] = 7.0
    assert backend.to_numpy(params["b"])[0] == 7.0          # a view, not a copy


def test_make_params_of_nothing_is_an_empty_buffer():
    params = make_params({}, get_backend("numpy"), "float64")
    assert params.flat.shape == (0,) and params.layout == () and dict(params) == {}


def test_assignment_copies_into_the_view_and_keeps_shape_and_entries():
    params = make_params(HOST, get_backend("numpy"), "float64")
    view = params["W"]
    params["W"] = np.ones((2, 3))
    assert params["W"] is view and np.shares_memory(view, params.flat)
    np.testing.assert_array_equal(params.flat[:6], np.ones(6))
    params["W"] = view                                        # `params[k] -= step` re-assigns the same array
    with pytest.raises(ShapeError) as caught:
        params["W"] = np.ones((3, 2))
    assert str(caught.value) == "params['W'] must keep shape (2, 3), got (3, 2)"
    with pytest.raises(KeyError) as caught:
        params["c"] = np.ones(2)
    assert caught.value.args[0] == "'c': a flat parameter set cannot gain new entries; it has ['W', 'b']"
    np.testing.assert_array_equal(params.flat[:6], np.ones(6))


def test_zeros_like_has_the_layout_dtype_and_device(backend):
    params = make_params(HOST, backend, "float64")
    zeros = params.zeros_like()
    assert isinstance(zeros, ParamDict) and zeros.layout == params.layout and zeros.backend is params.backend
    assert zeros.flat.dtype == params.flat.dtype and zeros.flat is not params.flat
    assert backend.owns(zeros.flat)
    np.testing.assert_array_equal(backend.to_numpy(zeros.flat), np.zeros(8))
    assert tuple(zeros["W"].shape) == (2, 3)


def test_gather_takes_a_same_layout_param_dict_as_it_is(backend):
    params = make_params(HOST, backend, "float64")
    grads = params.zeros_like()
    assert params.gather(grads) is grads.flat


def test_gather_puts_other_layouts_and_plain_dicts_in_its_own_order(backend):
    params = make_params(HOST, backend, "float64")
    reordered = make_params({"b": HOST["b"] + 1, "W": HOST["W"] + 1}, backend, "float64")
    expected = [1, 2, 3, 4, 5, 6, 11, 21]
    np.testing.assert_array_equal(backend.to_numpy(params.gather(reordered)), expected)
    plain = {"b": backend.asarray(HOST["b"] + 1, "float64"), "W": backend.asarray(HOST["W"] + 1, "float64")}
    np.testing.assert_array_equal(backend.to_numpy(params.gather(plain)), expected)


def test_gather_refuses_what_would_misalign_or_cast():
    be = get_backend("numpy")
    params = make_params(HOST, be, "float64")
    with pytest.raises(ShapeError) as caught:
        params.gather({"W": np.ones((3, 2)), "b": np.ones(2)})
    assert str(caught.value) == "gradient 'W' has shape (3, 2), the parameter (2, 3)"
    with pytest.raises(DTypeError) as caught:
        params.gather({"W": np.ones((2, 3)), "b": np.ones(2, dtype=np.float32)})
    assert str(caught.value) == "gradient 'b' is float32, the parameters float64; no silent casts"
    with pytest.raises(DTypeError, match="gradient 'W' is float32"):     # a ParamDict of another dtype too
        params.gather(make_params(HOST, be, "float32"))


def test_gather_names_a_gradient_from_another_backend_or_device():
    strict = pytest.importorskip("array_api_strict")
    params = make_params(HOST, get_backend("numpy"), "float64")
    with pytest.raises(BackendMismatch, match="arrays from different backends were mixed"):
        params.gather({"W": np.ones((2, 3)), "b": strict.ones(2, dtype=strict.float64)})
    be = get_backend("array_api_strict")
    params = make_params(HOST, be, "float64")
    others = [d for d in strict.__array_namespace_info__().devices() if d != be.device]
    grads = {"W": strict.ones((2, 3), dtype=strict.float64, device=be.device),
             "b": strict.ones(2, dtype=strict.float64, device=others[0])}
    with pytest.raises(BackendMismatch, match="gradient 'b' is on device"):
        params.gather(grads)
