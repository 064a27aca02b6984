"""Checkpoints: bitwise round trips, resumed training equal to uninterrupted training,
refusal of mismatched / corrupted / pickled files, and atomic writes (ENOSPC, SIGKILL)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import xpcnn.training.checkpoint as ckpt_mod
from xpcnn.models import SimpleConvNet
from xpcnn.nn.optim import make_optimizer
from xpcnn.training.checkpoint import (
    CheckpointError,
    build_from_checkpoint,
    generator_from_state,
    load_checkpoint,
    make_optimizer_from_checkpoint,
    restore,
    save_checkpoint,
)

SMALL_CONV = {"filter_num": 4, "filter_size": 3, "pad": 0, "stride": 1}
OPTIMIZER_NAMES = ["sgd", "momentum", "adagrad", "adam"]
OPTIMIZER_LR = {"sgd": 0.1, "momentum": 0.05, "adagrad": 0.05, "adam": 0.01}


def make_net(backend="numpy", seed=0, **overrides):
    kwargs = dict(input_dim=(1, 10, 10), conv_param=SMALL_CONV, hidden_size=8, output_size=3, seed=seed)
    kwargs.update(overrides)
    return SimpleConvNet(backend=backend, **kwargs)


def host_data(n=40, seed=7):
    data_rng = np.random.default_rng(seed)
    return data_rng.standard_normal((n, 1, 10, 10)).astype(np.float32), data_rng.integers(0, 3, n)


def train_steps(net, optimizer, batch_rng, steps, data, batch_size=8):
    """`steps` SGD-style steps on batches drawn with `batch_rng`; returns the host losses."""
    x_all, t_all = data
    losses = []
    for _ in range(steps):
        idx = batch_rng.choice(x_all.shape[0], batch_size, replace=False)
        x = net.backend.asarray(x_all[idx], dtype=net.dtype)
        t = net.backend.asarray(t_all[idx])
        grads = net.gradient(x, t)
        optimizer.update(net.params, grads)
        losses.append(net.backend.to_float(net.last_layer.loss))
    return losses


def host_params(net):
    return {key: net.backend.to_numpy(value).copy() for key, value in net.params.items()}


def host_state(net, optimizer):
    state = optimizer.state_dict()
    return {key: (value if key == "iterations" else net.backend.to_numpy(value).copy()) for key, value in state.items()}


def assert_bitwise_equal(actual, expected, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.tobytes() == expected.tobytes(), f"{what}: values differ"


def assert_dicts_bitwise_equal(actual, expected, what):
    assert sorted(actual) == sorted(expected), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
    for key in expected:
        if key == "iterations":
            assert actual[key] == expected[key], f"{what}: iterations {actual[key]} != {expected[key]}"
        else:
            assert_bitwise_equal(actual[key], expected[key], f"{what}[{key}]")


@pytest.fixture
def trained(tmp_path):
    """A numpy net trained 3 steps with AdaGrad, saved at epoch 1 / step 3."""
    net, optimizer = make_net(), make_optimizer("adagrad", lr=0.05)
    batch_rng = np.random.default_rng(3)
    train_steps(net, optimizer, batch_rng, 3, host_data())
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, net, optimizer, epoch=1, step=3, rng_state=batch_rng, history={"loss": [1.0, 0.5]})
    return path, net, optimizer


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_round_trip_is_bitwise(backend, name, tmp_path):
    net, optimizer = make_net(backend), make_optimizer(name, lr=OPTIMIZER_LR[name])
    batch_rng = np.random.default_rng(11)
    losses = train_steps(net, optimizer, batch_rng, 3, host_data())
    history = {"train_loss": [np.float32(v) for v in losses], "test_acc": [0.25, 0.5]}
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, net, optimizer, epoch=2, step=3, rng_state=batch_rng, history=history,
                    extra={"note": "hello", "mask": np.arange(5, dtype=np.int16)})
    saved_params, saved_state = host_params(net), host_state(net, optimizer)

    ckpt = load_checkpoint(path)
    assert_dicts_bitwise_equal(ckpt.params, saved_params, "loaded params")
    assert ckpt.optimizer_name == name
    assert ckpt.optimizer_hparams["lr"] == OPTIMIZER_LR[name]
    assert_dicts_bitwise_equal(ckpt.optimizer_state, saved_state, "loaded optimizer state")
    assert (ckpt.epoch, ckpt.step) == (2, 3)
    assert ckpt.history == {"train_loss": [float(v) for v in losses], "test_acc": [0.25, 0.5]}
    assert ckpt.metadata["backend"] == net.backend.name
    assert ckpt.metadata["dtype"] == "float32"
    assert ckpt.metadata["architecture"] == {"class": "SimpleConvNet", "config": net.config}
    assert ckpt.extra["note"] == "hello"
    assert_bitwise_equal(ckpt.extra["mask"], np.arange(5, dtype=np.int16), "extra mask")
    # The RNG continues exactly where the saved one stood.
    np.testing.assert_array_equal(generator_from_state(ckpt.rng_state).random(4), batch_rng.random(4))

    other, other_optimizer = make_net(backend, seed=99), make_optimizer(name)
    assert not np.array_equal(host_params(other)["W1"], saved_params["W1"])  # so the copy matters
    shared = {key: value for key, value in other.params.items()}
    restore(ckpt, other, other_optimizer)
    assert_dicts_bitwise_equal(host_params(other), saved_params, "restored params")
    assert_dicts_bitwise_equal(host_state(other, other_optimizer), saved_state, "restored optimizer state")
    # In place: the same arrays, still shared with the layers.
    for key, value in shared.items():
        assert other.params[key] is value
    assert other.layers["Conv1"].W is other.params["W1"]
    assert other.layers["Affine2"].b is other.params["b3"]
    for slot in other_optimizer.state.values():
        for value in slot.values():
            assert other.backend.owns(value), "optimizer state must live on the network's backend/device"


def test_metadata_is_plain_json_without_big_ints(trained):
    path, _, _ = trained
    with np.load(path, allow_pickle=False) as npz:
        assert not any(npz[key].dtype.hasobject for key in npz.files)
        raw = npz["metadata"]
    assert raw.dtype == np.uint8
    metadata = json.loads(raw.tobytes().decode("utf-8"))

    def walk(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from walk(item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)
        else:
            yield value

    ints = [v for v in walk(metadata) if isinstance(v, int) and not isinstance(v, bool)]
    assert all(abs(v) < 2 ** 53 for v in ints), "integers beyond 2**53 must be tagged strings"
    assert metadata["format_version"] == ckpt_mod.FORMAT_VERSION
    assert metadata["xpcnn_version"]
    # The 128-bit PCG64 state survives exactly.
    assert load_checkpoint(path).rng_state["state"]["state"] > 2 ** 64


def test_metadata_as_0d_unicode_array_is_accepted(trained, tmp_path):
    path, net, _ = trained
    with np.load(path, allow_pickle=False) as npz:
        entries = {key: npz[key] for key in npz.files}
    entries["metadata"] = np.array(entries["metadata"].tobytes().decode("utf-8"))
    other = tmp_path / "unicode.npz"
    np.savez(other, **entries)
    assert load_checkpoint(other).epoch == 1


# --------------------------------------------------------------------------- resuming

@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("how", ["restore", "build"])
def test_training_continues_identically_after_restore(backend, name, how, tmp_path):
    data = host_data()
    net, optimizer = make_net(backend), make_optimizer(name, lr=OPTIMIZER_LR[name])
    batch_rng = np.random.default_rng(5)
    train_steps(net, optimizer, batch_rng, 3, data)
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, net, optimizer, epoch=0, step=3, rng_state=batch_rng)
    uninterrupted_losses = train_steps(net, optimizer, batch_rng, 4, data)

    ckpt = load_checkpoint(path)
    if how == "restore":
        resumed, resumed_optimizer = make_net(backend, seed=42), make_optimizer(name, lr=OPTIMIZER_LR[name])
        restore(ckpt, resumed, resumed_optimizer)
    else:
        resumed = build_from_checkpoint(ckpt, backend=backend)
        resumed_optimizer = make_optimizer_from_checkpoint(ckpt, resumed)
        assert type(resumed_optimizer) is type(optimizer)
    resumed_losses = train_steps(resumed, resumed_optimizer, generator_from_state(ckpt.rng_state), 4, data)

    assert resumed_losses == uninterrupted_losses
    assert_dicts_bitwise_equal(host_params(resumed), host_params(net), "params after resumed training")
    assert_dicts_bitwise_equal(host_state(resumed, resumed_optimizer), host_state(net, optimizer),
                               "optimizer state after resumed training")


def test_restore_clears_state_the_checkpoint_does_not_have(tmp_path):
    # Saved before the first update: no state yet. A used optimizer must come back empty.
    net = make_net()
    path = tmp_path / "fresh.npz"
    save_checkpoint(path, net, make_optimizer("adagrad"))
    used = make_optimizer("adagrad")
    train_steps(net, used, np.random.default_rng(0), 1, host_data())
    restore(load_checkpoint(path), net, used)
    assert used.state == {"h": {}} and used.iterations == 0


def test_build_from_checkpoint_keeps_dtype_and_config(tmp_path):
    net = make_net(dtype="float64", hidden_size=6)
    path = tmp_path / "f64.npz"
    save_checkpoint(path, net)
    built = build_from_checkpoint(load_checkpoint(path))
    assert built.config == net.config
    assert str(built.params["W1"].dtype) == "float64"
    assert_dicts_bitwise_equal(host_params(built), host_params(net), "built params")
    with pytest.raises(CheckpointError, match="no optimizer"):
        make_optimizer_from_checkpoint(load_checkpoint(path))


# --------------------------------------------------------------------------- mismatches

@pytest.mark.parametrize("overrides, key, saved, current", [
    ({"hidden_size": 16}, "hidden_size", "8", "16"),
    ({"conv_param": {**SMALL_CONV, "filter_num": 6}}, "conv_param.filter_num", "4", "6"),
    ({"input_dim": (1, 12, 12)}, "input_dim", "[1, 10, 10]", "[1, 12, 12]"),
])
def test_wrong_architecture_is_refused_naming_both(trained, overrides, key, saved, current):
    path, _, _ = trained
    other, optimizer = make_net(seed=1, **overrides), make_optimizer("adagrad")
    before = host_params(other)
    with pytest.raises(CheckpointError) as info:
        restore(load_checkpoint(path), other, optimizer)
    message = str(info.value)
    assert key in message
    assert f"checkpoint has {saved}" in message and f"network has {current}" in message
    assert_dicts_bitwise_equal(host_params(other), before, "params after a refused restore")
    assert optimizer.state == {"h": {}}


def test_init_only_config_difference_is_accepted(trained):
    path, net, _ = trained
    other = make_net(seed=1, weight_init_std=0.5)
    restore(load_checkpoint(path), other)
    assert_dicts_bitwise_equal(host_params(other), host_params(net), "params")


def test_wrong_dtype_is_refused_naming_both(trained):
    path, _, _ = trained
    other = make_net(dtype="float64")
    before = host_params(other)
    with pytest.raises(CheckpointError) as info:
        restore(load_checkpoint(path), other)
    assert "float32" in str(info.value) and "float64" in str(info.value)
    assert_dicts_bitwise_equal(host_params(other), before, "params after a refused restore")


def test_wrong_optimizer_is_refused_before_anything_changes(trained):
    path, _, _ = trained
    other, adam = make_net(seed=1), make_optimizer("adam")
    before = host_params(other)
    with pytest.raises(CheckpointError) as info:
        restore(load_checkpoint(path), other, adam)
    assert "adagrad" in str(info.value) and "adam" in str(info.value)
    assert_dicts_bitwise_equal(host_params(other), before, "params after a refused restore")


# --------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("keep", ["10 bytes", "half", "all but 1 byte", "empty"])
def test_truncated_file_is_refused(trained, keep):
    path, _, _ = trained
    data = path.read_bytes()
    size = {"10 bytes": 10, "half": len(data) // 2, "all but 1 byte": len(data) - 1, "empty": 0}[keep]
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match="ckpt.npz"):
        load_checkpoint(path)


def test_corrupted_member_is_refused(trained):
    path, _, _ = trained
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside some member's bytes: the zip CRC check catches it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_text_file_and_missing_file_and_npy_are_refused(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not an .npz"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(CheckpointError):
        load_checkpoint(npy)


def test_missing_metadata_and_unknown_version_are_refused(trained, tmp_path):
    path, _, _ = trained
    with np.load(path, allow_pickle=False) as npz:
        entries = {key: npz[key] for key in npz.files}
    no_meta = tmp_path / "no_meta.npz"
    np.savez(no_meta, **{k: v for k, v in entries.items() if k != "metadata"})
    with pytest.raises(CheckpointError, match="metadata"):
        load_checkpoint(no_meta)

    metadata = json.loads(entries["metadata"].tobytes().decode("utf-8"))
    metadata["format_version"] = 999
    future = tmp_path / "future.npz"
    np.savez(future, **{**entries, "metadata": np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)})
    with pytest.raises(CheckpointError, match="format version 999"):
        load_checkpoint(future)


class _CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``, which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_array_is_refused_and_never_unpickled(trained, tmp_path):
    path, _, _ = trained
    marker = tmp_path / "unpickled.marker"
    with np.load(path, allow_pickle=False) as npz:
        entries = {key: npz[key] for key in npz.files}
    evil = tmp_path / "evil.npz"
    evil_array = np.empty(1, dtype=object)
    evil_array[0] = _CreatesFileWhenUnpickled(marker)
    np.savez(evil, **entries, **{"extra/payload": evil_array}, allow_pickle=True)

    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(evil)
    assert not marker.exists(), "load_checkpoint unpickled the object array"

    # Control: the payload is live, so the assertion above could fail.
    with np.load(evil, allow_pickle=True) as npz:
        npz["extra/payload"][0].close()
    assert marker.exists()


def test_plain_pickle_file_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled.marker"
    evil = tmp_path / "evil.npz"
    evil.write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    assert not marker.exists()


def test_unsaveable_values_are_refused_before_touching_the_file(trained):
    path, net, _ = trained
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="history"):
        save_checkpoint(path, net, history={"loss": [object()]})
    with pytest.raises(CheckpointError, match="extra"):
        save_checkpoint(path, net, extra={"objects": np.array([None, 1], dtype=object)})
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


# --------------------------------------------------------------------------- atomic writes

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _partial_write_then_enospc(fh, arrays):
    fh.write(b"PK\x03\x04" + b"\0" * 1000)  # a half-written zip in the temp file
    _enospc()


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_failed_write_keeps_previous_checkpoint(trained, monkeypatch, failing):
    path, net, optimizer = trained
    before = host_params(net)
    train_steps(net, optimizer, np.random.default_rng(1), 1, host_data())  # new weights to save
    if failing == "write":
        monkeypatch.setattr(ckpt_mod, "_write_npz", _partial_write_then_enospc)
    elif failing == "fsync":
        monkeypatch.setattr(os, "fsync", _enospc)
    else:
        monkeypatch.setattr(os, "replace", _enospc)

    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, net, optimizer, epoch=2, step=4)
    message = str(info.value)
    assert str(path) in message and "ENOSPC" in message and os.strerror(errno.ENOSPC) in message
    monkeypatch.undo()

    assert os.listdir(path.parent) == [path.name], "the temporary file must be removed"
    old = load_checkpoint(path)
    assert old.epoch == 1
    assert_dicts_bitwise_equal(old.params, before, "previous checkpoint params")


def test_missing_directory_is_reported(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "ckpt.npz"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(target, make_net())
    assert str(target) in str(info.value) and os.strerror(errno.ENOENT) in str(info.value)


_CHILD_PRELUDE = """
import sys, time
import numpy as np
import xpcnn.training.checkpoint as ck
from xpcnn.models import SimpleConvNet
path = sys.argv[1]
net = SimpleConvNet(input_dim=(1, 10, 10), conv_param={"filter_num": 4, "filter_size": 3, "pad": 0, "stride": 1},
                    hidden_size=8, output_size=3, seed=0)
