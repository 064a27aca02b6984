"""Fused steps (`xpcnn.nn.fusion`, `xpcnn.ops.fused`): a network runs a convolution with its
ReLU and pooling, and Affine with its ReLU, as one operation of the table; the results must
equal the layers run one by one, as the book runs them, on every backend."""

import numpy as np
import pytest

from xpcnn import Affine, Convolution, DeepConvNet, MultiLayerNetExtend, ReLU, SimpleConvNet, get_backend
from xpcnn.nn import fusion

MODELS = {
    "simple": (lambda backend: SimpleConvNet(input_dim=(1, 12, 12), conv_param={"filter_num": 6, "filter_size": 3},
                                             hidden_size=10, backend=backend, dtype="float64", seed=0), (5, 1, 12, 12)),
    "deep": (lambda backend: DeepConvNet(input_dim=(1, 12, 12), backend=backend, dtype="float64", seed=0),
             (3, 1, 12, 12)),
    "mlp": (lambda backend: MultiLayerNetExtend(36, [7, 5], 10, use_dropout=True, dropout_ratio=0.3,
                                                backend=backend, dtype="float64", seed=0), (5, 36)),
}


def _kinds(net):
    return [type(step).__name__ for step in net._steps()]


def test_the_plan_fuses_the_runs_the_table_has_operations_for():
    assert _kinds(MODELS["simple"][0]("numpy")) == ["ConvReLUPool", "AffineReLU", "LayerStep"]
    # DeepConvNet: Conv, ReLU | Conv, Pool, ReLU (pooling before ReLU) three times, then the classifier.
    assert _kinds(MODELS["deep"][0]("numpy")) == ["ConvReLU", "ConvReLUPool"] * 3 + [
        "AffineReLU", "LayerStep", "LayerStep", "LayerStep"]
    assert _kinds(MODELS["mlp"][0]("numpy")) == ["AffineReLU", "LayerStep"] * 2 + ["LayerStep"]
    with_batchnorm = MultiLayerNetExtend(36, [7], 10, use_batchnorm=True, seed=0)
    assert _kinds(with_batchnorm) == ["LayerStep"] * 4         # Affine, BatchNorm, ReLU: nothing to fuse


def test_subclassed_layers_are_not_fused():
    """A subclass may change what a layer computes: only the exact layer types are fused."""
    class LeakyReLU(ReLU):
        pass

    rng = np.random.default_rng(0)
    conv = Convolution(rng.standard_normal((2, 1, 3, 3)), np.zeros(2))
    affine = Affine(rng.standard_normal((4, 3)), np.zeros(3))
    assert [type(s).__name__ for s in fusion.steps([conv, LeakyReLU(), affine, ReLU()])] == [
        "LayerStep", "LayerStep", "AffineReLU"]


def test_the_plan_follows_changes_to_the_layers():
    net = MODELS["simple"][0]("numpy")
    first = net._steps()
    assert net._steps() is first
    net.layers["Relu2"] = ReLU()                       # a new layer object: planned again
    assert net._steps() is not first and _kinds(net) == ["ConvReLUPool", "AffineReLU", "LayerStep"]


def _layer_by_layer(net, x, t):
    """Scores and gradients as the book computes them: each layer's forward, then each
    layer's backward in reverse order."""
    h = x
    for layer in net.layers.values():
        h = layer.forward(h, True) if "train_flg" in layer.forward.__code__.co_varnames else layer.forward(h)
    loss = net.last_layer.forward(h, t)
    dout = net.last_layer.backward(1)
    for layer in reversed(list(net.layers.values())):
        dout = layer.backward(dout)
    return loss, net.last_layer.y, net._collect_grads()


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("reference", [False, True], ids=["fast-table", "reference-table"])
def test_fused_steps_equal_the_layers_one_by_one(backend, model, reference):
    """Two networks from the same seed (the same weights and Dropout masks): one runs its
    steps, the other its layers one by one. Where a fused step runs the table's own entries in
    turn, scores and gradients must be equal bit for bit (ReLU and max pooling commute
    exactly; the gradients flow to the same pixels); where the table has a fused kernel
    (NumPy's compiled ones), within float64 rounding (1e-12, as every fast operation)."""
    make, shape = MODELS[model]
    if reference:
        backend = get_backend(backend.name, reference=True)
    fused, plain = make(backend), make(backend)
    rng = np.random.default_rng(1)
    x = backend.asarray(rng.standard_normal(shape), "float64")
    t = backend.asarray(rng.integers(0, 10, shape[0]))
    kernels = set(fusion.FUSED_OPERATIONS) & set(fused.ops.fast_names)
    if kernels:
        def same(got, want, what):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * float(np.abs(want).max()), err_msg=what)
    else:
        def same(got, want, what):
            np.testing.assert_array_equal(got, want, err_msg=what)
    for _ in range(2):          # twice: a second step reuses the buffers and caches of the first
        grads = {k: backend.to_numpy(v) for k, v in fused.gradient(x, t).items()}
        loss, probabilities = (backend.to_numpy(a) for a in (fused.last_layer.loss, fused.last_layer.y))
        want_loss, want_probabilities, want = _layer_by_layer(plain, x, t)
        same(loss, backend.to_numpy(want_loss), "loss")
        same(probabilities, backend.to_numpy(want_probabilities), "probabilities")
        for key, value in want.items():
            same(grads[key], backend.to_numpy(value), key)
