"""PyTorch as a third backend (``array_api_compat.torch``): names and clear errors, host <->
device transfers, autograd left off, whole training steps equal to NumPy's, checkpoints that
move between backends, and the CLI.

Every layer, gradient-check and optimizer test already runs on torch through the `backend`
fixture (tests/conftest.py); these are the checks of the backend itself. `torch:cuda` and
`torch:mps` skip with the reason where their device is missing, everything else where PyTorch
is not installed (except the test of that very message).
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from xpcnn import AdaGrad, SimpleConvNet, Trainer, get_backend
from xpcnn.backend import Backend, TorchBackend, backend_of, namespace_of
from xpcnn.cli import main
from xpcnn.errors import BackendMismatch, BackendUnavailable, ConfigError, DTypeError
from xpcnn.nn.optim import make_optimizer
from xpcnn.training.checkpoint import (
    build_from_checkpoint,
    load_checkpoint,
    make_optimizer_from_checkpoint,
    save_checkpoint,
)

from helpers import IN_CI, REPO, isolated_env, make_learnable_set, unavailable

HAVE_TORCH = importlib.util.find_spec("torch") is not None
# Under CI=true (.ci/run installs PyTorch's CPU build) a missing torch fails these tests.
needs_torch = pytest.mark.skipif(not HAVE_TORCH and not IN_CI,
                                 reason="PyTorch is not installed (pip install 'xpcnn[torch]')")

TORCH_NAMES = ["torch", "torch:cuda", "torch:mps"]


def backend_or_skip(name: str) -> Backend:
    try:
        return get_backend(name)
    except BackendUnavailable as exc:
        if name == "torch":
            unavailable(f"{name} unavailable: {exc}")     # the CPU build: CI installs it
        pytest.skip(f"{name} unavailable: {exc}")


@pytest.fixture(params=TORCH_NAMES)
def torch_backend(request) -> Backend:
    """PyTorch on each of its devices that is present here."""
    return backend_or_skip(request.param)


def compute_dtypes(backend: Backend) -> list[str]:
    return list(backend.float_dtypes)


# ----------------------------------------------------------------------------- names, errors

@needs_torch
@pytest.mark.parametrize("name", ["torch", "TORCH", "pytorch", "torch:cpu"])
def test_torch_names_give_the_cpu_backend(name):
    import array_api_compat.torch
    import torch

    backend = get_backend(name)
    assert backend.name == "torch" and backend.xp is array_api_compat.torch
    assert backend.device == torch.device("cpu")
    assert backend.float_dtypes == ("float32", "float64")
    assert str(backend) == "torch (cpu)"


@needs_torch
@pytest.mark.parametrize("name, device, words", [
    ("torch:xpu", None, ("unknown torch device 'xpu'", "'cuda'", "'mps'")),
    ("torch:cuda:x", None, ("unknown torch device 'cuda:x'",)),
    ("torch:mps:1", None, ("unknown torch device 'mps:1'",)),
    ("cpu:1", None, ("unknown backend 'cpu:1'", "'torch:cuda'")),
    ("torch", 1, ("device number applies to CUDA", "--backend torch:cuda --device 1")),
    ("torch:cuda", "mps", ("'torch:cuda' but device 'mps'",)),
])
def test_bad_torch_device_names_are_config_errors(name, device, words):
    with pytest.raises(ConfigError) as info:
        get_backend(name, device=device)
    for word in words:
        assert word in str(info.value), str(info.value)


@needs_torch
@pytest.mark.parametrize("name, words", [
    ("torch:cuda", ("sees no CUDA device", "CPU-only build", "--backend torch")),
    ("torch:mps", ("cannot use Apple's MPS", "--backend torch")),
])
def test_missing_accelerator_is_reported(name, words):
    import torch

    if ((name == "torch:cuda" and torch.cuda.is_available())
            or (name == "torch:mps" and torch.backends.mps.is_available())):
        pytest.skip(f"{name} is available here")
    with pytest.raises(BackendUnavailable) as info:
        get_backend(name)
    for word in words:
        assert word in str(info.value), str(info.value)


BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # as if PyTorch were not installed\n"


def test_missing_torch_says_how_to_install(tmp_path):
    code = BLOCK_TORCH + (
        "from xpcnn import get_backend\n"
        "from xpcnn.errors import BackendUnavailable\n"
        "try:\n    get_backend('torch')\n"
        "except BackendUnavailable as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=isolated_env(tmp_path),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs PyTorch, which is not installed" in done.stdout and "pip install 'xpcnn[torch]'" in done.stdout


def test_cli_without_torch_exits_3_with_one_line(tmp_path):
    code = BLOCK_TORCH + "import sys; from xpcnn.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "train", "--backend", "torch", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=isolated_env(tmp_path), timeout=120)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xpcnn: error: backend 'torch' needs PyTorch"), done.stderr


@needs_torch
@pytest.mark.parametrize("argv, code, words", [
    (["--backend", "torch:xpu"], 2, ("unknown torch device 'xpu'",)),
    (["--backend", "torch", "--device", "1"], 2, ("--backend torch:cuda --device 1",)),
])
def test_cli_bad_torch_backend_is_one_line(argv, code, words, tmp_path):
    done = subprocess.run([sys.executable, "-m", "xpcnn.cli", "train", *argv, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=isolated_env(tmp_path), timeout=120)
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


@needs_torch
def test_a_float32_only_device_refuses_float64_clearly():
    """Apple's MPS has no float64. MPS itself is tested only where present (`torch_backend`);
    here the same rule runs on a torch CPU backend declared float32-only, as MPS's is."""
    import array_api_compat.torch as xp_torch
    import torch

    float32_only = TorchBackend(xp_torch, torch.device("cpu"), float_dtypes=("float32",))
    with pytest.raises(DTypeError, match=r"has no float64: it computes in float32 only \(Apple's MPS has no float64\)"):
        SimpleConvNet(backend=float32_only, dtype="float64")
    with pytest.raises(DTypeError, match="has no float64"):
        float32_only.asarray(np.ones(3), "float64")
    assert SimpleConvNet(backend=float32_only, seed=0).params["W1"].dtype == torch.float32


