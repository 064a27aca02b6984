"""Optimizers on every backend: in-place updates, state in the parameter's namespace and
dtype, and agreement with the formulas written out in NumPy."""

import math

import numpy as np
import pytest

from xpcnn.backend import get_backend
from xpcnn.errors import BackendMismatch, ConfigError
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


def test_book_defaults():
    assert SGD().lr == 0.01
    assert (Momentum().lr, Momentum().momentum) == (0.01, 0.9)
    assert AdaGrad().lr == 0.01 and AdaGrad.eps == 1e-7
    adam = Adam()
    assert (adam.lr, adam.beta1, adam.beta2, adam.eps) == (0.001, 0.9, 0.999, 1e-8)


@pytest.mark.parametrize("make, accepted", [
    (lambda v: Momentum(momentum=v), [0, 0.0, 0.5, 0.999]),
    (lambda v: Adam(beta1=v), [0, 0.0, 0.5, 0.999]),
    (lambda v: Adam(beta2=v), [0.0, 0.999]),
    (lambda v: Adam(eps=v), [1e-12, 1.0, 1e6]),
    (lambda v: SGD(lr=v), [1e-12, 1, 100.0]),
])
def test_hyperparameters_at_their_bounds_are_accepted(make, accepted):
    """Momentum and the betas may be 0 (closed below) but not 1; lr and eps must be above 0."""
    for value in accepted:
        make(value)


@pytest.mark.parametrize("make, message", [
    (lambda: SGD(lr=0.0), "SGD: lr must be > 0.0, got 0.0"),
    (lambda: AdaGrad(lr=-1), "AdaGrad: lr must be > 0.0, got -1.0"),
    (lambda: Momentum(momentum=1.0), "Momentum: momentum must be >= 0.0 and < 1.0, got 1.0"),
    (lambda: Momentum(momentum=1.5), "Momentum: momentum must be >= 0.0 and < 1.0, got 1.5"),
    (lambda: Momentum(momentum=-0.1), "Momentum: momentum must be >= 0.0 and < 1.0, got -0.1"),
    (lambda: Adam(beta1=1.0), "Adam: beta1 must be >= 0.0 and < 1.0, got 1.0"),
    (lambda: Adam(beta1=-1e-9), "Adam: beta1 must be >= 0.0 and < 1.0, got -1e-09"),
    (lambda: Adam(beta2=1.0), "Adam: beta2 must be >= 0.0 and < 1.0, got 1.0"),
    (lambda: Adam(beta2=-0.5), "Adam: beta2 must be >= 0.0 and < 1.0, got -0.5"),
    (lambda: Adam(eps=0.0), "Adam: eps must be > 0.0, got 0.0"),
    (lambda: Adam(beta1=True), "Adam: beta1 must be a number, got True"),
])
def test_bad_hyperparameters_name_the_optimizer_the_value_and_the_bound(make, message):
    with pytest.raises(ConfigError) as caught:
        make()
    assert str(caught.value) == message


def test_missing_gradient_message_names_the_optimizer_and_what_grads_has():
    with pytest.raises(ConfigError) as caught:
        Momentum(0.1).update({"W": np.ones(2), "b": np.ones(2)}, {"W": np.ones(2)})
    assert str(caught.value) == "Momentum.update: no gradient for parameter(s) ['b']; grads has ['W']"


def test_plain_dict_update_checks_every_gradient_before_changing_any():
    """A gradient from another backend is a `BackendMismatch` that says so (not only that the
    devices differ), raised before the first parameter is touched (the step count stays 0)."""
    strict = pytest.importorskip("array_api_strict")
    params = {"W": np.ones(3), "b": np.ones(2)}
    opt = SGD(0.1)
    with pytest.raises(BackendMismatch, match="arrays from different backends were mixed"):
        opt.update(params, {"W": np.ones(3), "b": strict.ones(2, dtype=strict.float64)})
    np.testing.assert_array_equal(params["W"], np.ones(3))
    assert opt.iterations == 0


def test_plain_dict_gradient_on_another_device_is_named(backend):
    other = _other_device(backend)
    if other is None:
        pytest.skip(f"{backend.name} has one device")
    params = {"W": backend.asarray(np.ones(3), "float64")}
    grads = {"W": backend.xp.asarray(np.ones(3), device=other)}
    with pytest.raises(BackendMismatch, match="gradient 'W' is on device"):
        SGD(0.1).update(params, grads)


def _other_device(backend):
    """A device of `backend`'s library other than the backend's own, or None."""
    if backend.name != "array_api_strict":
        return None
    import array_api_strict
    devices = [d for d in array_api_strict.__array_namespace_info__().devices() if d != backend.device]
    return devices[0] if devices else None


