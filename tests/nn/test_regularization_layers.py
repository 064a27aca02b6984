"""Chapter 6 layers on every backend: Dropout (fixed mask), BatchNormalization (2-D per
feature, 4-D per channel, 4-D per activation) and Sigmoid against float64 numerical
gradients; BatchNormalization against torch.nn.functional.batch_norm (training mode and
running statistics); the backend random source; validation errors."""

import numpy as np
import pytest

from xpcnn.backend import RandomSource, get_backend
from xpcnn.errors import ConfigError, DTypeError, ShapeError
from xpcnn.nn.layers import BatchNormalization, Dropout, Sigmoid

from helpers import numerical_gradient, relative_error

TOL = 1e-6


def _weighted_sum(backend, out, weights):
    return float(backend.to_numpy(backend.xp.sum(out * backend.asarray(weights, "float64"))))


# ------------------------------------------------------------------ random source

def test_random_source_is_seeded_and_resumable(backend):
    a, b = RandomSource(backend, 7), RandomSource(backend, 7)
    first = backend.to_numpy(a.uniform((3, 4), backend.xp.float64))
    np.testing.assert_array_equal(first, backend.to_numpy(b.uniform((3, 4), backend.xp.float64)))
    assert first.min() >= 0 and first.max() < 1
    snapshot = a.state()
    expected = backend.to_numpy(a.uniform((5,), backend.xp.float32))
    c = RandomSource(backend, 99)
    c.set_state(snapshot)
    got = backend.to_numpy(c.uniform((5,), backend.xp.float32))
    if backend.name != "cupy":          # NumPy/strict (PCG64) and torch resume bit for bit
        np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.float32


def test_random_source_refuses_a_bad_state():
    with pytest.raises(ConfigError, match="snapshot"):
        RandomSource(get_backend("cpu"), 0).set_state({"nope": 1})


# ------------------------------------------------------------------ Dropout

def test_dropout_gradient_with_a_fixed_mask(backend, rng):
    x = rng.standard_normal((4, 6))
    source = RandomSource(backend, 3)
    snapshot = source.state()
    layer = Dropout(0.4, rng=source)
    dout = rng.standard_normal(x.shape)

    def loss(v):
        source.set_state(snapshot)   # the same mask on every evaluation
        return _weighted_sum(backend, layer.forward(backend.asarray(v, "float64"), train_flg=True), dout)

    loss(x)
    dx = backend.to_numpy(layer.backward(backend.asarray(dout, "float64")))
    mask = backend.to_numpy(layer.mask)
    assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(dx, dout * mask)
    assert relative_error(dx, numerical_gradient(loss, x.copy()), f"Dropout on {backend.name}") < TOL


def test_dropout_keeps_about_one_minus_ratio_and_scales_at_inference(backend):
    layer = Dropout(0.3, rng=RandomSource(backend, 1))
    x = backend.asarray(np.ones((200, 100)), "float32")
    kept = backend.to_numpy(layer.forward(x, train_flg=True)).mean()
    assert abs(kept - 0.7) < 0.02
    np.testing.assert_allclose(backend.to_numpy(layer.forward(x, train_flg=False)), 0.7, rtol=1e-6)
    assert backend.to_numpy(layer.forward(x)).dtype == np.float32


def test_dropout_ratio_zero_is_the_identity(backend, rng):
    x = backend.asarray(rng.standard_normal((3, 5)), "float64")
    layer = Dropout(0.0)
    np.testing.assert_array_equal(backend.to_numpy(layer.forward(x, True)), backend.to_numpy(x))
    np.testing.assert_array_equal(backend.to_numpy(layer.backward(x)), backend.to_numpy(x))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5", True, float("nan")])
def test_dropout_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        Dropout(ratio)


@pytest.mark.parametrize("flag", ["False", 0, None, 1.0])
def test_train_flg_must_be_a_bool(flag):
    x = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(ConfigError, match="train_flg must be True or False"):
        Dropout(0.5).forward(x, flag)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(ConfigError, match="train_flg must be True or False"):
        BatchNormalization(gamma, beta).forward(x, flag)


def test_dropout_refuses_integer_input():
    with pytest.raises(DTypeError, match="float32 or float64"):
        Dropout(0.5).forward(np.ones((2, 3), dtype=np.int64))


# ------------------------------------------------------------------ Sigmoid

def test_sigmoid_gradient(backend, rng):
    x, dout = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    layer = Sigmoid()
    out = backend.to_numpy(layer.forward(backend.asarray(x, "float64")))
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-x)), rtol=1e-12)
    dx = backend.to_numpy(layer.backward(backend.asarray(dout, "float64")))
    num = numerical_gradient(lambda v: _weighted_sum(backend, Sigmoid().forward(backend.asarray(v, "float64")), dout),
                             x.copy())
    assert relative_error(dx, num, f"Sigmoid on {backend.name}") < TOL


# ------------------------------------------------------------------ BatchNormalization

BN_CASES = [  # (input shape, per_activation, gamma size)
    ((5, 4), False, 4),
    ((4, 3, 3, 2), False, 3),
    ((4, 2, 2, 3), True, 12),
]


