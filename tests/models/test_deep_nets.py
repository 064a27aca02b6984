"""DeepConvNet and MultiLayerNetExtend: the book's parameter names and shapes, float64
gradient checks (every option on), PyTorch float64 twins from the same weights, seeded
Dropout on every backend, checkpoints (running statistics and the mask generator), errors."""

import sys

import numpy as np
import pytest

from xpcnn.errors import CheckpointError, ConfigError, ShapeError
from xpcnn.models import DeepConvNet, MultiLayerNetExtend, SimpleConvNet
from xpcnn.nn.optim import Adam
from xpcnn.training.checkpoint import build_from_checkpoint, load_checkpoint, restore, save_checkpoint

from helpers import REPO, relative_error

sys.path.insert(0, str(REPO / "scripts"))

TOL = 1e-6
SMALL_CONVS = {f"conv_param_{i}": {"filter_num": n} for i, n in enumerate((3, 3, 4, 4, 5, 5), start=1)}


def small_deep(backend="cpu", dtype="float64", seed=0, **kw):
    return DeepConvNet(input_dim=(1, 12, 12), hidden_size=6, output_size=4, backend=backend, dtype=dtype, seed=seed,
                       **{**SMALL_CONVS, **kw})


def _loss_with_fixed_masks(net, x, t):
    """The training loss with the Dropout masks of the first call on every call."""
    snapshot = net.rng.state() if net.rng is not None else None

    def loss(_):
        if snapshot is not None:
            net.rng.set_state(snapshot)
        return net.backend.to_float(net.loss(x, t) if not isinstance(net, MultiLayerNetExtend)
                                    else net.loss(x, t, train_flg=True))
    return loss, snapshot


def _check_all_gradients(net, x_host, t_host, where, entries=None, tol=TOL):
    """Every parameter's gradient against central differences (float64), on all its
    entries or on `entries` random ones per parameter (the deep net is costly to perturb)."""
    be = net.backend
    x, t = be.asarray(x_host, net.dtype), be.asarray(t_host)
    loss, snapshot = _loss_with_fixed_masks(net, x, t)
    if snapshot is not None:
        net.rng.set_state(snapshot)
    grads = {k: be.to_numpy(v) for k, v in net.gradient(x, t).items()}
    assert sorted(grads) == sorted(net.params)
    pick = np.random.default_rng(0)
    for key, param in net.params.items():
        host = be.to_numpy(param).copy()
        flat = host.reshape(-1)
        chosen = (np.arange(flat.size) if entries is None or flat.size <= entries
                  else pick.choice(flat.size, entries, replace=False))
        numeric = np.empty(chosen.size)
        for n, i in enumerate(chosen):
            values = []
            for delta in (1e-5, -1e-5):
                bumped = host.copy().reshape(-1)
                bumped[i] += delta
                net.params[key][...] = be.asarray(bumped.reshape(host.shape), net.dtype)
                values.append(loss(None))
            numeric[n] = (values[0] - values[1]) / 2e-5
        net.params[key][...] = be.asarray(host, net.dtype)
        analytic = grads[key].reshape(-1)[chosen]
        if np.linalg.norm(numeric) < 1e-9:      # e.g. a bias followed by batch norm: exactly 0
            assert np.abs(analytic).max() < 1e-9, key
        else:
            assert relative_error(analytic, numeric, f"{where} {key}") < tol, key


# ------------------------------------------------------------------ DeepConvNet

def test_deepconvnet_has_the_books_parameters():
    net = DeepConvNet(seed=0)
    shapes = {k: tuple(v.shape) for k, v in net.params.items()}
    assert shapes == {"W1": (16, 1, 3, 3), "b1": (16,), "W2": (16, 16, 3, 3), "b2": (16,),
                      "W3": (32, 16, 3, 3), "b3": (32,), "W4": (32, 32, 3, 3), "b4": (32,),
                      "W5": (64, 32, 3, 3), "b5": (64,), "W6": (64, 64, 3, 3), "b6": (64,),
                      "W7": (1024, 50), "b7": (50,), "W8": (50, 10), "b8": (10,)}
    # He initialisation: std sqrt(2 / fan_in), the book's pre_node_nums.
    for key, fan_in in (("W2", 16 * 9), ("W6", 64 * 9), ("W7", 64 * 4 * 4)):
        assert abs(np.std(net.params[key]) / np.sqrt(2.0 / fan_in) - 1) < 0.1
    assert net.params["W1"].dtype == np.float32
    assert net.config["conv_param_4"]["pad"] == 2


def test_deepconvnet_gradient_small_input(backend, rng):
    net = small_deep(backend)
    _check_all_gradients(net, rng.random((3, 1, 12, 12)), np.array([0, 3, 1]), f"DeepConvNet on {backend.name}",
                         entries=8)


