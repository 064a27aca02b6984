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
from xpcnn import __version__
from xpcnn.backend.devices import get_backend
from xpcnn.models import MultiLayerNetExtend, SimpleConvNet
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
        assert type(resumed_optimizer) is type(optimizer) and resumed.backend.name == net.backend.name
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
    with pytest.raises(CheckpointError) as info:
        make_optimizer_from_checkpoint(load_checkpoint(path))
    assert str(info.value) == "checkpoint holds no optimizer"


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


# ------------------------------------------------- BatchNorm, Dropout, optimizers of one's own

def make_extend(seed=0, **overrides):
    kwargs = dict(input_size=12, hidden_size_list=[6, 5], output_size=3, use_dropout=True, use_batchnorm=True,
                  seed=seed)
    kwargs.update(overrides)
    return MultiLayerNetExtend(**kwargs)


def _extend_data():
    data_rng = np.random.default_rng(4)
    return data_rng.standard_normal((8, 12)).astype(np.float32), np.arange(8) % 3


def _host_buffers(net):
    return {key: net.backend.to_numpy(value).copy() for key, value in net.buffers().items()}


def test_batchnorm_statistics_and_the_dropout_stream_come_back_whole(tmp_path):
    """The BatchNorm running statistics are saved as buffers and the Dropout masks' random
    stream in the metadata: a restored or rebuilt network takes the next step exactly as the
    saved one does."""
    net, optimizer = make_extend(), make_optimizer("sgd", lr=0.1)
    x, t = _extend_data()
    for _ in range(3):
        optimizer.update(net.params, net.gradient(x, t))
    path = save_checkpoint(tmp_path / "bn.npz", net, optimizer)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(k for k in npz.files if k.startswith("buffer/")) == [
            "buffer/BatchNorm1/running_mean", "buffer/BatchNorm1/running_var",
            "buffer/BatchNorm2/running_mean", "buffer/BatchNorm2/running_var"]
    ckpt = load_checkpoint(path)
    assert_dicts_bitwise_equal(ckpt.buffers, _host_buffers(net), "loaded buffers")
    assert ckpt.metadata["network_rng"] == net.rng.state() and net.rng.state()["draws"] > 0

    restored = make_extend(seed=9)
    restore(ckpt, restored)
    for resumed in (restored, build_from_checkpoint(ckpt)):
        assert_dicts_bitwise_equal(_host_buffers(resumed), _host_buffers(net), "restored buffers")
        assert resumed.rng.state() == net.rng.state()
    grads = net.gradient(x, t)                                   # the next step: the same masks
    for resumed in (restored, build_from_checkpoint(ckpt)):
        resumed.rng.set_state(ckpt.metadata["network_rng"])
        assert_dicts_bitwise_equal({k: np.asarray(v) for k, v in resumed.gradient(x, t).items()},
                                   {k: np.asarray(v) for k, v in grads.items()}, "gradients of the next step")


def test_a_checkpoint_without_the_dropout_stream_leaves_the_networks_own(tmp_path):
    """Checkpoints that hold no ``network_rng`` restore the weights and leave the network's
    random stream as it is; a malformed one is a CheckpointError saying why."""
    net = make_extend()
    path = save_checkpoint(tmp_path / "bn.npz", net)
    other = make_extend(seed=3)
    before = other.rng.state()
    ckpt = load_checkpoint(path)
    ckpt.metadata["network_rng"] = None
    restore(ckpt, other)
    assert other.rng.state() == before
    assert_dicts_bitwise_equal(host_params(other), host_params(net), "params")
    ckpt.metadata["network_rng"] = {"seed": 1}
    with pytest.raises(CheckpointError) as info:
        restore(ckpt, other)
    assert str(info.value) == ("cannot restore checkpoint: RandomSource.set_state: expected a snapshot from "
                               "state(), got {'seed': 1}")


def test_buffers_that_do_not_match_are_refused_naming_both(tmp_path):
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "bn.npz", make_extend()))
    names = sorted(ckpt.buffers)
    del ckpt.buffers["BatchNorm2/running_var"]
    with pytest.raises(CheckpointError) as info:
        restore(ckpt, make_extend())
    assert str(info.value) == (f"checkpoint buffers {names[:3]} do not match the network's {names}")
    ckpt = load_checkpoint(tmp_path / "bn.npz")
    ckpt.buffers["BatchNorm1/running_mean"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointError) as info:
        restore(ckpt, make_extend())
    assert str(info.value) == "checkpoint buffer BatchNorm1/running_mean has shape (7,), the network's has (6,)"
    assert load_checkpoint(save_checkpoint(tmp_path / "plain.npz", make_net())).buffers == {}


