"""CPU/GPU agreement (skipped where CuPy or a CUDA device is missing).

float32 weights after many AdaGrad steps cannot be compared tightly on any implementation:
AdaGrad's first steps are about lr * sign(g), so one ulp of rounding in a near-zero gradient
flips a whole +-lr step (on the CPU alone, 1e-7 relative noise in the input moves W1 by
1.8e-2 after 50 steps). So float32 is compared where it is well defined - the gradients of
one step from identical weights - and by the accuracy a short real-data run reaches; float64
is compared weight for weight after 50 steps.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xpcnn import AdaGrad, SimpleConvNet, Trainer, get_backend

from helpers import REPO, isolated_env

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _relative(a, b):
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) or 1.0))


def _batches(x_host, t_host, steps, size=32):
    order = np.random.default_rng(4)
    return [order.choice(x_host.shape[0], size, replace=False) for _ in range(steps)]


def _data():
    rng = np.random.default_rng(0)
    return rng.random((256, 1, 28, 28)), rng.integers(0, 10, 256)


def test_float32_gradients_of_one_step_agree(gpu_backend):
    x_host, t_host = _data()
    grads = []
    for backend in (get_backend("cpu"), gpu_backend):
        net = SimpleConvNet(backend=backend, seed=11)
        g = net.gradient(backend.asarray(x_host[:100], "float32"), backend.asarray(t_host[:100]))
        grads.append({k: backend.to_numpy(v) for k, v in g.items()})
    for key in grads[0]:
        diff = _relative(grads[1][key], grads[0][key])
        print(f"float32 {key}: {diff:.2e}")
        assert diff <= 1e-5, f"{key}: {diff:.2e}"


def test_float64_weights_agree_after_50_steps(gpu_backend):
    x_host, t_host = _data()
    weights = []
    for backend in (get_backend("cpu"), gpu_backend):
        net = SimpleConvNet(backend=backend, dtype="float64", seed=11)
        x, t = backend.asarray(x_host, "float64"), backend.asarray(t_host)
        optimizer = AdaGrad(lr=0.06)
        for idx in _batches(x_host, t_host, 50):
            index = backend.asarray(idx)
            optimizer.update(net.params, net.gradient(backend.xp.take(x, index, axis=0),
                                                      backend.xp.take(t, index, axis=0)))
        weights.append({k: backend.to_numpy(v) for k, v in net.params.items()})
    for key in weights[0]:
        diff = _relative(weights[1][key], weights[0][key])
        print(f"float64 {key}: {diff:.2e}")
        assert diff <= 1e-10, f"{key}: {diff:.2e}"


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_short_real_run_reaches_the_same_accuracy(gpu_backend):
    from xpcnn import load_dataset

    (x_train, t_train), (x_test, t_test) = load_dataset("fashion-mnist", flatten=False)
    accuracies = []
    for backend in (get_backend("cpu"), gpu_backend):
        net = SimpleConvNet(backend=backend, seed=0)
        trainer = Trainer(net, x_train[:5000], t_train[:5000], x_test, t_test, epochs=2, mini_batch_size=100,
                          optimizer="adagrad", optimizer_param={"lr": 0.06}, verbose=False, seed=0)
        accuracies.append(trainer.train().test_acc[-1])
    print("test accuracy cpu, gpu:", accuracies)
    assert abs(accuracies[0] - accuracies[1]) <= 0.01, accuracies


def test_gpu_arrays_stay_on_the_device(gpu_backend):
    import cupy

    net = SimpleConvNet(backend=gpu_backend, seed=0)
    x = gpu_backend.asarray(np.random.default_rng(0).random((8, 1, 28, 28)), "float32")
    grads = net.gradient(x, gpu_backend.asarray(np.arange(8) % 10))
    assert all(isinstance(g, cupy.ndarray) for g in grads.values())
    assert isinstance(net.last_layer.loss, cupy.ndarray)


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("options, option_named", [
    (["--batch-size", "20000"], "--batch-size"),
    (["--eval-batch-size", "60000", "--train-size", "1000"], "--eval-batch-size"),
])
def test_out_of_gpu_memory_is_one_line_with_its_exit_code(gpu_backend, tmp_path, options, option_named):
    env = isolated_env(tmp_path, CUPY_GPU_MEMORY_LIMIT="300000000")
    done = subprocess.run([sys.executable, "-m", "xpcnn.cli", "train", "--backend", "gpu", "--epochs", "1", "--quiet",
                           "--no-plots", "--out", str(tmp_path / "run"), *options],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 8, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("xpcnn: error: out of memory") and option_named in done.stderr, done.stderr
