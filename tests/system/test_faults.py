"""Faults caused on purpose: SIGKILL while saving, Ctrl-C during training, a loss that
becomes NaN, a full disk, and the memory an evaluation of 60,000 images needs.

Each test causes the fault for real where it can (a subprocess killed with SIGKILL or
interrupted with SIGINT, a tiny tmpfs that fills up, a learning rate that overflows) and
checks what the issue asks: a clear error or exit code, and nothing lost (the previous
checkpoint still loads, byte for byte the same).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import xpcnn.training.checkpoint as checkpoint_module
from xpcnn import data
from xpcnn.errors import CheckpointError, TrainingError
from xpcnn.models import SimpleConvNet
from xpcnn.nn.optim import SGD, AdaGrad
from xpcnn.training import Trainer
from xpcnn.training.checkpoint import load_checkpoint, save_checkpoint

from helpers import isolated_env

REPO = Path(__file__).resolve().parents[2]
POSIX_SIGNALS = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def child_env(tmp_path: Path) -> dict[str, str]:
    return isolated_env(tmp_path, PYTHONUNBUFFERED="1")


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "xpcnn.cli", *argv]


def params_of(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files if key.startswith(("param/", "optim/"))}


def metadata_of(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(npz["metadata"].tobytes().decode("utf-8"))


def wait_for_first_checkpoint(run: subprocess.Popen, checkpoint: Path, timeout: float = 120) -> None:
    """Wait until the training `run` has finished its first epoch: its checkpoint appears
    (atomically, so it is complete once it exists); fail if the run ends or stalls first."""
    deadline = time.monotonic() + timeout
    while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), "the run never finished its first epoch"


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable MNIST-named dataset (2000 train / 200 test, 28x28): each class lights its own rows."""
    folder = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 2000), ("t10k", 200)):
        t = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for k in range(10):
            x[t == k, 2 * k:2 * k + 4, 4:24] += 150
        data.write_idx(folder / f"{prefix}-images-idx3-ubyte", x)
        data.write_idx(folder / f"{prefix}-labels-idx1-ubyte", t)
    return folder


# ------------------------------------------------------------------------------ SIGKILL while saving

KILLED_WRITER = textwrap.dedent("""
    import io, os, sys, time
    import numpy as np
    import xpcnn.training.checkpoint as ck
    from xpcnn.models import SimpleConvNet
    from xpcnn.nn.optim import AdaGrad

    path = sys.argv[1]
    net = SimpleConvNet(seed=0)
    ck.save_checkpoint(path, net, AdaGrad(0.1), epoch=1, step=0)
    print("saved", flush=True)

    real_write = ck._write_npz
    def write_half_then_hang(fh, arrays):
        buffer = io.BytesIO()
        real_write(buffer, arrays)
        payload = buffer.getvalue()
        fh.write(payload[: len(payload) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        print("half", flush=True)
        time.sleep(120)                    # the parent kills us here, mid-write
        fh.write(payload[len(payload) // 2:])
    ck._write_npz = write_half_then_hang

    net.params["W1"][...] += 1.0
    ck.save_checkpoint(path, net, AdaGrad(0.1), epoch=2, step=0)
    print("second save finished", flush=True)
""")


@POSIX_SIGNALS
def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env=child_env(tmp_path))
    try:
        assert proc.stdout.readline().strip() == "saved"
        saved = path.read_bytes()
        assert proc.stdout.readline().strip() == "half"
        # Half of the new checkpoint is on disk (fsync'ed) in a temporary file right now.
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint.npz.")]
        assert temps and temps[0].stat().st_size > 0
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == saved, "the checkpoint under the target name changed"
    ckpt = load_checkpoint(path)
    assert ckpt.epoch == 1
    with np.load(path) as npz:
        np.testing.assert_array_equal(ckpt.params["W1"], npz["param/W1"])


# ------------------------------------------------------------------------------ SIGINT and resume

