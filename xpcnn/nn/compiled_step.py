"""A training step captured once as a CUDA graph and replayed: `Network.compile_step(optimizer)`.

    >>> step = net.compile_step(AdaGrad(lr=0.06))
    >>> loss = step(x_batch, t_batch)         # gradient and update, as the eager step; loss 0-d, on the device

On a GPU these networks are bound by launches: each call into CuPy costs 8-28 us of Python and
launch (docs/gpu-results.md), and a step of SimpleConvNet on CuPy's fast path is 15 of them. A
CUDA graph records the launches of one step once; replaying it is one call.

For each shape of batch: the first call runs the step as usual (what is built on first use,
such as the optimizer's state, is built then); the second runs it again while recording its
allocations (`WarmedBuffers` of the backend's fast module), then captures it, its allocations
served by those same buffers (a capture runs nothing); from the third on, the batch is copied
into the captured input buffers (a copy on the device) and the graph is launched. A batch of
another shape gets a graph of its own, the same way, up to `MAX_GRAPHS` shapes; beyond them a
new shape takes the eager path. Each replay equals the eager step bit for bit (checked through
the CUDA emulation, tests/nn/test_compiled_step.py).

A graph keeps the addresses and the kernel arguments it was captured with. So everything the
step computes from numbers on the host must not change between replays, except what reaches the
device before each launch: `Optimizer.step_arguments` (Adam's bias-corrected step size) is
written into device arrays the captured update reads. The host-side counters a replay skips
(the optimizer's step count, the Dropout source's draws) are advanced here. Changing the
optimizer's hyperparameters, its state buffers (a checkpoint loaded into it) or the network's
parameter buffers drops the graphs, and the next calls capture again; for other changes to the
network (its layers' settings) call `reset`.

Only backends whose fast module can capture graphs have this (CuPy's, `xpcnn.ops.fast_cupy`);
elsewhere `check_graph_support` is a `ConfigError`.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ..errors import ConfigError

#: Batch shapes that get a graph of their own; a further shape runs eagerly.
MAX_GRAPHS = 4


def graph_support(xp: Any) -> Any:
    """The CUDA-graph support of `xp`'s library (`xpcnn.ops.fast_cupy.cuda_graphs()` for CuPy), or None."""
    inner = getattr(xp, "inner", None)         # a namespace in front of another (xpcnn.backend.counting)
    if inner is not None:
        return graph_support(inner)
    if array_api_compat.is_cupy_namespace(xp):
        from ..ops.fast_cupy import cuda_graphs  # imports CuPy: only where CuPy is in use (an optional library)

        return cuda_graphs()
    return None


def check_graph_support(backend: Any) -> Any:
    """The graph support of `backend` (see `graph_support`); `ConfigError` where it has none."""
    support = None if backend.reference else graph_support(backend.xp)
    if support is None:
        why = ("--reference runs the array-API reference code, which calls cuBLAS (not allowed in a capture)"
               if backend.reference else "only CuPy's fast path can be captured")
        raise ConfigError(f"CUDA graphs (--cuda-graph) need --backend gpu without --reference, got backend "
                          f"{backend}: {why}")
    return support


class _Shape:
    """What one batch shape has: its calls so far, the captured inputs, the graph and its buffers."""

    def __init__(self) -> None:
        self.calls = 0
        self.graph: Any = None
        self.buffers: Any = None
        self.x: Any = None
        self.t: Any = None
        self.loss: Any = None
        self.slots: dict[str, Any] = {}
        self.draws_per_step = 0
        self.kept: tuple = ()           # what the graph holds on to besides the batch (see _what_graphs_keep)


