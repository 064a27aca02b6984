"""Every layer on every backend: against loop references, numerical gradients (float64),
dtype preservation, no writes into the caller's arrays, and validation errors."""

import numpy as np
import pytest

from xpcnn.backend import get_backend
from xpcnn.errors import BackendMismatch, ConfigError, DTypeError, ShapeError
from xpcnn.nn.layers import Affine, Convolution, Pooling, ReLU, SoftmaxWithLoss

from helpers import naive_conv, naive_maxpool, numerical_gradient, relative_error, tie_free

TOL = 1e-6

CONV_GEOMETRIES = [
    # (N, C, H, W, FN, FH, FW, stride, pad)
    (2, 1, 6, 6, 3, 3, 3, 1, 0),
    (2, 3, 7, 7, 2, 3, 3, 2, 1),      # stride 2, pad 1, several channels
    (1, 2, 5, 7, 3, 3, 2, 1, 2),      # pad 2, non-square input and filter
    (2, 2, 9, 6, 2, 2, 3, 1, 1),
    (2, 3, 6, 6, 4, 3, 3, 1, 1),      # several channels, stride 1: dx as a transposed convolution
    (2, 2, 5, 5, 3, 3, 3, 1, 2),      # the same with pad 2 (DeepConvNet's conv4)
]

POOL_GEOMETRIES = [
    # (N, C, H, W, PH, PW, stride, pad)
    (2, 3, 6, 6, 2, 2, 2, 0),
    (1, 2, 7, 7, 3, 3, 2, 0),          # stride != size (overlapping windows)
    (2, 1, 5, 7, 2, 3, 1, 0),          # non-square, stride 1
    (1, 2, 7, 7, 3, 3, 3, 1),          # padded: padding must never win
    (1, 1, 6, 8, 2, 2, 2, 1),
]


