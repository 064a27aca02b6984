"""Array-library calls per training step: counted on any backend by wrapping its namespace.

On a GPU each call is at least one kernel launch plus ~10-30 us of Python, so the count is
the budget of a fast step. CI holds the count of a step on each table the CPU has, per
backend: the reference table (`reference=True`) and NumPy's fast table, whose convolution
reports its own NumPy calls (`xpcnn/ops/fast_numpy.py`, `_called`) and runs the one-channel
cases it hands back to the reference through a counting namespace. A change that adds calls
to a step fails; CuPy's fast path is counted on a GPU machine.
"""

import numpy as np
import pytest

from xpcnn import AdaGrad, Adam, DeepConvNet, SimpleConvNet, get_backend
from xpcnn.backend.counting import count_calls, counting_backend
from xpcnn.ops import ops_for
from xpcnn.ops.cpu_threads import THREADS_VARIABLE

#: Calls of one SimpleConvNet training step (gradient + AdaGrad, 16 images), per
#: (backend, table): measured (116 on the reference tables; 153 on NumPy's fast table, whose
#: Affine, ReLU and pooling entries work slice by slice and count each slice's calls) plus
#: one. Lower a budget when a change removes calls.
SIMPLE_STEP_CALLS = {("numpy", "reference"): 117, ("numpy", "fast"): 154, ("array_api_strict", "reference"): 117}
#: One step of a small DeepConvNet (1x12x12 inputs, 4 images, Adam) on NumPy: measured 421
#: (reference) and 677 (fast: five multi-channel convolutions in cache-sized chunks, padded
#: slice by slice, and the sliced Affine, ReLU and pooling), plus one.
DEEP_STEP_CALLS = {"reference": 422, "fast": 678}
#: NumPy's fast multi-channel convolution, forward and backward (two chunks): measured 106 (the
#: padding, slice by slice, counts its slices and fills).
FAST_NUMPY_CONV_CALLS = 107
#: The fast path's budget (issue 9: <= 30; counted on a GPU machine).
FAST_STEP_CALLS = 30


def _make_simple(backend):
    return SimpleConvNet(backend=backend, seed=0), AdaGrad(lr=0.06), (16, 1, 28, 28)


def _make_deep(backend):
    return DeepConvNet(input_dim=(1, 12, 12), backend=backend, seed=0), Adam(lr=0.001), (4, 1, 12, 12)


def count_step_calls(backend, make=_make_simple):
    """Calls made by one training step (after a first, warm-up step), and the weights after it."""
    be = counting_backend(backend)
    rng = np.random.default_rng(0)
    with count_calls() as counter:
        net, optimizer, shape = make(be)
        x, t = be.asarray(rng.random(shape), "float32"), be.asarray(rng.integers(0, 10, shape[0]))
        optimizer.update(net.params, net.gradient(x, t))
        counter.reset()
        optimizer.update(net.params, net.gradient(x, t))
        calls = counter.calls
    return calls, {k: be.to_numpy(v) for k, v in net.params.items()}


def plain_step_weights(backend, make=_make_simple):
    """The weights after two plain steps, in one slice of the batch as a counted step runs
    (`xpcnn.ops.cpu_threads`: slices add their sums in another order)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(THREADS_VARIABLE, "1")
        return _plain_step_weights(backend, make)


def _plain_step_weights(backend, make):
    rng = np.random.default_rng(0)
    net, optimizer, shape = make(backend)
    x, t = backend.asarray(rng.random(shape), "float32"), backend.asarray(rng.integers(0, 10, shape[0]))
    for _ in range(2):
        optimizer.update(net.params, net.gradient(x, t))
    return {k: backend.to_numpy(v) for k, v in net.params.items()}


def _check_budget(what, calls, budget, counted, plain):
    print(f"{what}: {calls} array-library calls per training step")
    assert 0 < calls <= budget, f"{what}: {calls} calls per step, more than the {budget} held"
    for key in plain:                        # counting changes nothing in the arithmetic
        np.testing.assert_array_equal(counted[key], plain[key])


@pytest.mark.parametrize("name, table", list(SIMPLE_STEP_CALLS))
def test_step_call_count_is_held(name, table):
    backend = get_backend(name, reference=table == "reference")
    assert ops_for(backend.xp, reference=backend.reference).reference == (table == "reference")
    calls, counted = count_step_calls(backend)
    _check_budget(f"{name} {table} table", calls, SIMPLE_STEP_CALLS[name, table], counted, plain_step_weights(backend))


def test_numpy_fast_one_channel_convolution_counts_what_the_reference_counts(rng):
    """NumPy's fast table runs the reference's code for a one-channel convolution (under a
    count, in one slice): the counts must agree (none were counted when the handed-back
    convolution went uncounted)."""
    counts = []
    for reference in (False, True):
        be = counting_backend(get_backend("numpy", reference=reference))
        ops = ops_for(be.xp, reference=reference)
        x = be.asarray(rng.standard_normal((4, 1, 12, 12)), "float32")
        W = be.asarray(rng.standard_normal((8, 1, 3, 3)), "float32")
        b = be.asarray(np.zeros(8), "float32")
        with count_calls() as counter:
            out, cache = ops.conv2d_forward(x, W, b, 1, 1, 12, 12)
            ops.conv2d_backward(out, cache, W, 1, 1, True)
            counts.append(counter.calls)
    fast, reference = counts
    assert 0 < fast == reference


@pytest.mark.parametrize("table", list(DEEP_STEP_CALLS))
def test_deep_step_call_count_is_held_on_numpy(table):
    backend = get_backend("numpy", reference=table == "reference")
    calls, counted = count_step_calls(backend, _make_deep)
    _check_budget(f"numpy {table} table, DeepConvNet", calls, DEEP_STEP_CALLS[table], counted,
                  plain_step_weights(backend, _make_deep))


def test_fast_numpy_convolution_reports_its_calls(rng):
    """NumPy's channels-last convolution calls NumPy directly; it reports those calls itself
    (none were counted before), one more chunk or copy fails the budget."""
    be = counting_backend(get_backend("numpy"))
    ops = ops_for(be.xp)
    x = be.asarray(rng.standard_normal((7, 16, 28, 28)), "float32")     # two chunks of images
    W = be.asarray(rng.standard_normal((16, 16, 3, 3)), "float32")
    b = be.asarray(np.zeros(16), "float32")
    dout = be.asarray(rng.standard_normal((7, 16, 28, 28)), "float32")
    with count_calls() as counter:
        _, cache = ops.conv2d_forward(x, W, b, 1, 1, 28, 28)
        forward = counter.calls
        ops.conv2d_backward(dout, cache, W, 1, 1, True)
        calls = counter.calls
    assert 0 < forward < calls <= FAST_NUMPY_CONV_CALLS, (forward, calls)


def test_counter_sees_operators_and_in_place_updates():
    be = counting_backend(get_backend("numpy"))
    with count_calls() as counter:
        a = be.asarray(np.ones(3), "float32")        # 1
        b = a * 2 + 1                                 # 2
        b += a                                        # 1
        b[0] = 5.0                                    # 1
        assert be.xp.isdtype(b.dtype, "real floating")   # a query: not counted
        total = be.xp.sum(b)                          # 1
    assert counter.calls == 6
    assert float(total) == 5.0 + 4.0 + 4.0


def test_fast_gpu_step_call_count(gpu_backend):
    calls, _ = count_step_calls(gpu_backend)
    print(f"cupy fast path: {calls} array-library calls per training step")
    assert calls <= FAST_STEP_CALLS
