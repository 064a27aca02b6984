"""Optimizers with the book's protocol: ``optimizer.update(params, grads)``, in place.

`params` is the network's dict of arrays, shared by reference with its layers, so the
update must modify those arrays rather than rebind the dict entries. State (velocities,
squared-gradient sums) is created lazily with the parameter's own namespace, device and
dtype, and can be saved and restored with `state_dict`/`load_state_dict`.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from .backend import check_same_device, namespace_of
from .errors import ConfigError


def _check_hyper(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                 low_open: bool = True, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what}: {name} must be a number, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if math.isnan(value) or too_low or value >= high:
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and < {high}")
        raise ConfigError(f"{what}: {name} must be {bound}, got {value!r}")
    return value


class Optimizer:
    """Base class: holds the learning rate and per-parameter state arrays."""

    #: names of the per-parameter state arrays, e.g. ("h",) for AdaGrad
    state_names: tuple[str, ...] = ()

    def __init__(self, lr: float):
        self.lr = _check_hyper("lr", lr, what=type(self).__name__)
        self.state: dict[str, dict[str, Any]] = {name: {} for name in self.state_names}
        self.iterations = 0

    def update(self, params: dict[str, Any], grads: dict[str, Any]) -> None:
        """Update every array in `params` in place from the matching entry of `grads`."""
        missing = [key for key in params if key not in grads]
        if missing:
            raise ConfigError(f"{type(self).__name__}.update: no gradient for parameter(s) {missing}; grads has {sorted(grads)}")
        for key, param in params.items():               # check all before changing any
            namespace_of(param, grads[key])               # BackendMismatch on mixed backends
            check_same_device(grads[key], param, f"gradient {key!r}")
        self.iterations += 1
        for key, param in params.items():
            self._update_one(key, param, grads[key])

    def _update_one(self, key: str, param: Any, grad: Any) -> None:
        raise NotImplementedError

    def _zeros_like(self, name: str, key: str, param: Any) -> Any:
        slot = self.state[name]
        if key not in slot:
            xp = namespace_of(param)
            slot[key] = xp.zeros(param.shape, dtype=param.dtype, device=array_api_compat.device(param))
        return slot[key]

    def state_dict(self) -> dict[str, Any]:
        """State arrays as ``{"<state>/<param>": array}`` plus the step count."""
        out: dict[str, Any] = {f"{name}/{key}": arr for name, slot in self.state.items() for key, arr in slot.items()}
        out["iterations"] = self.iterations
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (arrays already on the right backend)."""
        self.iterations = int(state.get("iterations", 0))
        for flat_key, arr in state.items():
            if flat_key == "iterations":
                continue
            name, _, key = flat_key.partition("/")
            if name not in self.state:
                raise ConfigError(f"{type(self).__name__}: unknown state entry {flat_key!r}")
            self.state[name][key] = arr


class SGD(Optimizer):
    """``p -= lr * g``."""

    def __init__(self, lr: float = 0.01):
        super().__init__(lr)

    def _update_one(self, key: str, param: Any, grad: Any) -> None:
        param -= self.lr * grad


class Momentum(Optimizer):
    """``v = momentum * v - lr * g;  p += v``."""

    state_names = ("v",)

    def __init__(self, lr: float = 0.01, momentum: float = 0.9):
        super().__init__(lr)
        self.momentum = _check_hyper("momentum", momentum, low=0.0, high=1.0, low_open=False, what="Momentum")

    def _update_one(self, key: str, param: Any, grad: Any) -> None:
        v = self._zeros_like("v", key, param)
        v *= self.momentum
        v -= self.lr * grad
        param += v


class AdaGrad(Optimizer):
    """The book's AdaGrad: ``h += g*g;  p -= lr * g / (sqrt(h) + 1e-7)``."""

    state_names = ("h",)
    eps = 1e-7

    def __init__(self, lr: float = 0.01):
        super().__init__(lr)

    def _update_one(self, key: str, param: Any, grad: Any) -> None:
        xp = namespace_of(param)
        h = self._zeros_like("h", key, param)
        h += grad * grad
        step = xp.sqrt(h)
        step += self.eps
        step = grad / step
        step *= self.lr              # in place on our own temporaries: fewer large allocations
        param -= step


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction folded into the step size, as in the book."""

    state_names = ("m", "v")

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        super().__init__(lr)
        self.beta1 = _check_hyper("beta1", beta1, low=0.0, high=1.0, low_open=False, what="Adam")
        self.beta2 = _check_hyper("beta2", beta2, low=0.0, high=1.0, low_open=False, what="Adam")
        self.eps = _check_hyper("eps", eps, what="Adam")

    def update(self, params: dict[str, Any], grads: dict[str, Any]) -> None:
        step = self.iterations + 1
        self._lr_t = self.lr * math.sqrt(1.0 - self.beta2 ** step) / (1.0 - self.beta1 ** step)
        super().update(params, grads)

    def _update_one(self, key: str, param: Any, grad: Any) -> None:
        xp = namespace_of(param)
        m = self._zeros_like("m", key, param)
        v = self._zeros_like("v", key, param)
        m += (1.0 - self.beta1) * (grad - m)
        v += (1.0 - self.beta2) * (grad * grad - v)
        param -= self._lr_t * m / (xp.sqrt(v) + self.eps)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adagrad": AdaGrad, "adam": Adam}


def make_optimizer(name: str, **params: Any) -> Optimizer:
    """An optimizer by (case-insensitive) name: sgd, momentum, adagrad or adam."""
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ConfigError(f"unknown optimizer {name!r}: expected one of {sorted(OPTIMIZERS)}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"optimizer {name!r}: bad parameters {params}: {exc}") from exc