"""

_CHILD_STOPS_MID_SAVE = _CHILD_PRELUDE + """
real_write = ck._write_npz
def write_then_hang(fh, arrays):
    fh.write(b"PK\\x03\\x04")
    real_write(fh, arrays)
    fh.flush()
    print("in-write", flush=True)
    time.sleep(60)
ck._write_npz = write_then_hang
ck.save_checkpoint(path, net, epoch=2)
"""

_CHILD_SAVES_IN_A_LOOP = _CHILD_PRELUDE + """
big = np.empty(6_000_000, dtype=np.float32)
for i in range(10_000):
    big.fill(i)
    start = time.perf_counter()
    ck.save_checkpoint(path, net, epoch=i, extra={"big": big})
    print(f"saved {i} {time.perf_counter() - start:.6f}", flush=True)
"""


def _spawn(script, path):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first_line(proc):
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        pytest.fail(f"child exited early (rc {proc.returncode}): {proc.stderr.read()}")
    return line


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stderr.close()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    previous = make_net(seed=1)
    save_checkpoint(path, previous, epoch=1)
    proc = _spawn(_CHILD_STOPS_MID_SAVE, path)
    try:
        assert _first_line(proc).strip() == "in-write"
    finally:
        _kill(proc)
    ckpt = load_checkpoint(path)
    assert ckpt.epoch == 1
    assert_dicts_bitwise_equal(ckpt.params, host_params(previous), "params after the killed save")
    leftovers = [name for name in os.listdir(tmp_path) if name != path.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.npz.") and leftovers[0].endswith(".tmp")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
@pytest.mark.parametrize("fraction_of_a_save", [0.1, 0.5, 0.9])
def test_sigkill_while_saving_big_checkpoints_in_a_loop(tmp_path, fraction_of_a_save):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, make_net(), epoch=-1, extra={"big": np.full(10, -1, dtype=np.float32)})
    proc = _spawn(_CHILD_SAVES_IN_A_LOOP, path)
    try:
        seconds_per_save = float(_first_line(proc).split()[2])
        # The child is now inside its next save: kill it part way through.
        time.sleep(fraction_of_a_save * seconds_per_save)
    finally:
        _kill(proc)
    ckpt = load_checkpoint(path)  # whichever save completed last, whole
    assert ckpt.epoch >= -1
    big = ckpt.extra["big"]
    assert big.dtype == np.float32 and np.all(big == ckpt.epoch), "file mixes two saves"
    assert_dicts_bitwise_equal(ckpt.params, host_params(make_net()), "params")
