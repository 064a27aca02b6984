"""The table of hot operations: one per namespace, the reference entries overridden by a
backend's fast ones.

Layers and optimizers ask their table for an operation by name; they never ask which backend
they run on. The reference entries are in `reference.py`; NumPy's fast entries in
`fast_numpy.py`, CuPy's in `fast_cupy.py`. `ops_for(xp, reference=True)` gives the reference
path on any namespace (the tests and benchmarks check the fast paths against it).

The fused entries (`fused.py`: a convolution with its ReLU and pooling, Affine with ReLU)
are defined as the table's own unfused entries called in turn; a backend with a fused kernel
replaces that definition.

A fast entry takes the reference's arguments and returns its result, or ``NotImplemented``
for a case it leaves to the reference (e.g. a pooling geometry it has no kernel for): the
table then calls the reference (for a fused entry, its definition) with the same arguments.
A namespace that stands in front of another one (`xpcnn.backend.counting.CountingNamespace`,
which counts calls) has an ``inner`` namespace and a ``wrap_fast_table`` method: its table
holds the inner library's fast entries as that method wraps them, so measuring happens
outside the operations.

    >>> ops = ops_for(array_api_compat.numpy)             # the fast table, where one exists
    >>> out, cache = ops.maxpool2d_forward(x, 2, 2, 2, 0, 14, 14)
    >>> ops_for(xp, reference=True)                       # the reference path, always
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Callable

import array_api_compat

from . import cpu_kernels, fast_numpy, fused, reference
from .cpu_threads import thread_count

#: Every operation a table holds, with its signature (after `xp`).
OP_SIGNATURES = {
    "conv2d_forward": "(x, W, b, stride, pad, out_h, out_w) -> (out, cache)",
    "conv2d_backward": "(dout, cache, W, stride, pad, need_input_grad, dW_out, db_out) -> (dx or None, dW, db)",
    "affine_forward": "(x2d, W, b) -> out",
    "affine_backward": "(dout, x2d, W, need_input_grad, dW_out, db_out) -> (dx2d or None, dW, db)",
    "maxpool2d_forward": "(x, pool_h, pool_w, stride, pad, out_h, out_w) -> (out, cache)",
    "maxpool2d_backward": "(dout, cache) -> dx",
    "relu_forward": "(x) -> out",
    "relu_backward": "(out, dout) -> dx",
    "softmax_cross_entropy_forward": "(scores, t) -> (loss, cache); cache[0] is the softmax",
    "softmax_cross_entropy_backward": "(cache, dout) -> dscores",
    "count_correct": "(scores, t) -> 0-d integer count",
    "sgd_update": "(param, grad, lr) -> None",
    "momentum_update": "(param, grad, v, lr, momentum) -> None",
    "adagrad_update": "(param, grad, h, lr, eps) -> None",
    "adam_update": "(param, grad, m, v, lr_t, beta1, beta2, eps) -> None",
    # Fused (fused.py): runs of layers in one operation; `pool` is (pool_h, pool_w, stride, pad, out_h, out_w).
    "conv2d_relu_forward": "(x, W, b, stride, pad, out_h, out_w) -> (out, cache)",
    "conv2d_relu_backward": "(dout, cache, W, stride, pad, need_input_grad, dW_out, db_out) -> (dx or None, dW, db)",
    "conv2d_relu_maxpool2d_forward": "(x, W, b, stride, pad, out_h, out_w, pool) -> (out, cache)",
    "conv2d_relu_maxpool2d_backward": "(dout, cache, W, stride, pad, need_input_grad, dW_out, db_out) -> "
                                      "(dx or None, dW, db)",
    "affine_relu_forward": "(x2d, W, b) -> (out, cache)",
    "affine_relu_backward": "(dout, cache, x2d, W, need_input_grad, dW_out, db_out) -> (dx2d or None, dW, db)",
}

_REFERENCE: dict[str, Callable[..., Any]] = {name: getattr(reference, name) for name in OP_SIGNATURES
                                             if name not in fused.FUSED}


class Ops:
    """A table of the hot operations bound to one namespace.

    Attributes:
        xp: the namespace.
        reference: True when every entry is the reference implementation.
        fast_names: the entries a backend replaced with fast code.
    """

    def __init__(self, xp: ModuleType, fast: dict[str, Callable[..., Any]] | None = None):
        self.xp = xp
        fast = dict(fast or {})
        unknown = set(fast) - set(OP_SIGNATURES)
        if unknown:
            raise ValueError(f"unknown fast operations {sorted(unknown)}; known: {sorted(OP_SIGNATURES)}")
        self.fast_names = tuple(sorted(fast))
        self.reference = not fast
        for name, reference_function in _REFERENCE.items():
            setattr(self, name, _entry(xp, name, reference_function, fast.get(name)))
        for name, definition in fused.FUSED.items():      # defined on this table's own entries
            setattr(self, name, _entry(xp, name, functools.partial(definition, self), fast.get(name),
                                       fallback_takes_xp=False))

    def __repr__(self) -> str:
        kind = "reference" if self.reference else f"fast: {', '.join(self.fast_names)}"
        return f"Ops({getattr(self.xp, '__name__', self.xp)}, {kind})"


def _entry(xp: ModuleType, name: str, reference_function: Callable[..., Any],
           fast_function: Callable[..., Any] | None, fallback_takes_xp: bool = True) -> Callable[..., Any]:
    """The table's entry `name` bound to `xp`: the fast function, falling back to the
    reference where it returns ``NotImplemented``; the reference alone without one.
    `reference_function` takes `xp` first unless ``fallback_takes_xp=False`` (a fused
    definition already bound to its table)."""
    fallback = functools.partial(reference_function, xp) if fallback_takes_xp else reference_function
    if fast_function is None:
        return fallback

    def entry(*args: Any) -> Any:
        result = fast_function(xp, *args)
        return fallback(*args) if result is NotImplemented else result

    entry.__name__ = name
    entry.__wrapped__ = fast_function            # the fast function behind the entry (for tests and tools)
    return entry


def _fast_table(xp: Any) -> dict[str, Callable[..., Any]]:
    """The fast entries for `xp`'s library (none for libraries without a fast module)."""
    wrap = getattr(xp, "wrap_fast_table", None)
    if wrap is not None:                 # a namespace in front of another: the other's entries, wrapped
        return wrap(_fast_table(xp.inner))
    if array_api_compat.is_cupy_namespace(xp):
        from . import fast_cupy  # imports CuPy: only where CuPy is in use (an optional library)

        return fast_cupy.fast_ops()
    if array_api_compat.is_numpy_namespace(xp):
        return {**fast_numpy.fast_ops(), **_compiled_cpu_ops()}
    return {}