def test_mps_computes_in_float32_only(torch_backend):
    if torch_backend.device.type != "mps":
        pytest.skip("only MPS lacks float64")
    with pytest.raises(DTypeError, match="has no float64"):
        SimpleConvNet(backend=torch_backend, dtype="float64")


def test_no_torch_code_above_the_backend_package():
    """Layers, optimizers, models, Trainer, checkpoints and the CLI know no torch: the namespace
    comes from array_api_compat; only xpcnn/backend/ imports or names torch in code. Reads
    source only, so it runs where torch is missing too."""
    pattern = re.compile(r"import torch|from torch|array_api_compat\.torch|is_torch_|\btorch\.|[\"']torch[\"']")
    checked, offenders = [], []
    for path in sorted((REPO / "xpcnn").rglob("*.py")):
        if "backend" in path.relative_to(REPO / "xpcnn").parts[:-1]:
            continue
        checked.append(path)
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert len(checked) >= 30, f"the guard read only {len(checked)} files: {checked}"
    assert not offenders, "\n".join(offenders)


# ------------------------------------------------------------------------------- transfers

def test_to_numpy_is_a_copy_that_later_updates_do_not_change(torch_backend):
    tensor = torch_backend.asarray(np.arange(6.0).reshape(2, 3), "float32")
    host = torch_backend.to_numpy(tensor)
    tensor += 1                                  # what an optimizer step does to a parameter
    np.testing.assert_array_equal(host, np.arange(6.0, dtype=np.float32).reshape(2, 3))
    assert torch_backend.to_float(torch_backend.xp.sum(tensor)) == 21.0


def test_asarray_casts_on_the_host_and_keeps_integers(torch_backend):
    import torch

    x = torch_backend.asarray(np.linspace(0, 1, 5), "float32")     # float64 host -> float32
    t = torch_backend.asarray(np.array([3, 1, 4], dtype=np.int64))
    assert x.dtype == torch.float32 and t.dtype == torch.int64
    assert x.device == torch_backend.device and t.device == torch_backend.device
    assert torch_backend.owns(x) and not torch_backend.owns(np.ones(2))
    assert backend_of(x).device == torch_backend.device and backend_of(x).name == "torch"


