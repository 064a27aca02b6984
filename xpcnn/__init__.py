"""xpcnn: the chapter-7 CNN of "Deep Learning from Scratch", written once for NumPy and CuPy.

    >>> from xpcnn import SimpleConvNet, AdaGrad
    >>> net = SimpleConvNet(backend="cpu", seed=0)
    >>> grads = net.gradient(x_batch, t_batch)
    >>> AdaGrad(lr=0.06).update(net.params, grads)
"""

from .backend import Backend, get_backend
from .errors import (
    BackendMismatch, BackendUnavailable, CheckpointError, ConfigError, DatasetError, DTypeError,
    ImageFileError, ShapeError, TrainingError, XpcnnError,
)
from .functional import col2im, conv_output_size, cross_entropy_error, im2col, softmax
from .layers import Affine, Convolution, Pooling, ReLU, SoftmaxWithLoss
from .data import DatasetSpec, load_dataset, load_idx_pair, load_mnist, load_split, read_idx, write_idx
from .models import SimpleConvNet
from .optim import SGD, AdaGrad, Adam, Momentum, make_optimizer
from .train import History, Trainer, TrainingInterrupted
from .checkpoint import load_checkpoint, save_checkpoint
from .images import load_images

__version__ = "0.1.0"

__all__ = [
    "Backend", "get_backend",
    "XpcnnError", "BackendUnavailable", "BackendMismatch", "ShapeError", "DTypeError", "ConfigError",
    "DatasetError", "CheckpointError", "TrainingError", "ImageFileError", "load_images",
    "im2col", "col2im", "conv_output_size", "softmax", "cross_entropy_error",
    "Convolution", "Pooling", "Affine", "ReLU", "SoftmaxWithLoss",
    "SimpleConvNet", "Trainer", "History", "TrainingInterrupted",
    "load_mnist", "load_dataset", "load_split", "load_idx_pair", "read_idx", "write_idx", "DatasetSpec",
    "save_checkpoint", "load_checkpoint",
    "SGD", "Momentum", "AdaGrad", "Adam", "make_optimizer",
]