#: Epochs of the runs the signals stop: enough that the rest of a run outlasts the signal's
#: delivery (an epoch of the digits takes about 0.1 s with the compiled kernels: at 3 epochs,
#: a run once finished before a SIGINT sent 0.3 s after its first checkpoint).
EPOCHS = 6
TRAIN_ARGS = ("train", "--dataset", "mnist", "--epochs", str(EPOCHS), "--batch-size", "50", "--seed", "3",
              "--log-every", "5", "--quiet", "--no-plots")


@POSIX_SIGNALS
def test_sigint_saves_exits_130_and_resume_matches_an_uninterrupted_run(tmp_path: Path, digits_dir: Path) -> None:
    env = child_env(tmp_path)
    args = (*TRAIN_ARGS, "--data-dir", str(digits_dir))
    reference_out, interrupted_out = tmp_path / "reference", tmp_path / "interrupted"
    reference = subprocess.Popen(cli(*args, "--out", str(reference_out)), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, env=env)
    interrupted = subprocess.Popen(cli(*args, "--out", str(interrupted_out)), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
    try:
        # Wait until epoch 1 is finished, then interrupt epoch 2.
        checkpoint = interrupted_out / "checkpoint.npz"
        wait_for_first_checkpoint(interrupted, checkpoint)
        time.sleep(0.3)
        interrupted.send_signal(signal.SIGINT)
        _, stderr = interrupted.communicate(timeout=120)
    finally:
        interrupted.kill()
    assert interrupted.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted by SIGINT at epoch" in stderr and f"--resume {checkpoint}" in stderr, stderr
    meta = metadata_of(checkpoint)
    assert (meta["epoch"], meta["step"]) < (EPOCHS, 0), "the checkpoint says training had finished"
    assert meta["epoch"] >= 1
    print(f"interrupted after epoch {meta['epoch']}, step {meta['step']}")

    resumed = subprocess.run(cli(*args, "--out", str(interrupted_out), "--resume", str(checkpoint)),
                             capture_output=True, text=True, env=env, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert f"epoch {meta['epoch']}, step {meta['step']}" in resumed.stdout

    _, ref_err = reference.communicate(timeout=180)
    assert reference.returncode == 0, ref_err
    expected, actual = params_of(reference_out / "checkpoint.npz"), params_of(checkpoint)
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)   # bit for bit
    assert metadata_of(checkpoint)["epoch"] == EPOCHS


def test_sigterm_saves_and_exits_143(tmp_path: Path, digits_dir: Path) -> None:
    """`docker stop` sends SIGTERM: the same clean stop as Ctrl-C, with exit code 128 + 15."""
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(*TRAIN_ARGS, "--data-dir", str(digits_dir), "--out", str(out)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(tmp_path))
    try:
        checkpoint = out / "checkpoint.npz"
        wait_for_first_checkpoint(proc, checkpoint)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr, stderr
    assert metadata_of(checkpoint)["epoch"] >= 1


# ------------------------------------------------------------------------------ NaN / inf loss

def nan_trainer(tmp_path: Path, on_nan: str, poisoned_steps: set[int]) -> Trainer:
    """A 4-steps-per-epoch Trainer whose batches become NaN at the given global steps (1-based)."""
    rng = np.random.default_rng(0)
    x, t = rng.random((40, 1, 10, 10), dtype=np.float32), rng.integers(0, 10, 40)
    net = SimpleConvNet(input_dim=(1, 10, 10), conv_param={"filter_num": 3, "filter_size": 3}, hidden_size=8, seed=0)
    real_gradient, calls = net.gradient, {"n": 0}

    def gradient(x_batch, t_batch):
        calls["n"] += 1
        if calls["n"] in poisoned_steps:
            x_batch = x_batch * float("nan")          # a poisoned input batch
        return real_gradient(x_batch, t_batch)

    net.gradient = gradient
    return Trainer(net, x, t, x[:10], t[:10], epochs=1, mini_batch_size=10, optimizer="adagrad",
                   optimizer_param={"lr": 0.05}, verbose=False, checkpoint_path=tmp_path / "checkpoint.npz",
                   on_nan=on_nan)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = nan_trainer(tmp_path, "stop", poisoned_steps={6})
    trainer.train()                                   # epoch 1: clean, writes the checkpoint
    good = (tmp_path / "checkpoint.npz").read_bytes()
    trainer.epochs = 2
    with np.errstate(invalid="ignore"), pytest.raises(TrainingError) as info:
        trainer.train()
    message = str(info.value)
    assert "nan" in message.lower() and "step 6" in message and "epoch 2, step 2 of 4" in message, message
    assert (tmp_path / "checkpoint.npz").read_bytes() == good
    assert load_checkpoint(tmp_path / "checkpoint.npz").epoch == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")], "temporary files left behind"


def test_nan_loss_with_on_nan_skip_skips_only_the_bad_steps(tmp_path: Path) -> None:
    trainer = nan_trainer(tmp_path, "skip", poisoned_steps={2, 7})
    trainer.epochs = 2
    with np.errstate(invalid="ignore"):
        history = trainer.train()
    assert history.skipped_steps == 2
    assert [i + 1 for i, v in enumerate(history.step_loss) if not np.isfinite(v)] == [2, 7]
    for key, value in trainer.network.params.items():
        assert np.all(np.isfinite(value)), f"{key} holds NaN/inf after skipped steps"
    assert load_checkpoint(tmp_path / "checkpoint.npz").epoch == 2


def _exploding_checkpoint(path: Path) -> bytes:
    """A checkpoint after epoch 1 whose optimizer (SGD, lr 1e30) makes the next steps overflow."""
    net = SimpleConvNet(seed=0)
    save_checkpoint(path, net, SGD(lr=1e30), epoch=1, step=0, rng_state=np.random.default_rng(0),
                    extra={"dataset": "mnist", "epochs": 2})
    return path.read_bytes()


@pytest.fixture(scope="module")
def nan_cli_run(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path):
    """``xpcnn train --resume`` from `_exploding_checkpoint`: (result, checkpoint path, its bytes before)."""
    out = tmp_path_factory.mktemp("nan-run")
    checkpoint = out / "checkpoint.npz"
    before = _exploding_checkpoint(checkpoint)
    result = subprocess.run(
        cli("train", "--resume", str(checkpoint), "--out", str(out), "--dataset", "mnist",
            "--data-dir", str(digits_dir), "--batch-size", "50", "--log-every", "1", "--quiet", "--no-plots"),
        capture_output=True, text=True, env=child_env(out), timeout=180)
    return result, checkpoint, before


def test_cli_nan_loss_exits_6_naming_the_step_and_keeps_the_checkpoint(nan_cli_run) -> None:
    result, checkpoint, before = nan_cli_run
    assert result.returncode == 6, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("xpcnn: error:")]
    assert len(errors) == 1, result.stderr
    found = re.search(r"loss became (nan|inf|-inf) at step (\d+) \(epoch 2, step (\d+) of 40\)", errors[0])
    assert found, errors[0]
    assert int(found.group(2)) == 40 + int(found.group(3))     # global step = epoch 1's 40 + step in epoch 2
    assert checkpoint.read_bytes() == before, "the last good checkpoint was overwritten"