@pytest.mark.parametrize("name, hp", [case for case in CASES if case[0] != "sgd"])
def test_flat_state_is_one_buffer_updated_in_place_across_steps(rng, backend, name, hp):
    """The flat path builds its state buffer once: the state arrays seen after the first step
    are the ones the later steps update (no gather into a fresh buffer per step)."""
    host = {"W": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    params = make_params(host, backend, backend.dtype("float64"))
    opt = make_optimizer(name, **hp)
    grads = [{k: backend.asarray(rng.standard_normal(v.shape), "float64") for k, v in host.items()} for _ in range(3)]
    opt.update(params, grads[0])
    first = {state_name: dict(slot) for state_name, slot in opt.state.items()}
    for g in grads[1:]:
        opt.update(params, g)
    for state_name, slot in opt.state.items():
        for key, array in slot.items():
            assert first[state_name][key] is array, f"{name} state {state_name}[{key}] was rebuilt"
    for key in host:
        _, state = reference_steps_and_state(name, host[key], [backend.to_numpy(g[key]) for g in grads], **hp)
        for state_name, expected in state.items():
            np.testing.assert_allclose(backend.to_numpy(first[state_name][key]), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name, hp", [case for case in CASES if case[0] != "sgd"])
def test_flat_path_resumes_from_loaded_state_even_a_partial_one(rng, backend, name, hp, dtype):
    """A state loaded with `load_state_dict` (a checkpoint), then flat updates: the same numbers
    as the per-array path from the same state; an entry the state lacks starts at zeros."""
    host = {"W": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in host.items()} for _ in range(2)]
    saved = {f"{state_name}/W": backend.asarray(np.abs(rng.standard_normal((4, 3))), dtype)
             for state_name in make_optimizer(name, **hp).state_names}
    saved["iterations"] = 5
    results = []
    for container in ("flat", "dict"):
        if container == "flat":
            params = make_params(host, backend, backend.dtype(dtype))
        else:
            params = {k: backend.asarray(v.copy(), dtype) for k, v in host.items()}
        opt = make_optimizer(name, **hp)
        opt.load_state_dict({k: (backend.xp.asarray(v, copy=True) if k != "iterations" else v)
                             for k, v in saved.items()})
        for g in grads:
            opt.update(params, {k: backend.asarray(v, dtype) for k, v in g.items()})
        assert opt.iterations == 7
        results.append(({k: backend.to_numpy(v) for k, v in params.items()},
                        {f"{s}/{k}": backend.to_numpy(a) for s, slot in opt.state.items() for k, a in slot.items()}))
    (flat_params, flat_state), (dict_params, dict_state) = results
    tol = 1e-5 if dtype == "float32" else 1e-12
    for key in host:
        np.testing.assert_allclose(flat_params[key], dict_params[key], rtol=tol, atol=tol)
    assert sorted(flat_state) == sorted(dict_state)
    for key in dict_state:
        np.testing.assert_allclose(flat_state[key], dict_state[key], rtol=tol, atol=tol)


def test_load_state_dict_reads_every_entry_whatever_the_order():
    """"iterations" may come first; a parameter name may hold "/" (the state name is what
    comes before the first one); no "iterations" means 0; an unknown state is named."""
    opt = AdaGrad(0.1)
    h = np.full(2, 4.0)
    opt.load_state_dict({"iterations": 3, "h/block1/W": h})
    assert opt.iterations == 3
    assert opt.state["h"] == {"block1/W": h}
    fresh = AdaGrad(0.1)
    fresh.load_state_dict({"h/W": h})
    assert fresh.iterations == 0
    with pytest.raises(ConfigError) as caught:
        AdaGrad(0.1).load_state_dict({"v/W": h})
    assert str(caught.value) == "AdaGrad: unknown state entry 'v/W'"


def test_flat_state_follows_a_new_layout():
    """One optimizer stepping a second `ParamDict` whose layout differs (another order of the
    same parameters, e.g. a network rebuilt from a checkpoint): its flat state is rebuilt in
    the new order, so every parameter keeps its own state (the per-array path agrees)."""
    be = get_backend("numpy")
    rng = np.random.default_rng(3)
    host = {"W": rng.standard_normal(4), "b": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(4) for k in host} for _ in range(3)]
    flat_opt, dict_opt = AdaGrad(0.1), AdaGrad(0.1)
    first = make_params(host, be, "float64")
    plain = {k: v.copy() for k, v in host.items()}
    flat_opt.update(first, grads[0])
    dict_opt.update(plain, grads[0])
    second = make_params({"b": be.to_numpy(first["b"]), "W": be.to_numpy(first["W"])}, be, "float64")
    for g in grads[1:]:
        flat_opt.update(second, g)
        dict_opt.update(plain, g)
    for key in host:
        np.testing.assert_allclose(second[key], plain[key], rtol=1e-12)
        np.testing.assert_allclose(flat_opt.state["h"][key], dict_opt.state["h"][key], rtol=1e-12)
