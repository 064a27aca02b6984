"""Each backend's fast operations against the array-API reference: NumPy's
(`xpcnn/fast_numpy.py`, the channels-last convolution) always, CuPy's (`xpcnn/fast_cupy.py`)
on a GPU (skipped without one).

Every entry a backend replaces, against the same entry of the reference table on the same
device: float64 within 1e-12 relative, float32 within 1e-5, on shapes with stride 2, pad 1
and 2, non-square inputs and filters, C > 1, N = 1, inputs in every memory layout the layers
hand on, and pooling ties (the first maximum wins). Entries a backend does not replace skip
with that reason. Then whole training steps of SimpleConvNet and DeepConvNet, fast against
reference, and determinism.

CuPy's fast path also runs here without a GPU: the "cupy-emulated" backend runs
fast_cupy.py's own wrappers with its kernels compiled as C++ (tests/ops/emulation,
docs/cuda-emulation.md). The cases are in `fast_cases.py`.

No comparison passes by comparing a function with itself: where a backend's fast entry hands
a case back to the reference (NumPy's convolution for one input channel, see
`reference.per_image_layout_wins`), the case skips with that reason, and the convolution test
asserts that the fast entry it compares did not call the reference. On NumPy the C=1 geometry
and SimpleConvNet's steps therefore skip (they are compared on CuPy and its emulation); the
multi-channel geometries and DeepConvNet's steps (five of its six convolutions) are compared.
"""

import contextlib

import numpy as np
import pytest

from xpcnn import AdaGrad, Adam, Convolution, DeepConvNet, SimpleConvNet
from xpcnn.backend import get_backend
from xpcnn.ops import cpu_kernels, cpu_threads, fast_numpy, fused, ops_for, reference
from xpcnn.ops import table as op_table

from fast_cases import (
    CONV_GEOMETRIES,
    CONV_RELU_POOL_GEOMETRIES,
    OPTIMIZER_CASES,
    OPTIMIZER_STATE_STARTS,
    POOL_GEOMETRIES,
    SCORE_ROWS,
    TOL,
)
from fast_cases import out_size as _out

FAST_BACKENDS = ["numpy", "numpy-sliced", "numpy-calls", "cupy", "cupy-emulated"]
#: Slices of the batch "numpy-sliced" cuts (three: uneven, and more than this machine's cores).
SLICES = 3


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    """Each backend with a fast table (CuPy skipped with the reason where it is missing; its
    emulation where CuPy's wheels or g++ are)."""
    if request.param == "cupy":
        return request.getfixturevalue("gpu_backend")
    if request.param == "cupy-emulated":
        return request.getfixturevalue("cupy_emulated_backend")
    if request.param == "numpy-calls":
        # NumPy's fast path without compiled kernels (XPCNN_CPU_KERNELS=numpy, or no Numba).
        patch = request.getfixturevalue("monkeypatch")
        patch.setenv(cpu_kernels.KERNELS_VARIABLE, "numpy")
        op_table.ops_for.cache_clear()
        request.addfinalizer(op_table.ops_for.cache_clear)
        return get_backend("numpy")
    if request.param == "numpy-sliced":
        # NumPy's fast path as it runs on large batches: each slice of the batch on its own
        # thread (xpcnn/ops/cpu_threads.py), here for every size and on any number of cores.
        patch = request.getfixturevalue("monkeypatch")
        patch.setenv(cpu_threads.THREADS_VARIABLE, str(SLICES))
        patch.setattr(cpu_threads, "MIN_PARALLEL_BYTES", 0)
        return get_backend("numpy")
    return get_backend(request.param)


def _tables(backend, *names):
    """(fast table, reference table); skips unless the backend replaces every one of `names`
    (a fused entry is always compared: without a fused kernel it runs the table's own fast
    entries in turn)."""
    fast, ref = ops_for(backend.xp), ops_for(backend.xp, reference=True)
    assert not fast.reference and ref.reference, fast
    missing = [name for name in names if name not in fast.fast_names and name not in fused.FUSED]
    if missing:
        pytest.skip(f"{backend.name} has no fast {', '.join(missing)} (the reference is its path)")
    return fast, ref