def _conv_loss(backend, x, W, b, stride, pad, weights):
    layer = Convolution(backend.asarray(W, "float64"), backend.asarray(b, "float64"), stride, pad)
    out = layer.forward(backend.asarray(x, "float64"))
    return float(backend.to_numpy(backend.xp.sum(out * backend.asarray(weights, "float64"))))


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_convolution_forward_matches_loop(backend, rng, geometry):
    n, c, h, w, fn, fh, fw, stride, pad = geometry
    x, W, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((fn, c, fh, fw)), rng.standard_normal(fn)
    layer = Convolution(backend.asarray(W, "float64"), backend.asarray(b, "float64"), stride, pad)
    out = backend.to_numpy(layer.forward(backend.asarray(x, "float64")))
    np.testing.assert_allclose(out, naive_conv(x, W, b, stride, pad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
def test_convolution_gradients(backend, rng, geometry):
    n, c, h, w, fn, fh, fw, stride, pad = geometry
    x, W, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((fn, c, fh, fw)), rng.standard_normal(fn)
    layer = Convolution(backend.asarray(W, "float64"), backend.asarray(b, "float64"), stride, pad)
    out = layer.forward(backend.asarray(x, "float64"))
    dout = rng.standard_normal(tuple(out.shape))
    dx = backend.to_numpy(layer.backward(backend.asarray(dout, "float64")))

    def loss(x_=x, W_=W, b_=b):
        return _conv_loss(backend, x_, W_, b_, stride, pad, dout)

    where = f"Convolution {geometry} on {backend.name}"
    assert relative_error(dx, numerical_gradient(lambda v: loss(x_=v), x.copy()), where) < TOL
    assert relative_error(backend.to_numpy(layer.dW), numerical_gradient(lambda v: loss(W_=v), W.copy()), where) < TOL
    assert relative_error(backend.to_numpy(layer.db), numerical_gradient(lambda v: loss(b_=v), b.copy()), where) < TOL


def test_convolution_without_input_grad_skips_dx(backend, rng):
    W, b = backend.asarray(rng.standard_normal((2, 1, 3, 3)), "float64"), backend.asarray(np.zeros(2), "float64")
    layer = Convolution(W, b)
    layer.need_input_grad = False
    out = layer.forward(backend.asarray(rng.standard_normal((2, 1, 5, 5)), "float64"))
    assert layer.backward(backend.xp.ones_like(out)) is None
    assert layer.dW.shape == W.shape and layer.db.shape == b.shape


@pytest.mark.parametrize("geometry", POOL_GEOMETRIES)
def test_pooling_forward_matches_loop(backend, rng, geometry):
    n, c, h, w, ph, pw, stride, pad = geometry
    x = rng.standard_normal((n, c, h, w)) - 5.0   # all negative: a zero pad would win
    out = backend.to_numpy(Pooling(ph, pw, stride, pad).forward(backend.asarray(x, "float64")))
    np.testing.assert_array_equal(out, naive_maxpool(x, ph, pw, stride, pad))


@pytest.mark.parametrize("geometry", POOL_GEOMETRIES)
def test_pooling_gradient(backend, rng, geometry):
    n, c, h, w, ph, pw, stride, pad = geometry
    x = tie_free(rng, (n, c, h, w))
    layer = Pooling(ph, pw, stride, pad)
    out = layer.forward(backend.asarray(x, "float64"))
    dout = rng.standard_normal(tuple(out.shape))
    dx = backend.to_numpy(layer.backward(backend.asarray(dout, "float64")))

    def loss(v):
        pooled = Pooling(ph, pw, stride, pad).forward(backend.asarray(v, "float64"))
        return float(np.sum(backend.to_numpy(pooled) * dout))

    assert relative_error(dx, numerical_gradient(loss, x.copy()), f"Pooling {geometry} on {backend.name}") < TOL


def test_pooling_ties_send_gradient_to_first_max_only(backend):
    x = np.ones((1, 1, 2, 2))
    layer = Pooling(2, 2, 2)
    layer.forward(backend.asarray(x, "float64"))
    dx = backend.to_numpy(layer.backward(backend.asarray(np.full((1, 1, 1, 1), 3.0), "float64")))
    np.testing.assert_array_equal(dx, [[[[3.0, 0.0], [0.0, 0.0]]]])


@pytest.mark.parametrize("x_shape", [(4, 6), (3, 2, 3, 2)])
def test_affine_gradients(backend, rng, x_shape):
    x, W, b = (rng.standard_normal(x_shape), rng.standard_normal((6 if len(x_shape) == 2 else 12, 5)),
               rng.standard_normal(5))
    layer = Affine(backend.asarray(W, "float64"), backend.asarray(b, "float64"))
    out = layer.forward(backend.asarray(x, "float64"))
    assert tuple(out.shape) == (x_shape[0], 5)
    dout = rng.standard_normal((x_shape[0], 5))
    dx = backend.to_numpy(layer.backward(backend.asarray(dout, "float64")))
    assert dx.shape == x_shape

    def loss(x_=x, W_=W, b_=b):
        lay = Affine(backend.asarray(W_, "float64"), backend.asarray(b_, "float64"))
        return float(np.sum(backend.to_numpy(lay.forward(backend.asarray(x_, "float64"))) * dout))

    where = f"Affine {x_shape} on {backend.name}"
    assert relative_error(dx, numerical_gradient(lambda v: loss(x_=v), x.copy()), where) < TOL
    assert relative_error(backend.to_numpy(layer.dW), numerical_gradient(lambda v: loss(W_=v), W.copy()), where) < TOL
    assert relative_error(backend.to_numpy(layer.db), numerical_gradient(lambda v: loss(b_=v), b.copy()), where) < TOL


def test_relu_gradient_and_no_writes_into_dout(backend, rng):
    x = rng.standard_normal((3, 4))
    x[np.abs(x) < 0.05] = 0.5   # keep away from the kink
    layer = ReLU()
    out = backend.to_numpy(layer.forward(backend.asarray(x, "float64")))
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    dout_host = rng.standard_normal((3, 4))
    dout = backend.asarray(dout_host, "float64")
    dx = backend.to_numpy(layer.backward(dout))
    np.testing.assert_array_equal(backend.to_numpy(dout), dout_host)   # the book's ReLU zeroed dout
    numeric = numerical_gradient(lambda v: float(np.sum(np.maximum(v, 0) * dout_host)), x.copy())
    assert relative_error(dx, numeric, f"ReLU on {backend.name}") < TOL


@pytest.mark.parametrize("labels", ["indices", "one_hot"])
def test_softmax_with_loss_gradient(backend, rng, labels):
    x = rng.standard_normal((5, 4))
    t_idx = rng.integers(0, 4, 5)
    t_host = t_idx if labels == "indices" else np.eye(4)[t_idx]

    def to_t():
        return backend.asarray(t_host) if labels == "indices" else backend.asarray(t_host, "float64")

    layer = SoftmaxWithLoss()
    loss = layer.forward(backend.asarray(x, "float64"), to_t())
    dx = backend.to_numpy(layer.backward())

    def f(v):
        return float(backend.to_numpy(SoftmaxWithLoss().forward(backend.asarray(v, "float64"), to_t())))

    assert float(backend.to_numpy(loss)) == pytest.approx(f(x))
    assert relative_error(dx, numerical_gradient(f, x.copy()), f"SoftmaxWithLoss {labels} on {backend.name}") < TOL


def test_layers_keep_float32_and_leave_inputs_alone(backend, rng):
    """float32 in, float32 out, for outputs and every gradient; inputs are never modified."""
    f32 = backend.xp.float32

    def arr(shape):
        return backend.asarray(rng.standard_normal(shape), "float32")

    x_host = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    x = backend.asarray(x_host, "float32")
    conv = Convolution(arr((3, 2, 3, 3)), arr((3,)), 1, 1)
    pool, relu, affine, loss = Pooling(2, 2, 2), ReLU(), Affine(arr((27, 4)), arr((4,))), SoftmaxWithLoss()
    h1 = conv.forward(x)
    h2 = relu.forward(h1)
    h3 = pool.forward(h2)
    scores = affine.forward(h3)
    value = loss.forward(scores, backend.asarray(np.array([1, 3])))
    grads = [loss.backward()]
    grads.append(affine.backward(grads[-1]))
    grads.append(pool.backward(grads[-1]))
    grads.append(relu.backward(grads[-1]))
    grads.append(conv.backward(grads[-1]))
    for a in [h1, h2, h3, scores, value, *grads, conv.dW, conv.db, affine.dW, affine.db]:
        assert a.dtype == f32
    np.testing.assert_array_equal(backend.to_numpy(x), x_host)


# ------------------------------------------------------------------------ validation

def _conv(backend, shape=(2, 1, 3, 3), stride=1, pad=0, dtype="float32"):
    return Convolution(backend.asarray(np.ones(shape), dtype), backend.asarray(np.zeros(shape[0]), dtype), stride, pad)


@pytest.mark.parametrize("make, x_shape, error, words", [
    (lambda be: _conv(be), (2, 3, 8, 8), ShapeError, "3 channels, but the filters expect 1"),
    (lambda be: _conv(be), (2, 8, 8), ShapeError, "expected a 4-D input"),
    (lambda be: _conv(be, stride=2), (2, 1, 8, 8), ShapeError, "not a multiple of stride 2"),
    (lambda be: _conv(be), (2, 1, 2, 2), ShapeError, "does not fit"),
    (lambda be: Pooling(2, 2, 2), (1, 1, 5, 5), ShapeError, "not a multiple of stride 2"),
    (lambda be: Pooling(2, 2, 2), (5, 5), ShapeError, "expected a 4-D input"),
    (lambda be: Affine(be.asarray(np.ones((6, 2)), "float32"), be.asarray(np.zeros(2), "float32")), (3, 5),
     ShapeError, "5 features per sample"),
])
def test_layer_rejects_bad_geometry(backend, make, x_shape, error, words):
    with pytest.raises(error, match=words):
        make(backend).forward(backend.asarray(np.ones(x_shape), "float32"))


@pytest.mark.parametrize("kwargs, words", [
    ({"stride": 0}, "stride must be an integer >= 1, got 0"),
    ({"stride": -1}, "stride must be an integer >= 1, got -1"),
    ({"pad": -1}, "pad must be an integer >= 0, got -1"),
])
def test_convolution_and_pooling_reject_bad_stride_pad(backend, kwargs, words):
    with pytest.raises(ConfigError, match=words):
        _conv(backend, **kwargs)
    with pytest.raises(ConfigError, match=words):
        Pooling(2, 2, **kwargs)


def test_pooling_rejects_pad_as_large_as_window():
    with pytest.raises(ConfigError, match="pad must be smaller than the window"):
        Pooling(2, 2, 2, 2)


def test_layers_reject_wrong_parameter_shapes(backend):
    with pytest.raises(ShapeError, match=r"W must be \(FN, C, FH, FW\)"):
        Convolution(backend.asarray(np.ones((2, 3, 3)), "float32"), backend.asarray(np.zeros(2), "float32"))
    with pytest.raises(ShapeError, match=r"b must have shape \(2,\)"):
        Convolution(backend.asarray(np.ones((2, 1, 3, 3)), "float32"), backend.asarray(np.zeros(3), "float32"))
    with pytest.raises(ShapeError, match=r"b must have shape \(4,\)"):
        Affine(backend.asarray(np.ones((3, 4)), "float32"), backend.asarray(np.zeros(3), "float32"))


@pytest.mark.parametrize("bad_dtype", ["int64", "float16", "float64"])
def test_layers_reject_other_dtypes(bad_dtype):
    conv = _conv(get_backend("numpy"))
    with pytest.raises(DTypeError, match=f"expected float32 input.*got {bad_dtype}"):
        conv.forward(np.ones((1, 1, 4, 4), dtype=bad_dtype))


def test_layers_reject_mixed_backends():
    strict = get_backend("array_api_strict")
    conv = _conv(strict)
    with pytest.raises(BackendMismatch, match="different backends"):
        conv.forward(np.ones((1, 1, 4, 4), dtype=np.float32))


def test_softmax_with_loss_rejects_bad_labels(backend):
    x = backend.asarray(np.zeros((3, 4)), "float32")
    layer = SoftmaxWithLoss()
    with pytest.raises(ShapeError, match="expected 3 labels for 3 samples, got 2"):
        layer.forward(x, backend.asarray(np.array([0, 1])))
    with pytest.raises(ShapeError, match=r"one-hot labels must have shape \(3, 4\), got \(3, 5\)"):
        layer.forward(x, backend.asarray(np.zeros((3, 5)), "float32"))
    with pytest.raises(ShapeError, match="must be integers"):
        layer.forward(x, backend.asarray(np.zeros(3), "float32"))
