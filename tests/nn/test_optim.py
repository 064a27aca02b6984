"""Optimizers on every backend: in-place updates, state in the parameter's namespace and
dtype, and agreement with the formulas written out in NumPy."""

import math

import numpy as np
import pytest

from xpcnn.errors import ConfigError
from xpcnn.nn.optim import SGD, AdaGrad, Adam, Momentum, make_optimizer
from xpcnn.nn.params import ParamDict, make_params


def reference_steps(name, p, grads, **hp):
    """The update rules in plain NumPy float64, step by step."""
    return reference_steps_and_state(name, p, grads, **hp)[0]


def reference_steps_and_state(name, p, grads, **hp):
    """The parameter after the steps and the optimizer's state arrays, by xpcnn's state names."""
    p = p.copy()
    v = np.zeros_like(p)
    h = np.zeros_like(p)
    m = np.zeros_like(p)
    for step, g in enumerate(grads, start=1):
        if name == "sgd":
            p -= hp["lr"] * g
        elif name == "momentum":
            v = hp["momentum"] * v - hp["lr"] * g
            p += v
        elif name == "adagrad":
            h += g * g
            p -= hp["lr"] * g / (np.sqrt(h) + 1e-7)
        elif name == "adam":
            lr_t = hp["lr"] * math.sqrt(1 - 0.999 ** step) / (1 - 0.9 ** step)
            m += 0.1 * (g - m)
            h += 0.001 * (g * g - h)
            p -= lr_t * m / (np.sqrt(h) + 1e-8)
    state = {"sgd": {}, "momentum": {"v": v}, "adagrad": {"h": h}, "adam": {"m": m, "v": h}}[name]
    return p, state


CASES = [("sgd", {"lr": 0.1}), ("momentum", {"lr": 0.1, "momentum": 0.9}), ("adagrad", {"lr": 0.06}),
         ("adam", {"lr": 0.01})]


@pytest.mark.parametrize("name, hp", CASES)
def test_optimizer_matches_formula_and_updates_in_place(backend, rng, name, hp):
    p_host = rng.standard_normal((4, 3))
    grads_host = [rng.standard_normal((4, 3)) for _ in range(3)]
    param = backend.asarray(p_host.copy(), "float64")   # NumPy's asarray would alias p_host
    params = {"W": param}
    opt = make_optimizer(name, **hp)
    for g in grads_host:
        opt.update(params, {"W": backend.asarray(g, "float64")})
    assert params["W"] is param                      # same array: layers holding it see the update
    np.testing.assert_allclose(backend.to_numpy(param), reference_steps(name, p_host, grads_host, **hp),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("container", ["dict", "flat"])
@pytest.mark.parametrize("name, hp", CASES)
def test_every_step_and_state_array_match_the_formula(backend, rng, name, hp, container):
    """Both update paths: a plain dict of arrays (one update per array) and a network's flat
    `ParamDict` (one update over the whole buffer): the parameters, the step count (Adam's bias
    correction reads it) and every state array after three steps."""
    host = {"W": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    steps = {key: [rng.standard_normal(value.shape) for _ in range(3)] for key, value in host.items()}
    if container == "flat":
        params = make_params(host, backend, backend.dtype("float64"))
        assert isinstance(params, ParamDict)
    else:
        params = {key: backend.asarray(value.copy(), "float64") for key, value in host.items()}
    opt = make_optimizer(name, **hp)
    for i in range(3):
        opt.update(params, {key: backend.asarray(steps[key][i], "float64") for key in host})
        assert opt.iterations == i + 1
    assert opt.state_dict()["iterations"] == 3
    for key, value in host.items():
        expected, state = reference_steps_and_state(name, value, steps[key], **hp)
        np.testing.assert_allclose(backend.to_numpy(params[key]), expected, rtol=1e-12, atol=1e-14)
        assert sorted(opt.state) == sorted(state)
        for state_name, expected_state in state.items():
            np.testing.assert_allclose(backend.to_numpy(opt.state[state_name][key]), expected_state,
                                       rtol=1e-12, atol=1e-14, err_msg=f"{name} state {state_name}[{key}]")


@pytest.mark.parametrize("name, hp", CASES)
def test_optimizer_state_lives_with_the_parameter(backend, rng, name, hp):
    param = backend.asarray(rng.standard_normal((3, 2)), "float32")
    opt = make_optimizer(name, **hp)
    opt.update({"W": param}, {"W": backend.asarray(rng.standard_normal((3, 2)), "float32")})
    assert param.dtype == backend.xp.float32
    for slot in opt.state.values():
        state = slot["W"]
        assert state.dtype == backend.xp.float32
        assert backend.owns(state)


def test_update_leaves_the_gradient_alone(rng):
    g = rng.standard_normal(5)
    g_copy = g.copy()
    AdaGrad(0.1).update({"W": rng.standard_normal(5)}, {"W": g})
    np.testing.assert_array_equal(g, g_copy)


@pytest.mark.parametrize("lr", [0, -0.1, float("nan"), float("inf"), "0.1", None])
def test_optimizers_reject_bad_learning_rates(lr):
    for cls in (SGD, Momentum, AdaGrad, Adam):
        with pytest.raises(ConfigError, match="lr must be"):
            cls(lr=lr)


def test_make_optimizer_rejects_unknown_names_and_params():
    with pytest.raises(ConfigError, match="unknown optimizer 'rmsprop'.*adagrad"):
        make_optimizer("rmsprop", lr=0.1)
    with pytest.raises(ConfigError, match="bad parameters"):
        make_optimizer("sgd", lr=0.1, momentum=0.9)
    assert isinstance(make_optimizer("AdaGrad", lr=0.06), AdaGrad)


def test_missing_gradient_is_reported():
    with pytest.raises(ConfigError, match=r"no gradient for parameter\(s\) \['b'\]"):
        SGD(0.1).update({"W": np.ones(2), "b": np.ones(2)}, {"W": np.ones(2)})


def test_state_dict_round_trip(rng):
    params = {"W": rng.standard_normal(4)}
    opt = Adam(0.01)
    opt.update(params, {"W": rng.standard_normal(4)})
    clone = Adam(0.01)
    clone.load_state_dict({k: (v.copy() if hasattr(v, "copy") else v) for k, v in opt.state_dict().items()})
    assert clone.iterations == 1
    g = rng.standard_normal(4)
    p1, p2 = params["W"].copy(), params["W"].copy()
    opt.update({"W": p1}, {"W": g})
    clone.update({"W": p2}, {"W": g})
    np.testing.assert_array_equal(p1, p2)
