"""SimpleConvNet as a whole: gradient check in float64, dtypes, identical initialisation on
every backend, batched accuracy, a small training run that must learn, and (hypothesis) the
whole network's gradient against a directional difference over random seeds and geometries."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpcnn.errors import ConfigError, DTypeError, ShapeError
from xpcnn.models import SimpleConvNet
from xpcnn.nn.optim import AdaGrad

from helpers import SEEDS, directional_derivatives, make_learnable_set, numerical_gradient, relative_error

NETS = [
    # input_dim, conv_param
    ((1, 10, 10), {"filter_num": 3, "filter_size": 3, "pad": 0, "stride": 1}),
    ((2, 8, 10), {"filter_num": 2, "filter_size": 3, "pad": 1, "stride": 1}),    # 2 channels, pad 1, non-square
    ((1, 13, 13), {"filter_num": 2, "filter_size": 3, "pad": 0, "stride": 2}),   # stride 2
    ((1, 8, 8), {"filter_num": 2, "filter_size": 5, "pad": 2, "stride": 1}),     # pad 2
]


def small_net(backend, input_dim=(1, 10, 10), conv_param=None, dtype="float64", seed=0, **kw):
    conv_param = conv_param or {"filter_num": 3, "filter_size": 3, "pad": 0, "stride": 1}
    return SimpleConvNet(input_dim, conv_param, hidden_size=kw.pop("hidden_size", 6),
                         output_size=kw.pop("output_size", 4), weight_init_std=kw.pop("weight_init_std", 0.3),
                         backend=backend, dtype=dtype, seed=seed, **kw)


@pytest.mark.parametrize("input_dim, conv_param", NETS)
def test_simple_conv_net_gradient_check(backend, rng, input_dim, conv_param):
    net = small_net(backend, input_dim, conv_param)
    x_host = rng.standard_normal((3, *input_dim))
    t_host = rng.integers(0, 4, 3)
    x, t = backend.asarray(x_host, "float64"), backend.asarray(t_host)
    grads = net.gradient(x, t)
    host_params = {k: backend.to_numpy(v).copy() for k, v in net.params.items()}

    for key in net.params:
        def loss_at(value, key=key):
            probe = small_net(backend, input_dim, conv_param)
            probe.set_params({**host_params, key: value})
            return float(backend.to_numpy(probe.loss(x, t)))

        numeric = numerical_gradient(loss_at, host_params[key].copy())
        err = relative_error(backend.to_numpy(grads[key]), numeric,
                             f"SimpleConvNet {input_dim} {key} on {backend.name}")
        assert err < 1e-6, f"{key}: relative error {err}"


def test_float32_everywhere(backend, rng):
    net = SimpleConvNet(backend=backend, seed=0)
    f32 = backend.xp.float32
    assert all(p.dtype == f32 for p in net.params.values())
    x = backend.asarray(rng.random((4, 1, 28, 28)), "float32")
    grads = net.gradient(x, backend.asarray(rng.integers(0, 10, 4)))
    assert all(g.dtype == f32 for g in grads.values())
    assert net.last_layer.loss.dtype == f32
    assert net.predict(x).dtype == f32


def test_float64_available(backend):
    net = SimpleConvNet(backend=backend, dtype="float64", seed=0)
    assert all(p.dtype == backend.xp.float64 for p in net.params.values())


def test_same_seed_same_weights_on_every_backend(backend):
    reference = SimpleConvNet(backend="cpu", seed=7)
    other = SimpleConvNet(backend=backend, seed=7)
    for key in reference.params:
        np.testing.assert_array_equal(backend.to_numpy(other.params[key]), reference.params[key])
    assert reference.params["W1"].shape == (30, 1, 5, 5) and reference.params["W2"].shape == (4320, 100)


def test_optimizer_updates_reach_the_layers(backend, rng):
    net = small_net(backend)
    before = backend.to_numpy(net.layers["Conv1"].W).copy()
    x = backend.asarray(rng.standard_normal((2, 1, 10, 10)), "float64")
    AdaGrad(0.1).update(net.params, net.gradient(x, backend.asarray(np.array([0, 1]))))
    assert net.layers["Conv1"].W is net.params["W1"]
    assert not np.array_equal(backend.to_numpy(net.layers["Conv1"].W), before)


def test_accuracy_is_batched_and_accepts_one_hot(backend, rng):
    net = small_net(backend, dtype="float32")
    x_host = rng.standard_normal((23, 1, 10, 10)).astype(np.float32)
    t_host = rng.integers(0, 4, 23)
    expected = np.mean(np.argmax(backend.to_numpy(net.predict(backend.asarray(x_host, "float32"))), axis=1) == t_host)
    x, t = backend.asarray(x_host, "float32"), backend.asarray(t_host)
    for batch_size in (1, 5, 100):
        assert net.accuracy(x, t, batch_size=batch_size) == pytest.approx(expected)
    assert net.accuracy(x, backend.asarray(np.eye(4)[t_host], "float32"), batch_size=7) == pytest.approx(expected)
    assert net.accuracy(x_host, t_host, batch_size=10) == pytest.approx(expected)   # host arrays move batch by batch


def test_accuracy_rejects_bad_arguments(rng):
    net = small_net("cpu", dtype="float32")
    x = rng.standard_normal((4, 1, 10, 10)).astype(np.float32)
    with pytest.raises(ShapeError, match="4 images but 3 labels"):
        net.accuracy(x, np.zeros(3, dtype=np.int64))
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        net.accuracy(x, np.zeros(4, dtype=np.int64), batch_size=0)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"input_dim": (1, 28, 28), "conv_param": {"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 2}},
     ShapeError, "stride"),
    ({"input_dim": (1, 27, 27)}, ShapeError, "2x2 pooling"),
    ({"input_dim": (28, 28)}, ShapeError, r"input_dim must be \(C, H, W\)"),
    ({"conv_param": {"filters": 3}}, ConfigError, "unknown conv_param keys"),
    ({"hidden_size": 0}, ConfigError, "hidden_size must be an integer >= 1"),
    ({"dtype": "float16"}, DTypeError, "dtype must be one of"),
])
def test_simple_conv_net_rejects_bad_configuration(kwargs, error, words):
    with pytest.raises(error, match=words):
        SimpleConvNet(**kwargs)


@pytest.mark.parametrize("steps", [300])
def test_small_training_run_learns(backend, rng, steps):
    if backend.name == "array_api_strict":
        steps = 60   # the strict namespace is slow; it only has to prove the loop runs there
    x_host, t_host = make_learnable_set(rng, 400)
    x, t = backend.asarray(x_host, "float32"), backend.asarray(t_host)
    net = SimpleConvNet((1, 12, 12), {"filter_num": 6, "filter_size": 3, "pad": 1, "stride": 1}, hidden_size=20,
                        output_size=4, weight_init_std=0.1, backend=backend, seed=3)
    opt = AdaGrad(lr=0.05)
    acc_before = net.accuracy(x, t)
    batch_rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        idx = backend.asarray(batch_rng.choice(400, 20, replace=False))
        xb, tb = backend.xp.take(x, idx, axis=0), backend.xp.take(t, idx, axis=0)
        opt.update(net.params, net.gradient(xb, tb))
        losses.append(float(backend.to_numpy(net.last_layer.loss)))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    acc_after = net.accuracy(x, t)
    assert acc_after > acc_before + 0.2 and acc_after > (0.9 if steps >= 300 else 0.5), (acc_before, acc_after)


def test_pooling_before_relu_equals_the_books_order(rng):
    """SimpleConvNet pools before its first ReLU (they commute): same loss, bit-identical gradients."""
    from xpcnn.nn.layers import Pooling, ReLU

    net = SimpleConvNet(seed=4, dtype="float64")
    books = SimpleConvNet(seed=4, dtype="float64")
    layers = books.layers
    books.layers = {"Conv1": layers["Conv1"], "Relu1": ReLU(), "Pool1": Pooling(2, 2, 2),
                    **{k: v for k, v in layers.items() if k not in ("Conv1", "Relu1", "Pool1")}}
    assert list(net.layers)[:3] == ["Conv1", "Pool1", "Relu1"]
    x, t = rng.standard_normal((6, 1, 28, 28)), rng.integers(0, 10, 6)
    grads, book_grads = net.gradient(x, t), books.gradient(x, t)
    assert float(net.last_layer.loss) == float(books.last_layer.loss)
    for key in grads:
        np.testing.assert_array_equal(grads[key], book_grads[key])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=SEEDS, batch=st.integers(1, 4), filter_size=st.sampled_from([1, 3, 5]), pad=st.integers(0, 2))
def test_property_network_gradient_directional(seed, batch, filter_size, pad):
    """The whole float64 SimpleConvNet: analytic gradients agree with a directional difference."""
    size = 8 + (filter_size + 1) % 2                   # conv output must be even for the 2x2 pool
    # pad >= filter_size would make all-padding windows whose outputs equal the bias exactly: ties in
    # the max pooling, where the loss has no gradient. Keep every window on at least one real pixel.
    pad = min(pad, filter_size - 1)
    net = SimpleConvNet(input_dim=(2, size, size), conv_param={"filter_num": 3, "filter_size": filter_size, "pad": pad},
                        hidden_size=6, output_size=4, weight_init_std=0.3, dtype="float64", seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 2, size, size))
    t = rng.integers(0, 4, batch)
    grads = net.gradient(x, t)
    keys = sorted(net.params)
    directions = [rng.standard_normal(net.params[k].shape) for k in keys]
    analytic, numeric = directional_derivatives(lambda: float(net.loss(x, t)), [grads[k] for k in keys],
                                                [net.params[k] for k in keys], directions, h=1e-6)
    # ReLU kinks and max switches make a rare non-smooth point possible; a 1e-6 step crosses one
    # with vanishing probability, and then only by a tiny amount.
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-6)