class BookStyleNetwork:
    """A network of the book's protocol that is not an xpcnn `Network`: parameters, config,
    dtype, backend and `set_params`, but no BatchNorm buffers and no Dropout stream."""

    def __init__(self, value=0.0):
        self.backend, self.dtype, self.config = get_backend("cpu"), np.float32, {"size": 3}
        self.params = {"W1": np.full(3, value, np.float32)}

    def set_params(self, params):
        for key, value in params.items():
            self.params[key][...] = value


def test_a_network_without_buffers_or_a_random_stream_is_saved_and_restored(tmp_path):
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "book.npz", BookStyleNetwork(1.5)))
    assert ckpt.buffers == {} and ckpt.metadata["network_rng"] is None
    assert ckpt.metadata["architecture"] == {"class": "BookStyleNetwork", "config": {"size": 3}}
    other = BookStyleNetwork()
    ckpt.metadata["network_rng"] = make_extend().rng.state()      # a stream it has no use for: ignored
    restore(ckpt, other)
    assert other.params["W1"].tolist() == [1.5, 1.5, 1.5]


class HandMadeOptimizer:
    """An optimizer of one's own (not in xpcnn's registry), with a list among its arguments."""

    def __init__(self, lr=0.5, betas=(0.9, 0.99), unstored=1):
        self.lr, self.betas = lr, list(betas)

    def state_dict(self):
        return {}


def test_an_optimizer_of_ones_own_is_saved_by_its_class_name_and_scalar_arguments(tmp_path):
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "own.npz", make_net(), HandMadeOptimizer()))
    assert ckpt.metadata["optimizer"] == {"name": "handmadeoptimizer", "class": "HandMadeOptimizer",
                                          "hparams": {"lr": 0.5}, "iterations": 0}
    assert (ckpt.optimizer_name, ckpt.optimizer_hparams, ckpt.optimizer_state) == \
        ("handmadeoptimizer", {"lr": 0.5}, {"iterations": 0})


# ------------------------------------------------------------ what a save writes, exactly

def test_extra_arrays_are_npz_entries_and_the_rest_json_with_sorted_keys(tmp_path):
    net = make_net()
    extra = {"mask": np.arange(5, dtype=np.int16), "scale": np.float32(0.5), "note": "hello", "steps": [1, 2]}
    history = {"curve": np.array([1.5, 2.5], np.float32), "big": 2 ** 53, "safe": 2 ** 53 - 1, "b": 1, "a": 2}
    path = save_checkpoint(tmp_path / "x.npz", net, extra=extra, history=history)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(k for k in npz.files if not k.startswith("param/")) == ["extra/mask", "metadata"]
        text = npz["metadata"].tobytes().decode("utf-8")
    metadata = json.loads(text)
    assert list(metadata) == sorted(metadata) and list(metadata["history"]) == sorted(metadata["history"])
    assert metadata["extra_arrays"] == ["mask"] and metadata["extra"] == {"note": "hello", "scale": 0.5,
                                                                          "steps": [1, 2]}
    assert '"big": {"__int__": "9007199254740992"}' in text and '"safe": 9007199254740991' in text
    assert metadata["history"]["curve"] == {"__ndarray__": [1.5, 2.5], "dtype": "<f4"}
    ckpt = load_checkpoint(path)
    assert ckpt.extra["note"] == "hello" and isinstance(ckpt.extra["note"], str) and ckpt.extra["scale"] == 0.5
    assert_bitwise_equal(ckpt.extra["mask"], extra["mask"], "extra mask")
    assert_bitwise_equal(ckpt.history["curve"], history["curve"], "history curve")
    assert ckpt.history["big"] == 2 ** 53 and (ckpt.epoch, ckpt.step) == (0, 0)
    assert metadata["optimizer"] is None and ckpt.optimizer_name is None


