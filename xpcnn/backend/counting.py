"""Count the array-library calls a piece of code makes, on any backend, from outside.

On a GPU each call into the array library is at least one kernel launch and ~10-30 us of
Python, so the number of calls per training step is the budget of a fast step. This module
wraps a backend's namespace (and the arrays it returns) so that every function call, array
operator, index and in-place update made through it is counted. The operations carry no
instruments (as Chainer's function hooks measure its functions from outside):

* code written against the namespace (layers, the reference operations) is counted call by
  call through the wrapper;
* a fast entry of the operation table (`xpcnn.ops.table`) runs on the library's own arrays,
  behind `CountingNamespace.wrap_fast_table`: it counts what its library reports through
  `add` while it runs (the CUDA emulation's stand-in for CuPy counts each launch, see
  tests/ops/emulation), and one call, the call into the table, where the library reports
  nothing (NumPy, a compiled kernel, CuPy itself). A fast entry that hands a case back to the
  reference (it returns ``NotImplemented``) has the reference's calls counted one by one.

    >>> with count_calls() as counter:
    ...     net = SimpleConvNet(backend=counting_backend(get_backend("cpu")), seed=0)
    ...     counter.reset()
    ...     grads = net.gradient(x, t)             # x, t made with that backend's asarray
    >>> counter.calls

Only for measuring: a counted network runs much slower than a plain one.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import replace
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np

_STATE = {"active": 0, "calls": 0}


def enabled() -> bool:
    """Whether a `count_calls` block is running."""
    return _STATE["active"] > 0


def add(calls: int = 1) -> None:
    """Record `calls` array-library calls; for a library that counts its own calls from
    outside the operations (the CUDA emulation's stand-in for CuPy)."""
    if _STATE["active"]:
        _STATE["calls"] += calls


class Counter:
    """The running count of a `count_calls` block."""

    @property
    def calls(self) -> int:
        return _STATE["calls"]

    def reset(self) -> None:
        _STATE["calls"] = 0


@contextlib.contextmanager
def count_calls() -> Iterator[Counter]:
    """Count calls made through counting namespaces (and fast operations) inside the block."""
    _STATE["active"] += 1
    _STATE["calls"] = 0
    try:
        yield Counter()
    finally:
        _STATE["active"] -= 1


def unwrap(value: Any) -> Any:
    """The library's own array(s) behind `value` (recursing into lists, tuples and dicts)."""
    if isinstance(value, CountedArray):
        return value._array
    if isinstance(value, (list, tuple)):
        return type(value)(unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    return value


def _wrap(value: Any, namespace: "CountingNamespace") -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_wrap(v, namespace) for v in value)
    if hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, CountedArray):
        return CountedArray(value, namespace)
    return value


def _counted_call(function: Any, namespace: "CountingNamespace", args: tuple, kwargs: dict) -> Any:
    """Call `function` on the arrays inside; count it if it returned an array (queries such
    as ``isdtype`` or ``finfo`` touch no data and are not counted)."""
    result = function(*unwrap(args), **unwrap(kwargs))
    if _holds_array(result):
        add(1)
    return _wrap(result, namespace)


def _holds_array(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_array(v) for v in value)
    return hasattr(value, "shape") and hasattr(value, "dtype")


class CountingNamespace:
    """A namespace whose functions count each call and return `CountedArray` results."""

    def __init__(self, xp: ModuleType):
        self.inner = xp
        self.__name__ = f"counting({getattr(xp, '__name__', xp)})"

    def wrap_fast_table(self, fast: dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
        """`fast` (the inner library's fast entries, ``function(xp, *args)``) for this namespace:
        each runs on the inner library's own arrays and counts as described in the module's
        docstring. The operation table (`xpcnn.ops.table`) asks a namespace that stands in
        front of another for its entries this way."""
        return {name: self._counted_entry(function) for name, function in fast.items()}

    def _counted_entry(self, function: Callable[..., Any]) -> Callable[..., Any]:
        inner = self.inner

        def entry(xp: Any, *args: Any) -> Any:
            before = _STATE["calls"]
            result = function(inner, *unwrap(args))
            if result is NotImplemented:           # the table runs the reference, counted call by call
                return result
            if _STATE["calls"] == before:
                add(1)                             # the library reported nothing: one call into the table
            return _wrap(result, self)

        entry.__name__ = getattr(function, "__name__", "entry")
        return entry

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if callable(attr) and not isinstance(attr, type):
            def call(*args: Any, **kwargs: Any) -> Any:
                return _counted_call(attr, self, args, kwargs)
            call.__name__ = name
            setattr(self, name, call)          # built once per name
            return call
        return attr


def _binary(name: str):
    def method(self: "CountedArray", other: Any) -> Any:
        return _counted_call(getattr(operator, name), self._namespace, (self, other), {})
    return method


def _reflected(name: str):
    def method(self: "CountedArray", other: Any) -> Any:
        return _counted_call(getattr(operator, name), self._namespace, (other, self), {})
    return method


def _inplace(name: str):
    def method(self: "CountedArray", other: Any) -> Any:
        add(1)
        result = getattr(operator, name)(self._array, unwrap(other))
        if result is not self._array:       # a library without in-place support rebinds
            self._array = result
        return self
    return method


class CountedArray:
    """An array of another library, counting every operation made on it."""

    __slots__ = ("_array", "_namespace")

    def __init__(self, array: Any, namespace: CountingNamespace):
        self._array, self._namespace = array, namespace

    def __array_namespace__(self, api_version: Any = None) -> CountingNamespace:
        return self._namespace

    shape = property(lambda self: self._array.shape)
    ndim = property(lambda self: self._array.ndim)
    dtype = property(lambda self: self._array.dtype)
    size = property(lambda self: self._array.size)
    device = property(lambda self: getattr(self._array, "device", "cpu"))
    T = property(lambda self: _counted_call(lambda a: a.T, self._namespace, (self,), {}))
    mT = property(lambda self: _counted_call(lambda a: a.mT, self._namespace, (self,), {}))

    def __getitem__(self, key: Any) -> Any:
        return _counted_call(operator.getitem, self._namespace, (self, key), {})

    def __setitem__(self, key: Any, value: Any) -> None:
        add(1)
        self._array[unwrap(key)] = unwrap(value)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        return np.asarray(self._array, dtype=dtype)

    def __float__(self) -> float:
        return float(self._array)

    def __int__(self) -> int:
        return int(self._array)

    def __bool__(self) -> bool:
        return bool(self._array)

    def __len__(self) -> int:
        return len(self._array)

    def __neg__(self) -> Any:
        return _counted_call(operator.neg, self._namespace, (self,), {})

    def __invert__(self) -> Any:
        return _counted_call(operator.invert, self._namespace, (self,), {})

    def __repr__(self) -> str:
        return f"CountedArray({self._array!r})"

    __hash__ = None  # type: ignore[assignment]


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor",
              "eq", "ne", "lt", "le", "gt", "ge"):
    _dunder = _name.rstrip("_")
    setattr(CountedArray, f"__{_dunder}__", _binary(_name))
    if _name not in ("eq", "ne", "lt", "le", "gt", "ge"):
        setattr(CountedArray, f"__r{_dunder}__", _reflected(_name))
        setattr(CountedArray, f"__i{_dunder}__",
                _inplace(f"i{_name}" if _name != "and_" and _name != "or_" else f"i{_dunder}"))


def counting_backend(backend: Any) -> Any:
    """`backend` with a counting namespace: arrays it makes count every operation on them."""
    return replace(backend, xp=CountingNamespace(backend.xp))
