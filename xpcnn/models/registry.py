"""The book's training recipe of each model the CLI trains, and building the model from one.

    simple  SimpleConvNet (ch. 7): AdaGrad lr 0.06, weight std 0.01, batch 100, 10 epochs
    deep    DeepConvNet (ch. 8): Adam lr 0.001, He initialisation, dropout 0.5, batch 100, 20 epochs
    mlp     MultiLayerNetExtend (ch. 6): 4 hidden layers of 100 ReLU units, He initialisation,
            SGD lr 0.01, batch 100, 20 epochs; weight decay, dropout and batch norm off unless asked

A run's settings (these plus the common ones: dataset, batch size, dtype, seed, ...) are saved
in its checkpoint, so `xpcnn evaluate` and ``--resume`` rebuild the same model.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

COMMON_DEFAULTS = {"dataset": "fashion-mnist", "batch_size": 100, "train_size": None, "test_size": None,
                   "dtype": "float32", "seed": 0}

RECIPES: dict[str, dict[str, Any]] = {
    "simple": {"optimizer": "adagrad", "lr": 0.06, "weight_init_std": 0.01},
    "deep": {"optimizer": "adam", "lr": 0.001, "dropout": 0.5},
    "mlp": {"optimizer": "sgd", "lr": 0.01, "weight_init_std": "he", "hidden_sizes": [100, 100, 100, 100],
            "activation": "relu", "weight_decay": 0.0, "dropout": 0.0, "batchnorm": False},
}
DEFAULT_EPOCHS = {"simple": 10, "deep": 20, "mlp": 20}
MODEL_CLASSES = {"simple": "SimpleConvNet", "deep": "DeepConvNet", "mlp": "MultiLayerNetExtend"}

#: Settings that only some models have (the CLI refuses them for the others).
MODEL_OPTIONS = ("weight_init_std", "hidden_sizes", "activation", "weight_decay", "dropout", "batchnorm")
#: Every key of a run's settings.
RUN_KEYS = ("model", *COMMON_DEFAULTS, "optimizer", "lr", *MODEL_OPTIONS)


def model_of_class(class_name: str) -> str | None:
    """``"deep"`` for ``"DeepConvNet"`` and so on (None for an unknown class)."""
    return next((model for model, name in MODEL_CLASSES.items() if name == class_name), None)


def run_defaults(model: str) -> dict[str, Any]:
    """Every setting of `model`'s recipe."""
    if model not in RECIPES:
        raise ConfigError(f"unknown model {model!r}: expected one of {sorted(RECIPES)}")
    return {"model": model, **COMMON_DEFAULTS, **RECIPES[model]}


def check_options(model: str, given: dict[str, Any]) -> None:
    """`ConfigError` for a given option that `model` does not have, naming the models that do."""
    for key in MODEL_OPTIONS:
        if key in given and key not in RECIPES[model]:
            owners = [m for m in RECIPES if key in RECIPES[m]]
            raise ConfigError(f"--{key.replace('_', '-')} is an option of --model {'/'.join(owners)}, not of --model {model}")
    if model == "simple" and isinstance(given.get("weight_init_std"), str):
        raise ConfigError(f"--weight-init-std for --model simple must be a number, got {given['weight_init_std']!r}")


def build_network(run: dict[str, Any], input_dim: tuple, output_size: int, backend: Any) -> Any:
    """The model of a run's settings, with its initial weights drawn from ``run["seed"]``."""
    from .models import SimpleConvNet
    from .nets import DeepConvNet, MultiLayerNetExtend

    model, common = run["model"], {"backend": backend, "dtype": run["dtype"], "seed": run["seed"]}
    if model == "simple":
        return SimpleConvNet(input_dim=tuple(input_dim), output_size=output_size,
                             weight_init_std=run["weight_init_std"], **common)
    if model == "deep":
        return DeepConvNet(input_dim=tuple(input_dim), output_size=output_size, dropout_ratio=run["dropout"], **common)
    if model == "mlp":
        dropout = run["dropout"]
        return MultiLayerNetExtend(math.prod(input_dim), list(run["hidden_sizes"]), output_size,
                                   activation=run["activation"], weight_init_std=run["weight_init_std"],
                                   weight_decay_lambda=run["weight_decay"], use_dropout=dropout > 0,
                                   dropout_ratio=dropout if dropout > 0 else 0.5,
                                   use_batchnorm=bool(run["batchnorm"]), **common)
    raise ConfigError(f"unknown model {model!r}: expected one of {sorted(RECIPES)}")