def test_deepconvnet_same_weights_and_masks_on_every_backend(backend, rng):
    reference, net = small_deep("cpu"), small_deep(backend)
    for key, value in reference.params.items():
        np.testing.assert_array_equal(backend.to_numpy(net.params[key]), value)
    x, t = rng.random((4, 1, 12, 12)), np.array([0, 1, 2, 3])
    expected = reference.gradient(x, t)
    got = net.gradient(backend.asarray(x, "float64"), backend.asarray(t))
    if backend.name in ("cupy", "torch"):   # they draw their own masks: only finiteness compares
        assert all(np.isfinite(backend.to_numpy(v)).all() for v in got.values())
        return
    for key in expected:
        np.testing.assert_allclose(backend.to_numpy(got[key]), expected[key], rtol=1e-10, atol=1e-12)


def test_deepconvnet_matches_torch_float64():
    torch = pytest.importorskip("torch")
    from torch_models import TorchDeepConvNet

    net = DeepConvNet(dtype="float64", seed=3, dropout_ratio=0.0)
    rng = np.random.default_rng(5)
    x, t = rng.random((3, 1, 28, 28)), rng.integers(0, 10, 3)
    twin = TorchDeepConvNet({k: np.asarray(v) for k, v in net.params.items()}, dropout_ratio=0.0, dtype="float64")
    scores_t = twin.forward(torch.tensor(x))
    np.testing.assert_allclose(net.predict(x), scores_t.detach().numpy(), rtol=1e-10, atol=1e-12)
    grads = net.gradient(x, t)
    torch.nn.functional.cross_entropy(twin.forward(torch.tensor(x), train=True), torch.tensor(t)).backward()
    for key, value in grads.items():
        np.testing.assert_allclose(value, twin.params[key].grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=key)


def test_deepconvnet_predict_is_inference_by_default_and_accuracy_is_deterministic(rng):
    net = small_deep()
    x, t = rng.random((7, 1, 12, 12)), rng.integers(0, 4, 7)
    np.testing.assert_array_equal(net.predict(x), net.predict(x, train_flg=False))
    assert not np.allclose(net.predict(x, train_flg=True), net.predict(x, train_flg=True))   # new masks each time
    assert net.accuracy(x, t, batch_size=3) == net.accuracy(x, t)
    expected = float(np.mean(net.predict(x).argmax(1) == t))
    assert net.accuracy(x, t, batch_size=2) == expected


def test_deepconvnet_bad_input():
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        DeepConvNet(dropout_ratio=1.0)
    with pytest.raises(ConfigError, match="unknown conv_param_2 keys"):
        DeepConvNet(conv_param_2={"filters": 3})
    with pytest.raises(ShapeError, match="pool"):
        DeepConvNet(input_dim=(1, 10, 10))
    net = small_deep()
    with pytest.raises(ConfigError, match="train_flg must be True or False"):
        net.predict(np.zeros((1, 1, 12, 12)), train_flg="False")
    with pytest.raises(ShapeError, match="channels"):
        net.predict(np.zeros((1, 3, 12, 12)))


def test_deepconvnet_trains(rng):
    # A learnable toy task: the class is the quadrant holding the bright pixel.
    n = 32
    x = np.zeros((n, 1, 12, 12), dtype=np.float32)
    t = rng.integers(0, 4, n)
    for i, label in enumerate(t):
        r, c = divmod(int(label), 2)
        x[i, 0, r * 6 + rng.integers(0, 6), c * 6 + rng.integers(0, 6)] = 1.0
    net, opt = small_deep(dropout_ratio=0.1, seed=1, dtype="float32"), Adam(lr=0.02)
    first = None
    for step in range(30):
        grads = net.gradient(x, t)
        first = first if first is not None else float(net.last_layer.loss)
        opt.update(net.params, grads)
    assert float(net.last_layer.loss) < 0.5 * first
    assert net.accuracy(x, t) > 0.8


# ------------------------------------------------------------------ MultiLayerNetExtend

def test_multilayer_net_extend_gradient_every_option_on(backend, rng):
    net = MultiLayerNetExtend(6, [5, 4], 3, activation="relu", weight_init_std="he", weight_decay_lambda=0.1,
                              use_dropout=True, dropout_ration=0.3, use_batchnorm=True, backend=backend,
                              dtype="float64", seed=2)
    assert sorted(net.params) == ["W1", "W2", "W3", "b1", "b2", "b3", "beta1", "beta2", "gamma1", "gamma2"]
    _check_all_gradients(net, rng.standard_normal((5, 6)), np.array([0, 1, 2, 1, 0]),
                         f"MultiLayerNetExtend on {backend.name}")


def test_multilayer_net_extend_sigmoid_gradient(rng):
    net = MultiLayerNetExtend(4, [5], 3, activation="sigmoid", weight_init_std="xavier", dtype="float64", seed=1)
    _check_all_gradients(net, rng.standard_normal((3, 4)), np.array([0, 2, 1]), "MultiLayerNetExtend sigmoid")


