"""CPU/GPU equivalence: the same seed and the same batches give the same weights on NumPy
and CuPy after 50 training steps (skipped where CuPy or a CUDA device is missing)."""

import numpy as np
import pytest

from xpcnn import AdaGrad, SimpleConvNet, get_backend


def train_50_steps(backend, dtype, x_host, t_host):
    net = SimpleConvNet(backend=backend, dtype=dtype, seed=11)
    be = net.backend
    x, t = be.asarray(x_host, dtype), be.asarray(t_host)
    optimizer = AdaGrad(lr=0.06)
    order = np.random.default_rng(4)
    for _ in range(50):
        idx = be.asarray(order.choice(x_host.shape[0], 32, replace=False))
        optimizer.update(net.params, net.gradient(be.xp.take(x, idx, axis=0), be.xp.take(t, idx, axis=0)))
    return {k: be.to_numpy(v) for k, v in net.params.items()}


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-4), ("float64", 1e-10)])
def test_cpu_and_gpu_training_agree(gpu_backend, dtype, rtol):
    rng = np.random.default_rng(0)
    x_host = rng.random((256, 1, 28, 28)).astype(dtype)
    t_host = rng.integers(0, 10, 256)
    cpu = train_50_steps(get_backend("cpu"), dtype, x_host, t_host)
    gpu = train_50_steps(gpu_backend, dtype, x_host, t_host)
    for key in cpu:
        diff = float(np.linalg.norm(gpu[key] - cpu[key]) / (np.linalg.norm(cpu[key]) or 1.0))
        print(f"{dtype} {key}: ||gpu - cpu|| / ||cpu|| = {diff:.2e}")
        assert diff < rtol, f"{key}: relative difference {diff:.2e} >= {rtol}"


def test_gpu_arrays_stay_on_the_device(gpu_backend):
    import cupy

    net = SimpleConvNet(backend=gpu_backend, seed=0)
    x = gpu_backend.asarray(np.random.default_rng(0).random((8, 1, 28, 28)), "float32")
    grads = net.gradient(x, gpu_backend.asarray(np.arange(8) % 10))
    assert all(isinstance(g, cupy.ndarray) for g in grads.values())
    assert isinstance(net.last_layer.loss, cupy.ndarray)
