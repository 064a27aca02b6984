"""The building blocks of a network, on any array-API namespace.

    layers.py     the book's layers: Convolution, Pooling, Affine, ReLU, Sigmoid, Dropout,
                  BatchNormalization, SoftmaxWithLoss
    params.py     parameters as views of one flat buffer
    optim.py      SGD, Momentum, AdaGrad, Adam (one update over the flat buffer)
    fusion.py     the layers as steps: runs of layers one fused operation computes
    network.py    `Network`: the base of every model (predict, loss, gradient, accuracy)
    inference.py  batched class probabilities and top-k
"""

from .inference import device_batches, predict_proba, top_k
from .layers import Affine, BatchNormalization, Convolution, Dropout, Pooling, ReLU, Sigmoid, SoftmaxWithLoss
from .network import Network
from .optim import OPTIMIZERS, SGD, AdaGrad, Adam, Momentum, Optimizer, make_optimizer
from .params import ParamDict, make_params

__all__ = ["device_batches", "predict_proba", "top_k", "Affine", "BatchNormalization", "Convolution", "Dropout",
           "Pooling", "ReLU", "Sigmoid", "SoftmaxWithLoss", "Network", "OPTIMIZERS", "SGD", "AdaGrad", "Adam",
           "Momentum", "Optimizer", "make_optimizer", "ParamDict", "make_params"]
