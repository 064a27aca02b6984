"""``xpcnn export``: a trained network as one ONNX file that ONNX Runtime runs anywhere, and
`xpcnn.app.onnx_model.OnnxModel` runs such a file on pictures the way ``xpcnn predict`` runs a checkpoint.

    >>> export_onnx(net, "model.onnx", dataset="fashion-mnist")     # any network, any backend
    >>> export_checkpoint("runs/latest/checkpoint.npz", "model.onnx")
    >>> OnnxModel("model.onnx").predict_proba(x)                     # (N, K), in ONNX Runtime

Two routes write the same function as a graph:

- ``via="direct"`` (the default): each layer becomes ONNX's own operator: ``Conv``, ``MaxPool``,
  ``Flatten`` + ``Gemm``, ``Relu``/``Sigmoid``, ``BatchNormalization``, the book's inference-time
  Dropout as a ``Mul`` by ``1 - ratio``, then ``Softmax``. A handful of nodes, which every ONNX
  runtime has fast kernels for.
- ``via="ndonnx"``: the network's unchanged forward code (the array-API reference operations)
  runs on ndonnx arrays, whose operations record ONNX nodes: im2col as slices and a stack,
  matrix products, the softmax as written in `xpcnn.ops.functions`. Hundreds of nodes, slower
  to run (docs/export.md measures both), but it needs no mapping: a network with a layer the
  direct route does not know still exports. It is also an independent check of the direct
  route: two graphs written by different code must agree.

Both graphs take ``images`` ``(N, C, H, W)`` float32 (the batch N dynamic, or fixed with
`batch`) and give ``scores`` ``(N, K)`` and ``probabilities`` ``(N, K)``. The file carries
metadata a deployer needs (`metadata_of`): class names, the input's shape and dtype, how
pictures are prepared, xpcnn's version. Before it is written, a model is checked with
``onnx.checker`` (full check) and shape inference, and run in ONNX Runtime, where installed,
against the network's own `predict_proba`; the file is written atomically, so a failure
leaves no file behind.

Running a written file is `xpcnn.app.onnx_model`. ONNX, ONNX Runtime and ndonnx are the optional
extra ``export``; they are imported only inside the functions that use them.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..backend.arrays import dtype_name
from ..backend.devices import get_backend
from ..data.datasets import class_names, get_spec
from ..data.images import FIT_CHOICES
from ..errors import ConfigError, DatasetError, ExportError, MissingDependency, OutputError
from ..fileio import atomic_write
from ..nn.inference import predict_proba
from ..nn.layers import Affine, BatchNormalization, Convolution, Dropout, Pooling, ReLU, Sigmoid
from ..ops.functions import softmax
from ..ops.table import Ops, ops_of
from ..training.checkpoint import build_from_checkpoint, load_checkpoint
from .onnx_model import BATCH_DIM, INPUT_NAME, PROBABILITIES, SCORES, open_session, runtime

ONNX_MISSING = "xpcnn export needs ONNX, an optional extra: pip install 'xpcnn[export]'"
NDONNX_MISSING = "xpcnn export --via ndonnx needs ndonnx, an optional extra: pip install 'xpcnn[export]'"

#: The ONNX opsets the direct route writes: from 13 (Softmax's single-axis meaning) to the newest
#: that ONNX Runtime 1.31, the oldest the extra ``export`` installs, can run.
MIN_OPSET, MAX_OPSET = 13, 26
DEFAULT_OPSET = 17
#: The routes from a network to a graph (see the module docstring).
VIAS = ("direct", "ndonnx")
#: How far ONNX Runtime's probabilities may be from the network's before an export is refused.
VERIFY_TOLERANCE = 1e-5
#: Images (uniform noise in [0, 1], seeded) the exported graph is checked on before it is written.
VERIFY_IMAGES = 37


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        via: ``"direct"`` or ``"ndonnx"``.
        opset: the ONNX opset of the default domain.
        batch: the fixed batch size, or None for a dynamic batch.
        nodes: operators in the graph.
        size_bytes: bytes of the file.
        max_difference: the largest probability difference between ONNX Runtime and the
            network on the check images (None where ONNX Runtime is not installed).
        notes: things the user should know (a float64 network exported as float32, ...).
    """

    path: Path
    via: str
    opset: int
    batch: int | None
    nodes: int
    size_bytes: int
    max_difference: float | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        batch = "dynamic" if self.batch is None else str(self.batch)
        check = ("not run in ONNX Runtime (not installed)" if self.max_difference is None else
                 f"ONNX Runtime agrees with xpcnn within {self.max_difference:.1e} on {VERIFY_IMAGES} images")
        return (f"wrote {self.path}: {self.nodes} nodes (via {self.via}), opset {self.opset}, batch {batch}, "
                f"{self.size_bytes / 1e6:.2f} MB; onnx.checker and shape inference passed; {check}")


