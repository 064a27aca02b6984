"""im2col/col2im against loop references, their adjoint property, softmax and losses."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from xpcnn.errors import BackendMismatch, ConfigError, ShapeError
from xpcnn.ops import col2im, conv_output_size, cross_entropy_error, im2col, log_softmax, one_hot, softmax
from xpcnn.ops import reference as ops
from xpcnn.ops.functions import as_one_hot, host_class_labels
from xpcnn.ops.geometry import col2im_cnhw, im2col_cnhw, pad_nchw

from helpers import SEEDS, conv_geometries, naive_col2im, naive_im2col

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


# ------------------------------------------------------- the book's one-sample form, labels


def test_cross_entropy_error_of_one_sample_as_the_book_writes_it(backend):
    """The book's ``cross_entropy_error(y, t)`` with one sample: `y` ``(K,)`` and `t` a one-hot
    ``(K,)`` row, a 0-d label or a one-element label array."""
    y_host = np.array([0.1, 0.05, 0.6, 0.25])
    y = backend.asarray(y_host, "float64")
    expected = -np.log(0.6 + 1e-7)
    for t in (np.array([0.0, 0.0, 1.0, 0.0]), np.array(2), np.array([2])):
        loss = backend.to_numpy(cross_entropy_error(y, backend.asarray(t, "float64" if t.dtype.kind == "f" else None)))
        assert loss.shape == () and float(loss) == pytest.approx(expected, rel=1e-12), t
    with pytest.raises(ShapeError, match=r"labels: expected 1 labels for 1 samples, got 2"):
        cross_entropy_error(y, backend.asarray(np.array([2, 1])))


def test_as_one_hot_refuses_labels_and_scores_of_different_backends():
    array_api_strict = pytest.importorskip("array_api_strict")
    scores = np.full((2, 3), 1 / 3, np.float32)
    for t, like in ((array_api_strict.asarray([1, 0]), scores), (np.array([1, 0]), array_api_strict.asarray(scores))):
        with pytest.raises(BackendMismatch, match="arrays from different backends were mixed in one call"):
            as_one_hot(t, like)
    np.testing.assert_array_equal(as_one_hot(np.array([1, 0]), scores), np.eye(3, dtype=np.float32)[[1, 0]])


def test_host_class_labels_takes_indices_and_one_hot_rows_and_says_what_is_wrong():
    indices = np.array([3, 0, 9, 1], np.int64)
    assert host_class_labels(indices, 10, "test labels", n=4) is indices          # already int64: no copy
    small = host_class_labels(np.array([3, 0, 9], np.uint8), 10, "labels")
    assert small.dtype == np.int64 and small.tolist() == [3, 0, 9]
    rows = np.eye(10, dtype=np.float32)[[3, 0, 9, 1]]
    for classes in (10, None):
        out = host_class_labels(rows, classes, "labels", n=4)
        assert out.dtype == np.int64 and out.tolist() == [3, 0, 9, 1]
    assert host_class_labels(np.array([-1, 12]), None, "labels").tolist() == [-1, 12]   # no range to check
    cases = [
        ((np.zeros((4, 1, 1), np.int64), 10, 4), "test labels: expected 4 labels, one per image, got shape (4, 1, 1)"),
        ((indices[:3], 10, 4), "test labels: expected 4 labels, one per image, got shape (3,)"),
        ((rows[:, :9], 10, 4), "test labels: one-hot labels must have 10 columns, got 9"),
        ((indices.astype(np.float32), 10, None), "test labels: labels must be (N,) integers or (N, K) one-hot "
                                                  "rows, got shape (4,) dtype float32"),
        ((np.array(3), 10, None), "test labels: labels must be (N,) integers or (N, K) one-hot rows, got shape () "
                                  "dtype int64"),
        ((np.zeros((2, 2, 2), np.int64), None, None), "got shape (2, 2, 2) dtype int64"),
        ((np.array([3, -1, 2]), 10, 3), "test labels: class indices must lie in 0..9, got values from -1 to 3"),
        ((np.array([3, 10, 2]), 10, None), "test labels: class indices must lie in 0..9, got values from 2 to 10"),
    ]
    for (t, classes, n), message in cases:
        with pytest.raises(ShapeError) as error:
            host_class_labels(t, classes, "test labels", n=n)
        assert message in str(error.value), (t.shape, str(error.value))


# ------------------------------------------- the whole-batch layout, padding, the messages


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_whole_batch_im2col_and_col2im_are_the_book_matrix_transposed(backend, rng, geometry):
    """`im2col_cnhw` is the book's ``(N*OH*OW, C*FH*FW)`` matrix transposed, and `col2im_cnhw`
    adds a ``(C*FH*FW, N*OH*OW)`` matrix back into the images as the book's col2im does."""
    n, c, h, w, fh, fw, stride, pad = geometry
    out_h, out_w = conv_output_size(h, fh, stride, pad), conv_output_size(w, fw, stride, pad)
    x = rng.standard_normal((n, c, h, w))
    col = im2col_cnhw(backend.asarray(x, "float64"), fh, fw, stride, pad, out_h, out_w)
    np.testing.assert_array_equal(backend.to_numpy(col), naive_im2col(x, fh, fw, stride, pad).T)
    y = rng.standard_normal((c * fh * fw, n * out_h * out_w))
    back = backend.to_numpy(col2im_cnhw(backend.asarray(y, "float64"), (n, c, h, w), fh, fw, stride, pad, out_h, out_w))
    np.testing.assert_allclose(back, naive_col2im(y.T, (n, c, h, w), fh, fw, stride, pad), rtol=1e-12, atol=1e-12)