#: The compiled CPU kernels' module once imported, or why it could not be (`_compiled_cpu_module`).
_COMPILED_CPU: dict[str, Any] = {}


def _compiled_cpu_module() -> Any:
    """`fast_numba`, or None with the reason kept (Numba missing, or failing to import)."""
    if "module" not in _COMPILED_CPU:
        try:
            from . import fast_numba  # imports Numba: an optional heavy library, imported where it is used
        except Exception as error:  # noqa: BLE001 - any failure to import means "not available here"
            _COMPILED_CPU.update(module=None, reason=f"{type(error).__name__}: {error}")
        else:
            _COMPILED_CPU.update(module=fast_numba, reason="")
    return _COMPILED_CPU["module"]


def _compiled_cpu_ops() -> dict[str, Callable[..., Any]]:
    """The compiled entries laid over NumPy's fast table, or none where `XPCNN_CPU_KERNELS=numpy`
    or Numba cannot be imported (NumPy's path then runs, without an error)."""
    if cpu_kernels.requested() != "numba":
        return {}
    module = _compiled_cpu_module()
    return module.fast_ops() if module is not None else {}


def _cpu_kernels_line() -> str:
    if cpu_kernels.requested() == "numpy":
        return f"NumPy calls ({cpu_kernels.KERNELS_VARIABLE}=numpy)"
    module = _compiled_cpu_module()
    if module is None:
        return f"NumPy calls (compiled kernels unavailable: {_COMPILED_CPU['reason']})"
    return (f"compiled kernels (Numba {module.numba_version()}; compiled on first use, kept in "
            f"{cpu_kernels.cache_dir()})")


@functools.lru_cache(maxsize=None)
def ops_for(xp: ModuleType, reference: bool = False) -> Ops:
    """The operation table for namespace `xp`: its fast table, or the reference with `reference=True`."""
    return Ops(xp, None if reference else _fast_table(xp))


def describe(ops: Ops) -> str:
    """One line on the code a table runs (for `xpcnn train`'s banner and the benchmarks)."""
    if ops.reference:
        return "the array-API reference code"
    if array_api_compat.is_numpy_namespace(ops.xp):
        return f"NumPy's fast path, {_cpu_kernels_line()}, {thread_count()} thread(s)"
    return f"the fast path of {getattr(ops.xp, '__name__', ops.xp)}"


def ops_of(backend: Any) -> Ops:
    """The operation table of a `Backend` (its reference table when ``backend.reference``)."""
    return ops_for(backend.xp, backend.reference)