# ------------------------------------------------------------------ optional libraries

def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise MissingDependency(ONNX_MISSING) from None
    return onnx


# ------------------------------------------------------------------ what the graph takes

def input_dims(network: Any) -> tuple[int, ...]:
    """The shape of one input without the batch: ``(C, H, W)``; for a fully connected network
    of ``input_size`` D, ``(1, s, s)`` where ``D = s * s`` (a square grayscale picture, flattened
    by the first Affine as in xpcnn), else ``(D,)``."""
    if "input_dim" in network.config:
        return tuple(int(v) for v in network.config["input_dim"])
    size = int(network.config["input_size"])
    side = math.isqrt(size)
    return (1, side, side) if side * side == size else (size,)


def check_opset(opset: Any, via: str = "direct") -> int:
    """`opset` as an int the route can write; `ConfigError` naming the range otherwise."""
    if via not in VIAS:
        raise ConfigError(f"unknown export route {via!r}: expected one of {VIAS}")
    newest = min(MAX_OPSET, _onnx().defs.onnx_opset_version())
    if via == "ndonnx":
        written = ndonnx_opset()
        if opset is not None and int(opset) != written:
            raise ConfigError(f"--via ndonnx writes opset {written} (ndonnx's own); got --opset {opset}: "
                              f"drop --opset or use the direct route")
        return written
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not hasattr(opset, "__index__") or not MIN_OPSET <= int(opset) <= newest:
        raise ConfigError(f"unsupported opset {opset!r}: xpcnn export writes opsets {MIN_OPSET} to {newest} "
                          f"(default {DEFAULT_OPSET})")
    return int(opset)


def ndonnx_opset() -> int:
    """The opset ndonnx writes (its spox operator set)."""
    ndx = _ndonnx()
    x = ndx.argument(shape=(1,), dtype=ndx.float32)
    model = ndx.build({"x": x}, {"y": x + 1.0})
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _check_batch(batch: Any) -> int | None:
    if batch is None:
        return None
    if isinstance(batch, bool) or not hasattr(batch, "__index__") or int(batch) < 1:
        raise ConfigError(f"batch must be None (dynamic) or an integer >= 1, got {batch!r}")
    return int(batch)


def picture_fit_of(dataset: str | None) -> str:
    """How pictures are framed for `dataset` (its `DatasetSpec.picture_fit`; "fill" when unknown)."""
    try:
        return get_spec(dataset).picture_fit if dataset else "fill"
    except DatasetError:
        return "fill"


