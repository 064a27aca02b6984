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
    app/             the command line, predict, report, plots, export (ONNX)
"""

import sys as _sys

from ._version import __version__
from .app import report
from .app.export import export_onnx
from .app.onnx_model import load_onnx
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
from .training import History, Trainer, TrainingInterrupted, checkpoint, load_checkpoint, save_checkpoint

# The module names of the flat layout that the docs show, kept importable:
# ``import xpcnn.checkpoint``, ``from xpcnn.report import write_report``.
_sys.modules[__name__ + ".checkpoint"] = checkpoint
_sys.modules[__name__ + ".report"] = report

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