def test_cli_nan_loss_prints_only_one_line_on_stderr(nan_cli_run) -> None:
    result, _, _ = nan_cli_run
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr


# ------------------------------------------------------------------------------ disk full

def _partial_write_then_enospc(fh, arrays) -> None:
    fh.write(b"PK\x03\x04" + b"\x00" * 4096)
    raise OSError(28, os.strerror(28))      # errno.ENOSPC


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_old_checkpoint(tmp_path, monkeypatch) -> None:
    trainer = nan_trainer(tmp_path, "stop", poisoned_steps=set())
    trainer.train()
    path = tmp_path / "checkpoint.npz"
    good = path.read_bytes()
    monkeypatch.setattr(checkpoint_module, "_write_npz", _partial_write_then_enospc)
    trainer.epochs = 2
    with pytest.raises(CheckpointError) as info:
        trainer.train()
    message = str(info.value)
    assert str(path) in message and "No space left on device" in message and "ENOSPC" in message, message
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"], "temporary file left behind"


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A real 256 KiB tmpfs (needs root and permission to mount; skipped otherwise)."""
    mount = shutil.which("mount")
    if os.name != "posix" or os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root")
    point = tmp_path / "tiny"
    point.mkdir()
    result = subprocess.run([mount, "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False)


def test_real_full_tmpfs_keeps_the_old_checkpoint(tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "checkpoint.npz"
    small = SimpleConvNet(input_dim=(1, 10, 10), conv_param={"filter_num": 3, "filter_size": 3}, hidden_size=8, seed=0)
    save_checkpoint(path, small, AdaGrad(0.1), epoch=1)
    good = path.read_bytes()
    big = SimpleConvNet(seed=0)                        # about 1.7 MB: cannot fit in 256 KiB
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, big, AdaGrad(0.1), epoch=2)
    assert "No space left on device" in str(info.value) and str(path) in str(info.value), str(info.value)
    assert path.read_bytes() == good
    assert load_checkpoint(path).epoch == 1
    assert [p.name for p in tiny_tmpfs.iterdir()] == ["checkpoint.npz"], "temporary file left behind"


@pytest.fixture
def cli_disk_full_run(tiny_tmpfs: Path, digits_dir: Path, tmp_path: Path):
    """``xpcnn train --out`` on the full tmpfs, over an older (small) checkpoint: (result, path, old bytes)."""
    out = tiny_tmpfs / "run"
    out.mkdir()
    path = out / "checkpoint.npz"
    small = SimpleConvNet(input_dim=(1, 10, 10), conv_param={"filter_num": 3, "filter_size": 3}, hidden_size=8, seed=0)
    save_checkpoint(path, small, AdaGrad(0.1), epoch=1)
    before = path.read_bytes()
    result = subprocess.run(
        cli("train", "--dataset", "mnist", "--data-dir", str(digits_dir), "--train-size", "200", "--test-size", "50",
            "--epochs", "1", "--quiet", "--no-plots", "--out", str(out)),
        capture_output=True, text=True, env=child_env(tmp_path), timeout=180)
    return result, path, before


def test_cli_disk_full_is_one_clear_line_and_keeps_the_old_checkpoint(cli_disk_full_run) -> None:
    from xpcnn.app.exit_codes import ExitCode

    result, path, before = cli_disk_full_run
    assert result.returncode not in (0, 1), result.stderr
    assert result.returncode in {int(code) for code in ExitCode}, "exit code not in the documented table"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(path) in lines[0] and "No space left on device" in lines[0], lines[0]
    assert path.read_bytes() == before
    assert load_checkpoint(path).epoch == 1


def test_cli_disk_full_exits_with_the_documented_io_code_7(cli_disk_full_run) -> None:
    result, _, _ = cli_disk_full_run
    assert result.returncode == 7, result.stderr


# ------------------------------------------------------------------------------ memory of a full evaluation

MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from xpcnn.models import SimpleConvNet

    n, batch = int(sys.argv[1]), int(sys.argv[2])
    net = SimpleConvNet(seed=0)
    x = np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)   # 188 MB for 60,000
    t = np.random.default_rng(1).integers(0, 10, n)
    net.accuracy(x[:10], t[:10])          # imports and first-call allocations out of the way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    accuracy = net.accuracy(x, t, batch_size=batch)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after, "accuracy": accuracy}))
""")

#: Peak RSS growth allowed while scoring 60,000 images in batches of 500. Measured: about
#: 205 MiB (docs/reliability.md). One unbatched im2col of 60,000 images would need
#: 60000*24*24 rows x 25 float32 columns = 3.5 GB for the column matrix alone.
EVAL_MEMORY_BOUND_MIB = 400


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_evaluating_60000_images_stays_under_a_memory_bound(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, "60000", "500"], capture_output=True, text=True,
                            env=child_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    growth_mib = (report["after_kib"] - report["before_kib"]) / 1024
    print(f"peak RSS growth while scoring 60,000 images: {growth_mib:.0f} MiB "
          f"(before {report['before_kib'] / 1024:.0f} MiB, after {report['after_kib'] / 1024:.0f} MiB)")
    assert 0.0 <= report["accuracy"] <= 1.0
    assert growth_mib < EVAL_MEMORY_BOUND_MIB, f"evaluation grew peak RSS by {growth_mib:.0f} MiB"