def metadata_of(network: Any, *, dataset: str | None, fit: str, batch: int | None, via: str,
                source_dtype: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The file's metadata (ONNX ``metadata_props``: string keys and values; lists and objects
    as JSON): what a deployer needs to feed the graph pictures and read its answers."""
    if fit not in FIT_CHOICES:
        raise ConfigError(f"fit must be one of {FIT_CHOICES}, got {fit!r}")
    dims = input_dims(network)
    size = list(dims[-2:]) if len(dims) == 3 else [int(dims[0])]
    names = class_names(dataset, int(network.config["output_size"]))
    framing = {
        "fill": "trimmed to its content (pixels brighter than the border's median), the longest side scaled to "
                "the full size keeping the aspect ratio (area-averaged when shrinking, bilinear when enlarging), "
                "centred on black (Fashion-MNIST's recipe)",
        "digit": "trimmed to its content, fitted into a box of 20/28 of the size, centred on black, then moved so "
                 "its centre of mass is at the centre (MNIST's recipe)",
        "whole": "the whole picture fitted into the size keeping the aspect ratio, centred on black",
    }[fit]
    preparation = {
        "steps": [
            "grayscale (Pillow's mode L: ITU-R 601-2 luma); transparent pixels count as white paper; the EXIF "
            "rotation is applied",
            "8-bit values divided by 255 in float32, so values lie in [0, 1]",
            "inverted (1 - v) when the median of the outermost ring of pixels is above 0.5: the model was "
            "trained on light-on-dark images",
            "a dark background's level (the border's median, when at most 0.5) is subtracted, then the picture "
            f"is framed into {size}: {framing}; a picture already of that size is taken as it is",
        ],
        "scale": "value / 255, float32, in [0, 1]",
        "invert": "auto: when the border's median is above 0.5",
        "fit": fit,
        "size": size,
        "light_on_dark": True,
        "reference": "xpcnn.data.images.read_input_file (what xpcnn predict and xpcnn serve do)",
    }
    metadata = {
        "xpcnn_version": __version__,
        "model": type(network).__name__,
        "config": network.config,
        "dataset": dataset or "",
        "classes": names,
        "input": {"name": INPUT_NAME, "shape": [BATCH_DIM if batch is None else batch, *dims], "dtype": "float32",
                  "layout": "NCHW" if len(dims) == 3 else "ND", "range": [0.0, 1.0]},
        "outputs": {SCORES: "class scores (N, K), the network's predict in inference mode",
                    PROBABILITIES: "softmax of the scores (N, K), xpcnn's predict_proba"},
        "preprocessing": preparation,
        "exported_via": via,
        "source_dtype": source_dtype,
        **(extra or {}),
    }
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


# ------------------------------------------------------------------ the direct route

def _host_float32(network: Any, array: Any) -> np.ndarray:
    return np.ascontiguousarray(network.backend.to_numpy(array), dtype=np.float32)


def _direct_nodes(network: Any, onnx: Any) -> tuple[list[Any], list[Any]]:
    """The nodes and initializers of the direct route, from ``images`` to ``scores``."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    nodes: list[Any] = []
    weights: list[Any] = []
    current, rank = INPUT_NAME, 1 + len(input_dims(network))

    def weight(name: str, array: np.ndarray) -> str:
        weights.append(numpy_helper.from_array(array, name))
        return name

    def add(op: str, inputs: list[str], name: str, **attrs: Any) -> None:
        nonlocal current
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        current = name

    for layer_name, layer in network.layers.items():
        prefix = layer_name
        if isinstance(layer, Convolution):
            filter_h, filter_w = (int(s) for s in layer.W.shape[2:])
            add("Conv", [current, weight(f"{prefix}.W", _host_float32(network, layer.W)),
                         weight(f"{prefix}.b", _host_float32(network, layer.b))], prefix,
                kernel_shape=[filter_h, filter_w], strides=[layer.stride] * 2, pads=[layer.pad] * 4)
        elif isinstance(layer, Pooling):
            # ONNX pads MaxPool with -inf (padding never wins), as xpcnn's Pooling does.
            add("MaxPool", [current], prefix, kernel_shape=[layer.pool_h, layer.pool_w],
                strides=[layer.stride] * 2, pads=[layer.pad] * 4)
        elif isinstance(layer, ReLU):
            add("Relu", [current], prefix)
        elif isinstance(layer, Sigmoid):
            add("Sigmoid", [current], prefix)
        elif isinstance(layer, Affine):
            if rank != 2:      # (N, C, H, W) -> (N, C*H*W), row-major like xpcnn's reshape
                add("Flatten", [current], f"{prefix}.flatten", axis=1)
                rank = 2
            add("Gemm", [current, weight(f"{prefix}.W", _host_float32(network, layer.W)),
                         weight(f"{prefix}.b", _host_float32(network, layer.b))], prefix)
        elif isinstance(layer, BatchNormalization):
            if rank == 4 and layer.per_activation:
                raise ConfigError(f"layer {layer_name}: a per-activation BatchNormalization of 4-D inputs has no "
                                  f"direct ONNX operator; export with via='ndonnx'")
            add("BatchNormalization", [current] + [
                weight(f"{prefix}.{key}", _host_float32(network, getattr(layer, key)))
                for key in ("gamma", "beta", "running_mean", "running_var")], prefix, epsilon=layer.eps)
        elif isinstance(layer, Dropout):
            if layer.dropout_ratio:     # the book's inference mode scales every unit (ONNX's Dropout would not)
                keep = np.asarray(1.0 - layer.dropout_ratio, dtype=np.float32)
                add("Mul", [current, weight(f"{prefix}.keep", keep)], prefix)
        else:
            raise ConfigError(f"layer {layer_name} ({type(layer).__name__}) has no direct ONNX mapping; "
                              f"export with via='ndonnx' (the layer's own array-API code, traced)")
    nodes.append(helper.make_node("Identity", [current], [SCORES], name=SCORES))
    return nodes, weights


def _direct_model(network: Any, batch: int | None, opset: int) -> Any:
    onnx = _onnx()
    helper, tensor = onnx.helper, onnx.TensorProto
    nodes, weights = _direct_nodes(network, onnx)
    nodes.append(helper.make_node("Softmax", [SCORES], [PROBABILITIES], name=PROBABILITIES, axis=-1))
    rows: Any = BATCH_DIM if batch is None else batch
    classes = int(network.config["output_size"])
    graph = helper.make_graph(
        nodes, type(network).__name__,
        [helper.make_tensor_value_info(INPUT_NAME, tensor.FLOAT, [rows, *input_dims(network)])],
        [helper.make_tensor_value_info(SCORES, tensor.FLOAT, [rows, classes]),
         helper.make_tensor_value_info(PROBABILITIES, tensor.FLOAT, [rows, classes])],
        initializer=weights)
    opsets = [helper.make_opsetid("", opset)]
    # The oldest IR version that has the opset, so that older runtimes load the file too.
    return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