class CompiledStep:
    """`network`'s training step with `optimizer`, replayed as a CUDA graph (see the module docstring).

    Attributes:
        network, optimizer: as given.
        replays: graph launches so far (the steps that did not run eagerly).
    """

    def __init__(self, network: Any, optimizer: Any):
        self.graphs = check_graph_support(network.backend)
        self.network, self.optimizer = network, optimizer
        self.replays = 0
        self._shapes: dict[tuple, _Shape] = {}

    def reset(self) -> None:
        """Drop every graph and its buffers: the next calls capture again."""
        self._shapes.clear()

    def __call__(self, x: Any, t: Any) -> Any:
        """One training step on the batch `x`, `t` (on the device): the loss, a 0-d device array
        that later steps do not overwrite."""
        key = (tuple(x.shape), str(x.dtype), tuple(t.shape), str(t.dtype))
        shape = self._shapes.get(key)
        if shape is not None and shape.graph is not None:
            if shape.kept == self._what_graphs_keep():
                return self._replay(shape, x, t)
            self.reset()                       # buffers or settings changed under the graphs
            shape = None
        if shape is None:
            if len(self._shapes) >= MAX_GRAPHS:
                return self._eager(x, t)
            shape = self._shapes[key] = _Shape()
        shape.calls += 1
        if shape.calls == 1:
            return self._eager(x, t)
        return self._capture(shape, x, t)

    # ------------------------------------------------------------------ the three ways

    def _eager(self, x: Any, t: Any) -> Any:
        grads = self.network.gradient(x, t)
        self.optimizer.update(self.network.params, grads)
        return self.network.last_layer.loss

    def _capture(self, shape: _Shape, x: Any, t: Any) -> Any:
        """Run the step once recording its allocations, then capture it with them."""
        xp, network, optimizer = self.network.xp, self.network, self.optimizer
        shape.x, shape.t = xp.empty_like(x), xp.empty_like(t)
        shape.x[...] = x
        shape.t[...] = t
        step = optimizer.iterations + 1
        shape.slots = {name: network.backend.asarray(np.asarray([value]), dtype=network.dtype)
                       for name, value in optimizer.step_arguments(step).items()}
        shape.buffers = self.graphs.WarmedBuffers()
        optimizer.captured_arguments = shape.slots or None
        try:
            with shape.buffers.recording():
                loss = self._eager(shape.x, shape.t)
            kept = xp.asarray(loss, copy=True)
            # The capture runs no step: the counters its Python advanced are put back.
            iterations, draws = optimizer.iterations, self._draws()
            graph, shape.loss = self.graphs.capture(lambda: self._eager(shape.x, shape.t), shape.buffers)
            shape.draws_per_step = self._draws() - draws
            optimizer.iterations = iterations
            self._set_draws(draws)
        finally:
            optimizer.captured_arguments = None
        shape.graph, shape.kept = graph, self._what_graphs_keep()
        return kept

    def _replay(self, shape: _Shape, x: Any, t: Any) -> Any:
        shape.x[...] = x                      # device-to-device copies into the captured inputs
        shape.t[...] = t
        optimizer = self.optimizer
        for name, value in optimizer.step_arguments(optimizer.iterations + 1).items():
            shape.slots[name][...] = value    # what changes from step to step, on the device before the launch
        self.graphs.launch(shape.graph)
        optimizer.iterations += 1
        self._set_draws(self._draws() + shape.draws_per_step)
        self.replays += 1
        return self.network.xp.asarray(shape.loss, copy=True)

    # ------------------------------------------------------------------ bookkeeping

    def _draws(self) -> int:
        rng = getattr(self.network, "rng", None)
        return 0 if rng is None else rng.draws

    def _set_draws(self, draws: int) -> None:
        rng = getattr(self.network, "rng", None)
        if rng is not None:
            rng.draws = draws

    def _what_graphs_keep(self) -> tuple:
        """What a graph holds on to besides the batch: buffers (by identity) and hyperparameters;
        when it changes, the graphs are captured again."""
        network, optimizer = self.network, self.optimizer
        settings = tuple(sorted((name, value) for name, value in vars(optimizer).items()
                                if not name.startswith("_") and name != "iterations"
                                and isinstance(value, (int, float))))
        state = tuple(id(array) for array in getattr(optimizer, "_flat_state", {}).values())
        return (id(network.params.flat), id(network.grads.flat), type(optimizer), settings, state,
                tuple(map(id, network.layers.values())))
