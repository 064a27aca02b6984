"""xpcnn: the CNNs of "Deep Learning from Scratch" (chapters 6-8), written once against the
array API, trained the same way on NumPy, CuPy or PyTorch.

    >>> from xpcnn import SimpleConvNet, AdaGrad
    >>> net = SimpleConvNet(backend="cpu", seed=0)
    >>> grads = net.gradient(x_batch, t_batch)
    >>> AdaGrad(lr=0.06).update(net.params, grads)

The packages, from the bottom up (each imports only from those above it in this list):

    errors, fileio   exception types; atomic file writes
    backend/         which array library and device; host <-> device; random numbers
    ops/             the operations: im2col geometry, softmax/loss, the hot-operation table
    nn/              layers, parameters, optimizers, the network base, batched inference
    models/          SimpleConvNet, DeepConvNet, MultiLayerNetExtend and their registry
    data/            IDX files, datasets, image files
    training/        Trainer, History, checkpoints
    app/             the command line, predict, report, plots, tune, serve, export (ONNX)

This module loads the library floors (backend to training), never the app floor: ``import
xpcnn.ops`` or ``from xpcnn import SimpleConvNet`` reads no command-line code.
"""

import importlib as _importlib
import importlib.util as _importlib_util
import sys as _sys
from types import ModuleType as _ModuleType

from ._version import __version__
from .backend import Backend, get_backend
from .data import DatasetSpec, load_dataset, load_idx_pair, load_images, load_mnist, load_split, read_idx, write_idx
from .errors import (
    BackendMismatch,
    BackendUnavailable,
    CheckpointError,
    ConfigError,
    DatasetError,
    DTypeError,
    ImageFileError,
    ShapeError,
    TrainingError,
    XpcnnError,
)
from .models import DeepConvNet, MultiLayerNetExtend, SimpleConvNet
from .nn import (
    SGD,
    AdaGrad,
    Adam,
    Affine,
    BatchNormalization,
    Convolution,
    Dropout,
    Momentum,
    Pooling,
    ReLU,
    Sigmoid,
    SoftmaxWithLoss,
    make_optimizer,
)
from .ops import col2im, conv_output_size, cross_entropy_error, im2col, softmax
from .training import History, Trainer, TrainingInterrupted, load_checkpoint, save_checkpoint

#: The module names of xpcnn 0.1's flat layout that the docs show, kept importable
#: (``import xpcnn.checkpoint``, ``from xpcnn.report import write_report``, ``xpcnn.report``) and
#: loaded only when asked for.
_ALIASES = {"checkpoint": "xpcnn.training.checkpoint", "report": "xpcnn.app.report"}


class _AliasFinder:
    """Imports ``xpcnn.NAME`` of `_ALIASES` as the module it names: one module object, which
    ``sys.modules`` then lists under both names (only after the alias is first imported).

    A meta-path finder and its loader (the protocol of ``importlib.abc.MetaPathFinder`` and
    ``Loader``, whose module would add ``importlib.resources`` to every ``import xpcnn``)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in _ALIASES:
            return None
        return _importlib_util.spec_from_loader(fullname, self)

    def create_module(self, spec: object) -> None:
        return None                         # a placeholder, replaced in exec_module

    def exec_module(self, module: _ModuleType) -> None:
        # The import system hands back what sys.modules holds once this returns: the real module.
        _sys.modules[module.__name__] = _importlib.import_module(_ALIASES[module.__name__.rpartition(".")[2]])


if not any(isinstance(finder, _AliasFinder) for finder in _sys.meta_path):
    _sys.meta_path.append(_AliasFinder())


#: Public functions of the app floor, by name: (module, attribute), imported on first use.
_APP_FUNCTIONS = {"export_onnx": ("xpcnn.app.export", "export_onnx"),
                  "load_onnx": ("xpcnn.app.onnx_model", "load_onnx")}


def __getattr__(name: str) -> object:
    """``xpcnn.report``, ``xpcnn.checkpoint``, ``xpcnn.export_onnx`` and ``xpcnn.load_onnx`` as
    attributes: imported on first use (the app floor is not loaded by ``import xpcnn``)."""
    if name in _ALIASES:
        return _importlib.import_module(f"{__name__}.{name}")
    if name in _APP_FUNCTIONS:
        module, attribute = _APP_FUNCTIONS[name]
        return getattr(_importlib.import_module(module), attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__", "Backend", "get_backend",
    "XpcnnError", "BackendUnavailable", "BackendMismatch", "ShapeError", "DTypeError", "ConfigError",
    "DatasetError", "CheckpointError", "TrainingError", "ImageFileError", "load_images",
    "im2col", "col2im", "conv_output_size", "softmax", "cross_entropy_error",
    "Convolution", "Pooling", "Affine", "ReLU", "SoftmaxWithLoss", "Dropout", "BatchNormalization", "Sigmoid",
    "SimpleConvNet", "DeepConvNet", "MultiLayerNetExtend", "Trainer", "History", "TrainingInterrupted",
    "load_mnist", "load_dataset", "load_split", "load_idx_pair", "read_idx", "write_idx", "DatasetSpec",
    "save_checkpoint", "load_checkpoint", "export_onnx", "load_onnx",
    "SGD", "Momentum", "AdaGrad", "Adam", "make_optimizer",
]