# ------------------------------------------------------------------ the ndonnx route

def _ndonnx() -> Any:
    try:
        import ndonnx
    except ImportError:
        raise MissingDependency(NDONNX_MISSING) from None
    return ndonnx


def on_ndonnx(network: Any) -> Any:
    """A copy of `network` whose parameters and BatchNorm statistics are float32 ndonnx
    constants, and whose layers use ndonnx's operation table (the array-API reference): the
    same layer objects' code, only their arrays moved, as to another device. `network` is
    left as it is. Each array becomes one constant of the graph (no copy of the old values)."""
    backend = get_backend("ndonnx")
    table = ops_of(backend)
    arrays = list(network.params.values()) + list(network.buffers().values() if hasattr(network, "buffers") else [])
    moved = {id(array): backend.asarray(np.asarray(network.backend.to_numpy(array), dtype=np.float32))
             for array in arrays}
    clone = copy.copy(network)
    clone.layers = {}
    for name, layer in network.layers.items():
        twin = copy.copy(layer)
        for key, value in vars(layer).items():
            if id(value) in moved:
                setattr(twin, key, moved[id(value)])
            elif isinstance(value, Ops):
                setattr(twin, key, table)
        clone.layers[name] = twin
    clone.params = {key: moved[id(value)] for key, value in network.params.items()}
    clone.backend, clone.dtype = backend, backend.dtype("float32")
    return clone


def trace_onnx(network: Any, batch: int | None = None) -> Any:
    """The network's own forward code (``predict``, inference mode) and xpcnn's softmax, run on
    an ndonnx argument ``images`` of shape ``(batch or N, *input)``: the ONNX model they write.
    `network` must live on the ``ndonnx`` backend (see `on_ndonnx`)."""
    ndx = _ndonnx()
    x = ndx.argument(shape=(BATCH_DIM if batch is None else batch, *input_dims(network)), dtype=ndx.float32)
    scores = network.predict(x)
    return ndx.build({INPUT_NAME: x}, {SCORES: scores, PROBABILITIES: softmax(scores)})


# ------------------------------------------------------------------ checks and writing

def check_model(model: Any, batch: int | None, classes: int) -> None:
    """``onnx.checker`` (full check, which includes strict shape inference) and shape inference:
    both outputs must come out as ``(batch or N, classes)`` float32; `ExportError` otherwise."""
    onnx = _onnx()
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph failed onnx's checks (a bug in xpcnn export): "
                          f"{str(exc).strip().splitlines()[0]}") from exc
    expected = [BATCH_DIM if batch is None else batch, classes]
    for output in inferred.graph.output:
        dims = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
        if output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or (dims and dims[1:] != expected[1:]):
            raise ExportError(f"the exported graph's output {output.name!r} is {dims} of ONNX type "
                              f"{output.type.tensor_type.elem_type}, expected {expected} float32")


def _verify(model_bytes: bytes, network: Any, batch: int | None) -> float | None:
    """Run the graph in ONNX Runtime (when installed) on seeded noise images and compare its
    probabilities with the network's `predict_proba`; the largest difference, or None."""
    if runtime(required=False) is None:
        return None
    count = VERIFY_IMAGES if batch is None else batch
    images = np.random.default_rng(0).random((count, *input_dims(network)), dtype=np.float32)
    session = open_session(model_bytes, "the exported graph (a bug in xpcnn export)", ExportError)
    got = session.run([PROBABILITIES], {INPUT_NAME: images})[0]
    expected = network.backend.to_numpy(predict_proba(network, images.astype(dtype_name(network.dtype)), count))
    difference = float(np.max(np.abs(got.astype(np.float64) - expected)))
    if not difference <= VERIFY_TOLERANCE:
        raise ExportError(f"ONNX Runtime's probabilities differ from xpcnn's by {difference:.2e} "
                          f"(more than {VERIFY_TOLERANCE:g}) on {count} images: not written (a bug in xpcnn export)")
    return difference


