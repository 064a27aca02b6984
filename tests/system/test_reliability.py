"""Bad input: every case gives a clear error naming what was expected and what was given.

Three tables drive most of this file:

* `LIBRARY_CASES`: calls into the library (layers, model, optimizers, Trainer, backends)
  that must raise an exception type from `xpcnn/errors.py`;
* `FILE_CASES`: corrupted IDX files, gzip, downloads and checkpoints, through the public
  API, also raising `xpcnn.errors` types;
* `CLI_CASES`: ``python -m xpcnn.cli`` in a subprocess, which must exit with the documented
  code and print ONE line on stderr (argparse's usage lines aside), with no traceback.

Each row lists words that must appear in the message: the value that was given and the
value (or rule) that was expected. Rows marked xfail are library gaps listed in
docs/reliability.md.

Then come the checks that no bare ``assert`` does validation (the suite passes under
``python -O``). The property tests of convolution and pooling are in
tests/ops/test_conv_properties.py, the whole network's in tests/models/test_simple_convnet.py.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import xpcnn
from xpcnn import data
from xpcnn.backend import get_backend
from xpcnn.errors import (
    BackendMismatch,
    BackendUnavailable,
    CheckpointError,
    ConfigError,
    DatasetError,
    DTypeError,
    ShapeError,
    XpcnnError,
)
from xpcnn.models import SimpleConvNet
from xpcnn.nn.layers import Affine, Convolution, Pooling, SoftmaxWithLoss
from xpcnn.nn.optim import SGD, AdaGrad, make_optimizer
from xpcnn.ops import im2col
from xpcnn.training import Trainer
from xpcnn.training.checkpoint import load_checkpoint, restore, save_checkpoint

from helpers import cli_env, error_line, run_cli

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path(xpcnn.__file__).resolve().parent


def _cupy_usable() -> bool:
    try:
        get_backend("gpu")
    except BackendUnavailable:
        return False
    return True


HAVE_GPU = _cupy_usable()


# ------------------------------------------------------------------------------ helpers

def f32(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def images(n: int = 5, c: int = 1, h: int = 10, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, c, h, w), dtype=np.float32)


def labels(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, n)


def small_net(**overrides: Any) -> SimpleConvNet:
    """SimpleConvNet on (1, 10, 10) images: conv 3x3 -> (3, 8, 8), pool -> (3, 4, 4), hidden 8."""
    kwargs: dict[str, Any] = dict(input_dim=(1, 10, 10), conv_param={"filter_num": 3, "filter_size": 3},
                                  hidden_size=8, seed=0)
    kwargs.update(overrides)
    return SimpleConvNet(**kwargs)


def conv_layer(channels: int = 3, stride: int = 1, pad: int = 0) -> Convolution:
    rng = np.random.default_rng(0)
    return Convolution(f32(rng.standard_normal((4, channels, 3, 3))), f32(np.zeros(4)), stride, pad)


def trainer(x_train=None, t_train=None, x_test=None, t_test=None, **kwargs: Any) -> Trainer:
    x_train = images() if x_train is None else x_train
    t_train = labels() if t_train is None else t_train
    x_test = images(3, seed=1) if x_test is None else x_test
    t_test = labels(3, seed=1) if t_test is None else t_test
    kwargs.setdefault("mini_batch_size", 2)
    return Trainer(small_net(), x_train, t_train, x_test, t_test, verbose=False, **kwargs)


def strict_array(host: np.ndarray) -> Any:
    return get_backend("array_api_strict").asarray(host)


def with_nan(x: np.ndarray, value: float = np.nan) -> np.ndarray:
    x = x.copy()
    x[1, 0, 2, 3] = value
    return x


@dataclass(frozen=True)
class Case:
    """One bad input: `call(tmp_path)` must raise `error` with every word of `words` in its message."""

    id: str
    where: str
    call: Callable[[Path], Any]
    error: type
    words: tuple[str, ...]
    gap: str = ""            # non-empty: a known library gap (xfail, strict)
    needs_no_gpu: bool = False


def _params(cases: list) -> list:
    out = []
    for case in cases:
        marks = []
        if case.gap:
            marks.append(pytest.mark.xfail(strict=True, reason=case.gap))
        if case.needs_no_gpu and HAVE_GPU:
            marks.append(pytest.mark.skip(reason="CuPy and a CUDA device are present here"))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def _check_raises(case: Case, tmp_path: Path) -> None:
    with pytest.raises(XpcnnError) as info:
        case.call(tmp_path)
    assert isinstance(info.value, case.error), (
        f"{case.id}: expected {case.error.__name__}, got {type(info.value).__name__}: {info.value}")
    message = str(info.value)
    missing = [word for word in case.words if word.lower() not in message.lower()]
    assert not missing, f"{case.id}: message lacks {missing}: {message!r}"


# ------------------------------------------------------------------------------ library cases


LIBRARY_CASES = [
    # --- geometry and channels
    Case("conv-channel-mismatch", "Convolution.forward",
         lambda tmp: conv_layer(channels=3).forward(images(2, c=2, h=8, w=8)),
         ShapeError, ("2 channels", "expect 3")),
    Case("conv-geometry-does-not-divide", "Convolution.forward",
         lambda tmp: conv_layer(stride=2).forward(images(2, c=3, h=8, w=8)),
         ShapeError, ("not a multiple of stride 2", "input 8", "window 3")),
    Case("conv-filter-larger-than-input", "Convolution.forward",
         lambda tmp: conv_layer().forward(images(2, c=3, h=2, w=2)),
         ShapeError, ("window of size 3", "input of size 2")),
    Case("pool-geometry-does-not-divide", "Pooling.forward",
         lambda tmp: Pooling(3, 3, stride=2).forward(images(2, c=3, h=8, w=8)),
         ShapeError, ("not a multiple of stride 2", "input 8", "window 3")),
    Case("simpleconvnet-geometry-does-not-divide", "SimpleConvNet()",
         lambda tmp: SimpleConvNet(input_dim=(1, 9, 9), conv_param={"filter_size": 3}),
         ShapeError, ("pooling", "not a multiple of stride 2")),
    Case("conv-stride-0", "Convolution()", lambda tmp: conv_layer(stride=0),
         ConfigError, ("stride must be an integer >= 1", "got 0")),
    Case("conv-stride-negative", "Convolution()", lambda tmp: conv_layer(stride=-2),
         ConfigError, ("stride must be an integer >= 1", "got -2")),
    Case("pool-stride-0", "Pooling()", lambda tmp: Pooling(2, 2, stride=0),
         ConfigError, ("stride must be an integer >= 1", "got 0")),
    Case("pool-stride-negative", "Pooling()", lambda tmp: Pooling(2, 2, stride=-1),
         ConfigError, ("stride must be an integer >= 1", "got -1")),
    Case("im2col-stride-0", "im2col", lambda tmp: im2col(images(), 3, 3, 0, 0),
         ConfigError, ("stride must be an integer >= 1", "got 0")),
    Case("conv-pad-negative", "Convolution()", lambda tmp: conv_layer(pad=-1),
         ConfigError, ("pad must be an integer >= 0", "got -1")),
    Case("pool-pad-negative", "Pooling()", lambda tmp: Pooling(2, 2, stride=2, pad=-1),
         ConfigError, ("pad must be an integer >= 0", "got -1")),
    Case("simpleconvnet-pad-negative", "SimpleConvNet()",
         lambda tmp: SimpleConvNet(conv_param={"pad": -1}), ConfigError, ("pad must be an integer >= 0", "got -1")),
    # --- rank
    Case("conv-input-rank-3", "Convolution.forward", lambda tmp: conv_layer().forward(images(1, c=3)[0]),
         ShapeError, ("4-D input", "(3, 10, 10)")),
    Case("pool-input-rank-2", "Pooling.forward", lambda tmp: Pooling(2, 2, 2).forward(f32(np.zeros((4, 4)))),
         ShapeError, ("4-D input", "(4, 4)")),
    Case("net-flat-input", "SimpleConvNet.predict", lambda tmp: small_net().predict(f32(np.zeros((5, 100)))),
         ShapeError, ("4-D input", "(5, 100)")),
    Case("affine-input-rank-1", "Affine.forward",
         lambda tmp: Affine(f32(np.zeros((3, 2))), f32(np.zeros(2))).forward(f32(np.zeros(3))),
         ShapeError, ("batch axis", "(3,)")),
    Case("trainer-wrong-image-shape", "Trainer()", lambda tmp: trainer(x_train=images(5, h=12, w=12)),
         ShapeError, ("(N, 1, 10, 10)", "(5, 1, 12, 12)")),
    # --- dtype
    Case("conv-int32-input", "Convolution.forward",
         lambda tmp: conv_layer().forward(images(2, c=3).astype(np.int32)), DTypeError, ("float32", "int32")),
    Case("conv-float16-input", "Convolution.forward",
         lambda tmp: conv_layer().forward(images(2, c=3).astype(np.float16)), DTypeError, ("float32", "float16")),
    Case("net-uint8-input", "SimpleConvNet.loss",
         lambda tmp: small_net().loss(images().astype(np.uint8), labels()), DTypeError, ("float32", "uint8")),
    Case("net-float64-into-float32", "SimpleConvNet.predict",
         lambda tmp: small_net().predict(images().astype(np.float64)), DTypeError, ("float32", "float64")),
    Case("pool-int-input", "Pooling.forward",
         lambda tmp: Pooling(2, 2, 2).forward(images().astype(np.int64)), DTypeError, ("float32", "int64")),
    Case("pool-float16-input", "Pooling.forward",
         lambda tmp: Pooling(2, 2, 2).forward(images().astype(np.float16)), DTypeError, ("float32", "float16")),
    Case("softmax-int-scores", "SoftmaxWithLoss.forward",
         lambda tmp: SoftmaxWithLoss().forward(np.zeros((2, 3), np.int32), np.array([0, 1])),
         DTypeError, ("float32", "int32")),
    Case("net-dtype-float16", "SimpleConvNet()", lambda tmp: small_net(dtype="float16"),
         DTypeError, ("float32", "float16")),
    Case("trainer-uint8-images", "Trainer()", lambda tmp: trainer(x_train=(images() * 255).astype(np.uint8)),
         DTypeError, ("float", "uint8")),
    # --- NaN / inf in the input
    Case("trainer-nan-in-train-images", "Trainer()", lambda tmp: trainer(x_train=with_nan(images())),
         ConfigError, ("training images", "NaN")),
    Case("trainer-inf-in-test-images", "Trainer()", lambda tmp: trainer(x_test=with_nan(images(3), np.inf)),
         ConfigError, ("test images", "infinite")),
    Case("accuracy-nan-images", "SimpleConvNet.accuracy",
         lambda tmp: small_net().accuracy(with_nan(images()), labels()), XpcnnError, ("NaN",)),
    # --- labels
    Case("trainer-label-out-of-range", "Trainer()", lambda tmp: trainer(t_train=np.array([0, 1, 2, 3, 10])),
         ShapeError, ("0..9", "to 10")),
    Case("trainer-label-negative", "Trainer()", lambda tmp: trainer(t_test=np.array([-1, 1, 2])),
         ShapeError, ("0..9", "from -1")),
    Case("loss-label-out-of-range", "SimpleConvNet.loss",
         lambda tmp: small_net().loss(images(), np.array([0, 1, 2, 3, 10])), ShapeError, ("10",)),
    Case("accuracy-label-out-of-range", "SimpleConvNet.accuracy",
         lambda tmp: small_net().accuracy(images(), np.array([0, 1, 2, 3, 10])), ShapeError, ("10",)),
    Case("loss-one-hot-wrong-width", "SimpleConvNet.loss",
         lambda tmp: small_net().loss(images(), np.eye(9, dtype=np.float32)[labels() % 9]),
         ShapeError, ("(5, 10)", "(5, 9)")),
    Case("trainer-one-hot-wrong-width", "Trainer()",
         lambda tmp: trainer(t_train=np.eye(12, dtype=np.float32)[labels()]), ShapeError, ("10 columns", "12")),
    Case("loss-float-class-indices", "SoftmaxWithLoss.forward",
         lambda tmp: SoftmaxWithLoss().forward(f32(np.zeros((2, 3))), np.array([0.0, 1.0])),
         ShapeError, ("integers", "float64")),
    Case("loss-label-count-mismatch", "SimpleConvNet.loss", lambda tmp: small_net().loss(images(), labels(4)),
         ShapeError, ("5 labels", "got 4")),
    Case("accuracy-label-count-mismatch", "SimpleConvNet.accuracy",
         lambda tmp: small_net().accuracy(images(), labels(4)), ShapeError, ("5 images", "4 labels")),
    Case("trainer-label-count-mismatch", "Trainer()", lambda tmp: trainer(t_train=labels(4)),
         ShapeError, ("5 images", "4 labels")),
    # --- batch size
    Case("trainer-batch-size-0", "Trainer()", lambda tmp: trainer(mini_batch_size=0),
         ConfigError, ("mini_batch_size must be an integer >= 1", "got 0")),
    Case("trainer-batch-size-larger-than-data", "Trainer()", lambda tmp: trainer(mini_batch_size=6),
         ConfigError, ("mini_batch_size 6", "training set (5 images)")),
    Case("accuracy-batch-size-0", "SimpleConvNet.accuracy",
         lambda tmp: small_net().accuracy(images(), labels(), batch_size=0), ConfigError, (">= 1", "got 0")),
    Case("trainer-empty-training-set", "Trainer()",
         lambda tmp: trainer(x_train=images()[:0], t_train=labels()[:0]), ShapeError, ("empty",)),
    # --- backends
    Case("mixed-backends-conv", "Convolution.forward",
         lambda tmp: conv_layer().forward(strict_array(images(2, c=3))), BackendMismatch,
         ("different backends", "numpy", "array_api_strict")),
    Case("mixed-backends-loss-labels", "SimpleConvNet.loss",
         lambda tmp: small_net().loss(images(), strict_array(labels())), BackendMismatch,
         ("different backends", "numpy", "array_api_strict")),
    Case("mixed-backends-accuracy", "SimpleConvNet.accuracy",
         lambda tmp: small_net().accuracy(strict_array(images()), labels()), BackendMismatch,
         ("different backends",)),
    Case("mixed-backends-optimizer", "AdaGrad.update",
         lambda tmp: AdaGrad(0.1).update({"W": f32(np.ones(3))}, {"W": strict_array(f32(np.ones(3)))}),
         BackendMismatch, ("different backends",)),
    Case("unknown-backend", "get_backend", lambda tmp: get_backend("tpu"), ConfigError, ("'tpu'", "'cpu', 'gpu'")),
    Case("gpu-backend-without-cupy", "get_backend", lambda tmp: get_backend("gpu"), BackendUnavailable,
         ("gpu", "CuPy"), needs_no_gpu=True),
    # --- optimizer
    Case("unknown-optimizer", "make_optimizer", lambda tmp: make_optimizer("rmsprop", lr=0.1),
         ConfigError, ("'rmsprop'", "adagrad")),
    Case("trainer-unknown-optimizer", "Trainer()", lambda tmp: trainer(optimizer="rmsprop"),
         ConfigError, ("'rmsprop'", "sgd")),
    Case("lr-zero", "AdaGrad()", lambda tmp: AdaGrad(lr=0), ConfigError, ("lr must be > 0", "got 0.0")),
    Case("lr-negative", "SGD()", lambda tmp: SGD(lr=-0.1), ConfigError, ("lr must be > 0", "got -0.1")),
    Case("lr-nan", "make_optimizer", lambda tmp: make_optimizer("adam", lr=float("nan")),
         ConfigError, ("lr must be > 0", "nan")),
    Case("lr-not-a-number", "Trainer()", lambda tmp: trainer(optimizer_param={"lr": "fast"}),
         ConfigError, ("lr must be a number", "'fast'")),
]


@pytest.mark.parametrize("case", _params(LIBRARY_CASES))
def test_library_bad_input(case: Case, tmp_path: Path) -> None:
    _check_raises(case, tmp_path)


# ------------------------------------------------------------------------------ file cases

def _idx_file(tmp: Path, payload: bytes, name: str = "bad-idx3-ubyte") -> Path:
    path = tmp / name
    path.write_bytes(payload)
    return path


def _good_idx(array: np.ndarray) -> bytes:
    return data.encode_idx(array)


def _toy_images(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 4, 5), dtype=np.uint8)


def _pair(tmp: Path, n_images: int, label_values: list[int]) -> tuple[Path, Path]:
    images_path = data.write_idx(tmp / "images-idx3-ubyte", _toy_images(n_images))
    labels_path = data.write_idx(tmp / "labels-idx1-ubyte", np.asarray(label_values, dtype=np.uint8))
    return images_path, labels_path


def _checksum_mismatch(tmp: Path) -> None:
    mirror = tmp / "mirror"
    mirror.mkdir()
    served = _good_idx(_toy_images())
    (mirror / "toy-images-idx3-ubyte.gz").write_bytes(gzip.compress(served))
    expected = hashlib.md5(b"something else").hexdigest()
    spec = data.FileSpec("toy-images-idx3-ubyte", expected, len(served))
    try:
        data.download_file(spec, [mirror.as_uri() + "/"], tmp / "dest")
    finally:
        # Nothing may be kept from a download whose checksum did not match.
        assert not (tmp / "dest").exists() or not any((tmp / "dest").iterdir())


def _saved(tmp: Path, net: SimpleConvNet | None = None, name: str = "ckpt.npz") -> Path:
    net = small_net() if net is None else net
    return Path(save_checkpoint(tmp / name, net, AdaGrad(0.1), epoch=1, step=0))


def _truncated_checkpoint(tmp: Path) -> None:
    path = _saved(tmp)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    load_checkpoint(path)


def _text_checkpoint(tmp: Path) -> None:
    path = tmp / "ckpt.npz"
    path.write_text("W1 = [[0.1, 0.2]]\n")
    load_checkpoint(path)


def _other_architecture(tmp: Path) -> None:
    path = _saved(tmp, small_net(hidden_size=16))
    restore(load_checkpoint(path), small_net(hidden_size=8))


def _other_dtype(tmp: Path) -> None:
    path = _saved(tmp, small_net(dtype="float64"))
    restore(load_checkpoint(path), small_net(dtype="float32"))


class _OpensFileWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_checkpoint(tmp: Path) -> None:
    good = _saved(tmp)
    marker = tmp / "UNPICKLED"
    with np.load(good) as npz:
        entries = {key: npz[key] for key in npz.files}
    trap = np.empty(1, dtype=object)
    trap[0] = _OpensFileWhenUnpickled(marker)
    entries["param/W1"] = trap
    bad = tmp / "pickled.npz"
    np.savez(bad, **entries)
    try:
        load_checkpoint(bad)
    finally:
        assert not marker.exists(), "load_checkpoint unpickled an object array"


def _plain_pickle_checkpoint(tmp: Path) -> None:
    import pickle

    marker = tmp / "UNPICKLED"
    path = tmp / "ckpt.npz"
    path.write_bytes(pickle.dumps({"W1": _OpensFileWhenUnpickled(marker)}))
    try:
        load_checkpoint(path)
    finally:
        assert not marker.exists(), "load_checkpoint unpickled a pickle file"


FILE_CASES = [
    Case("idx-wrong-magic", "read_idx",
         lambda tmp: data.read_idx(_idx_file(tmp, b"\x01\x02\x08\x01" + _good_idx(np.arange(3, dtype=np.uint8))[4:])),
         DatasetError, ("magic number", "0x00 0x00", "got 0x01 0x02")),
    Case("idx-unknown-dtype-code", "read_idx",
         lambda tmp: data.read_idx(_idx_file(tmp, b"\x00\x00\x07\x01" + _good_idx(np.arange(3, dtype=np.uint8))[4:])),
         DatasetError, ("data type code 0x07", "known")),
    Case("idx-truncated", "read_idx",
         lambda tmp: data.read_idx(_idx_file(tmp, _good_idx(_toy_images())[:-7])),
         DatasetError, ("truncated", "expected 120 bytes", "has 113")),
    Case("idx-truncated-header", "read_idx",
         lambda tmp: data.read_idx(_idx_file(tmp, _good_idx(_toy_images())[:9])),
         DatasetError, ("too short", "16-byte header")),
    Case("idx-header-disagrees-with-size", "read_idx",
         lambda tmp: data.read_idx(_idx_file(tmp, _good_idx(_toy_images()) + b"\x00" * 20)),
         DatasetError, ("6x4x5", "expected 120 bytes", "has 140", "trailing")),
    Case("gz-not-gzip", "read_idx",
         lambda tmp: data.read_idx(_idx_file(tmp, _good_idx(_toy_images()), "images-idx3-ubyte.gz")),
         DatasetError, ("not a gzip file", "1f 8b", "00 00")),
    Case("gz-corrupted", "read_idx",
         lambda tmp: data.read_idx(_idx_file(tmp, gzip.compress(_good_idx(_toy_images()))[:-12], "x-idx3-ubyte.gz")),
         DatasetError, ("corrupted gzip",)),
    Case("images-labels-count-mismatch", "load_idx_pair",
         lambda tmp: data.load_idx_pair(*_pair(tmp, 6, [0, 1, 2, 3, 4])),
         DatasetError, ("6 images", "5 labels")),
    Case("label-file-out-of-range", "load_idx_pair",
         lambda tmp: data.load_idx_pair(*_pair(tmp, 3, [0, 11, 2])),
         DatasetError, ("[0, 10)", "to 11")),
    Case("download-checksum-mismatch", "download_file", _checksum_mismatch,
         DatasetError, ("checksum mismatch", hashlib.md5(b"something else").hexdigest(), "MD5")),
    Case("dataset-not-found", "load_dataset",
         lambda tmp: data.load_dataset("mnist", data_dir=tmp, system_dirs=[tmp / "none"]),
         DatasetError, ("not found", "train-images-idx3-ubyte", "Tried")),
    Case("checkpoint-truncated", "load_checkpoint", _truncated_checkpoint,
         CheckpointError, ("truncated", "ckpt.npz")),
    Case("checkpoint-not-npz", "load_checkpoint", _text_checkpoint,
         CheckpointError, ("not an .npz", "b'W1 ='")),
    Case("checkpoint-missing", "load_checkpoint", lambda tmp: load_checkpoint(tmp / "nope.npz"),
         CheckpointError, ("nope.npz", "does not exist")),
    Case("checkpoint-other-architecture", "restore", _other_architecture,
         CheckpointError, ("hidden_size", "checkpoint has 16", "network has 8")),
    Case("checkpoint-other-dtype", "restore", _other_dtype,
         CheckpointError, ("checkpoint dtype is float64", "float32")),
    Case("checkpoint-pickled-object-array", "load_checkpoint", _pickled_checkpoint,
         CheckpointError, ("pickled", "refusing")),
    Case("checkpoint-plain-pickle", "load_checkpoint", _plain_pickle_checkpoint,
         CheckpointError, ("not an .npz",)),
]


@pytest.fixture
def no_user_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the user's dataset cache and XPCNN_DATA_DIR from the lookup."""
    monkeypatch.delenv("XPCNN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("case", _params(FILE_CASES))
def test_file_bad_input(case: Case, tmp_path: Path, no_user_data: None) -> None:
    _check_raises(case, tmp_path)


# ------------------------------------------------------------------------------ CLI cases

CLI_EXIT = {"usage": 2, "backend": 3, "dataset": 4, "checkpoint": 5, "io": 7}


@dataclass(frozen=True)
class CliCase:
    id: str
    argv: tuple[str, ...]            # {tmp} and {data} are filled in
    exit_code: int
    words: tuple[str, ...]
    gap: str = ""
    needs_no_gpu: bool = False



CLI_CASES = [
    CliCase("unknown-backend", ("train", "--backend", "tpu", "--out", "{tmp}/out"), 2, ("'tpu'", "'cpu', 'gpu'")),
    CliCase("gpu-without-cupy", ("train", "--backend", "gpu", "--out", "{tmp}/out"), 3, ("gpu", "CuPy"),
            needs_no_gpu=True),
    CliCase("missing-dataset-offline",
            ("train", "--dataset", "mnist", "--data-dir", "{tmp}/empty", "--out", "{tmp}/out"),
            4, ("'mnist' not found", "{tmp}/empty", "--download")),
    CliCase("corrupt-dataset-file",
            ("train", "--dataset", "mnist", "--data-dir", "{tmp}/corrupt", "--out", "{tmp}/out"),
            4, ("truncated", "train-images-idx3-ubyte")),
    CliCase("unknown-dataset", ("train", "--dataset", "cifar", "--out", "{tmp}/out"), 4, ("'cifar'", "fashion-mnist")),
    CliCase("unwritable-out", ("train", "--out", "{tmp}/afile/out"), 7,
            ("--out", "{tmp}/afile/out", "Not a directory")),
    CliCase("epochs-0", ("train", "--epochs", "0", "--out", "{tmp}/out"), 2, ("--epochs", ">= 1", "'0'")),
    CliCase("batch-size-negative", ("train", "--batch-size", "-5", "--out", "{tmp}/out"), 2,
            ("--batch-size", ">= 1", "'-5'")),
    CliCase("lr-nan", ("train", "--lr", "nan", "--out", "{tmp}/out"), 2, ("--lr", "> 0", "'nan'")),
    CliCase("lr-zero", ("train", "--lr", "0", "--out", "{tmp}/out"), 2, ("--lr", "> 0", "'0'")),
    CliCase("unknown-optimizer", ("train", "--optimizer", "rmsprop", "--out", "{tmp}/out"), 2,
            ("--optimizer", "'rmsprop'", "adagrad")),
    CliCase("batch-size-larger-than-data",
            ("train", "--dataset", "mnist", "--data-dir", "{data}", "--batch-size", "1000", "--out", "{tmp}/out"),
            2, ("mini_batch_size 1000", "40 images")),
    CliCase("resume-missing-file", ("train", "--resume", "{tmp}/nope.npz", "--out", "{tmp}/out"), 5,
            ("{tmp}/nope.npz", "does not exist")),
    CliCase("resume-not-npz", ("train", "--resume", "{tmp}/afile", "--out", "{tmp}/out"), 5,
            ("{tmp}/afile", "not an .npz")),
    CliCase("evaluate-missing-checkpoint", ("evaluate", "{tmp}/nope.npz"), 5, ("{tmp}/nope.npz", "does not exist")),
]


@pytest.mark.parametrize("case", _params(CLI_CASES))
def test_cli_bad_input(case: CliCase, tmp_path: Path, cli_dataset: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("not a checkpoint\n")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (corrupt / name).write_bytes((cli_dataset / name).read_bytes()[:-5] if "train-images" in name
                                     else (cli_dataset / name).read_bytes())
    fill = {"tmp": str(tmp_path), "data": str(cli_dataset)}
    argv = [arg.format(**fill) for arg in case.argv]
    result = run_cli(argv, tmp_path)
    assert result.returncode == case.exit_code, (
        f"expected exit {case.exit_code}, got {result.returncode}\nstderr: {result.stderr}")
    line = error_line(result.stderr, case.exit_code)
    assert "error" in line
    missing = [w.format(**fill) for w in case.words if w.format(**fill).lower() not in line.lower()]
    assert not missing, f"message lacks {missing}: {line!r}"


def test_cli_exit_codes_are_documented() -> None:
    """Every exit code the CLI tests expect appears in the table `ExitCode` (which docs/cli.md
    shows row for row: tests/app/test_exit_codes.py)."""
    from xpcnn.app.exit_codes import ExitCode

    table = {int(code) for code in ExitCode}
    expected = {case.exit_code for case in CLI_CASES} | {0, 6, 130, 143}
    assert expected <= table, f"codes {sorted(expected - table)} are not in the table ExitCode {sorted(table)}"


# ------------------------------------------------------------------------------ no asserts, python -O

def test_no_assert_statement_in_the_library() -> None:
    """Validation never relies on `assert` (which ``python -O`` strips)."""
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        offenders += [f"{path.name}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert not offenders, f"bare assert statements in xpcnn: {offenders}"


def test_bad_input_suite_passes_under_python_O(tmp_path: Path) -> None:
    """The library and file tables give the same errors with asserts stripped (``python -O``)."""
    env = cli_env(tmp_path)
    env.pop("PYTHONWARNINGS", None)
    result = subprocess.run(
        [sys.executable, "-O", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(Path(__file__)), str(REPO / "tests" / "nn" / "test_layers.py"),
         str(REPO / "tests" / "ops" / "test_functions_and_geometry.py"),
         "-k", "not python_O and not property and not cli"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
    # the child really ran with asserts stripped
    probe = subprocess.run([sys.executable, "-O", "-c", "assert False"], capture_output=True, env=env)
    assert probe.returncode == 0
