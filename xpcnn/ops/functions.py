"""The book's functions on any array-API namespace: softmax, one-hot, the label check and
the cross-entropy loss (each computed here once; the reference ops of `reference.py` call them).

Each takes an optional `xp`: pass it where the namespace is already known (the hot path),
leave it out to have it looked up from the arrays.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from ..backend.arrays import namespace_of, values_are_free_to_read
from ..errors import ShapeError


def log_softmax(x: Any, *, xp: Any = None) -> Any:
    """Row-wise ``log(softmax(x))`` of ``(N, K)`` scores, computed stably."""
    xp = xp or namespace_of(x)
    shifted = x - xp.max(x, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def softmax(x: Any, *, xp: Any = None) -> Any:
    """Row-wise softmax of ``(N, K)`` (or ``(K,)``) scores."""
    xp = xp or namespace_of(x)
    shifted = x - xp.max(x, axis=-1, keepdims=True)
    e = xp.exp(shifted)
    return e / xp.sum(e, axis=-1, keepdims=True)


def one_hot(t: Any, num_classes: int, dtype: Any, *, xp: Any = None) -> Any:
    """``(N,)`` integer labels -> ``(N, num_classes)`` one-hot rows of `dtype`.

    Built by comparison with ``arange`` (no integer scatter, which is slow on GPUs).
    """
    xp = xp or namespace_of(t)
    classes = xp.arange(num_classes, device=array_api_compat.device(t))
    return xp.astype(xp.reshape(t, (-1, 1)) == classes, dtype)


def check_label_range(t: Any, num_classes: int, what: str = "labels") -> None:
    """Raise `ShapeError` if host labels fall outside ``0..num_classes-1``.

    Only where reading values is free (host NumPy arrays): on a device this would cost a
    synchronisation per step; the Trainer checks its labels once before moving them there.
    """
    if values_are_free_to_read(t) and t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ShapeError(f"{what}: class indices must lie in 0..{num_classes - 1}, "
                         f"got values from {t.min()} to {t.max()}")


def host_class_labels(t: Any, num_classes: "int | None", what: str, n: "int | None" = None) -> Any:
    """Host labels checked once, as ``(N,)`` int64 class indices: the one label check for
    whole sets on the host (the Trainer's data, a report's labels, `Network.accuracy`).

    Takes ``(N,)`` integer class indices or ``(N, K)`` one-hot rows (a NumPy array); `n` and
    `num_classes`, where given, are the label count and the number of classes expected.
    """
    if n is not None and (t.ndim not in (1, 2) or t.shape[0] != n):
        raise ShapeError(f"{what}: expected {n} labels, one per image, got shape {tuple(t.shape)}")
    if t.ndim == 2:
        if num_classes is not None and t.shape[1] != num_classes:
            raise ShapeError(f"{what}: one-hot labels must have {num_classes} columns, got {t.shape[1]}")
        return t.argmax(axis=1).astype("int64")
    if t.ndim != 1 or t.dtype.kind not in "iu":
        raise ShapeError(f"{what}: labels must be (N,) integers or (N, K) one-hot rows, "
                         f"got shape {tuple(t.shape)} dtype {t.dtype}")
    if num_classes is not None:
        check_label_range(t, num_classes, what)
    return t.astype("int64", copy=False)


def check_labels(xp: Any, t: Any, like: Any) -> Any:
    """Validate labels `t` for scores `like` ``(N, K)``; return them ready for a loss.

    ``(N,)`` integer class indices are returned as they are (range-checked where reading them
    is free); ``(N, K)`` one-hot rows are returned in the scores' dtype. Anything else is a
    `ShapeError` saying what was expected.
    """
    n, k = like.shape
    if t.ndim == 1:
        if t.shape[0] != n:
            raise ShapeError(f"labels: expected {n} labels for {n} samples, got {t.shape[0]}")
        if not xp.isdtype(t.dtype, "integral"):
            raise ShapeError(f"labels: 1-D labels must be integers (class indices), got dtype {t.dtype}")
        check_label_range(t, k)
        return t
    if t.ndim == 2:
        if tuple(t.shape) != (n, k):
            raise ShapeError(f"labels: one-hot labels must have shape {(n, k)}, got {tuple(t.shape)}")
        return t if t.dtype == like.dtype else xp.astype(t, like.dtype)
    raise ShapeError(f"labels: expected (N,) class indices or (N, K) one-hot rows, got shape {tuple(t.shape)}")


def as_one_hot(t: Any, like: Any) -> Any:
    """Labels `t` as one-hot rows matching scores `like` ``(N, K)``.

    Accepts ``(N,)`` integer class labels or ``(N, K)`` one-hot rows (the book's form).
    """
    t = check_labels(namespace_of(t, like), t, like)
    return one_hot(t, like.shape[1], like.dtype) if t.ndim == 1 else t


def cross_entropy_error(y: Any, t: Any) -> Any:
    """The book's loss on probabilities `y` ``(N, K)``: ``-sum(t * log(y + 1e-7)) / N``.

    `t` is ``(N,)`` class indices or ``(N, K)`` one-hot. Returns a 0-d array.
    """
    xp = namespace_of(y)
    if y.ndim == 1:                       # one sample: a one-hot row, or its label (0-d or one element)
        y = xp.reshape(y, (1, -1))
        t = xp.reshape(t, (1, -1)) if t.ndim == 1 and t.shape[0] == y.shape[1] else xp.reshape(t, (-1,))
    t_hot = as_one_hot(t, y)
    return -xp.sum(t_hot * xp.log(y + 1e-7)) / y.shape[0]