def _sliced(n):
    """Whether NumPy's fast path cuts a batch of `n` into slices here (on "numpy-sliced")."""
    return n > 1 and cpu_threads.thread_count() > 1 and cpu_threads.MIN_PARALLEL_BYTES == 0


def _hands_back_to_reference(backend, channels, n=2):
    """Whether `backend`'s fast convolution runs the reference code for `channels` input
    channels on a batch of `n` (NumPy's, `fast_numpy`, does for one channel: the per-image
    layout is faster there; cut into slices of the batch it is compared, slices and sums)."""
    entry = ops_for(backend.xp).conv2d_forward
    return (getattr(entry, "__wrapped__", None) is fast_numpy.conv2d_forward
            and reference.per_image_layout_wins(channels) and not _sliced(n))


def _skip_where_fast_is_reference(backend, channels, n=2):
    if _hands_back_to_reference(backend, channels, n):
        pytest.skip(f"{backend.name}'s fast convolution is the reference for C={channels} "
                    "(per_image_layout_wins): nothing to compare on this backend")


@contextlib.contextmanager
def _calls_into_reference(*names):
    """Records the reference entries `names` called inside the block (by a fast entry that
    hands its case back); the reference table holds its own references and is not seen."""
    called = []
    with pytest.MonkeyPatch.context() as patch:
        for name in names:
            original = getattr(reference, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                called.append(_name)
                return _original(*args, **kwargs)
            patch.setattr(reference, name, spy)
        yield called


def _close(backend, fast, ref, dtype, what):
    f, r = backend.to_numpy(fast), backend.to_numpy(ref)
    assert f.dtype == r.dtype == np.dtype(dtype), f"{what}: dtype {f.dtype}, the reference's {r.dtype}, input {dtype}"
    f, r = f.astype(np.float64), r.astype(np.float64)
    assert f.shape == r.shape, (what, f.shape, r.shape)
    scale = max(float(np.abs(r).max()), 1e-30)
    err = float(np.abs(f - r).max()) / scale
    assert err <= TOL[dtype], f"{what}: max relative difference {err:.2e} > {TOL[dtype]}"


def _in_layout(backend, host, dtype, layout):
    """The host array (N, C, H, W) on the device as the previous layer may hand it on:
    contiguous NCHW, a view of channels-last or of (C, N, H, W) memory, or a strided slice."""
    xp = backend.xp
    if layout == "channels-last":
        return xp.permute_dims(backend.asarray(np.ascontiguousarray(host.transpose(0, 2, 3, 1)), dtype), (0, 3, 1, 2))
    if layout == "cnhw":
        return xp.permute_dims(backend.asarray(np.ascontiguousarray(host.transpose(1, 0, 2, 3)), dtype), (1, 0, 2, 3))
    if layout == "sliced":           # every other column of an array twice as wide
        return backend.asarray(np.repeat(host, 2, axis=3), dtype)[:, :, :, 0::2]
    return backend.asarray(host, dtype)


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
@pytest.mark.parametrize("need_input_grad", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels-last", "cnhw", "sliced"])
def test_conv2d_matches_reference(fast_backend, rng, dtype, geometry, need_input_grad, layout):
    n, c, h, w, fn, fh, fw, stride, pad = geometry
    _skip_where_fast_is_reference(fast_backend, c, n)
    oh, ow = _out(h, fh, stride, pad), _out(w, fw, stride, pad)
    be = fast_backend
    x = _in_layout(be, rng.standard_normal((n, c, h, w)), dtype, layout)
    W = be.asarray(rng.standard_normal((fn, c, fh, fw)), dtype)
    b = be.asarray(rng.standard_normal(fn), dtype)
    dout = _in_layout(be, rng.standard_normal((n, fn, oh, ow)), dtype, layout)
    fast, ref = _tables(be, "conv2d_forward", "conv2d_backward")
    with _calls_into_reference("conv2d_forward", "conv2d_backward") as handed_back:
        out_f, cache_f = fast.conv2d_forward(x, W, b, stride, pad, oh, ow)
        got = fast.conv2d_backward(dout, cache_f, W, stride, pad, need_input_grad,
                                   be.asarray(np.zeros((fn, c, fh, fw)), dtype), be.asarray(np.zeros(fn), dtype))
    if not (reference.per_image_layout_wins(c) and _sliced(n)):     # there: the reference on each slice
        assert not handed_back, f"the fast entry ran the reference's {handed_back}: it would be compared with itself"
    out_r, cache_r = ref.conv2d_forward(x, W, b, stride, pad, oh, ow)
    _close(be, out_f, out_r, dtype, "conv forward")
    want = ref.conv2d_backward(dout, cache_r, W, stride, pad, need_input_grad)
    for name, g, r in zip(("dx", "dW", "db"), got, want):
        if r is None:
            assert g is None
        else:
            _close(be, g, r, dtype, f"conv {name}")


@pytest.mark.parametrize("into_buffers", [False, True])
def test_affine_matches_reference(fast_backend, rng, dtype, into_buffers):
    be = fast_backend
    fast, ref = _tables(be, "affine_forward", "affine_backward")
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


def test_affine_backward_without_input_gradient_and_into_a_strided_buffer(fast_backend, rng, dtype):
    """No input gradient asked for: none made (None back); gradient buffers that are views
    with other strides (a transposed array) are written, and handed back, as given."""
    be = fast_backend
    fast, ref = _tables(be, "affine_forward", "affine_backward")
    x, W = be.asarray(rng.standard_normal((9, 12)), dtype), be.asarray(rng.standard_normal((12, 5)), dtype)
    dout = be.asarray(rng.standard_normal((9, 5)), dtype)
    dW_buffer = be.xp.permute_dims(be.asarray(np.zeros((5, 12)), dtype), (1, 0))       # (12, 5), not contiguous
    db_buffer = be.asarray(np.zeros(5), dtype)
    dx, dW, db = fast.affine_backward(dout, x, W, False, dW_buffer, db_buffer)
    _, dW_r, db_r = ref.affine_backward(dout, x, W, False)
    assert dx is None and dW is dW_buffer and db is db_buffer
    _close(be, dW_buffer, dW_r, dtype, "affine dW into a strided buffer")
    _close(be, db_buffer, db_r, dtype, "affine db")
    # One image, cut into as many slices as the features allow: dx's rows have one slice only.
    got = fast.affine_backward(dout[:1], x[:1], W, True)
    for name, g, r in zip(("dx", "dW", "db"), got, ref.affine_backward(dout[:1], x[:1], W, True)):
        _close(be, g, r, dtype, f"affine {name}, one image")


def _compare_gradients(be, got, want, dtype, what):
    for name, g, r in zip(("dx", "dW", "db"), got, want):
        if r is None:
            assert g is None, f"{what} {name}: expected None"
        else:
            _close(be, g, r, dtype, f"{what} {name}")


@pytest.mark.parametrize("geometry", CONV_RELU_POOL_GEOMETRIES)
@pytest.mark.parametrize("need_input_grad", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_conv_relu_pool_matches_reference(fast_backend, rng, dtype, geometry, need_input_grad, ties):
    """The fused convolution + ReLU + max pooling against the reference's layers; with
    ``ties`` the filters are zero, so every window ties (at the bias: positive in some
    channels, negative in others) and the first maximum must win."""
    n, c, h, w, fn, fh, fw, stride, pad, size = geometry
    be = fast_backend
    fast, ref = _tables(be, "conv2d_relu_maxpool2d_forward", "conv2d_relu_maxpool2d_backward")
    oh, ow = _out(h, fh, stride, pad), _out(w, fw, stride, pad)
    pool = (size, size, size, 0, _out(oh, size, size, 0), _out(ow, size, size, 0))
    x = be.asarray(rng.standard_normal((n, c, h, w)), dtype)
    W = be.asarray(np.zeros((fn, c, fh, fw)) if ties else rng.standard_normal((fn, c, fh, fw)), dtype)
    b = be.asarray(rng.standard_normal(fn), dtype)
    dout = be.asarray(rng.standard_normal((n, fn, pool[4], pool[5])), dtype)
    results = []
    for table in (fast, ref):
        out, cache = table.conv2d_relu_maxpool2d_forward(x, W, b, stride, pad, oh, ow, pool)
        buffers = (be.asarray(np.zeros((fn, c, fh, fw)), dtype), be.asarray(np.zeros(fn), dtype))
        grads = table.conv2d_relu_maxpool2d_backward(dout, cache, W, stride, pad, need_input_grad, *buffers)
        assert grads[1] is buffers[0] and grads[2] is buffers[1]
        results.append((out, grads))
    _close(be, results[0][0], results[1][0], dtype, "conv-relu-pool forward")
    _compare_gradients(be, results[0][1], results[1][1], dtype, "conv-relu-pool")


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES)
@pytest.mark.parametrize("need_input_grad", [True, False])
def test_fused_conv_relu_matches_reference(fast_backend, rng, dtype, geometry, need_input_grad):
    n, c, h, w, fn, fh, fw, stride, pad = geometry
    be = fast_backend
    fast, ref = _tables(be, "conv2d_relu_forward", "conv2d_relu_backward")
    oh, ow = _out(h, fh, stride, pad), _out(w, fw, stride, pad)
    x = be.asarray(rng.standard_normal((n, c, h, w)), dtype)
    W = be.asarray(rng.standard_normal((fn, c, fh, fw)), dtype)
    b = be.asarray(rng.standard_normal(fn), dtype)
    dout = be.asarray(rng.standard_normal((n, fn, oh, ow)), dtype)
    results = []
    for table in (fast, ref):
        out, cache = table.conv2d_relu_forward(x, W, b, stride, pad, oh, ow)
        results.append((out, table.conv2d_relu_backward(dout, cache, W, stride, pad, need_input_grad)))
    _close(be, results[0][0], results[1][0], dtype, "conv-relu forward")
    _compare_gradients(be, results[0][1], results[1][1], dtype, "conv-relu")


def test_fused_affine_relu_matches_reference(fast_backend, rng, dtype):
    be = fast_backend
    fast, ref = _tables(be, "affine_relu_forward", "affine_relu_backward")
    x = be.asarray(rng.standard_normal((7, 12)), dtype)
    W = be.asarray(rng.standard_normal((12, 5)), dtype)
    b = be.asarray(rng.standard_normal(5), dtype)
    dout = be.asarray(rng.standard_normal((7, 5)), dtype)
    results = []
    for table in (fast, ref):
        out, cache = table.affine_relu_forward(x, W, b)
        results.append((out, table.affine_relu_backward(dout, cache, x, W, True)))
    _close(be, results[0][0], results[1][0], dtype, "affine-relu forward")
    _compare_gradients(be, results[0][1], results[1][1], dtype, "affine-relu")


@pytest.mark.parametrize("geometry", POOL_GEOMETRIES)
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_matches_reference_ties_included(fast_backend, rng, dtype, geometry, ties):
    n, c, h, w, ph, pw, stride, pad = geometry
    oh, ow = _out(h, ph, stride, pad), _out(w, pw, stride, pad)
    host = rng.standard_normal((n, c, h, w))
    if ties:  # as after a ReLU: many equal maxima, whole windows of zeros
        host = np.round(np.maximum(host, 0.0))
    be = fast_backend
    x = be.asarray(host, dtype)
    dout = be.asarray(rng.standard_normal((n, c, oh, ow)), dtype)
    fast, ref = _tables(be, "maxpool2d_forward", "maxpool2d_backward")
    out_f, cache_f = fast.maxpool2d_forward(x, ph, pw, stride, pad, oh, ow)
    out_r, cache_r = ref.maxpool2d_forward(x, ph, pw, stride, pad, oh, ow)
    np.testing.assert_array_equal(be.to_numpy(out_f), be.to_numpy(out_r))
    np.testing.assert_array_equal(be.to_numpy(fast.maxpool2d_backward(dout, cache_f)),
                                  be.to_numpy(ref.maxpool2d_backward(dout, cache_r)))


def test_relu_softmax_and_scoring_match_reference(fast_backend, rng, dtype):
    be = fast_backend
    fast, ref = _tables(be, "relu_forward", "relu_backward", "softmax_cross_entropy_forward",
                        "softmax_cross_entropy_backward", "count_correct")
    x = be.asarray(rng.standard_normal((7, 5, 3)), dtype)
    dout = be.asarray(rng.standard_normal((7, 5, 3)), dtype)
    out = fast.relu_forward(x)
    _close(be, out, ref.relu_forward(x), dtype, "relu forward")
    _close(be, fast.relu_backward(out, dout), ref.relu_backward(out, dout), dtype, "relu backward")
    for n in SCORE_ROWS:
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


@pytest.mark.parametrize("geometry", [POOL_GEOMETRIES[0], POOL_GEOMETRIES[1]])
def test_nan_stays_visible_like_the_reference(fast_backend, rng, dtype, geometry):
    """A NaN must stay visible on every backend (the Trainer's NaN handling depends on it):
    max pooling gives NaN for a window holding one, as the reference's `maximum` does, and
    count_correct takes a NaN score for the row's maximum, as `argmax` does; softmax-CE's loss
    is NaN. (Which pixel the gradient of a NaN window goes to is not compared.)"""
    be = fast_backend
    fast, ref = _tables(be, "maxpool2d_forward", "count_correct", "softmax_cross_entropy_forward")
    n, c, h, w, ph, pw, stride, pad = geometry
    oh, ow = _out(h, ph, stride, pad), _out(w, pw, stride, pad)
    host = rng.standard_normal((n, c, h, w))
    host[0, 0, 0, 0] = host[0, 1, 3, 4] = host[-1, -1, h - 1, w - 1] = np.nan
    host[0, 0, 1, 1] = 50.0                     # a large value beside the NaN does not hide it
    x = be.asarray(host, dtype)
    out_f, _ = fast.maxpool2d_forward(x, ph, pw, stride, pad, oh, ow)
    out_r, _ = ref.maxpool2d_forward(x, ph, pw, stride, pad, oh, ow)
    assert np.isnan(be.to_numpy(out_r)).sum() >= 3
    np.testing.assert_array_equal(be.to_numpy(out_f), be.to_numpy(out_r))
    scores = rng.standard_normal((6, 10))
    scores[:, 2] = 10.0                         # column 2 is each row's largest number
    scores[0, 3] = scores[1, 0] = scores[2, 9] = scores[3, 5] = np.nan
    labels = be.asarray(np.array([3, 0, 9, 2, 2, 2]))     # right, right, right, wrong (the NaN wins), ...
    counted = int(fast.count_correct(be.asarray(scores, dtype), labels))
    assert counted == int(ref.count_correct(be.asarray(scores, dtype), labels)) == 5, counted
    loss, _ = fast.softmax_cross_entropy_forward(be.asarray(scores, dtype), labels)
    assert np.isnan(be.to_float(loss))


@pytest.mark.parametrize("name, args", OPTIMIZER_CASES)
@pytest.mark.parametrize("start", OPTIMIZER_STATE_STARTS)
def test_optimizer_kernels_match_reference(fast_backend, rng, dtype, name, args, start):
    be = fast_backend
    fast, ref = _tables(be, name)
    n_state = {"sgd_update": 0, "momentum_update": 1, "adagrad_update": 1, "adam_update": 2}[name]
    host = [rng.standard_normal(1000) for _ in range(2 + n_state)]
    host[2:] = [np.abs(h) if start == "abs-randn" else np.zeros_like(h) for h in host[2:]]
    results = []
    for table in (fast, ref):
        arrays = [be.asarray(h, dtype) for h in host]
        param, grad, *state = arrays
        for _ in range(3):
            getattr(table, name)(param, grad, *state, *args)
        results.append([param, *state])
    for got, want in zip(*results):
        _close(be, got, want, dtype, name)


def _make(model, backend, dtype, reference):
    if model == "deep":   # small images keep it quick; every layer shape kind is still there
        return (DeepConvNet(input_dim=(1, 12, 12), backend=backend, dtype=dtype, seed=3, reference=reference),
                Adam(lr=0.001))
    return SimpleConvNet(backend=backend, dtype=dtype, seed=3, reference=reference), AdaGrad(lr=0.06)


def _train(model, backend, dtype, steps, x_host, t_host, reference):
    """(gradients of the first step, weights after `steps` optimizer steps), as host arrays."""
    net, optimizer = _make(model, backend, dtype, reference)
    be = net.backend
    x, t = be.asarray(x_host, dtype), be.asarray(t_host)
    order = np.random.default_rng(1)
    first_grads = None
    for _ in range(steps):
        idx = be.asarray(order.choice(x_host.shape[0], 50, replace=False))
        grads = net.gradient(be.xp.take(x, idx, axis=0), be.xp.take(t, idx, axis=0))
        if first_grads is None:
            first_grads = {k: be.to_numpy(v).copy() for k, v in grads.items()}
        optimizer.update(net.params, grads)
    return first_grads, {k: be.to_numpy(v) for k, v in net.params.items()}


def _images(model):
    rng = np.random.default_rng(0)
    size = 12 if model == "deep" else 28
    return rng.random((200, 1, size, size)), rng.integers(0, 10, 200)


def _needs_fast_convolution(backend):
    _tables(backend, "conv2d_forward", "conv2d_backward")


def _compared_convolutions(backend, model):
    """The input channels of `model`'s convolutions whose fast entry is not the reference on
    `backend`; skips when there are none (the steps would be compared with themselves)."""
    net, _ = _make(model, backend, "float32", reference=False)
    channels = [layer.W.shape[1] for layer in net.layers.values() if isinstance(layer, Convolution)]
    compared = [c for c in channels if not _hands_back_to_reference(backend, c)]
    if not compared:
        pytest.skip(f"every convolution of model={model!r} (C={channels}) runs the reference on {backend.name}")
    return compared


@pytest.mark.parametrize("model", ["simple", "deep"])
@pytest.mark.parametrize("dtype, steps, tol", [("float32", 1, 1e-5), ("float64", 50, 1e-10)])
def test_whole_training_steps_fast_equal_reference(fast_backend, model, dtype, steps, tol):
    """float32: gradients of one step from identical weights; float64: weights after 50 steps."""
    _needs_fast_convolution(fast_backend)
    _compared_convolutions(fast_backend, model)
    x_host, t_host = _images(model)
    fast = _train(model, fast_backend, dtype, steps, x_host, t_host, reference=False)
    ref = _train(model, fast_backend, dtype, steps, x_host, t_host, reference=True)
    got, want = (fast[0], ref[0]) if steps == 1 else (fast[1], ref[1])
    for key in want:
        diff = float(np.linalg.norm(got[key] - want[key]) / (np.linalg.norm(want[key]) or 1.0))
        assert diff <= tol, f"{key}: {diff:.2e} > {tol}"


@pytest.mark.parametrize("model", ["simple", "deep"])
def test_two_runs_are_bit_identical(fast_backend, model):
    _needs_fast_convolution(fast_backend)
    x_host, t_host = _images(model)
    _, first = _train(model, fast_backend, "float32", 20, x_host, t_host, reference=False)
    _, second = _train(model, fast_backend, "float32", 20, x_host, t_host, reference=False)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_numpy_layers_hand_on_channels_last_memory(rng):
    """The point of NumPy's fast convolution: its output, and the ReLU and pooling after it,
    stay views of channels-last memory, so no layer between two convolutions transposes."""
    from xpcnn import Convolution, Pooling, ReLU
    from xpcnn.backend import get_backend

    be = get_backend("numpy")
    x = be.asarray(rng.standard_normal((4, 16, 8, 8)), "float32")
    conv = Convolution(be.asarray(rng.standard_normal((8, 16, 3, 3)), "float32"), be.asarray(np.zeros(8), "float32"),
                       pad=1)
    relu, pool = ReLU(), Pooling(2, 2, stride=2)
    conv_out = conv.forward(x)
    out = pool.forward(relu.forward(conv_out))
    for name, array in (("convolution", conv_out), ("relu", relu.out), ("pooling", out)):
        assert np.transpose(array, (0, 2, 3, 1)).flags.c_contiguous, f"{name} output is not channels-last"
    dx = conv.backward(relu.backward(pool.backward(np.ones_like(out))))
    assert np.transpose(dx, (0, 2, 3, 1)).flags.c_contiguous
    assert conv.dW.flags.c_contiguous and conv.dW.shape == (8, 16, 3, 3)
