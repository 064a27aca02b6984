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

from ..fileio import atomic_write


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
        ax.set_title(f"Training loss (axis clipped at {top:.2f}; peak {good.max():.1f} at step {peak_step})",
                     fontsize=10)
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


# ------------------------------------------------------- evaluation report (xpcnn.report)


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], path: "str | os.PathLike[str]",
                   title: str = "Confusion matrix") -> Path:
    """Counts ``(K, K)`` (rows: true class, columns: predicted), written in each cell; the
    colour is the row's fraction, so every class reads alike whatever its size."""
    plt = _pyplot()
    counts = np.asarray(confusion)
    k = counts.shape[0]
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = max(4.0, 0.62 * k + 2.2)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    shown = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8 if k <= 12 else 6,
                        color="white" if fraction[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_image_grid(images: np.ndarray, titles: Sequence[str], path: "str | os.PathLike[str]",
                    title: str, cols: int = 6) -> Path:
    """Images ``(M, H, W)`` (values in [0, 1], light-on-dark as the datasets) in a grid, each
    with its own (multi-line) title."""
    plt = _pyplot()
    count = max(1, len(images))
    cols = min(cols, count)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 2.1 + 0.5), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    fig.suptitle(title, fontsize=10)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_activations(image: np.ndarray, maps: np.ndarray, path: "str | os.PathLike[str]", title: str,
                     image_title: str = "input") -> Path:
    """An image ``(H, W)`` beside a layer's feature maps ``(FN, OH, OW)``, each map in grey
    scaled to its own range (white: the largest response)."""
    plt = _pyplot()
    count = maps.shape[0]
    cols = min(count, 10)
    rows = -(-count // cols)
    fig = plt.figure(figsize=(2.6 + cols * 0.95, max(2.6, rows * 0.95 + 0.7)))
    grid = fig.add_gridspec(rows, cols + 3, wspace=0.08, hspace=0.08)
    ax = fig.add_subplot(grid[:, :3] if rows < 3 else grid[:3, :3])
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(image_title, fontsize=8)
    ax.axis("off")
    for i in range(count):
        map_ax = fig.add_subplot(grid[i // cols, 3 + i % cols])
        map_ax.imshow(maps[i], cmap="gray", interpolation="nearest")
        map_ax.set_xticks([])
        map_ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    path = _save(fig, path)
    plt.close(fig)
    return path


def plot_tune_grid(rows: Sequence[dict], path: "str | os.PathLike[str]") -> Path:
    """The book's figure of section 6.5: the best trials (up to 20) in a 4 x 5 grid, validation
    accuracy solid and training accuracy dashed per epoch, titled ``Best-1 (lr:..., wd:...)``."""
    plt = _pyplot()
    fig, axes = plt.subplots(4, 5, figsize=(15, 10.5), sharex=True, sharey=True, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(rows):
            ax.set_axis_off()
            continue
        row = rows[i]
        val, train = row["val_acc_per_epoch"], row["train_acc_per_epoch"]
        ax.plot(np.arange(1, len(val) + 1), val, color="tab:blue", linewidth=1.5, label="validation")
        ax.plot(np.arange(1, len(train) + 1), train, color="tab:blue", linewidth=1.0, linestyle="--", label="train")
        params = row["params"]
        parts = [f"{'wd' if name == 'weight_decay' else name}:{value:.2e}" for name, value in params.items()]
        state = "" if row["state"] == "COMPLETE" else f" [{row['state'].lower()}]"
        ax.set_title(f"Best-{i + 1} (" + ", ".join(parts) + f"){state}", fontsize=7.5)
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.supxlabel("epoch")
    fig.supylabel("accuracy (solid: validation, dashed: training)")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.06, top=0.96, wspace=0.08, hspace=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_tune_scatter(rows: Sequence[dict], param_names: Sequence[str], path: "str | os.PathLike[str]") -> Path:
    """Validation accuracy over the searched plane: (lr, weight_decay) when both are searched,
    else the first two searched settings (one setting: accuracy against it), log axes for positive
    ranges, colour = accuracy; diverged or failed trials as grey crosses."""
    plt = _pyplot()
    names = ([n for n in ("lr", "weight_decay") if n in param_names] if {"lr", "weight_decay"} <= set(param_names)
             else list(param_names[:2]))
    fig, ax = plt.subplots(figsize=(7, 5.5))
    scored = [r for r in rows if r["val_acc"] is not None and all(n in r["params"] for n in names)]
    lost = [r for r in rows if r["val_acc"] is None and all(n in r["params"] for n in names)]
    acc = np.array([r["val_acc"] for r in scored], dtype=float)
    xs = np.array([r["params"][names[0]] for r in scored], dtype=float)
    ys = acc if len(names) == 1 else np.array([r["params"][names[1]] for r in scored], dtype=float)
    points = ax.scatter(xs, ys, c=acc, cmap="viridis", vmin=0.0, vmax=1.0, s=36, edgecolors="black",
                        linewidths=0.3)
    if lost and len(names) == 2:
        ax.scatter([r["params"][names[0]] for r in lost], [r["params"][names[1]] for r in lost], marker="x",
                   color="grey", label="no accuracy (failed)")
        ax.legend(fontsize=8, loc="best")
    fig.colorbar(points, ax=ax, label="validation accuracy (last epoch)")
    for name, set_scale in zip(names, (ax.set_xscale, ax.set_yscale)):
        values = [r["params"][name] for r in rows if name in r["params"]]
        if values and min(values) > 0:
            set_scale("log")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1] if len(names) == 2 else "validation accuracy")
    if scored:
        best = int(np.argmax(acc))
        ax.scatter([xs[best]], [ys[best]], marker="*", s=260, color="red", edgecolors="black", label="best")
        ax.legend(fontsize=8, loc="best")
    ax.set_title(f"Validation accuracy of {len(scored)} trials")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