def test_read_only_host_arrays_are_copied_without_warnings(torch_backend):
    host = np.frombuffer(np.arange(4, dtype=np.float32).tobytes(), dtype=np.float32)   # read-only
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # torch warns when it shares a read-only array
        tensor = torch_backend.asarray(host, "float32")
    tensor *= 2
    np.testing.assert_array_equal(host, [0, 1, 2, 3])


@needs_torch
def test_numpy_and_torch_arrays_mixed_in_a_layer_are_reported():
    torch_backend = get_backend("torch")
    net = SimpleConvNet((1, 8, 8), {"filter_num": 2, "filter_size": 3, "pad": 0, "stride": 1}, hidden_size=4,
                        output_size=3, backend=torch_backend, seed=0)
    with pytest.raises(BackendMismatch, match="different backends"):
        net.layers["Conv1"].forward(np.zeros((1, 1, 8, 8), dtype=np.float32))
    with pytest.raises(BackendMismatch, match="different backends"):
        namespace_of(np.ones(2), torch_backend.asarray(np.ones(2), "float32"))


def test_parameter_views_share_the_flat_buffer(torch_backend):
    """`params["W1"]` is a view of `params.flat` on torch too: writes through either reach the
    other (`x[...] = y`, `p -= step` on reshaped slices), as the whole-buffer optimizers need."""
    net = SimpleConvNet((1, 8, 8), {"filter_num": 2, "filter_size": 3, "pad": 0, "stride": 1}, hidden_size=4,
                        output_size=3, backend=torch_backend, seed=0)
    params, xp = net.params, torch_backend.xp
    w1 = params["W1"]
    params.flat[...] = 0.0
    assert torch_backend.to_float(xp.sum(xp.abs(w1))) == 0.0
    w1 -= 1.5
    params["b1"] = torch_backend.asarray(np.full(2, 2.0), "float32")
    size = math.prod(w1.shape)
    host_flat = torch_backend.to_numpy(params.flat)
    assert (host_flat[:size] == -1.5).all() and (host_flat[size:size + 2] == 2.0).all()
    assert torch_backend.to_float(xp.sum(net.layers["Conv1"].W)) == -1.5 * size     # the layer sees it


def test_autograd_stays_off(torch_backend):
    """No tensor xpcnn makes asks for gradients, so autograd records nothing; and the global
    grad mode is left as it was (no torch.set_grad_enabled(False) behind the caller's back)."""
    import torch

    grad_mode = torch.is_grad_enabled()
    net = SimpleConvNet((1, 10, 10), {"filter_num": 3, "filter_size": 3, "pad": 1, "stride": 1}, hidden_size=6,
                        output_size=4, backend=torch_backend, seed=0)
    optimizer = AdaGrad(lr=0.05)
    rng = np.random.default_rng(0)
    x = torch_backend.asarray(rng.standard_normal((8, 1, 10, 10)), "float32")
    t = torch_backend.asarray(rng.integers(0, 4, 8))
    for _ in range(2):
        grads = net.gradient(x, t)
        optimizer.update(net.params, grads)
    tensors = {**net.params, **{f"grad {k}": v for k, v in grads.items()},
               **{k: v for k, v in optimizer.state_dict().items() if k != "iterations"},
               "loss": net.last_layer.loss, "scores": net.predict(x)}
    recorded = [key for key, value in tensors.items() if value.requires_grad or value.grad_fn is not None]
    assert not recorded, f"autograd recorded {recorded}"
    assert torch.is_grad_enabled() == grad_mode


# ------------------------------------------------------------------- agreement with NumPy

def run_steps(backend: Backend, dtype: str, steps: int, x_host: np.ndarray, t_host: np.ndarray,
              optimizer: str = "adagrad"):
    """`steps` optimizer steps of the book's SimpleConvNet on fixed batches; host params and losses."""
    net = SimpleConvNet(backend=backend, dtype=dtype, seed=11)
    x, t = backend.asarray(x_host, dtype), backend.asarray(t_host)
    optimizer = make_optimizer(optimizer, lr=0.06)
    order = np.random.default_rng(4)
    losses = []
    for _ in range(steps):
        idx = backend.asarray(order.choice(x_host.shape[0], 32, replace=False))
        grads = net.gradient(backend.xp.take(x, idx, axis=0), backend.xp.take(t, idx, axis=0))
        optimizer.update(net.params, grads)
        losses.append(backend.to_float(net.last_layer.loss))
    return {k: backend.to_numpy(v) for k, v in net.params.items()}, np.array(losses)