def test_weight_decay_is_in_the_loss_as_the_book_does(rng):
    x, t = rng.standard_normal((4, 5)), np.array([0, 1, 2, 0])
    plain = MultiLayerNetExtend(5, [6], 3, dtype="float64", seed=0)
    decayed = MultiLayerNetExtend(5, [6], 3, weight_decay_lambda=0.5, dtype="float64", seed=0)
    penalty = 0.25 * sum(np.sum(decayed.params[k] ** 2) for k in ("W1", "W2"))
    assert float(decayed.loss(x, t)) == pytest.approx(float(plain.loss(x, t)) + penalty, rel=1e-12)
    g_plain, g_decay = plain.gradient(x, t), decayed.gradient(x, t)
    np.testing.assert_allclose(g_decay["W1"], g_plain["W1"] + 0.5 * plain.params["W1"], rtol=1e-12)
    np.testing.assert_allclose(g_decay["b1"], g_plain["b1"], rtol=1e-12)


@pytest.mark.parametrize("init,expected", [("relu", np.sqrt(2 / 400)), ("He", np.sqrt(2 / 400)),
                                           ("sigmoid", np.sqrt(1 / 400)), ("xavier", np.sqrt(1 / 400)), (0.05, 0.05)])
def test_weight_init_std_names_and_numbers(init, expected):
    net = MultiLayerNetExtend(400, [300], 10, weight_init_std=init, seed=0)
    assert abs(np.std(net.params["W1"]) / expected - 1) < 0.02


def test_dropout_ration_and_dropout_ratio_both_accepted():
    a = MultiLayerNetExtend(4, [3], 2, use_dropout=True, dropout_ration=0.2)
    b = MultiLayerNetExtend(4, [3], 2, use_dropout=True, dropout_ratio=0.2)
    assert a.layers["Dropout1"].dropout_ratio == b.layers["Dropout1"].dropout_ratio == 0.2
    with pytest.raises(ConfigError, match="differ"):
        MultiLayerNetExtend(4, [3], 2, dropout_ration=0.2, dropout_ratio=0.3)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        MultiLayerNetExtend(4, [3], 2, dropout_ratio=-0.1)
    with pytest.raises(ConfigError, match="weight_init_std"):
        MultiLayerNetExtend(4, [3], 2, weight_init_std="glorot")
    with pytest.raises(ConfigError, match="activation"):
        MultiLayerNetExtend(4, [3], 2, activation="tanh")
    with pytest.raises(ConfigError, match="weight_decay_lambda"):
        MultiLayerNetExtend(4, [3], 2, weight_decay_lambda=-1)


# ------------------------------------------------------------------ checkpoints

def test_checkpoint_keeps_running_stats_and_masks_for_an_exact_resume(tmp_path, rng):
    def make():
        return MultiLayerNetExtend(8, [6, 5], 3, use_dropout=True, use_batchnorm=True, dtype="float64", seed=4)
    x, t = rng.standard_normal((10, 8)), rng.integers(0, 3, 10)
    net, opt = make(), Adam(lr=0.01)
    for _ in range(3):
        opt.update(net.params, net.gradient(x, t))
    path = save_checkpoint(tmp_path / "c.npz", net, opt)
    continued = []
    for _ in range(2):
        opt.update(net.params, net.gradient(x, t))
        continued.append(float(net.last_layer.loss))

    ckpt = load_checkpoint(path)
    assert sorted(ckpt.buffers) == ["BatchNorm1/running_mean", "BatchNorm1/running_var",
                                    "BatchNorm2/running_mean", "BatchNorm2/running_var"]
    resumed, opt2 = make(), Adam(lr=0.01)
    restore(ckpt, resumed, opt2)
    replay = []
    for _ in range(2):
        opt2.update(resumed.params, resumed.gradient(x, t))
        replay.append(float(resumed.last_layer.loss))
    assert replay == continued     # bit for bit: weights, Adam state, BN statistics, Dropout masks
    for key, value in net.buffers().items():
        np.testing.assert_array_equal(resumed.buffers()[key], value)
    rebuilt = build_from_checkpoint(ckpt)
    assert isinstance(rebuilt, MultiLayerNetExtend)
    np.testing.assert_array_equal(rebuilt.layers["BatchNorm1"].running_var, ckpt.buffers["BatchNorm1/running_var"])


def test_deepconvnet_checkpoint_rebuilds_and_refuses_another_model(tmp_path, rng):
    net = small_deep(seed=5)
    net.gradient(rng.random((2, 1, 12, 12)), np.array([1, 2]))
    path = save_checkpoint(tmp_path / "deep.npz", net)
    rebuilt = build_from_checkpoint(load_checkpoint(path))
    assert isinstance(rebuilt, DeepConvNet) and rebuilt.config == net.config
    x = rng.random((3, 1, 12, 12))
    np.testing.assert_array_equal(rebuilt.predict(x), net.predict(x))
    with pytest.raises(CheckpointError, match="DeepConvNet, but the network is a SimpleConvNet"):
        restore(load_checkpoint(path), SimpleConvNet(input_dim=(1, 12, 12), output_size=4, dtype="float64"))
