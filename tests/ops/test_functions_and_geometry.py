"""im2col/col2im against loop references, their adjoint property, softmax and losses."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from xpcnn.errors import ConfigError, ShapeError
from xpcnn.ops import col2im, conv_output_size, cross_entropy_error, im2col, log_softmax, one_hot, softmax
from xpcnn.ops import reference as ops

from helpers import SEEDS, conv_geometries, naive_im2col

GEOMETRIES = [
    # (N, C, H, W, FH, FW, stride, pad)
    (2, 1, 5, 5, 3, 3, 1, 0),
    (2, 3, 7, 7, 3, 3, 2, 1),
    (1, 2, 6, 7, 2, 3, 2, 2),
    (3, 2, 9, 7, 5, 3, 2, 1),
    (1, 1, 4, 4, 4, 4, 1, 0),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_im2col_matches_loop_reference(backend, rng, geometry):
    n, c, h, w, fh, fw, stride, pad = geometry
    x = rng.standard_normal((n, c, h, w))
    col = im2col(backend.asarray(x, "float64"), fh, fw, stride, pad)
    np.testing.assert_allclose(backend.to_numpy(col), naive_im2col(x, fh, fw, stride, pad), rtol=0, atol=0)


def test_im2col_rows_times_filters_is_convolution(rng):
    from helpers import naive_conv
    x, W = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 2))
    col = im2col(x, 3, 2, stride=1, pad=1)
    out = (col @ W.reshape(4, -1).T).reshape(2, 7, 7, 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, naive_conv(x, W, np.zeros(4), 1, 1), rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=conv_geometries(), seed=SEEDS)
def test_im2col_col2im_are_adjoint(backend, geometry, seed):
    """<im2col(x), y> == <x, col2im(y)> for every geometry."""
    n, c, h, w, _, fh, fw, stride, pad = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    out_h, out_w = conv_output_size(h, fh, stride, pad), conv_output_size(w, fw, stride, pad)
    y = rng.standard_normal((n * out_h * out_w, c * fh * fw))
    lhs = np.sum(backend.to_numpy(im2col(backend.asarray(x, "float64"), fh, fw, stride, pad)) * y)
    rhs = np.sum(x * backend.to_numpy(col2im(backend.asarray(y, "float64"), x.shape, fh, fw, stride, pad)))
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)


def test_im2col_keeps_float32(backend, rng):
    x = backend.asarray(rng.standard_normal((2, 3, 6, 6)), "float32")
    col = im2col(x, 3, 3, 1, 1)
    assert col.dtype == backend.xp.float32
    assert col2im(col, x.shape, 3, 3, 1, 1).dtype == backend.xp.float32


@pytest.mark.parametrize("args, error, words", [
    ((28, 5, 0, 0), ConfigError, "stride"),
    ((28, 5, -1, 0), ConfigError, "stride"),
    ((28, 5, 1, -1), ConfigError, "pad"),
    ((28, 5, 2, 0), ShapeError, "not a multiple of stride 2"),
    ((4, 7, 1, 1), ShapeError, "does not fit"),
    ((28, 5, 1.5, 0), ConfigError, "stride"),
])
def test_conv_output_size_rejects_bad_geometry(args, error, words):
    with pytest.raises(error, match=words):
        conv_output_size(*args)


def test_conv_output_size_values():
    assert conv_output_size(28, 5) == 24
    assert conv_output_size(28, 5, 1, 2) == 28
    assert conv_output_size(7, 3, 2, 1) == 4


def test_col2im_rejects_wrong_col_shape(rng):
    with pytest.raises(ShapeError, match="expected col of shape"):
        col2im(rng.standard_normal((10, 9)), (1, 1, 5, 5), 3, 3)


def test_softmax_rows_sum_to_one_and_are_stable(backend):
    x = backend.asarray(np.array([[1000.0, 1001.0, 1002.0], [-5.0, 0.0, 5.0]]), "float32")
    y = backend.to_numpy(softmax(x))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[0], softmax(np.array([0.0, 1.0, 2.0])), rtol=1e-6)
    assert np.all(np.isfinite(backend.to_numpy(log_softmax(x))))


def test_cross_entropy_error_accepts_labels_and_one_hot(backend, rng):
    y_host = softmax(rng.standard_normal((5, 4)))
    t = rng.integers(0, 4, 5)
    y = backend.asarray(y_host, "float64")
    by_label = backend.to_numpy(cross_entropy_error(y, backend.asarray(t)))
    by_one_hot = backend.to_numpy(cross_entropy_error(y, backend.asarray(np.eye(4)[t], "float64")))
    expected = -np.mean(np.log(y_host[np.arange(5), t] + 1e-7))
    assert float(by_label) == pytest.approx(expected, rel=1e-12)
    assert float(by_one_hot) == pytest.approx(expected, rel=1e-12)


def test_softmax_cross_entropy_matches_book_formula(backend, rng):
    x_host = rng.standard_normal((6, 3))
    t = rng.integers(0, 3, 6)
    x = backend.asarray(x_host, "float64")
    loss, (y, _) = ops.softmax_cross_entropy_forward(backend.xp, x, one_hot(backend.asarray(t), 3, backend.xp.float64))
    expected = -np.mean(np.log(softmax(x_host)[np.arange(6), t]))
    assert float(backend.to_numpy(loss)) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(backend.to_numpy(y), softmax(x_host), rtol=1e-12)


def test_one_hot(backend):
    t = backend.asarray(np.array([2, 0, 1]))
    out = backend.to_numpy(one_hot(t, 4, backend.xp.float32))
    np.testing.assert_array_equal(out, np.eye(4, dtype=np.float32)[[2, 0, 1]])
    assert out.dtype == np.float32