@pytest.mark.parametrize("shape,per_activation,features", BN_CASES)
def test_batchnorm_gradients_in_training_mode(backend, rng, shape, per_activation, features):
    x = rng.standard_normal(shape) * 2 + 0.5
    gamma, beta = rng.standard_normal(features) + 1.5, rng.standard_normal(features)
    dout = rng.standard_normal(shape)

    def make(g, b):
        return BatchNormalization(backend.asarray(g, "float64"), backend.asarray(b, "float64"),
                                  per_activation=per_activation)

    def loss(x_=x, g_=gamma, b_=beta):
        return _weighted_sum(backend, make(g_, b_).forward(backend.asarray(x_, "float64"), True), dout)

    layer = make(gamma, beta)
    out = backend.to_numpy(layer.forward(backend.asarray(x, "float64"), True))
    assert out.shape == shape
    dx = backend.to_numpy(layer.backward(backend.asarray(dout, "float64")))
    where = f"BatchNormalization {shape} per_activation={per_activation} on {backend.name}"
    assert relative_error(dx, numerical_gradient(lambda v: loss(x_=v), x.copy()), where) < TOL
    assert relative_error(backend.to_numpy(layer.dgamma), numerical_gradient(lambda v: loss(g_=v), gamma.copy()),
                          where) < TOL
    assert relative_error(backend.to_numpy(layer.dbeta), numerical_gradient(lambda v: loss(b_=v), beta.copy()),
                          where) < TOL


@pytest.mark.parametrize("shape,per_activation,features", BN_CASES)
def test_batchnorm_matches_torch_training_and_running_stats(rng, shape, per_activation, features):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.standard_normal(shape) * 3 - 1
    gamma, beta, dout = rng.standard_normal(features), rng.standard_normal(features), rng.standard_normal(shape)
    layer = BatchNormalization(gamma.copy(), beta.copy(), momentum=0.8, per_activation=per_activation, eps=1e-5)
    rm, rv = np.zeros(features), np.ones(features)
    rm_t, rv_t = torch.zeros(features, dtype=torch.float64), torch.ones(features, dtype=torch.float64)
    x_t = torch.tensor(x.reshape(shape[0], -1) if per_activation else x, requires_grad=True)
    g_t, b_t = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    out_t = F.batch_norm(x_t, rm_t, rv_t, g_t, b_t, training=True, momentum=0.2, eps=1e-5)
    out_t.backward(torch.tensor(dout.reshape(tuple(out_t.shape))))

    out = layer.forward(x, True)
    dx = layer.backward(dout)
    np.testing.assert_allclose(out, out_t.detach().numpy().reshape(shape), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, x_t.grad.numpy().reshape(shape), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.dgamma, g_t.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.dbeta, b_t.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, rm_t.numpy(), rtol=1e-12, atol=1e-14)
    # PyTorch's running variance uses the unbiased batch variance, the book's the biased one:
    # the updates differ by exactly m / (m - 1), m the values per feature.
    m = x.size // features
    np.testing.assert_allclose((layer.running_var - 0.8 * rv) * m / (m - 1), rv_t.numpy() - 0.8 * rv, rtol=1e-10)
    assert not np.allclose(rm, layer.running_mean)
    # Inference uses the running statistics.
    rv_book = layer.running_var
    expected = F.batch_norm(torch.tensor(x.reshape(shape[0], -1) if per_activation else x),
                            torch.tensor(layer.running_mean), torch.tensor(rv_book), torch.tensor(gamma),
                            torch.tensor(beta), training=False, eps=1e-5)
    np.testing.assert_allclose(layer.forward(x, False), expected.numpy().reshape(shape), rtol=1e-10, atol=1e-12)


def test_batchnorm_keeps_float32(backend, rng):
    layer = BatchNormalization(backend.asarray(np.ones(3), "float32"), backend.asarray(np.zeros(3), "float32"))
    out = layer.forward(backend.asarray(rng.standard_normal((4, 3, 2, 2)), "float32"), True)
    assert backend.to_numpy(out).dtype == np.float32
    assert backend.to_numpy(layer.running_var).dtype == np.float32


def test_batchnorm_shape_errors():
    gamma, beta = np.ones(3), np.zeros(3)
    with pytest.raises(ShapeError, match="beta must have gamma's shape"):
        BatchNormalization(gamma, np.zeros(4))
    with pytest.raises(ShapeError, match="running_var"):
        BatchNormalization(gamma, beta, running_var=np.ones(2))
    with pytest.raises(ShapeError, match="1-D"):
        BatchNormalization(np.ones((3, 1)), beta)
    layer = BatchNormalization(gamma, beta)
    with pytest.raises(ShapeError, match="4 features per sample"):
        layer.forward(np.ones((2, 4)))
    with pytest.raises(ShapeError, match="2 channels, gamma has 3"):
        layer.forward(np.ones((2, 2, 3, 3)))
    with pytest.raises(ShapeError, match="2-D"):
        layer.forward(np.ones((2, 3, 4)))
    with pytest.raises(ShapeError, match="at least 2 values"):
        layer.forward(np.ones((1, 3)), True)
    with pytest.raises(DTypeError, match="float64"):
        layer.forward(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="momentum"):
        BatchNormalization(gamma, beta, momentum=1.5)
