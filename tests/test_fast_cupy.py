"""CuPy's fast operations against the array-API reference, on a GPU (skipped without one).

Every entry of CuPy's table (`xpcnn/fast_cupy.py`) against the same entry of the reference
table on the same device: float64 within 1e-12 relative, float32 within 1e-5, on shapes with
stride 2, pad 1 and 2, non-square inputs and filters, C > 1, N = 1, and pooling ties (the
first maximum wins). Then whole training steps, fast against reference, and determinism.
"""

import numpy as np
import pytest

from xpcnn import AdaGrad, SimpleConvNet
from xpcnn.ops import ops_for

TOL = {"float64": 1e-12, "float32": 1e-5}
CONV_GEOMETRIES = [  # (N, C, H, W, FN, FH, FW, stride, pad)
    (3, 1, 28, 28, 30, 5, 5, 1, 0),
    (2, 3, 9, 7, 4, 3, 2, 2, 1),
    (1, 2, 8, 8, 5, 3, 3, 1, 2),
    (2, 16, 14, 14, 32, 3, 3, 1, 1),
    (1, 4, 11, 6, 3, 5, 3, 2, 2),
]
POOL_GEOMETRIES = [  # (N, C, H, W, PH, PW, stride, pad)
    (2, 3, 24, 24, 2, 2, 2, 0),
    (1, 2, 9, 7, 3, 2, 2, 1),
    (2, 1, 8, 8, 3, 3, 1, 1),
    (1, 4, 7, 9, 2, 3, 1, 0),
]


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return request.param


def _tables(backend):
    fast, ref = ops_for(backend.xp), ops_for(backend.xp, reference=True)
    assert not fast.reference and ref.reference, fast
    return fast, ref


def _close(backend, fast, ref, dtype, what):
    f, r = backend.to_numpy(fast).astype(np.float64), backend.to_numpy(ref).astype(np.float64)
    assert f.shape == r.shape, (what, f.shape, r.shape)
    scale = max(float(np.abs(r).max()), 1e-30)
    err = float(np.abs(f - r).max()) / scale
    assert err <= TOL[dtype], f"{what}: max relative difference {err:.2e} > {TOL[dtype]}"


def _out(size, filt, stride, pad):
    return (size + 2 * pad - filt) // stride + 1


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
@pytest.mark.parametrize("need_input_grad", [True, False])
def test_conv2d_matches_reference(gpu_backend, rng, dtype, geometry, need_input_grad):
    n, c, h, w, fn, fh, fw, stride, pad = geometry
    oh, ow = _out(h, fh, stride, pad), _out(w, fw, stride, pad)
    be = gpu_backend
    x = be.asarray(rng.standard_normal((n, c, h, w)), dtype)
    W = be.asarray(rng.standard_normal((fn, c, fh, fw)), dtype)
    b = be.asarray(rng.standard_normal(fn), dtype)
    dout = be.asarray(rng.standard_normal((n, fn, oh, ow)), dtype)
    fast, ref = _tables(be)
    out_f, cache_f = fast.conv2d_forward(x, W, b, stride, pad, oh, ow)
    out_r, cache_r = ref.conv2d_forward(x, W, b, stride, pad, oh, ow)
    _close(be, out_f, out_r, dtype, "conv forward")
    got = fast.conv2d_backward(dout, cache_f, W, stride, pad, need_input_grad,
                               be.asarray(np.zeros((fn, c, fh, fw)), dtype), be.asarray(np.zeros(fn), dtype))
    want = ref.conv2d_backward(dout, cache_r, W, stride, pad, need_input_grad)
    for name, g, r in zip(("dx", "dW", "db"), got, want):
        if r is None:
            assert g is None
        else:
            _close(be, g, r, dtype, f"conv {name}")


@pytest.mark.parametrize("into_buffers", [False, True])
def test_affine_matches_reference(gpu_backend, rng, dtype, into_buffers):
    be = gpu_backend
    fast, ref = _tables(be)
    x = be.asarray(rng.standard_normal((7, 12)), dtype)
    W = be.asarray(rng.standard_normal((12, 5)), dtype)
    b = be.asarray(rng.standard_normal(5), dtype)
    dout = be.asarray(rng.standard_normal((7, 5)), dtype)
    _close(be, fast.affine_forward(x, W, b), ref.affine_forward(x, W, b), dtype, "affine forward")
    results = []
    for table in (fast, ref):
        outs = (be.asarray(np.zeros((12, 5)), dtype), be.asarray(np.zeros(5), dtype)) if into_buffers else (None, None)
        dx, dW, db = table.affine_backward(dout, x, W, True, *outs)
        if into_buffers:
            assert dW is outs[0] and db is outs[1]
        results.append((dx, dW, db))
    for name, got, want in zip(("dx", "dW", "db"), *results):
        _close(be, got, want, dtype, f"affine {name}")


