"""Where a trained model goes wrong: the report of ``xpcnn evaluate CHECKPOINT --report DIR``.

    >>> from xpcnn.data import class_names
    >>> report = evaluate_report(net, x_test, t_test, class_names=class_names("fashion-mnist"))
    >>> print(report.format_table())                  # precision, recall, support; accuracy
    >>> write_report(report, "runs/latest/report", net, x_test)

Written against the book's network protocol only (``predict``, ``backend``, ``config
["output_size"]``, ``layers``), so deeper networks get the same report. Files written (each
atomically): ``confusion.csv``/``.png`` (rows: true class, columns: predicted),
``per_class.csv``, ``mistakes.png`` (the most confidently wrong images), ``activations.png``
(the first convolution's feature maps for one image) and ``report.json`` (all the figures).
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..backend.arrays import values_are_free_to_read
from ..errors import ConfigError, OutputError
from ..fileio import atomic_write_text
from ..nn.inference import device_batches
from ..ops.functions import host_class_labels, softmax
from .plots import plot_activations, plot_confusion, plot_image_grid

#: How many of the most confidently wrong images `write_report` shows by default.
DEFAULT_MISTAKES = 24


@dataclass
class EvaluationReport:
    """Predictions on a labelled set and the figures derived from them (host NumPy).

    Attributes:
        class_names: name of each class ``0 .. K-1``.
        labels: ``(N,)`` int64 true classes.
        predicted: ``(N,)`` int64 argmax of the network's scores (as `accuracy` counts them).
        confidence: ``(N,)`` float64 probability (softmax) of the predicted class.
        info: what was evaluated (dataset, split, checkpoint, ...), copied into report.json.
    """

    class_names: list[str]
    labels: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def confusion(self) -> np.ndarray:
        """``(K, K)`` int64 counts: row = true class, column = predicted class."""
        k = len(self.class_names)
        return np.bincount(self.labels * k + self.predicted, minlength=k * k).reshape(k, k)

    @property
    def accuracy(self) -> float:
        return int(np.count_nonzero(self.predicted == self.labels)) / self.images

    def per_class(self) -> dict[str, np.ndarray]:
        """``support`` (true images of each class), ``precision`` and ``recall`` (NaN where
        undefined: a class never predicted has no precision, one absent from the set no recall)."""
        confusion = self.confusion
        hits = np.diag(confusion).astype(np.float64)
        support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(predicted > 0, hits / predicted, np.nan)
            recall = np.where(support > 0, hits / support, np.nan)
        return {"precision": precision, "recall": recall, "support": support}

    def mistakes(self, count: int = DEFAULT_MISTAKES) -> np.ndarray:
        """Indices of the `count` most confidently wrong images, most confident first."""
        wrong = np.flatnonzero(self.predicted != self.labels)
        order = np.argsort(-self.confidence[wrong], kind="stable")
        return wrong[order[:count]]

    def format_table(self) -> str:
        """The per-class table as printed by ``xpcnn evaluate --report``."""
        stats = self.per_class()
        width = max(len("accuracy"), *(len(name) for name in self.class_names)) + 5
        lines = [f"{'class':<{width}}{'precision':>10}{'recall':>9}{'support':>9}"]
        for k, name in enumerate(self.class_names):
            lines.append(f"{f'{k} {name}':<{width}}{_fmt(stats['precision'][k]):>10}{_fmt(stats['recall'][k]):>9}"
                         f"{int(stats['support'][k]):>9}")
        lines.append(f"{'accuracy':<{width}}{'':>10}{self.accuracy:>9.4f}{self.images:>9}")
        return "\n".join(lines)

    def to_dict(self, mistakes: int = DEFAULT_MISTAKES) -> dict[str, Any]:
        """Every figure, JSON-ready (undefined precision/recall as None)."""
        stats = self.per_class()
        return {
            **self.info,
            "images": self.images,
            "accuracy": self.accuracy,
            "classes": list(self.class_names),
            "confusion": self.confusion.tolist(),
            "per_class": [
                {"class": k, "label": name, "precision": _json_float(stats["precision"][k]),
                 "recall": _json_float(stats["recall"][k]), "support": int(stats["support"][k])}
                for k, name in enumerate(self.class_names)
            ],
            "mistakes": [
                {"index": int(i), "true": int(self.labels[i]), "true_label": self.class_names[self.labels[i]],
                 "predicted": int(self.predicted[i]), "predicted_label": self.class_names[self.predicted[i]],
                 "prob": float(self.confidence[i])}
                for i in self.mistakes(mistakes)
            ],
        }


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def evaluate_report(network: Any, x: Any, t: Any, *, class_names: Sequence[str] | None = None,
                    batch_size: int = 500, info: dict[str, Any] | None = None) -> EvaluationReport:
    """Predict every image of ``x (N, C, H, W)`` (host or backend array) against labels ``t``
    ``(N,)`` (or one-hot), `batch_size` at a time, and keep what the report needs.

    The predicted class is the argmax of ``network.predict`` on the same batches as
    ``network.accuracy(x, t, batch_size)``, so `EvaluationReport.accuracy` equals it.
    """
    num_classes = int(network.config["output_size"])
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    if len(names) != num_classes:
        raise ConfigError(f"report: {len(names)} class names given for a network of {num_classes} classes")
    labels = host_class_labels(t if values_are_free_to_read(t) else network.backend.to_numpy(t), num_classes,
                               "report", x.shape[0])
    xp = network.backend.xp
    predicted, confidence = [], []
    for _, batch in device_batches(network, x, batch_size):
        scores = network.predict(batch)
        predicted.append(xp.argmax(scores, axis=1))
        confidence.append(xp.max(softmax(scores), axis=1))
    # Two transfers at the end, not two per batch.
    predicted_host = network.backend.to_numpy(xp.concat(predicted, axis=0)).astype(np.int64)
    confidence_host = network.backend.to_numpy(xp.concat(confidence, axis=0)).astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(confidence_host)))
    if bad:
        raise ConfigError(f"report: the network gave NaN or infinite scores for {bad} images; expected finite "
                          f"pixels and weights")
    return EvaluationReport(names, labels, predicted_host, confidence_host, dict(info or {}))


# ---------------------------------------------------------------------- the first layer


def first_convolution(network: Any) -> tuple[str, list[Any], Any] | None:
    """``(name, layers before it, layer)`` of the first layer of ``network.layers`` (a dict, as
    the book's, or a list) holding 4-D filters ``W (FN, C, FH, FW)``; None when there is none."""
    layers = network.layers
    items = list(layers.items()) if isinstance(layers, dict) else [(f"{type(layer).__name__}{i}", layer)
                                                                    for i, layer in enumerate(layers)]
    for position, (name, layer) in enumerate(items):
        weights = getattr(layer, "W", None)
        if weights is not None and len(getattr(weights, "shape", ())) == 4:
            return name, [earlier for _, earlier in items[:position]], layer
    return None


def _forward_for_inference(layer: Any, x: Any) -> Any:
    try:
        takes_flag = "train_flg" in inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):
        takes_flag = False
    return layer.forward(x, train_flg=False) if takes_flag else layer.forward(x)


