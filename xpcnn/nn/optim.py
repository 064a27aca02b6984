"""Optimizers with the book's protocol: ``optimizer.update(params, grads)``, in place.

`params` is the network's dict of arrays, shared by reference with its layers, so the
update must modify those arrays rather than rebind the dict entries. State (velocities,
squared-gradient sums) is created lazily with the parameter's own namespace, device and
dtype, and can be saved and restored with `state_dict`/`load_state_dict`. The formulas
themselves are operations of the backend's table (`xpcnn.ops`: `adagrad_update`, ...), so a
backend can run each as one fused kernel.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import array_api_compat

from .. import checks
from ..backend.arrays import check_same_device, namespace_of
from ..errors import ConfigError
from ..ops.table import ops_for, ops_of
from .params import ParamDict


class Optimizer:
    """Base class: holds the learning rate and per-parameter state arrays.

    When `params` is a `ParamDict` (every network's ``params``: views of one flat buffer),
    `update` runs the optimizer's formula once over the whole buffer, with state arrays that
    are one buffer too; otherwise once per array. Both give the same numbers.
    """

    #: names of the per-parameter state arrays, e.g. ("h",) for AdaGrad
    state_names: tuple[str, ...] = ()
    #: One-element device arrays the update reads in place of `step_arguments`' numbers while a
    #: step is captured as a CUDA graph (set by `xpcnn.nn.compiled_step`, which writes the numbers
    #: of each step into them before each replay); None otherwise.
    captured_arguments: dict[str, Any] | None = None

    def __init__(self, lr: float):
        self.lr = checks.number_in(lr, "lr", type(self).__name__)
        self.state: dict[str, dict[str, Any]] = {name: {} for name in self.state_names}
        self.iterations = 0
        self._flat_state: dict[str, Any] = {}     # state name -> flat buffer (the flat path)
        self._flat_layout: tuple | None = None

    def update(self, params: dict[str, Any], grads: dict[str, Any]) -> None:
        """Update every array in `params` in place from the matching entry of `grads`."""
        missing = [key for key in params if key not in grads]
        if missing:
            raise ConfigError(f"{type(self).__name__}.update: no gradient for parameter(s) {missing}; "
                              f"grads has {sorted(grads)}")
        if isinstance(params, ParamDict):
            flat_grad = params.gather(grads)              # checks every entry before changing any
            self.iterations += 1
            self._update(ops_of(params.backend), "", params.flat, flat_grad,
                         lambda name: self._flat_buffer(name, params))
            return
        for key, param in params.items():               # check all before changing any
            namespace_of(param, grads[key])               # BackendMismatch on mixed backends
            check_same_device(grads[key], param, f"gradient {key!r}")
        self.iterations += 1
        for key, param in params.items():
            ops = ops_for(namespace_of(param))
            self._update(ops, key, param, grads[key],
                         lambda name, key=key, param=param: self._zeros_like(name, key, param))

    def _update(self, ops: Any, key: str, param: Any, grad: Any, state: Callable[[str], Any]) -> None:
        """Apply the formula to one array (or the flat buffer); `state(name)` gives its state array."""
        raise NotImplementedError

    def step_arguments(self, step: int) -> dict[str, float]:
        """The numbers the update of step `step` (1-based) hands its operation that change from
        step to step (a CUDA graph keeps the arguments it was captured with): none here."""
        return {}

    def _zeros_like(self, name: str, key: str, param: Any) -> Any:
        slot = self.state[name]
        if key not in slot:
            xp = namespace_of(param)
            slot[key] = xp.zeros(param.shape, dtype=param.dtype, device=array_api_compat.device(param))
        return slot[key]

    def _flat_buffer(self, name: str, params: ParamDict) -> Any:
        """State `name` as one buffer laid out like `params.flat` (built once, from any
        per-parameter state already loaded); ``self.state[name][key]`` are views of it."""
        if self._flat_layout != params.layout:
            self._flat_state, self._flat_layout = {}, params.layout
        flat = self._flat_state.get(name)
        if flat is None:
            xp, slot = params.backend.xp, self.state[name]
            if slot:
                state = {key: slot[key] if key in slot else xp.zeros(shape, dtype=params.flat.dtype,
                                                                     device=array_api_compat.device(params.flat))
                         for key, _, _, shape in params.layout}
                flat = params.gather(state)
            else:
                flat = xp.zeros(params.flat.shape, dtype=params.flat.dtype, device=array_api_compat.device(params.flat))
            self._flat_state[name] = flat
            slot.update(params.views_of(flat))
        return flat

    def state_dict(self) -> dict[str, Any]:
        """State arrays as ``{"<state>/<param>": array}`` plus the step count."""
        out: dict[str, Any] = {f"{name}/{key}": arr for name, slot in self.state.items() for key, arr in slot.items()}
        out["iterations"] = self.iterations
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (arrays already on the right backend)."""
        self.iterations = int(state.get("iterations", 0))
        self._flat_state, self._flat_layout = {}, None     # rebuilt from these on the next update
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

    def _update(self, ops: Any, key: str, param: Any, grad: Any, state: Callable[[str], Any]) -> None:
        ops.sgd_update(param, grad, self.lr)


class Momentum(Optimizer):
    """``v = momentum * v - lr * g;  p += v``."""

    state_names = ("v",)

    def __init__(self, lr: float = 0.01, momentum: float = 0.9):
        super().__init__(lr)
        self.momentum = checks.number_in(momentum, "momentum", "Momentum", low=0.0, high=1.0, low_open=False)

    def _update(self, ops: Any, key: str, param: Any, grad: Any, state: Callable[[str], Any]) -> None:
        ops.momentum_update(param, grad, state("v"), self.lr, self.momentum)


class AdaGrad(Optimizer):
    """The book's AdaGrad: ``h += g*g;  p -= lr * g / (sqrt(h) + 1e-7)``."""

    state_names = ("h",)
    eps = 1e-7

    def __init__(self, lr: float = 0.01):
        super().__init__(lr)

    def _update(self, ops: Any, key: str, param: Any, grad: Any, state: Callable[[str], Any]) -> None:
        ops.adagrad_update(param, grad, state("h"), self.lr, self.eps)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction folded into the step size, as in the book."""

    state_names = ("m", "v")

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        super().__init__(lr)
        self.beta1 = checks.number_in(beta1, "beta1", "Adam", low=0.0, high=1.0, low_open=False)
        self.beta2 = checks.number_in(beta2, "beta2", "Adam", low=0.0, high=1.0, low_open=False)
        self.eps = checks.number_in(eps, "eps", "Adam")

    def step_arguments(self, step: int) -> dict[str, float]:
        """The bias-corrected step size of step `step`: ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``."""
        return {"lr_t": self.lr * math.sqrt(1.0 - self.beta2 ** step) / (1.0 - self.beta1 ** step)}

    def update(self, params: dict[str, Any], grads: dict[str, Any]) -> None:
        self._lr_t = (self.captured_arguments or self.step_arguments(self.iterations + 1))["lr_t"]
        super().update(params, grads)

    def _update(self, ops: Any, key: str, param: Any, grad: Any, state: Callable[[str], Any]) -> None:
        ops.adam_update(param, grad, state("m"), state("v"), self._lr_t, self.beta1, self.beta2, self.eps)


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