def relative_differences(actual: dict, expected: dict) -> dict:
    return {key: float(np.linalg.norm(actual[key].astype(np.float64) - expected[key])
                       / (np.linalg.norm(expected[key]) or 1.0)) for key in expected}


@pytest.mark.parametrize("dtype, steps, optimizer, rtol",
                         [("float32", 1, "sgd", 1e-5), ("float64", 50, "adagrad", 1e-10)])
def test_whole_steps_agree_with_numpy(torch_backend, dtype, steps, optimizer, rtol):
    """The same seed and batches give the same weights on NumPy and torch: after one SGD step in
    float32 and after fifty AdaGrad steps in float64 (relative norm of the difference, per
    parameter). Not AdaGrad in float32: its first step is about lr * sign(g), so one ulp of a
    near-zero gradient (the BLAS kernel's rounding) flips a whole step of that weight."""
    if dtype not in compute_dtypes(torch_backend):
        pytest.skip(f"{torch_backend} has no {dtype}")
    rng = np.random.default_rng(0)
    x_host = rng.random((256, 1, 28, 28)).astype(dtype)
    t_host = rng.integers(0, 10, 256)
    numpy_params, numpy_losses = run_steps(get_backend("cpu"), dtype, steps, x_host, t_host, optimizer)
    torch_params, torch_losses = run_steps(torch_backend, dtype, steps, x_host, t_host, optimizer)
    differences = relative_differences(torch_params, numpy_params)
    print(f"{torch_backend} {dtype}, {steps} step(s): ||torch - numpy|| / ||numpy|| = "
          + ", ".join(f"{k} {v:.1e}" for k, v in differences.items()))
    worst = max(differences, key=differences.get)
    assert differences[worst] <= rtol, f"{worst}: relative difference {differences[worst]:.2e} > {rtol}"
    np.testing.assert_allclose(torch_losses, numpy_losses, rtol=rtol)


