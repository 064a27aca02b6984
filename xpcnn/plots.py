"""The seed's figures, drawn headless with matplotlib's Agg backend (never ``plt.show()``).

- ``loss.png``: the training loss of every step, with a moving average.
- ``accuracy.png``: train and test accuracy after each epoch (full sets).
- ``filters.png``: the first layer's filters before and after training, as the book shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .fileio import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: "str | os.PathLike[str]") -> Path:
    path = Path(path)
    with atomic_write(path) as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    return path


def plot_loss(step_loss: Sequence[float], path: "str | os.PathLike[str]", steps_per_epoch: int | None = None) -> Path:
    """Loss per step (light) and its moving average (dark), epochs marked on the top axis."""
    plt = _pyplot()
    loss = np.asarray(step_loss, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(1, loss.size + 1)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss per step")
    finite = np.isfinite(loss)            # a step skipped with on_nan="skip" has a NaN loss
    window = max(1, min(100, loss.size // 20))
    if loss.size >= window > 1:
        kernel = np.ones(window)
        counts = np.convolve(finite.astype(float), kernel, mode="valid")
        sums = np.convolve(np.where(finite, loss, 0.0), kernel, mode="valid")
        smooth = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)
        ax.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=1.8, label=f"moving average ({window} steps)")
    if steps_per_epoch:
        for boundary in range(steps_per_epoch, loss.size + 1, steps_per_epoch):
            ax.axvline(boundary, color="grey", linewidth=0.5, alpha=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("Training loss")
    # AdaGrad's first steps can spike the loss far above the rest (the seed's recipe does):
    # scale the axis to the bulk of the curve and say so, instead of flattening everything.
    good = loss[finite]
    top = float(np.percentile(good, 99.5)) * 1.15 if good.size else 1.0
    top = top if top > 0 else 1.0
    if good.size and good.max() > top:
        peak_step = int(np.argmax(np.where(finite, loss, -np.inf))) + 1
        ax.set_title(f"Training loss (axis clipped at {top:.2f}; peak {good.max():.1f} at step {peak_step})", fontsize=10)
    ax.set_ylim(0, top)
    ax.legend()
    ax.grid(alpha=0.3)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_accuracy(epochs: Sequence[int], train_acc: Sequence[float], test_acc: Sequence[float],
                  path: "str | os.PathLike[str]") -> Path:
    """Train and test accuracy after each epoch (the book's second figure)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, train_acc, marker="o", label="train")
    ax.plot(epochs, test_acc, marker="s", linestyle="--", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy on the full train and test sets")
    low = min([*train_acc, *test_acc, 1.0])
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_filters(before: np.ndarray, after: np.ndarray, path: "str | os.PathLike[str]") -> Path:
    """First-layer filters ``(FN, C, FH, FW)`` (channel 0) before and after training, in grey."""
    plt = _pyplot()
    count = before.shape[0]
    cols = min(count, 10)
    rows = -(-count // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(cols * 0.9, 2 * rows * 0.9 + 0.6), squeeze=False)
    for block, (weights, title) in enumerate(((before, "before training"), (after, "after training"))):
        for i in range(rows * cols):
            ax = axes[block * rows + i // cols][i % cols]
            ax.set_xticks([])
            ax.set_yticks([])
            if i < count:
                ax.imshow(weights[i, 0], cmap="gray_r", interpolation="nearest")
            else:
                ax.axis("off")
        axes[block * rows][0].set_title(title, loc="left", fontsize=9)
    fig.suptitle("First-layer filters (channel 0)")
    path = _save(fig, path)
    plt.close(fig)
    return path
