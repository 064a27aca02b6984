"""Classify files with a trained network: the engine of ``xpcnn predict``.

    >>> for result in classify_files(net, ["shoe.jpg", "bad.png", "batch.npy"]):
    ...     print(result)          # a Prediction per image, a FileFailure per unusable file

Files are read with `xpcnn.data.images.read_input_file` (pictures fitted to the network's input
size, arrays taken as they are) and predicted `batch_size` images at a time, in order. A bad
file never stops the others. Works with any network of the book's protocol (``predict``,
``backend``, ``dtype``, ``config["input_dim"]``); its own ``predict_proba(x, batch_size)`` is used
where it has one (`xpcnn.app.onnx_model.OnnxModel` runs an exported graph's probabilities so).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..backend.arrays import dtype_name
from ..data.images import InputFile, read_input_file
from ..errors import CheckpointError, ImageFileError
from ..nn.inference import predict_proba, top_k


@dataclass(frozen=True)
class Prediction:
    """The most probable classes of one image.

    Attributes:
        file: the file as given.
        index: position of the image inside an array file (``.npy``/IDX); None for a picture.
        classes: class numbers, most probable first.
        probs: their probabilities.
        inverted: whether the image was inverted before predicting.
    """

    file: str
    index: int | None
    classes: list[int]
    probs: list[float]
    inverted: bool


@dataclass(frozen=True)
class FileFailure:
    """A file that could not be used, and why."""

    file: str
    error: ImageFileError


def prediction_record(result: Prediction, names: "list[str] | tuple[str, ...]") -> dict[str, Any]:
    """The JSON object of one line of ``xpcnn predict --json`` (also what ``xpcnn serve`` answers)."""
    record: dict[str, Any] = {"file": result.file}
    if result.index is not None:
        record["index"] = result.index
    record["top"] = [{"class": c, "label": names[c], "prob": round(p, 6)} for c, p in zip(result.classes, result.probs)]
    record["inverted"] = result.inverted
    return record


def input_size(network: Any) -> tuple[int, int]:
    """``(H, W)`` of the images `network` takes; `CheckpointError` unless it takes 1 channel."""
    if "input_dim" not in network.config:      # MultiLayerNetExtend: square grayscale images, flattened
        size = int(network.config["input_size"])
        side = math.isqrt(size)
        if side * side != size:
            raise CheckpointError(f"predict reads square grayscale images, but this network takes {size} inputs")
        return side, side
    channels, height, width = (int(v) for v in network.config["input_dim"])
    if channels != 1:
        raise CheckpointError(f"predict reads grayscale images (1 channel), but this network takes {channels} "
                              f"channels (input_dim {tuple(network.config['input_dim'])})")
    return height, width


def classify_files(network: Any, paths: Iterable["str | os.PathLike[str]"], *, invert: str = "auto", fit: str = "fill",
                   top: int = 3, batch_size: int = 100, on_file: Callable[[str], None] | None = None
                   ) -> Iterator[Prediction | FileFailure]:
    """Yield, in the order of `paths`, a `Prediction` per image (one per picture, one per
    image of an array file) or a `FileFailure` per unusable file. `on_file(path)` is called
    after each file is read (a progress bar's hook)."""
    size = input_size(network)
    dtype = dtype_name(network.dtype)
    pending: list[InputFile] = []
    probabilities = getattr(network, "predict_proba", None) or (lambda x, n: predict_proba(network, x, n))

    def flush() -> Iterator[Prediction]:
        if not pending:
            return
        x = np.concatenate([item.images for item in pending])[:, None].astype(dtype, copy=False)
        proba = network.backend.to_numpy(probabilities(x, batch_size))
        classes, probs = top_k(proba, top)
        row = 0
        for item in pending:
            many = item.kind != "image"
            for i in range(item.images.shape[0]):
                yield Prediction(item.path, i if many else None, classes[row].tolist(),
                                 [float(p) for p in probs[row]], item.inverted)
                row += 1
        pending.clear()

    waiting = 0
    for path in paths:
        try:
            item = read_input_file(path, size, invert, fit=fit)
        except ImageFileError as exc:
            yield from flush()
            waiting = 0
            yield FileFailure(os.fspath(path), exc)
        else:
            pending.append(item)
            waiting += item.images.shape[0]
            if waiting >= batch_size:
                yield from flush()
                waiting = 0
        if on_file is not None:
            on_file(os.fspath(path))
    yield from flush()