class _Stub:
    """A network or optimizer made of the attributes `save_checkpoint` reads."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


@pytest.mark.parametrize("what, message", [
    ("history", "save_checkpoint: metadata['history']['loss'][1] holds a object"),
    ("history key", "save_checkpoint: metadata['history'] has a non-string key 1; JSON keys must be strings"),
    ("history objects", "save_checkpoint: metadata['history']['x'] holds an object array, which cannot be saved "
                        "without pickle"),
    ("history datetime", "save_checkpoint: metadata['history']['when'] holds a datetime"),
    ("history datetimes", "save_checkpoint: metadata['history']['when'][0] holds a datetime"),
    ("extra key", "save_checkpoint: extra keys must be non-empty strings, got 5"),
    ("empty extra key", "save_checkpoint: extra keys must be non-empty strings, got ''"),
    ("rng", "save_checkpoint: rng_state must be a bit-generator state dict, a numpy.random.Generator or None, "
            "got int"),
    ("parameter", "save_checkpoint: parameter 'W1' is an object array, which cannot be saved without pickle"),
    ("buffer", "save_checkpoint: buffer 'BN/running_mean' is an object array, which cannot be saved without pickle"),
    ("optimizer state", "save_checkpoint: optimizer state 'h/W1' is an object array, which cannot be saved "
                        "without pickle"),
])
def test_what_cannot_be_saved_is_named_exactly(tmp_path, what, message):
    net, objects, kwargs = make_net(), np.array([None, 1], dtype=object), {}
    if what == "history":
        kwargs["history"] = {"loss": [1.0, object()]}
    elif what == "history key":
        kwargs["history"] = {1: "a"}
    elif what == "history objects":
        kwargs["history"] = {"x": objects}
    elif what == "history datetime":
        kwargs["history"] = {"when": np.datetime64("2026-01-01T10:00:00")}
    elif what == "history datetimes":
        kwargs["history"] = {"when": np.array(["2026-01-01T10:00:00"], dtype="datetime64[s]")}
    elif what in ("extra key", "empty extra key"):
        kwargs["extra"] = {5 if what == "extra key" else "": "x"}
    elif what == "rng":
        kwargs["rng_state"] = 42
    elif what == "parameter":
        net = _Stub(backend=get_backend("cpu"), params={"W1": objects}, config={}, dtype=np.float32)
    elif what == "buffer":
        net = _Stub(backend=get_backend("cpu"), params={}, config={}, dtype=np.float32,
                    buffers=lambda: {"BN/running_mean": objects})
    else:
        kwargs["optimizer"] = _Stub(state_dict=lambda: {"h/W1": objects})
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path / "x.npz", net, **kwargs)
    assert str(info.value).startswith(message), str(info.value)
    assert not (tmp_path / "x.npz").exists()


def test_a_bit_generator_or_its_state_is_saved_as_its_state(tmp_path):
    for rng in (np.random.PCG64(5), np.random.PCG64(5).state):
        ckpt = load_checkpoint(save_checkpoint(tmp_path / "r.npz", make_net(), rng_state=rng))
        assert ckpt.rng_state == np.random.PCG64(5).state


@pytest.mark.parametrize("state, message", [
    ("nonsense", "RNG state names bit generator None, which numpy.random does not have"),
    ({"bit_generator": "Nope"}, "RNG state names bit generator 'Nope', which numpy.random does not have"),
    ({"bit_generator": "Generator"}, "RNG state names bit generator 'Generator', which numpy.random does not have"),
    ({"bit_generator": "random"}, "RNG state names bit generator 'random', which numpy.random does not have"),
    ({"bit_generator": "PCG64", "state": "garbage"}, "RNG state for PCG64 is invalid: "),
])
def test_a_bad_rng_state_is_refused_saying_why(state, message):
    with pytest.raises(CheckpointError) as info:
        generator_from_state(state)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("error, described", [
    (OSError(errno.EIO, "the disk said no"), "the disk said no (EIO)"),
    (OSError(errno.EIO, None), "Input/output error (EIO)"),
    (OSError(9999, "odd"), "odd (9999)"),
    (OSError("a plain message"), "a plain message"),
    (OSError(), "OSError"),
])
def test_write_errors_name_the_os_reason(tmp_path, monkeypatch, error, described):
    def failing(*args, **kwargs):
        raise error
    monkeypatch.setattr(ckpt_mod, "atomic_write", failing)
    path = tmp_path / "ckpt.npz"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, make_net())
    assert str(info.value) == f"cannot write checkpoint {str(path)!r}: {described}"


def test_a_directory_is_refused_as_a_target(tmp_path):
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, make_net())
    assert str(info.value) == f"cannot write checkpoint {str(tmp_path)!r}: it is a directory"


# ------------------------------------------------------- what a load refuses, exactly

def _entries(path):
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _json_bytes(metadata):
    return np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)


def _saved_with(trained, tmp_path, change):
    """The trained checkpoint's entries, changed by `change(entries, metadata)`, saved anew
    (a change that sets ``entries["metadata"]`` to None has the changed `metadata` written)."""
    path, _, _ = trained
    entries = _entries(path)
    metadata = json.loads(entries["metadata"].tobytes().decode("utf-8"))
    change(entries, metadata)
    if entries.get("metadata", ()) is None:
        entries["metadata"] = _json_bytes(metadata)
    other = tmp_path / "changed.npz"
    np.savez(other, **entries)
    return other


def _set(key, value):
    def change(entries, metadata):
        metadata[key] = value
        entries["metadata"] = None
    return change


def _drop_metadata_key(*keys):
    def change(entries, metadata):
        target = metadata
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
        entries["metadata"] = None
    return change


@pytest.mark.parametrize("change, message", [
    (lambda e, m: e.update(metadata=np.zeros(3)), "metadata must be UTF-8 JSON as uint8 or a 0-d string, got "
                                                  "dtype float64 shape (3,)"),
    (lambda e, m: e.update(metadata=np.array(1.5)), "metadata must be UTF-8 JSON as uint8 or a 0-d string, got "
                                                    "dtype float64 shape ()"),
    (lambda e, m: e.update(metadata=np.frombuffer(b"\xff\xfe{", np.uint8)), "metadata is not valid UTF-8 JSON: "),
    (lambda e, m: e.update(metadata=np.frombuffer(b"[1, 2]", np.uint8)), "metadata must be a JSON object, got list"),
    (_set("format_version", 999), f"has format version 999; this xpcnn reads 1 (written by xpcnn {__version__})"),
    (lambda e, m: (m.update(format_version=7), m.pop("xpcnn_version"), e.update(metadata=None)),
     "has format version 7; this xpcnn reads 1 (written by xpcnn unknown)"),
    (_drop_metadata_key("dtype"), "metadata lacks 'dtype'"),
    (_drop_metadata_key("architecture", "config"), "metadata 'architecture' must hold a 'config' object"),
    (lambda e, m: e.update({"other/x": np.zeros(2)}), "unexpected entry 'other/x'"),
    (lambda e, m: [e.pop(k) for k in list(e) if k.startswith("param/")], "holds no parameters (no 'param/...' "
                                                                          "entries)"),
    (lambda e, m: e.update({"param/W1": e["param/W1"].astype(np.float64)}),
     "parameter 'W1' is float64, metadata says float32"),
    (_set("optimizer", None), "has optimizer state but no optimizer metadata"),
])
def test_a_bad_file_is_refused_naming_it_and_what_is_wrong(trained, tmp_path, change, message):
    other = _saved_with(trained, tmp_path, change)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(other)
    text = str(info.value)
    assert text.startswith(f"checkpoint {str(other)!r}") and message in text, text


def test_an_optimizer_without_an_iteration_count_starts_at_zero(trained, tmp_path):
    ckpt = load_checkpoint(_saved_with(trained, tmp_path, _drop_metadata_key("optimizer", "iterations")))
    assert ckpt.optimizer_state["iterations"] == 0
    del ckpt.optimizer_state["iterations"]                      # a hand-made state: the same
    optimizer = make_optimizer("adagrad")
    optimizer.iterations = 5
    restore(ckpt, make_net(), optimizer)
    assert optimizer.iterations == 0


def test_unreadable_and_undecodable_files_are_refused_saying_why(trained, tmp_path, monkeypatch):
    path, _, _ = trained
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == f"checkpoint {str(tmp_path)!r} is a directory, expected an .npz file"
    text = tmp_path / "notes.npz"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(text)
    assert str(info.value) == (f"checkpoint {str(text)!r} is not an .npz (zip) file: it starts with b'this', "
                               f"expected b'PK\\x03\\x04'")

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(ckpt_mod, "open", eio, raising=False)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"cannot read checkpoint {str(path)!r}: Input/output error (EIO)"
    monkeypatch.undo()
    for raised, said in ((OSError(errno.EIO, "Input/output error"), "cannot read checkpoint {}: Input/output "
                                                                     "error (EIO)"),
                         (ValueError("bad header"), "checkpoint {} is not a valid .npz file: bad header"),
                         (RuntimeError("odd"), "checkpoint {} is corrupted: RuntimeError: odd")):
        def failing(*args, **kwargs):
            raise raised
        monkeypatch.setattr(np, "load", failing)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        monkeypatch.undo()
        assert str(info.value) == said.format(repr(str(path)))


def test_a_pickled_entry_is_refused_with_what_to_do(trained, tmp_path):
    path, _, _ = trained
    evil = tmp_path / "evil.npz"
    np.savez(evil, **_entries(path), **{"extra/payload": np.array([None], dtype=object)}, allow_pickle=True)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil)
    assert str(info.value) == (f"checkpoint {str(evil)!r} contains pickled data (an object array or a pickle "
                               f"file); refusing to load it: checkpoints hold only numeric arrays")


# -------------------------------------------------- what a restore refuses, exactly

def test_another_class_is_refused_and_a_checkpoint_without_a_class_is_a_simpleconvnet(trained, tmp_path):
    path, net, _ = trained
    with pytest.raises(CheckpointError) as info:
        restore(load_checkpoint(path), make_extend())
    assert str(info.value) == "checkpoint is a SimpleConvNet, but the network is a MultiLayerNetExtend"
    ckpt = load_checkpoint(_saved_with(trained, tmp_path, _drop_metadata_key("architecture", "class")))
    built = build_from_checkpoint(ckpt)
    assert type(built) is SimpleConvNet
    assert_dicts_bitwise_equal(host_params(built), host_params(net), "params")
    ckpt.metadata["architecture"]["class"] = "ResNet"
    with pytest.raises(CheckpointError) as info:
        build_from_checkpoint(ckpt)
    assert str(info.value) == ("checkpoint is a 'ResNet'; this xpcnn can build ['DeepConvNet', "
                               "'MultiLayerNetExtend', 'SimpleConvNet']")


def test_architecture_differences_are_listed_whole(trained):
    path, net, _ = trained
    ckpt = load_checkpoint(path)
    other = make_net(seed=1, hidden_size=16, conv_param={**SMALL_CONV, "filter_num": 6})
    with pytest.raises(CheckpointError) as info:
        restore(ckpt, other)
    assert str(info.value) == (
        "checkpoint architecture does not match the network: conv_param.filter_num: checkpoint has 4, network "
        "has 6; hidden_size: checkpoint has 8, network has 16 "
        f"(checkpoint config {ckpt.config}, network config {other.config})")
    ckpt.config["zz_added"] = [1, 2]               # a key only one side has, after an init-only one
    with pytest.raises(CheckpointError) as info:
        restore(ckpt, make_net(seed=1))
    assert "does not match the network: zz_added: checkpoint has [1, 2], network has '<absent>' (" in str(info.value)
    del ckpt.config["zz_added"]
    hidden = ckpt.config.pop("hidden_size")
    with pytest.raises(CheckpointError) as info:
        restore(ckpt, make_net(seed=1))
    assert "does not match the network: hidden_size: checkpoint has '<absent>', network has 8 (" in str(info.value)
    ckpt.config["hidden_size"] = hidden
    ckpt.config["weight_init_std"] = {"per_layer": [0.1, 0.2]}     # init-only, whatever it holds
    restore(ckpt, make_net(seed=1))


def test_unsaveable_config_values_are_named(trained):
    path, _, _ = trained
    ckpt = load_checkpoint(path)
    ckpt.config["bad"] = object()
    with pytest.raises(CheckpointError, match=r"config\['bad'\] holds a object"):
        restore(ckpt, make_net())
    other = make_net()
    other.config["bad"] = object()
    with pytest.raises(CheckpointError, match=r"config\['bad'\] holds a object"):
        restore(load_checkpoint(path), other)


def test_parameters_that_do_not_match_are_refused_naming_both(trained):
    path, _, _ = trained
    names = sorted(load_checkpoint(path).params)
    ckpt = load_checkpoint(path)
    del ckpt.params["W1"]
    with pytest.raises(CheckpointError) as info:
        restore(ckpt, make_net())
    assert str(info.value) == (f"checkpoint parameters {sorted(ckpt.params)} do not match the network's {names} "
                               f"(missing ['W1'], unexpected [])")
    ckpt = load_checkpoint(path)
    ckpt.params["W9"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError) as info:
        restore(ckpt, make_net())
    assert str(info.value).endswith("(missing [], unexpected ['W9'])")
    ckpt = load_checkpoint(path)
    ckpt.params["W1"] = np.zeros((4, 1, 2, 2), np.float32)
    with pytest.raises(CheckpointError) as info:
        restore(ckpt, make_net())
    assert str(info.value) == "checkpoint parameter W1 has shape (4, 1, 2, 2), the network's has (4, 1, 3, 3)"


def test_optimizer_state_that_does_not_fit_is_refused_naming_it(trained, tmp_path):
    path, _, _ = trained
    plain = save_checkpoint(tmp_path / "plain.npz", make_net())
    with pytest.raises(CheckpointError) as info:
        restore(load_checkpoint(plain), make_net(), make_optimizer("adagrad"))
    assert str(info.value) == ("checkpoint holds no optimizer state, but an optimizer (AdaGrad) was given to "
                               "restore")
    with pytest.raises(CheckpointError) as info:
        restore(load_checkpoint(path), make_net(), make_optimizer("adam"))
    assert str(info.value) == "checkpoint optimizer is 'adagrad', but the optimizer given is 'adam' (Adam)"
    for key, value, message in (
            ("v/W1", np.zeros((4, 1, 3, 3), np.float32), "checkpoint optimizer state 'v/W1' is unknown to AdaGrad "
                                                         "(it keeps ['h'])"),
            ("h/W9", np.zeros(3, np.float32), "checkpoint optimizer state 'h/W9' with shape (3,) matches no network "
                                              "parameter"),
            ("h/W1", np.zeros(3, np.float32), "checkpoint optimizer state 'h/W1' with shape (3,) matches no network "
                                              "parameter")):
        ckpt = load_checkpoint(path)
        ckpt.optimizer_state[key] = value
        with pytest.raises(CheckpointError) as info:
            restore(ckpt, make_net(), make_optimizer("adagrad"))
        assert str(info.value) == message


def test_optimizer_state_comes_back_in_the_networks_dtype_in_any_order(trained):
    path, net, optimizer = trained
    ckpt = load_checkpoint(path)
    state = dict(ckpt.optimizer_state)
    ckpt.optimizer_state = {"iterations": state.pop("iterations"),
                            **{key: value.astype(np.float64) for key, value in state.items()}}
    other = make_optimizer("adagrad")
    restore(ckpt, make_net(), other)
    assert other.iterations == optimizer.iterations
    assert sorted(other.state["h"]) == sorted(optimizer.state["h"])
    assert all(value.dtype == np.float32 for value in other.state["h"].values())


@pytest.mark.parametrize("config, message", [
    ({"colour": 3}, "does not fit SimpleConvNet: "),
    ({"hidden_size": 0}, "is invalid for SimpleConvNet: "),
])
def test_a_config_that_does_not_build_is_refused_naming_it(trained, config, message):
    path, _, _ = trained
    ckpt = load_checkpoint(path)
    ckpt.config.update(config)
    with pytest.raises(CheckpointError) as info:
        build_from_checkpoint(ckpt)
    assert str(info.value).startswith(f"checkpoint config {ckpt.config} {message}"), str(info.value)


def test_an_optimizer_that_cannot_be_rebuilt_is_refused_naming_it(trained):
    path, _, _ = trained
    ckpt = load_checkpoint(path)
    ckpt.optimizer_hparams["lr"] = -1.0
    with pytest.raises(CheckpointError) as info:
        make_optimizer_from_checkpoint(ckpt)
    assert str(info.value).startswith("cannot rebuild the checkpoint's optimizer 'adagrad': "), str(info.value)


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
