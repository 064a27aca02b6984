"""The book's networks, one file each, and the one registry of them.

    simple_convnet.py          `SimpleConvNet` (chapter 7)
    deep_convnet.py            `DeepConvNet` (chapter 8)
    multi_layer_net_extend.py  `MultiLayerNetExtend` (chapter 6)
    registry.py                `MODELS`: name -> class, the book's recipe, default epochs
"""

from .deep_convnet import DeepConvNet
from .multi_layer_net_extend import MultiLayerNetExtend
from .registry import MODELS, ModelEntry, build_network, model_entry, model_of_class, run_defaults
from .simple_convnet import SimpleConvNet

__all__ = ["DeepConvNet", "MultiLayerNetExtend", "SimpleConvNet", "MODELS", "ModelEntry", "build_network",
           "model_entry", "model_of_class", "run_defaults"]