def _check_out_path(path: Path) -> None:
    """`OutputError` unless `path` can be written: its folder exists and is writable, and it
    is not a folder itself (checked before any work, so nothing is left half-done)."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"cannot write {str(path)!r}: it is a folder; give a file name such as model.onnx")
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "does not exist; create it first"
        raise OutputError(f"cannot write {str(path)!r}: {str(folder)!r} {why}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {str(path)!r}: the folder {str(folder)!r} is not writable")


def export_onnx(network: Any, path: "str | os.PathLike[str]", *, opset: int | None = None, batch: int | None = None,
                via: str = "direct", dataset: str | None = None, fit: str | None = None,
                extra_metadata: dict[str, Any] | None = None) -> ExportResult:
    """Write `network` (any backend, float32 or float64) as an ONNX file at `path`.

    Args:
        network: a network of the book's protocol (`SimpleConvNet`, `DeepConvNet`,
            `MultiLayerNetExtend`, ...), exported in inference mode.
        path: the file to write (its folder must exist); written atomically.
        opset: ONNX opset of the direct route (`MIN_OPSET` to the installed onnx's newest;
            default `DEFAULT_OPSET`); the ndonnx route writes ndonnx's own.
        batch: None for a dynamic batch dimension ``N``, or a fixed batch size.
        via: ``"direct"`` (ONNX's own operators) or ``"ndonnx"`` (the forward code traced).
        dataset: whose class names and picture framing the metadata records.
        fit: how pictures are framed (default: the dataset's recipe).
        extra_metadata: more metadata entries (JSON-able values).

    A float64 network is exported in float32 (ONNX runtimes compute in float32), with a note.

    Raises:
        MissingDependency: onnx (or ndonnx for ``via="ndonnx"``) is not installed.
        ConfigError: an unsupported opset, batch or route, or a layer with no ONNX mapping.
        OutputError: the folder is missing or not writable, or writing fails.
        ExportError: the graph fails onnx's checks or disagrees with the network in ONNX Runtime.
    """
    path = Path(path)
    opset = check_opset(opset, via)
    batch = _check_batch(batch)
    _check_out_path(path)
    source_dtype = dtype_name(network.dtype)
    notes = []
    if source_dtype != "float32":
        notes.append(f"the network computes in {source_dtype}; exported as float32 (ONNX runtimes compute in "
                     f"float32; probabilities differ from xpcnn's {source_dtype} ones by about 1e-7)")
    if via == "ndonnx":
        model = trace_onnx(on_ndonnx(network), batch)
    else:
        model = _direct_model(network, batch, opset)
    onnx = _onnx()
    metadata = metadata_of(network, dataset=dataset, fit=fit or picture_fit_of(dataset), batch=batch, via=via,
                           source_dtype=source_dtype, extra=extra_metadata)
    onnx.helper.set_model_props(model, metadata)
    model.producer_name, model.producer_version = "xpcnn", __version__
    model.doc_string = (f"{type(network).__name__} exported by xpcnn {__version__}: input {INPUT_NAME!r} "
                        f"(N, *{list(input_dims(network))}) float32 in [0, 1], outputs {SCORES!r} and "
                        f"{PROBABILITIES!r}; the metadata says how to prepare pictures")
    check_model(model, batch, int(network.config["output_size"]))
    data = model.SerializeToString()
    difference = _verify(data, network, batch)
    try:
        with atomic_write(path) as fh:
            fh.write(data)
    except OSError as exc:
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    return ExportResult(path, via, opset, batch, len(model.graph.node), len(data), difference, notes)


def export_checkpoint(checkpoint_path: "str | os.PathLike[str]", path: "str | os.PathLike[str]", *,
                      dataset: str | None = None, **options: Any) -> ExportResult:
    """`export_onnx` of the network saved in a checkpoint (written on any backend), rebuilt on
    NumPy; the metadata records the checkpoint's dataset, epoch and test accuracy."""
    _onnx()                                    # a missing extra says so before anything is read
    if options.get("via") == "ndonnx":
        _ndonnx()
    check_opset(options.get("opset"), options.get("via", "direct"))
    _check_batch(options.get("batch"))
    _check_out_path(Path(path))
    if dataset:
        get_spec(dataset)                      # an unknown name is refused, not ignored
    checkpoint = load_checkpoint(checkpoint_path)
    network = build_from_checkpoint(checkpoint, get_backend("cpu"))
    dataset = dataset or checkpoint.extra.get("dataset")
    history = checkpoint.history if isinstance(checkpoint.history, dict) else {}
    accuracy = (history.get("test_acc") or [None])[-1]
    extra = {"checkpoint": {"file": Path(checkpoint_path).name, "epoch": checkpoint.epoch,
                            "test_accuracy": accuracy}}
    return export_onnx(network, path, dataset=str(dataset) if dataset else None, extra_metadata=extra, **options)