def test_trainer_on_torch_matches_numpy(torch_backend):
    """The Trainer path (device permutation, take, batched evaluation) gives NumPy's history."""
    dtype = "float64" if "float64" in compute_dtypes(torch_backend) else "float32"
    rng = np.random.default_rng(5)
    data = (*make_learnable_set(rng, 300), *make_learnable_set(rng, 100))
    histories = []
    for backend in (get_backend("cpu"), torch_backend):
        net = SimpleConvNet((1, 12, 12), {"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1}, hidden_size=16,
                            output_size=4, weight_init_std=0.1, backend=backend, dtype=dtype, seed=0)
        x_train, t_train, x_test, t_test = data
        trainer = Trainer(net, x_train.astype(dtype), t_train, x_test.astype(dtype), t_test, epochs=2,
                          mini_batch_size=30, optimizer_param={"lr": 0.05}, seed=1, log_every=4, verbose=False)
        histories.append(trainer.train())
    numpy_history, torch_history = histories
    assert torch_history.test_acc == numpy_history.test_acc and torch_history.train_acc == numpy_history.train_acc
    np.testing.assert_allclose(torch_history.step_loss, numpy_history.step_loss,
                               rtol=1e-9 if dtype == "float64" else 1e-4)
    assert torch_history.test_acc[-1] > 0.8


# ------------------------------------------------------------------ checkpoints across backends

CROSS = [("numpy", "torch"), ("torch", "numpy"), ("torch", "array_api_strict"), ("array_api_strict", "torch"),
         ("torch:cuda", "numpy"), ("numpy", "torch:cuda"), ("torch:cuda", "torch"),
         ("cupy", "torch"), ("torch", "cupy"), ("torch:mps", "numpy"), ("numpy", "torch:mps")]


@pytest.mark.parametrize("source, target", CROSS, ids=[f"{a}->{b}" for a, b in CROSS])
def test_checkpoint_moves_between_backends(source, target, tmp_path):
    """Saved on one backend, loaded on another: the same weights and optimizer state, and
    training continues on the new backend as it would have on the old one."""
    src, dst = backend_or_skip(source), backend_or_skip(target)
    dtype = "float64" if "float64" in src.float_dtypes and "float64" in dst.float_dtypes else "float32"
    rng = np.random.default_rng(7)
    x_host, t_host = rng.standard_normal((40, 1, 10, 10)).astype(dtype), rng.integers(0, 3, 40)

    def steps(net, optimizer, count, seed):
        batch_rng = np.random.default_rng(seed)
        be = net.backend
        for _ in range(count):
            idx = batch_rng.choice(40, 8, replace=False)
            optimizer.update(net.params, net.gradient(be.asarray(x_host[idx], dtype), be.asarray(t_host[idx])))

    net = SimpleConvNet((1, 10, 10), {"filter_num": 4, "filter_size": 3, "pad": 0, "stride": 1}, hidden_size=8,
                        output_size=3, backend=src, dtype=dtype, seed=0)
    optimizer = make_optimizer("adagrad", lr=0.05)
    steps(net, optimizer, 3, seed=1)
    path = save_checkpoint(tmp_path / "ckpt.npz", net, optimizer, epoch=1, step=3)
    checkpoint = load_checkpoint(path)
    assert checkpoint.metadata["backend"] == src.name

    moved = build_from_checkpoint(checkpoint, backend=dst)
    moved_optimizer = make_optimizer_from_checkpoint(checkpoint, moved)
    assert moved.backend is dst and all(dst.owns(v) for v in moved.params.values())
    for key, value in net.params.items():        # the weights arrive exactly
        np.testing.assert_array_equal(dst.to_numpy(moved.params[key]), src.to_numpy(value))
    steps(net, optimizer, 4, seed=2)
    steps(moved, moved_optimizer, 4, seed=2)
    rtol = 1e-10 if dtype == "float64" else 1e-4
    differences = relative_differences({k: dst.to_numpy(v) for k, v in moved.params.items()},
                                       {k: src.to_numpy(v).astype(np.float64) for k, v in net.params.items()})
    assert max(differences.values()) <= rtol, differences


# ------------------------------------------------------------------------------------- CLI

@needs_torch
def test_cli_trains_on_torch_and_numpy_evaluates_the_checkpoint(fashion_like_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    common = ["--dataset", "fashion-mnist", "--data-dir", str(fashion_like_dir), "--batch-size", "50", "--quiet",
              "--seed", "2", "--epochs", "1"]
    assert main(["train", *common, "--backend", "torch", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "backend torch (cpu)" in printed
    for name in ("checkpoint.npz", "history.json", "history.csv", "loss.png", "accuracy.png", "filters.png"):
        assert (out / name).stat().st_size > 0, name
    reference = tmp_path / "reference"
    assert main(["train", *common, "--backend", "cpu", "--no-plots", "--out", str(reference)]) == 0
    torch_run, numpy_run = np.load(out / "checkpoint.npz"), np.load(reference / "checkpoint.npz")
    keys = [k for k in numpy_run.files if k.startswith("param/")]
    differences = relative_differences({k: torch_run[k] for k in keys},
                                       {k: numpy_run[k].astype(np.float64) for k in keys})
    assert max(differences.values()) <= 1e-3, differences    # 12 float32 steps on two libraries

    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint.npz"), "--data-dir", str(fashion_like_dir), "--backend", "cpu"]) == 0
    on_numpy = capsys.readouterr().out
    assert main(["evaluate", str(out / "checkpoint.npz"), "--data-dir", str(fashion_like_dir),
                 "--backend", "torch"]) == 0
    on_torch = capsys.readouterr().out
    accuracy = re.compile(r"test acc (\d\.\d{4}) on 200 images")
    assert accuracy.search(on_numpy) and accuracy.search(on_numpy).group(1) == accuracy.search(on_torch).group(1)
    assert "backend numpy (cpu)" in on_numpy and "backend torch (cpu)" in on_torch

