"""Array-library calls per training step: counted on any backend by wrapping its namespace.

On a GPU each call is at least one kernel launch plus ~10-30 us of Python, so the count is
the budget of a fast step. CI holds the reference path's count here on the CPU (a change that
adds calls to a step fails); CuPy's fast path is counted on a GPU machine.
"""

import numpy as np
import pytest

from xpcnn import AdaGrad, SimpleConvNet, get_backend
from xpcnn.backend.counting import count_calls, counting_backend

#: Calls of one SimpleConvNet training step (gradient + AdaGrad) on the reference path,
#: measured when this test was written; lower it when a change removes calls.
REFERENCE_STEP_CALLS = 118
#: The fast path's budget (issue 9: <= 30; counted on a GPU machine).
FAST_STEP_CALLS = 30


def count_step_calls(backend):
    """Calls made by one training step (after a first, warm-up step), and the weights after it."""
    be = counting_backend(backend)
    rng = np.random.default_rng(0)
    with count_calls() as counter:
        net = SimpleConvNet(backend=be, seed=0)
        x, t = be.asarray(rng.random((16, 1, 28, 28)), "float32"), be.asarray(rng.integers(0, 10, 16))
        optimizer = AdaGrad(lr=0.06)
        optimizer.update(net.params, net.gradient(x, t))
        counter.reset()
        optimizer.update(net.params, net.gradient(x, t))
        calls = counter.calls
    return calls, {k: be.to_numpy(v) for k, v in net.params.items()}


def plain_step_weights(backend):
    rng = np.random.default_rng(0)
    net = SimpleConvNet(backend=backend, seed=0)
    x, t = backend.asarray(rng.random((16, 1, 28, 28)), "float32"), backend.asarray(rng.integers(0, 10, 16))
    optimizer = AdaGrad(lr=0.06)
    for _ in range(2):
        optimizer.update(net.params, net.gradient(x, t))
    return {k: backend.to_numpy(v) for k, v in net.params.items()}


@pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
def test_reference_step_call_count_is_held(name):
    calls, counted = count_step_calls(get_backend(name))
    print(f"{name}: {calls} array-library calls per training step (reference path)")
    assert 0 < calls <= REFERENCE_STEP_CALLS, f"{calls} calls per step, more than the {REFERENCE_STEP_CALLS} held"
    plain = plain_step_weights(get_backend(name))
    for key in plain:                        # counting changes nothing in the arithmetic
        np.testing.assert_array_equal(counted[key], plain[key])


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
