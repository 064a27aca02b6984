"""The one registry of models: each model's name, class and the book's training recipe.

    simple  SimpleConvNet (ch. 7): AdaGrad lr 0.06, weight std 0.01, batch 100, 10 epochs
    deep    DeepConvNet (ch. 8): Adam lr 0.001, He initialisation, dropout 0.5, batch 100, 20 epochs
    mlp     MultiLayerNetExtend (ch. 6): 4 hidden layers of 100 ReLU units, He initialisation,
            SGD lr 0.01, batch 100, 20 epochs; weight decay, dropout and batch norm off unless asked

The CLI's ``--model`` choices, the recipes and the classes checkpoints are rebuilt from all
come from `MODELS`. A run's settings (these plus the common ones: dataset, batch size, dtype,
seed, ...) are saved in its checkpoint, so `xpcnn evaluate` and ``--resume`` rebuild the same model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigError
from ..nn.network import Network
from .deep_convnet import DeepConvNet
from .multi_layer_net_extend import MultiLayerNetExtend
from .simple_convnet import SimpleConvNet

COMMON_DEFAULTS = {"dataset": "fashion-mnist", "batch_size": 100, "train_size": None, "test_size": None,
                   "dtype": "float32", "seed": 0}


def _build_simple(run: dict[str, Any], input_dim: tuple, output_size: int, common: dict[str, Any]) -> Network:
    return SimpleConvNet(input_dim=tuple(input_dim), output_size=output_size,
                         weight_init_std=run["weight_init_std"], **common)


def _build_deep(run: dict[str, Any], input_dim: tuple, output_size: int, common: dict[str, Any]) -> Network:
    return DeepConvNet(input_dim=tuple(input_dim), output_size=output_size, dropout_ratio=run["dropout"], **common)


def _build_mlp(run: dict[str, Any], input_dim: tuple, output_size: int, common: dict[str, Any]) -> Network:
    dropout = run["dropout"]
    return MultiLayerNetExtend(math.prod(input_dim), list(run["hidden_sizes"]), output_size,
                               activation=run["activation"], weight_init_std=run["weight_init_std"],
                               weight_decay_lambda=run["weight_decay"], use_dropout=dropout > 0,
                               dropout_ratio=dropout if dropout > 0 else 0.5,
                               use_batchnorm=bool(run["batchnorm"]), **common)


@dataclass(frozen=True)
class ModelEntry:
    """One model: its CLI name, class, the book's recipe, default epochs, and how a run's
    settings become its constructor's arguments."""

    name: str
    cls: type
    recipe: dict[str, Any] = field(repr=False)
    epochs: int
    build: Callable[[dict[str, Any], tuple, int, dict[str, Any]], Network] = field(repr=False)


MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in (
    ModelEntry("simple", SimpleConvNet, {"optimizer": "adagrad", "lr": 0.06, "weight_init_std": 0.01}, 10,
               _build_simple),
    ModelEntry("deep", DeepConvNet, {"optimizer": "adam", "lr": 0.001, "dropout": 0.5}, 20, _build_deep),
    ModelEntry("mlp", MultiLayerNetExtend,
               {"optimizer": "sgd", "lr": 0.01, "weight_init_std": "he", "hidden_sizes": [100, 100, 100, 100],
                "activation": "relu", "weight_decay": 0.0, "dropout": 0.0, "batchnorm": False}, 20, _build_mlp),
)}

#: Settings that only some models have (the CLI refuses them for the others).
MODEL_OPTIONS = ("weight_init_std", "hidden_sizes", "activation", "weight_decay", "dropout", "batchnorm")
#: Every key of a run's settings.
RUN_KEYS = ("model", *COMMON_DEFAULTS, "optimizer", "lr", *MODEL_OPTIONS)


def model_entry(model: str) -> ModelEntry:
    """The registry entry of `model` (``"simple"``, ``"deep"``, ``"mlp"``)."""
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}: expected one of {sorted(MODELS)}")
    return MODELS[model]


def model_of_class(class_name: str) -> str | None:
    """``"deep"`` for ``"DeepConvNet"`` and so on (None for an unknown class)."""
    return next((entry.name for entry in MODELS.values() if entry.cls.__name__ == class_name), None)


def run_defaults(model: str) -> dict[str, Any]:
    """Every setting of `model`'s recipe."""
    return {"model": model, **COMMON_DEFAULTS, **model_entry(model).recipe}


def check_options(model: str, given: dict[str, Any]) -> None:
    """`ConfigError` for a given option that `model` does not have, naming the models that do."""
    for key in MODEL_OPTIONS:
        if key in given and key not in model_entry(model).recipe:
            owners = [m for m, entry in MODELS.items() if key in entry.recipe]
            raise ConfigError(f"--{key.replace('_', '-')} is an option of --model {'/'.join(owners)}, "
                              f"not of --model {model}")
    if model == "simple" and isinstance(given.get("weight_init_std"), str):
        raise ConfigError(f"--weight-init-std for --model simple must be a number, got {given['weight_init_std']!r}")


def build_network(run: dict[str, Any], input_dim: tuple, output_size: int, backend: Any) -> Network:
    """The model of a run's settings, with its initial weights drawn from ``run["seed"]``."""
    common = {"backend": backend, "dtype": run["dtype"], "seed": run["seed"]}
    return model_entry(run["model"]).build(run, input_dim, output_size, common)
