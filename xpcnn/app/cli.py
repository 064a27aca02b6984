"""Command line: ``xpcnn train``, ``xpcnn evaluate``, ``xpcnn predict``, ``xpcnn tune``, ``xpcnn serve`` and
``xpcnn export``.

Every `XpcnnError` becomes one line on stderr (``xpcnn: error: ...``) and an exit code of
the table `ExitCode` (``exit_codes.py``; docs/cli.md shows it).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .._version import __version__
from ..backend.arrays import FLOAT_DTYPES
from ..backend.devices import get_backend, out_of_memory_as_error
from ..data.datasets import class_names, get_spec, load_dataset, load_split
from ..data.images import FIT_CHOICES, INVERT_CHOICES
from ..errors import CheckpointError, ConfigError, DatasetError, OutputError, XpcnnError
from ..models.multi_layer_net_extend import ACTIVATIONS
from ..models.registry import MODELS, RUN_KEYS, build_network, check_options, model_entry, model_of_class, run_defaults
from ..nn.compiled_step import check_graph_support
from ..nn.optim import OPTIMIZERS
from ..ops.table import describe as describe_table
from ..ops.table import ops_of
from ..training.checkpoint import build_from_checkpoint, load_checkpoint, make_optimizer_from_checkpoint, network_like
from ..training.trainer import ON_NAN_CHOICES, Trainer, TrainingInterrupted
from .exit_codes import ExitCode, exit_code_for
from .export import DEFAULT_OPSET, VIAS, export_checkpoint
from .onnx_model import OnnxModel, is_onnx_path
from .plots import plot_accuracy, plot_filters, plot_loss
from .predict import FileFailure, classify_files, input_size, prediction_record
from .report import evaluate_report, write_report
from .serve import (
    DEFAULT_MAX_BATCH,
    MAX_CONNECTIONS,
    MAX_WAIT,
    QUEUE_TIMEOUT,
    REQUEST_TIMEOUT,
    Limits,
    ServedModel,
    require_server_packages,
    serve,
)
from .tune import TuneConfig, run_tune


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def _float_option(expected: str, accept: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a float that `accept` takes, else one line saying what was `expected`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_positive_float = _float_option("a finite number > 0", lambda v: 0.0 < v < float("inf"))
_dropout_ratio = _float_option("a ratio in [0, 1)", lambda v: 0.0 <= v < 1.0)
_non_negative_float = _float_option("a finite number >= 0", lambda v: 0.0 <= v < float("inf"))


def _init_std(text: str) -> "float | str":
    if text.lower() in ("he", "relu", "xavier", "sigmoid"):
        return text.lower()
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or he/relu/xavier/sigmoid, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xpcnn", description="The book's CNNs (SimpleConvNet, DeepConvNet, MultiLayerNetExtend) on NumPy, "
                                 "CuPy or PyTorch: train, evaluate, predict, tune, serve.")
    parser.add_argument("--version", action="version", version=f"xpcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,predict,tune,serve,export}")

    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_predict_parser(sub)
    _add_tune_parser(sub)
    _add_serve_parser(sub)
    _add_export_parser(sub)
    return parser


def _add_train_parser(sub: Any) -> None:
    train = sub.add_parser("train", help="train SimpleConvNet, DeepConvNet or MultiLayerNetExtend (the book's recipes)",
                           description="Train a model with its book recipe as defaults: simple "
                                       "(SimpleConvNet: AdaGrad lr 0.06, 10 epochs), deep (DeepConvNet: Adam "
                                       "lr 0.001, dropout 0.5, He init, 20 epochs), mlp (MultiLayerNetExtend: "
                                       "4x100 ReLU, He init, SGD lr 0.01, 20 epochs); batch 100.")
    train.add_argument("--model", choices=sorted(MODELS), default=None,
                       help="simple (default), deep or mlp; on --resume, the checkpoint's")
    _add_backend_args(train)
    _add_data_args(train, dataset_default=None)
    train.add_argument("--epochs", type=_int_at_least(1), default=None,
                       help="epochs in total (default 10, deep/mlp 20; on --resume, the checkpoint's)")
    # default=None: the model's recipe applies (xpcnn/models/registry.py), or the checkpoint's on --resume.
    train.add_argument("--batch-size", type=_int_at_least(1), default=None, help="images per step (default 100)")
    train.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                       help="default adagrad (deep: adam, mlp: sgd)")
    train.add_argument("--lr", type=_positive_float, default=None,
                       help="learning rate (default 0.06; deep 0.001, mlp 0.01)")
    train.add_argument("--weight-init-std", type=_init_std, default=None,
                       help="simple: a number (default 0.01); mlp: he/relu (default), xavier/sigmoid or a number")
    train.add_argument("--dropout", type=_dropout_ratio, default=None,
                       help="dropout ratio (deep: default 0.5; mlp: default 0 = off)")
    train.add_argument("--weight-decay", type=_non_negative_float, default=None,
                       help="mlp: L2 weight decay lambda (default 0)")
    train.add_argument("--batchnorm", action="store_true", default=None,
                       help="mlp: batch normalization after each hidden Affine")
    train.add_argument("--hidden-sizes", type=_int_at_least(1), nargs="+", default=None,
                       help="mlp: hidden layer sizes (default 100 100 100 100)")
    train.add_argument("--activation", choices=sorted(ACTIVATIONS), default=None, help="mlp: activation (default relu)")
    train.add_argument("--dtype", choices=list(FLOAT_DTYPES), default=None, help="default float32")
    train.add_argument("--seed", type=_int_at_least(0), default=None,
                       help="seed for the initial weights and the shuffling (default 0)")
    train.add_argument("--train-size", type=_int_at_least(1), default=None, help="use only the first N training images")
    train.add_argument("--test-size", type=_int_at_least(1), default=None, help="use only the first N test images")
    train.add_argument("--eval-batch-size", type=_int_at_least(1), default=500,
                       help="images per batch when scoring (default 500)")
    train.add_argument("--log-every", type=_int_at_least(1), default=50,
                       help="steps between loss reads from the device (default 50)")
    train.add_argument("--on-nan", choices=list(ON_NAN_CHOICES), default="stop",
                       help="a NaN/inf loss stops training (default) or skips that step")
    train.add_argument("--cuda-graph", action="store_true",
                       help="gpu: replay each training step as one CUDA graph (captured once per batch shape)")
    train.add_argument("--out", default="runs/latest", help="output directory (default runs/latest)")
    train.add_argument("--resume", metavar="CHECKPOINT", default=None, help="continue from a checkpoint.npz")
    train.add_argument("--no-plots", action="store_true", help="do not draw loss.png, accuracy.png, filters.png")
    train.add_argument("--quiet", action="store_true",
                       help="no progress bar (the one-line epoch summaries still print)")


def _add_evaluate_parser(sub: Any) -> None:
    evaluate = sub.add_parser("evaluate", help="score a saved checkpoint on a dataset split")
    evaluate.add_argument("checkpoint", help="a checkpoint.npz written by xpcnn train")
    _add_backend_args(evaluate)
    _add_data_args(evaluate, dataset_default=None)
    evaluate.add_argument("--split", choices=["test", "train"], default="test")
    evaluate.add_argument("--batch-size", type=_int_at_least(1), default=500)
    evaluate.add_argument("--report", metavar="DIR", default=None,
                          help="also write confusion.png/.csv, per_class.csv, mistakes.png, activations.png, "
                               "report.json into DIR")


def _batch_option(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        return _int_at_least(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'dynamic' or an integer >= 1, got {text!r}") from None


def _add_export_parser(sub: Any) -> None:
    export = sub.add_parser("export", help="write a checkpoint as an ONNX file (ONNX Runtime, the browser, phones)",
                            description="Write a checkpoint's network (any model, saved on any backend) as an ONNX "
                                        "file: input 'images' (N, C, H, W) float32, outputs 'scores' and "
                                        "'probabilities', metadata saying how to prepare pictures. Checked with "
                                        "onnx.checker and shape inference, and against xpcnn in ONNX Runtime, "
                                        "before it is written. Needs pip install 'xpcnn[export]'.")
    export.add_argument("checkpoint", help="a checkpoint.npz written by xpcnn train")
    export.add_argument("out", metavar="OUT.onnx", help="the file to write (its folder must exist)")
    export.add_argument("--opset", type=_int_at_least(1), default=None,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; --via ndonnx writes ndonnx's own)")
    export.add_argument("--batch", type=_batch_option, default=None, metavar="dynamic|N",
                        help="batch dimension: dynamic (default) or a fixed number of images")
    export.add_argument("--via", choices=list(VIAS), default="direct",
                        help="direct (default): ONNX's own operators; ndonnx: xpcnn's forward code traced "
                             "on ndonnx arrays (a larger, slower graph: docs/export.md)")
    export.add_argument("--dataset", default=None,
                        help="whose class names and picture framing to record (default: the checkpoint's dataset)")


def _device_list(text: str) -> list[int]:
    try:
        devices = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU numbers separated by commas (e.g. 0,1), got {text!r}") from None
    if any(d < 0 for d in devices) or len(set(devices)) != len(devices):
        raise argparse.ArgumentTypeError(f"expected distinct GPU numbers >= 0 (e.g. 0,1), got {text!r}")
    return devices


def _fraction(text: str) -> float:
    return _float_option("a fraction in (0, 1)", lambda v: 0.0 < v < 1.0)(text)


def _add_tune_parser(sub: Any) -> None:
    tune = sub.add_parser("tune", help="search hyper-parameters on a validation split (the book's 6.5; needs Optuna)",
                          description="The book's hyper-parameter search (section 6.5) on Optuna: random "
                                      "(lr, weight_decay) pairs for the 6 x 100 MultiLayerNetExtend on 400 of the "
                                      "first 500 training images (100 for validation), 50 epochs, 100 trials. The "
                                      "test set is never read. Resumable (rerun the same command) and parallel "
                                      "(--jobs, --devices, or workers on several machines sharing --storage). "
                                      "Needs pip install 'xpcnn[tune]'.")
    tune.add_argument("--model", choices=sorted(MODELS), default="mlp",
                      help="mlp (default: 6 x 100, SGD, the book's), simple or deep, each with its recipe")
    _add_backend_args(tune)
    _add_data_args(tune)
    tune.add_argument("--trials", type=_int_at_least(1), default=100,
                      help="finished trials the study should have (default 100); a rerun runs the missing ones")
    tune.add_argument("--search", default=None, metavar="NAME=LOW:HIGH[:log],...",
                      help="settings to draw (the model's train options lr, weight_decay, dropout, "
                           "weight_init_std, batch_size); default lr=1e-06:0.01:log,weight_decay=1e-08:0.0001:log "
                           "(simple/deep: lr only)")
    tune.add_argument("--sampler", choices=["random", "tpe"], default="random", help="default random (the book's)")
    tune.add_argument("--pruner", choices=["none", "median"], default="none",
                      help="median: stop a trial whose validation accuracy after an epoch is below the median "
                           "of earlier trials at that epoch (default none)")
    tune.add_argument("--train-size", type=_int_at_least(2), default=500,
                      help="the first N training images (default 500), validation split included")
    tune.add_argument("--validation", type=_fraction, default=0.2,
                      help="fraction of them held out for validation, drawn with --seed (default 0.2)")
    tune.add_argument("--epochs", type=_int_at_least(1), default=50, help="epochs per trial (default 50)")
    tune.add_argument("--batch-size", type=_int_at_least(1), default=100, help="images per step (default 100)")
    tune.add_argument("--seed", type=_int_at_least(0), default=0,
                      help="seed of the validation split, the weights and the sampler (default 0)")
    tune.add_argument("--study", default="xpcnn-tune", help="study name (default xpcnn-tune)")
    tune.add_argument("--storage", default=None, metavar="URL",
                      help="Optuna storage URL shared by all workers, e.g. postgresql://user:pw@host/db "
                           "(default: sqlite file study.db in --out)")
    tune.add_argument("--jobs", type=_int_at_least(1), default=1, help="worker processes on this machine (default 1)")
    tune.add_argument("--devices", type=_device_list, default=None, metavar="0,1,...",
                      help="one worker per GPU (with --backend gpu or torch:cuda)")
    tune.add_argument("--heartbeat", type=_int_at_least(1), default=10,
                      help="seconds between a running trial's heartbeats; a trial silent for 3 beats is "
                           "failed and replaced (default 10)")
    tune.add_argument("--out", default="runs/tune", help="output directory (default runs/tune)")


def _add_serve_parser(sub: Any) -> None:
    serve_parser = sub.add_parser(
        "serve", help="a web page and HTTP API: draw or drop an image, see what the network answers",
        description="Serve a checkpoint: a page to draw on or drop pictures into (GET /), POST /api/predict, "
                    "GET /api/model, GET /healthz. Needs the optional extra: pip install 'xpcnn[serve]'.")
    serve_parser.add_argument("checkpoint", help="a checkpoint.npz written by xpcnn train")
    _add_backend_args(serve_parser)
    serve_parser.add_argument("--host", default="127.0.0.1",
                              help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 shares it "
                                   "with the network, with no login)")
    serve_parser.add_argument("--port", type=_int_at_least(0), default=8000, help="port (default 8000; 0: a free one)")
    serve_parser.add_argument("--max-batch", type=_int_at_least(1), default=DEFAULT_MAX_BATCH,
                              help=f"requests gathered into one forward pass (default {DEFAULT_MAX_BATCH}; 1: none)")
    serve_parser.add_argument("--max-wait-ms", type=_non_negative_float, default=MAX_WAIT * 1000,
                              help=f"how long a request waits for others to share its batch "
                                   f"(default {MAX_WAIT * 1000:g} ms)")
    serve_parser.add_argument("--max-queue", type=_int_at_least(1), default=None,
                              help="requests in hand at once past reading their upload; more are answered 503 "
                                   "(default 4 x --max-batch, at least 32)")
    serve_parser.add_argument("--queue-timeout", type=_positive_float, default=QUEUE_TIMEOUT,
                              help=f"seconds a request may wait for the network before it is answered 503 instead "
                                   f"(default {QUEUE_TIMEOUT:g})")
    serve_parser.add_argument("--max-connections", type=_int_at_least(1), default=MAX_CONNECTIONS,
                              help=f"open connections; requests on more are answered 503 (default {MAX_CONNECTIONS})")
    serve_parser.add_argument("--request-timeout", type=_positive_float, default=REQUEST_TIMEOUT,
                              help=f"seconds a request's headers, and then its body, may take to arrive; slower "
                                   f"ones are answered 408 (default {REQUEST_TIMEOUT:g})")
    serve_parser.add_argument("--dataset", default=None,
                              help="whose class names to show (default: the checkpoint's dataset)")
    serve_parser.add_argument("--access-log", action="store_true", help="print one line per request")


def _add_predict_parser(sub: Any) -> None:
    predict = sub.add_parser("predict", help="classify picture files (PNG, JPEG, ...), .npy or IDX arrays",
                             description="Classify picture files (fitted into the model's input like the datasets), "
                                         ".npy arrays and IDX files with a saved checkpoint, or with an ONNX file "
                                         "written by xpcnn export.")
    predict.add_argument("checkpoint", metavar="MODEL",
                         help="a checkpoint.npz written by xpcnn train, or a .onnx file written by xpcnn export "
                              "(run in ONNX Runtime, with the preparation its metadata records)")
    predict.add_argument("files", nargs="+", metavar="FILE", help="picture, .npy or IDX files")
    _add_backend_args(predict)
    predict.add_argument("--invert", choices=list(INVERT_CHOICES), default="auto",
                         help="make pictures light-on-dark like the datasets: auto (default) inverts a picture whose "
                              "border is light; arrays are inverted only with yes")
    predict.add_argument("--fit", choices=["auto", *FIT_CHOICES], default="auto",
                         help="how pictures are framed: fill (trim, longest side to the full size: Fashion-MNIST's "
                              "recipe), digit (trim, 20x20 box centred by mass: MNIST's), whole (keep margins); "
                              "auto (default): the checkpoint's dataset's")
    predict.add_argument("--top", type=_int_at_least(1), default=3, help="classes to print per image (default 3)")
    predict.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    predict.add_argument("--dataset", default=None,
                         help="whose class names to print (default: the checkpoint's dataset)")
    predict.add_argument("--batch-size", type=_int_at_least(1), default=100, help="images per batch (default 100)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="cpu", metavar="BACKEND",
                        help="cpu (NumPy), gpu (CuPy), torch (PyTorch on the CPU), torch:cuda or torch:mps "
                             "(PyTorch on an NVIDIA or Apple GPU); default cpu")
    parser.add_argument("--device", type=_int_at_least(0), default=None,
                        help="CUDA device number for --backend gpu or torch:cuda")
    parser.add_argument("--reference", action="store_true",
                        help="run the array-API reference code for every operation, never a backend's fast path "
                             "(slower; for checking)")


def _add_data_args(parser: argparse.ArgumentParser, dataset_default: str | None = "fashion-mnist") -> None:
    parser.add_argument("--dataset", default=dataset_default,
                        help="fashion-mnist (default) or mnist; on --resume or evaluate, the checkpoint's")
    parser.add_argument("--data-dir", default=None, help="folder holding the IDX files (searched first)")
    parser.add_argument("--download", action="store_true",
                        help="download missing files into the user cache (checksums verified)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xpcnn`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "predict":
            return run_predict(args)
        if args.command == "tune":
            return run_tune_command(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "export":
            return run_export(args)
        return run_evaluate(args)
    except XpcnnError as exc:
        if isinstance(exc, TrainingInterrupted):
            print(f"xpcnn: {exc}", file=sys.stderr)
            if getattr(exc, "checkpoint_path", None):
                print(f"xpcnn: resume with: xpcnn train --resume {exc.checkpoint_path} --out {args.out}",
                      file=sys.stderr)
            return ExitCode.TERMINATED if exc.signum == signal.SIGTERM else ExitCode.INTERRUPTED
        print(f"xpcnn: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("xpcnn: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except OSError as exc:
        print(f"xpcnn: error: {exc.filename or ''}: {exc.strerror or exc}".replace(": : ", ": "), file=sys.stderr)
        return ExitCode.IO


def _prepare_out_dir(path: str, option: str = "--out") -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to {option} {path!r}: {exc.strerror or exc}; "
                          f"choose a writable folder") from exc
    return out


def _load_split_pair(args: argparse.Namespace, dataset: str,
                     dtype: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    return load_dataset(dataset, normalize=True, flatten=False, data_dir=args.data_dir, download=args.download,
                        dtype=dtype)


def _run_settings(args: argparse.Namespace, checkpoint: Any) -> dict[str, Any]:
    """The settings that define a run: the options given (else the seed's defaults), or, on
    --resume, the checkpoint's; an option that contradicts the checkpoint is refused."""
    given = {key: getattr(args, key) for key in RUN_KEYS if getattr(args, key, None) is not None}
    if checkpoint is None:
        model = given.get("model", "simple")
        check_options(model, given)
        return {**run_defaults(model), **given}
    saved = checkpoint.extra.get("run")
    saved = dict(saved) if isinstance(saved, dict) else {}     # a checkpoint written from Python has none
    if "dataset" not in saved and checkpoint.extra.get("dataset"):
        saved["dataset"] = str(checkpoint.extra["dataset"])
    saved_class = checkpoint.metadata["architecture"].get("class", "SimpleConvNet")
    saved.setdefault("model", model_of_class(saved_class) or "simple")
    if "model" in given and given["model"] != saved["model"]:
        raise CheckpointError(f"cannot resume: the checkpoint is a {saved_class} (--model {saved['model']}), "
                              f"not --model {given['model']}; drop --model or start a new run")
    check_options(saved["model"], given)
    conflicts = [f"--{key.replace('_', '-')} {value} (checkpoint: {saved[key]})"
                 for key, value in given.items() if key in saved and value != saved[key]]
    if conflicts:
        raise ConfigError(f"a resumed run keeps the settings it started with, but {', '.join(conflicts)} "
                          f"differ; drop these options (only --epochs, --backend, --out and display options "
                          f"may change)")
    return {**run_defaults(saved["model"]), **given, **saved}


def _save_history_on_failure(trainer: Any, out: Path) -> None:
    """Keep what a failed or interrupted run measured, without hiding why it stopped."""
    if not (trainer.history.epoch or trainer.history.step_loss):
        return
    try:
        trainer.history.save(out)
    except XpcnnError as exc:
        print(f"xpcnn: warning: could not save the history: {exc}", file=sys.stderr)


def run_train(args: argparse.Namespace) -> int:
    out = _prepare_out_dir(args.out)
    # fail fast, before loading data
    backend = get_backend(args.backend, device=args.device, reference=args.reference)
    if args.cuda_graph:
        check_graph_support(backend)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    run = _run_settings(args, checkpoint)

    (x_train, t_train), (x_test, t_test) = _load_split_pair(args, run["dataset"], run["dtype"])
    if run["train_size"]:
        x_train, t_train = x_train[:run["train_size"]], t_train[:run["train_size"]]
    if run["test_size"]:
        x_test, t_test = x_test[:run["test_size"]], t_test[:run["test_size"]]

    if checkpoint is not None:
        # The checkpoint's weights, optimizer state and progress come in once, by trainer.resume_from;
        # its optimizer keeps its own lr (_run_settings refuses a different --lr).
        network = network_like(checkpoint, backend)
        optimizer: Any = make_optimizer_from_checkpoint(checkpoint)
        optimizer_param = None
        epochs = args.epochs or int(checkpoint.extra.get("epochs", model_entry(run["model"]).epochs))
        initial_w1 = checkpoint.extra.get("W1_initial")
    else:
        network = build_network(run, tuple(x_train.shape[1:]), 10, backend)
        optimizer, optimizer_param = run["optimizer"], {"lr": run["lr"]}
        epochs = args.epochs or model_entry(run["model"]).epochs
        initial_w1 = backend.to_numpy(network.params["W1"]).copy()

    trainer = Trainer(network, x_train, t_train, x_test, t_test, epochs=epochs, mini_batch_size=run["batch_size"],
                      optimizer=optimizer, optimizer_param=optimizer_param, seed=run["seed"],
                      log_every=args.log_every, eval_batch_size=args.eval_batch_size, progress=not args.quiet,
                      checkpoint_path=out / "checkpoint.npz", on_nan=args.on_nan, cuda_graph=args.cuda_graph)
    trainer.extra_state.update(dataset=run["dataset"], run=run, W1_initial=initial_w1)
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
        print(f"resumed from {args.resume}: epoch {checkpoint.epoch}, step {checkpoint.step}", flush=True)

    print(f"xpcnn {__version__}: {type(network).__name__} on {run['dataset']} "
          f"({trainer.train_size} train / {x_test.shape[0]} test images), "
          f"backend {backend}, {run['dtype']}, {type(trainer.optimizer).__name__} lr {trainer.optimizer.lr}, "
          f"batch {run['batch_size']}, epochs {epochs}", flush=True)
    print(f"running {describe_table(ops_of(backend))}", flush=True)
    started = time.perf_counter()
    try:
        # A diverging run overflows before the NaN check stops it: one clear error, no warnings.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            history = trainer.train()
    except BaseException:
        _save_history_on_failure(trainer, out)
        raise
    history.save(out)
    if not args.no_plots:
        plot_loss(history.step_loss, out / "loss.png", steps_per_epoch=trainer.steps_per_epoch)
        plot_accuracy(history.epoch, history.train_acc, history.test_acc, out / "accuracy.png")
        has_filters = initial_w1 is not None and np.ndim(initial_w1) == 4    # a first convolution
        if has_filters:
            plot_filters(initial_w1, backend.to_numpy(network.params["W1"]), out / "filters.png")
    figures = "" if args.no_plots else ", loss.png, accuracy.png" + (", filters.png" if has_filters else "")
    print(f"done in {time.perf_counter() - started:.1f} s: final test acc {history.test_acc[-1]:.4f}; "
          f"outputs in {out}/ (checkpoint.npz, history.json, history.csv{figures})", flush=True)
    return ExitCode.OK


def run_evaluate(args: argparse.Namespace) -> int:
    backend = get_backend(args.backend, device=args.device, reference=args.reference)
    report_dir = _prepare_out_dir(args.report, "--report") if args.report else None     # fail fast
    checkpoint = load_checkpoint(args.checkpoint)
    dataset = args.dataset or checkpoint.extra.get("dataset")
    if not dataset:
        raise ConfigError("this checkpoint does not say which dataset it was trained on: "
                          "pass --dataset mnist|fashion-mnist")
    network = build_from_checkpoint(checkpoint, backend)
    x, t = load_split(str(dataset), args.split, normalize=True, flatten=False, data_dir=args.data_dir,
                      download=args.download, dtype=checkpoint.dtype)
    # Convolutional nets take (C, H, W) images; MultiLayerNetExtend flattens them (input_size).
    takes = tuple(int(v) for v in network.config.get("input_dim", ())) or (int(network.config["input_size"]),)
    if (tuple(x.shape[1:]) != takes) if len(takes) == 3 else (math.prod(x.shape[1:]) != takes[0]):
        raise CheckpointError(f"the checkpoint's network takes {takes} images, but the {dataset} {args.split} images "
                              f"are {tuple(x.shape[1:])}: evaluate it on the dataset it was trained on")
    started = time.perf_counter()
    with out_of_memory_as_error(backend,
                                lambda: (f"scoring a batch of {args.batch_size} images", "lower --batch-size")):
        accuracy = network.accuracy(x, t, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    print(f"{args.split} acc {accuracy:.4f} on {x.shape[0]} images of {dataset} "
          f"(checkpoint epoch {checkpoint.epoch}, backend {backend}, {seconds:.1f} s)")
    if report_dir is not None:
        _write_evaluation_report(args, network, x, t, str(dataset), checkpoint.epoch, report_dir)
    return ExitCode.OK


def _write_evaluation_report(args: argparse.Namespace, network: Any, x: Any, t: Any, dataset: str, epoch: int,
                             out: Path) -> None:
    info = {"dataset": dataset, "split": args.split, "checkpoint": str(args.checkpoint), "checkpoint_epoch": epoch,
            "backend": str(network.backend)}
    report = evaluate_report(network, x, t, class_names=class_names(dataset, network.config["output_size"]),
                             batch_size=args.batch_size, info=info)
    print(report.format_table())
    files = write_report(report, out, network, x)
    print(f"report in {out}/ ({', '.join(files)})")


def _predict_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(network, dataset, class names) of a checkpoint, or of an ``.onnx`` file run in ONNX Runtime."""
    if is_onnx_path(args.checkpoint):
        if args.backend != "cpu" or args.device is not None or args.reference:
            raise ConfigError("an .onnx file runs in ONNX Runtime on the CPU: drop --backend, --device and --reference")
        model = OnnxModel(args.checkpoint)
        dataset = args.dataset or model.dataset or None
        return model, dataset, (class_names(dataset, len(model.classes)) if args.dataset else model.classes)
    backend = get_backend(args.backend, device=args.device, reference=args.reference)
    checkpoint = load_checkpoint(args.checkpoint)
    network = build_from_checkpoint(checkpoint, backend)
    dataset = args.dataset or checkpoint.extra.get("dataset")
    return network, dataset, class_names(dataset, network.config["output_size"])


def run_predict(args: argparse.Namespace) -> int:
    if args.dataset:
        get_spec(args.dataset)                           # an unknown name is refused, not ignored
    network, dataset, names = _predict_model(args)
    input_size(network)                                  # a colour network fails before any file is read
    fit = args.fit if args.fit != "auto" else (network.fit if isinstance(network, OnnxModel) else _picture_fit(dataset))
    bar = _files_progress_bar(len(args.files), args.quiet)
    failures = 0
    try:
        for result in classify_files(network, args.files, invert=args.invert, fit=fit, top=args.top,
                                     batch_size=args.batch_size,
                                     on_file=(lambda _path: bar.update(1)) if bar is not None else None):
            if isinstance(result, FileFailure):
                failures += 1
                _write_above_bar(bar, f"xpcnn: error: {result.error}", sys.stderr)
                continue
            name = result.file if result.index is None else f"{result.file}[{result.index}]"
            if args.json:
                line = json.dumps(prediction_record(result, names))
            else:
                guesses = ", ".join(f"{names[c]} {p:.3f}" for c, p in zip(result.classes, result.probs))
                note = (("  (light background: inverted)" if args.invert == "auto" else "  (inverted)")
                        if result.inverted else "")
                line = f"{name}: {guesses}{note}"
            _write_above_bar(bar, line, sys.stdout)
    finally:
        if bar is not None:
            bar.close()
    if failures:
        print(f"xpcnn: error: {failures} of {len(args.files)} files could not be classified (see above)",
              file=sys.stderr)
        return ExitCode.INPUT_FILE
    return ExitCode.OK


def run_export(args: argparse.Namespace) -> int:
    result = export_checkpoint(args.checkpoint, args.out, opset=args.opset, batch=args.batch, via=args.via,
                               dataset=args.dataset)
    for note in result.notes:
        print(f"xpcnn: note: {note}", file=sys.stderr)
    print(result.summary())
    return ExitCode.OK


def run_tune_command(args: argparse.Namespace) -> int:
    if args.devices and args.backend not in ("gpu", "torch:cuda"):
        raise ConfigError(f"--devices needs --backend gpu or torch:cuda, got --backend {args.backend}")
    if args.reference:
        raise ConfigError("--reference is not an option of xpcnn tune")
    config = TuneConfig(out=args.out, model=args.model, dataset=args.dataset, data_dir=args.data_dir,
                        download=args.download, trials=args.trials, search=args.search, sampler=args.sampler,
                        pruner=args.pruner, train_size=args.train_size, validation=args.validation,
                        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, backend=args.backend,
                        device=args.device, study=args.study, storage=args.storage, jobs=args.jobs,
                        devices=list(args.devices or []), heartbeat=args.heartbeat)
    try:
        run_tune(config, print_fn=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("xpcnn: interrupted; the running trials are marked failed. Rerun the same command to resume",
              file=sys.stderr)
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def run_serve(args: argparse.Namespace) -> int:
    require_server_packages()                            # fail fast, before loading anything
    backend = get_backend(args.backend, device=args.device, reference=args.reference)
    if args.dataset:
        get_spec(args.dataset)                           # an unknown name is refused, not ignored
    model = ServedModel.from_checkpoint(args.checkpoint, backend, dataset=args.dataset)
    limits = Limits(max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000, max_queue=args.max_queue or 0,
                    queue_timeout=args.queue_timeout, max_connections=args.max_connections,
                    request_timeout=args.request_timeout)
    serve(model, args.host, args.port, limits, log_requests=args.access_log)
    return ExitCode.OK


def _picture_fit(dataset: Any) -> str:
    try:
        return get_spec(dataset).picture_fit if dataset else "fill"
    except DatasetError:
        return "fill"


#: ``xpcnn predict`` shows a progress bar (on a terminal) from this many files on.
PROGRESS_BAR_FILES = 20


def _files_progress_bar(count: int, quiet: bool) -> Any:
    if quiet or count < PROGRESS_BAR_FILES:
        return None
    from tqdm.auto import tqdm

    # disable=None: off when stderr is not a terminal (logs and pipes stay clean).
    return tqdm(total=count, unit="file", desc="predict", leave=False, dynamic_ncols=True, disable=None)


def _write_above_bar(bar: Any, line: str, stream: Any) -> None:
    if bar is not None and not bar.disable:
        bar.write(line, file=stream)
    else:
        print(line, file=stream, flush=stream is sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
