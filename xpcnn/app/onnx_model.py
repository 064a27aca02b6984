"""An ONNX file written by ``xpcnn export`` (`xpcnn.app.export`), run in ONNX Runtime on the CPU.

    >>> model = load_onnx("model.onnx")
    >>> model.predict_proba(x)            # (N, K): the graph's ``probabilities``
    >>> model.classes, model.fit          # from the file's metadata

`OnnxModel` has the protocol `xpcnn.app.predict.classify_files` needs, so ``xpcnn predict
MODEL.onnx FILE...`` prepares and classifies pictures exactly as it does with a checkpoint.
ONNX Runtime (the optional extra ``export``) is imported only inside the functions that use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..backend.devices import get_backend
from ..data.images import FIT_CHOICES
from ..errors import CheckpointError, ConfigError, MissingDependency

RUNTIME_MISSING = "running an ONNX file needs ONNX Runtime, an optional extra: pip install 'xpcnn[export]'"

#: The graph's input and outputs (what ``xpcnn export`` writes).
INPUT_NAME, SCORES, PROBABILITIES = "images", "scores", "probabilities"
#: Name of the dynamic batch dimension.
BATCH_DIM = "N"


def runtime(required: bool = True) -> Any:
    """ONNX Runtime, or `MissingDependency` (None when not `required`)."""
    try:
        import onnxruntime
    except ImportError:
        if required:
            raise MissingDependency(RUNTIME_MISSING) from None
        return None
    return onnxruntime


def open_session(model: "bytes | str", what: str, error: type = CheckpointError) -> Any:
    """An ONNX Runtime CPU session of `model` (bytes or a path); `error` naming `what` if it cannot load."""
    onnxruntime = runtime()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3          # errors only: no warnings on stderr
    try:
        return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:       # ONNX Runtime raises its own types (Fail, InvalidGraph, NoSuchFile, ...)
        text = str(exc).strip().splitlines()
        raise error(f"ONNX Runtime {onnxruntime.__version__} cannot load {what}: "
                    f"{text[0] if text else type(exc).__name__}") from exc


def is_onnx_path(path: "str | os.PathLike[str]") -> bool:
    """Whether `path` names an ONNX file (by its suffix, ``.onnx``)."""
    return Path(path).suffix.lower() == ".onnx"


class OnnxModel:
    """An ONNX file written by ``xpcnn export``, run in ONNX Runtime on the CPU, with the
    protocol `xpcnn.app.predict.classify_files` needs (``predict``, ``predict_proba``,
    ``backend``, ``dtype``, ``config``), so ``xpcnn predict MODEL.onnx FILE...`` prepares and
    classifies pictures exactly as it does with a checkpoint.

    Attributes:
        path: the file.
        metadata: its metadata, JSON values decoded.
        classes: the class names (the metadata's, else the numbers).
        dataset: the dataset it was trained on ("" when unknown).
        fit: how pictures are framed (the metadata's, else "fill").
    """

    def __init__(self, path: "str | os.PathLike[str]"):
        runtime()                              # a missing extra says so before the file is looked at
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"ONNX file {str(self.path)!r} does not exist" if not self.path.exists() else
                                  f"ONNX file {str(self.path)!r} is not a file")
        self.session = open_session(str(self.path), repr(str(self.path)))
        inputs, outputs = self.session.get_inputs(), [o.name for o in self.session.get_outputs()]
        if len(inputs) != 1 or inputs[0].type != "tensor(float)" or PROBABILITIES not in outputs:
            raise CheckpointError(f"{str(self.path)!r} is not a model written by xpcnn export: expected one float32 "
                                  f"input and an output {PROBABILITIES!r}, got inputs "
                                  f"{[(i.name, i.type) for i in inputs]} and outputs {outputs}")
        self.input_name = inputs[0].name
        dims = [d if isinstance(d, int) else None for d in inputs[0].shape]
        self.fixed_batch = dims[0]
        raw = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {key: _decoded(key, value) for key, value in raw.items()}
        classes = int(self.session.get_outputs()[outputs.index(PROBABILITIES)].shape[-1])
        self.classes = [str(c) for c in self.metadata.get("classes", [])] or [str(c) for c in range(classes)]
        self.dataset = str(self.metadata.get("dataset", ""))
        preparation = self.metadata.get("preprocessing")
        fit = preparation.get("fit") if isinstance(preparation, dict) else None
        self.fit = fit if fit in FIT_CHOICES else "fill"
        self.backend = get_backend("cpu")
        self.dtype = np.float32
        shape = dims[1:]
        if any(d is None for d in shape):
            raise CheckpointError(f"{str(self.path)!r}: its input {self.input_name!r} has unknown dimensions "
                                  f"{inputs[0].shape}; expected (N, C, H, W) or (N, D)")
        self.config = ({"input_dim": shape, "output_size": len(self.classes)} if len(shape) == 3 else
                       {"input_size": shape[0], "output_size": len(self.classes)})

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, {self.metadata.get('model', '?')}, {len(self.classes)} classes)"

    def _run(self, output: str, x: np.ndarray, batch_size: int) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != np.float32:
            raise ConfigError(f"{str(self.path)!r} takes float32 images, got {x.dtype}")
        if self.fixed_batch is not None:
            batch_size = self.fixed_batch
        parts = [self.session.run([output], {self.input_name: chunk})[0] for chunk in self._chunks(x, batch_size)]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out[:x.shape[0]]

    def _chunks(self, x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start:start + batch_size]
            if self.fixed_batch is not None and chunk.shape[0] < self.fixed_batch:     # pad a fixed batch
                chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - chunk.shape[0], *chunk.shape[1:]),
                                                        np.float32)])
            yield chunk

    def predict(self, x: np.ndarray, batch_size: int = 100) -> np.ndarray:
        """The graph's ``scores`` ``(N, K)`` for float32 images ``(N, *input)``."""
        return self._run(SCORES, x, batch_size)

    def predict_proba(self, x: np.ndarray, batch_size: int = 100) -> np.ndarray:
        """The graph's ``probabilities`` ``(N, K)``, `batch_size` images per run."""
        if isinstance(batch_size, bool) or not hasattr(batch_size, "__index__") or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        return self._run(PROBABILITIES, x, int(batch_size))


def load_onnx(path: "str | os.PathLike[str]") -> OnnxModel:
    """An ONNX file written by ``xpcnn export``, ready to run (see `OnnxModel`)."""
    return OnnxModel(path)


#: Metadata entries written as JSON (the others are plain text).
JSON_METADATA = ("config", "classes", "input", "outputs", "preprocessing", "checkpoint")


def _decoded(key: str, value: str) -> Any:
    if key not in JSON_METADATA:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value