def first_layer_maps(network: Any, image: Any) -> tuple[str, np.ndarray] | None:
    """The first convolution's output ``(FN, OH, OW)`` (before any activation) for one image
    ``(C, H, W)``, with the layer's name; None when the network has no convolution."""
    found = first_layer_outputs(network, image[None, ...])
    return None if found is None else (found[0], found[1][0])


def first_layer_outputs(network: Any, x: Any) -> tuple[str, np.ndarray] | None:
    """`first_layer_maps` for a batch ``(N, C, H, W)`` at once: ``(name, (N, FN, OH, OW))`` on the host."""
    conv = first_convolution(network)
    if conv is None:
        return None
    name, earlier, layer = conv
    _, out = next(device_batches(network, x, x.shape[0]))
    for previous in earlier:
        out = _forward_for_inference(previous, out)
    out = _forward_for_inference(layer, out)
    return name, network.backend.to_numpy(out)


# ---------------------------------------------------------------------------- writing


def _csv_text(rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _host_images(network: Any, x: Any, indices: Sequence[int]) -> np.ndarray:
    """``(M, H, W)`` host images (channel 0) of `x` ``(N, C, H, W)`` at `indices`."""
    images = []
    for i in indices:
        row = x[int(i), ...]
        row = row if values_are_free_to_read(row) else network.backend.to_numpy(row)
        images.append(row[0] if row.ndim == 3 else row)
    return np.stack(images) if images else np.zeros((0, 1, 1), dtype=np.float32)


def write_report(report: EvaluationReport, out_dir: "str | os.PathLike[str]", network: Any, x: Any, *,
                 mistakes: int = DEFAULT_MISTAKES, activation_index: int = 0) -> list[str]:
    """Write the report's files into `out_dir` (created if needed); returns their names.

    `x` is the image set the report was computed on (for mistakes.png and activations.png);
    `activation_index` picks the image whose first-layer feature maps are drawn.

    Raises:
        OutputError: the folder or a file cannot be written.
    """
    out = Path(out_dir)
    names = report.class_names
    data = report.to_dict(mistakes)
    stats = report.per_class()
    where = " ".join(str(report.info[key]) for key in ("dataset", "split") if key in report.info)
    written: list[str] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        confusion = report.confusion
        atomic_write_text(out / "confusion.csv", _csv_text(
            [["true \\ predicted", *names], *([names[k], *row] for k, row in enumerate(confusion.tolist()))]))
        plot_confusion(confusion, names, out / "confusion.png",
                       title=(f"{where} confusion matrix: accuracy {report.accuracy:.4f} "
                              f"on {report.images} images").strip())
        atomic_write_text(out / "per_class.csv", _csv_text(
            [["class", "label", "precision", "recall", "support"],
             *([k, name, _csv_float(stats["precision"][k]), _csv_float(stats["recall"][k]), int(stats["support"][k])]
               for k, name in enumerate(names)),
             ["all", "overall accuracy", "", f"{report.accuracy:.6f}", report.images]]))
        written += ["confusion.csv", "confusion.png", "per_class.csv"]

        wrong = report.mistakes(mistakes)
        titles = [f"#{i} true: {names[report.labels[i]]}\n"
                  f"pred: {names[report.predicted[i]]} ({report.confidence[i]:.3f})"
                  for i in wrong]
        plot_image_grid(_host_images(network, x, wrong), titles, out / "mistakes.png",
                        title=f"{where + ': ' if where else ''}the {len(wrong)} most confidently wrong images (of "
                              f"{int(np.count_nonzero(report.predicted != report.labels))} wrong)")
        written.append("mistakes.png")

        data["activations"] = _write_activations(report, out, network, x, activation_index, where)
        if "skipped" not in data["activations"]:
            written.append("activations.png")
        data["files"] = [*written, "report.json"]
        atomic_write_text(out / "report.json", _json_text(data))
    except OSError as exc:
        raise OutputError(f"cannot write the report into {out}: {exc.strerror or exc}"
                          f"{' (' + exc.filename + ')' if getattr(exc, 'filename', None) else ''}") from exc
    return data["files"]


def _json_text(data: dict[str, Any]) -> str:
    """Indented JSON with each list of numbers (a confusion row) kept on one line."""
    text = json.dumps(data, indent=1)
    return re.sub(r"\[\s*([-0-9.eE,\s]+?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


def _csv_float(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def _write_activations(report: EvaluationReport, out: Path, network: Any, x: Any, index: int,
                       where: str) -> dict[str, Any]:
    if not 0 <= index < report.images:
        raise ConfigError(f"report: activation_index must lie in 0..{report.images - 1}, got {index}")
    found = first_layer_maps(network, x[index, ...])
    if found is None:
        return {"skipped": f"{type(network).__name__} has no layer with 4-D filters W (no convolution)"}
    layer_name, maps = found
    image = _host_images(network, x, [index])[0]
    true, predicted = report.labels[index], report.predicted[index]
    plot_activations(image, maps, out / "activations.png",
                     title=f"What the first layer sees: the {maps.shape[0]} feature maps of {layer_name} "
                           f"(before ReLU) for {where} image #{index}".replace("  ", " "),
                     image_title=f"#{index} true: {report.class_names[true]}\npred: {report.class_names[predicted]} "
                                 f"({report.confidence[index]:.3f})")
    return {"index": index, "layer": layer_name, "feature_maps": int(maps.shape[0]),
            "map_size": [int(maps.shape[1]), int(maps.shape[2])]}