@pytest.mark.parametrize("geometry", POOL_GEOMETRIES)
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_matches_reference_ties_included(gpu_backend, rng, dtype, geometry, ties):
    n, c, h, w, ph, pw, stride, pad = geometry
    oh, ow = _out(h, ph, stride, pad), _out(w, pw, stride, pad)
    host = rng.standard_normal((n, c, h, w))
    if ties:  # as after a ReLU: many equal maxima, whole windows of zeros
        host = np.round(np.maximum(host, 0.0))
    be = gpu_backend
    x = be.asarray(host, dtype)
    dout = be.asarray(rng.standard_normal((n, c, oh, ow)), dtype)
    fast, ref = _tables(be)
    out_f, cache_f = fast.maxpool2d_forward(x, ph, pw, stride, pad, oh, ow)
    out_r, cache_r = ref.maxpool2d_forward(x, ph, pw, stride, pad, oh, ow)
    np.testing.assert_array_equal(be.to_numpy(out_f), be.to_numpy(out_r))
    np.testing.assert_array_equal(be.to_numpy(fast.maxpool2d_backward(dout, cache_f)),
                                  be.to_numpy(ref.maxpool2d_backward(dout, cache_r)))


def test_relu_softmax_and_scoring_match_reference(gpu_backend, rng, dtype):
    be = gpu_backend
    fast, ref = _tables(be)
    x = be.asarray(rng.standard_normal((7, 5, 3)), dtype)
    dout = be.asarray(rng.standard_normal((7, 5, 3)), dtype)
    out = fast.relu_forward(x)
    _close(be, out, ref.relu_forward(x), dtype, "relu forward")
    _close(be, fast.relu_backward(out, dout), ref.relu_backward(out, dout), dtype, "relu backward")
    for n in (1, 100, 1000):   # more rows than the kernel's 256 threads
        scores = be.asarray(rng.standard_normal((n, 10)) * 5, dtype)
        labels = be.asarray(rng.integers(0, 10, n))
        loss_f, cache_f = fast.softmax_cross_entropy_forward(scores, labels)
        loss_r, cache_r = ref.softmax_cross_entropy_forward(scores, labels)
        _close(be, loss_f, loss_r, dtype, "softmax-CE loss")
        _close(be, cache_f[0], cache_r[0], dtype, "softmax probabilities")
        _close(be, fast.softmax_cross_entropy_backward(cache_f, 1), ref.softmax_cross_entropy_backward(cache_r, 1),
               dtype, "softmax-CE backward")
        assert int(fast.count_correct(scores, labels)) == int(ref.count_correct(scores, labels))
    tied = be.asarray(np.zeros((4, 10)), dtype)                # argmax of a tie is the first column
    assert int(fast.count_correct(tied, be.asarray(np.zeros(4, dtype=np.int64)))) == 4


@pytest.mark.parametrize("name, args", [("sgd_update", (0.1,)), ("momentum_update", (0.1, 0.9)),
                                        ("adagrad_update", (0.06, 1e-7)), ("adam_update", (0.001, 0.9, 0.999, 1e-8))])
def test_optimizer_kernels_match_reference(gpu_backend, rng, dtype, name, args):
    be = gpu_backend
    fast, ref = _tables(be)
    n_state = {"sgd_update": 0, "momentum_update": 1, "adagrad_update": 1, "adam_update": 2}[name]
    host = [rng.standard_normal(1000) for _ in range(2 + n_state)]
    host[2:] = [np.abs(h) for h in host[2:]]
    results = []
    for table in (fast, ref):
        arrays = [be.asarray(h, dtype) for h in host]
        param, grad, *state = arrays
        for _ in range(3):
            getattr(table, name)(param, grad, *state, *args)
        results.append([param, *state])
    for got, want in zip(*results):
        _close(be, got, want, dtype, name)


def _train(backend, dtype, steps, x_host, t_host, reference):
    """(gradients of the first step, weights after `steps` AdaGrad steps), as host arrays."""
    net = SimpleConvNet(backend=backend, dtype=dtype, seed=3, reference=reference)
    be = net.backend
    x, t = be.asarray(x_host, dtype), be.asarray(t_host)
    optimizer = AdaGrad(lr=0.06)
    order = np.random.default_rng(1)
    first_grads = None
    for _ in range(steps):
        idx = be.asarray(order.choice(x_host.shape[0], 50, replace=False))
        grads = net.gradient(be.xp.take(x, idx, axis=0), be.xp.take(t, idx, axis=0))
        if first_grads is None:
            first_grads = {k: be.to_numpy(v).copy() for k, v in grads.items()}
        optimizer.update(net.params, grads)
    return first_grads, {k: be.to_numpy(v) for k, v in net.params.items()}


@pytest.mark.parametrize("dtype, steps, tol", [("float32", 1, 1e-5), ("float64", 50, 1e-10)])
def test_whole_training_steps_fast_equal_reference(gpu_backend, dtype, steps, tol):
    """float32: gradients of one step from identical weights; float64: weights after 50 steps."""
    rng = np.random.default_rng(0)
    x_host, t_host = rng.random((200, 1, 28, 28)), rng.integers(0, 10, 200)
    fast = _train(gpu_backend, dtype, steps, x_host, t_host, reference=False)
    ref = _train(gpu_backend, dtype, steps, x_host, t_host, reference=True)
    got, want = (fast[0], ref[0]) if steps == 1 else (fast[1], ref[1])
    for key in want:
        diff = float(np.linalg.norm(got[key] - want[key]) / (np.linalg.norm(want[key]) or 1.0))
        assert diff <= tol, f"{key}: {diff:.2e} > {tol}"


def test_two_gpu_runs_are_bit_identical(gpu_backend):
    rng = np.random.default_rng(0)
    x_host, t_host = rng.random((200, 1, 28, 28)), rng.integers(0, 10, 200)
    _, first = _train(gpu_backend, "float32", 20, x_host, t_host, reference=False)
    _, second = _train(gpu_backend, "float32", 20, x_host, t_host, reference=False)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