def test_pad_nchw_pads_both_spatial_axes_on_each_side_with_the_fill(backend):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    padded = backend.to_numpy(pad_nchw(backend.asarray(x), 2, fill=-7.0))
    assert padded.shape == (2, 3, 8, 9) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded, np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=-7.0))
    assert pad_nchw(x, 0) is x


def test_im2col_and_col2im_default_to_stride_1_and_no_padding(rng):
    x = rng.standard_normal((2, 2, 5, 4))
    np.testing.assert_array_equal(im2col(x, 3, 2), im2col(x, 3, 2, 1, 0))
    y = rng.standard_normal((2 * 3 * 3, 2 * 3 * 2))
    np.testing.assert_array_equal(col2im(y, x.shape, 3, 2), col2im(y, x.shape, 3, 2, 1, 0))


@pytest.mark.parametrize("call, error, message", [
    (lambda: conv_output_size(5, 3, stride=0), ConfigError, "convolution: stride must be an integer >= 1, got 0"),
    (lambda: conv_output_size(5, 3, pad=True), ConfigError, "convolution: pad must be an integer >= 0, got True"),
    (lambda: conv_output_size(5, 3, pad=1.5), ConfigError, "convolution: pad must be an integer >= 0, got 1.5"),
    (lambda: conv_output_size(5, 3, pad="1"), ConfigError, "convolution: pad must be an integer >= 0, got '1'"),
    (lambda: conv_output_size(5, 10, pad=2), ShapeError,
     "convolution: window of size 10 does not fit an input of size 5 with pad 2 (expected 1 <= window <= 9)"),
    (lambda: im2col(np.zeros((2, 5, 5)), 3, 3), ShapeError,
     "im2col: expected a 4-D input (N, C, H, W), got shape (2, 5, 5)"),
    (lambda: im2col(np.zeros((1, 1, 2, 5)), 3, 3), ShapeError, "im2col (height): window of size 3 does not fit"),
    (lambda: im2col(np.zeros((1, 1, 5, 2)), 3, 3), ShapeError, "im2col (width): window of size 3 does not fit"),
    (lambda: col2im(np.zeros((9, 9)), (1, 5, 5), 3, 3), ShapeError,
     "col2im: input_shape must be (N, C, H, W), got (1, 5, 5)"),
    (lambda: col2im(np.zeros((9, 9)), (1, 1, 2, 5), 3, 3), ShapeError,
     "col2im (height): window of size 3 does not fit"),
    (lambda: col2im(np.zeros((9, 9)), (1, 1, 5, 2), 3, 3), ShapeError,
     "col2im (width): window of size 3 does not fit"),
])
def test_geometry_errors_say_where_and_what_was_expected(call, error, message):
    with pytest.raises(error) as raised:
        call()
    assert str(raised.value).startswith(message), str(raised.value)
