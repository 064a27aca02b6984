"""The book's `Trainer`, made real: device-resident data, seeded shuffling, full-set
evaluation every epoch, a progress bar, history, checkpoints and exact resume.

    >>> trainer = Trainer(net, x_train, t_train, x_test, t_test, epochs=10,
    ...                   mini_batch_size=100, optimizer="adagrad", optimizer_param={"lr": 0.06})
    >>> history = trainer.train()

Data flows one way: host arrays are moved to the network's backend once; each epoch a
permutation is drawn on the host from a seeded generator (so CPU and GPU see the same
batches) and batches are gathered on the device. Losses stay on the device and come back
to the host once every `log_every` steps, never every step.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import numpy as np

from .. import checks
from ..backend.arrays import values_are_free_to_read
from ..backend.devices import out_of_memory_as_error
from ..errors import CheckpointError, ConfigError, DTypeError, ShapeError, TrainingError, XpcnnError
from ..nn.compiled_step import check_graph_support
from ..nn.optim import Optimizer, make_optimizer
from ..ops.functions import host_class_labels
from .checkpoint import Checkpoint, generator_from_state, restore, save_checkpoint
from .history import History

ON_NAN_CHOICES = ("stop", "skip")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(XpcnnError):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM; `checkpoint_path` holds the last finished step."""

    def __init__(self, message: str, checkpoint_path: str | None, epoch: int, step: int,
                 signum: int = signal.SIGINT):
        super().__init__(message)
        self.checkpoint_path, self.epoch, self.step, self.signum = checkpoint_path, epoch, step, int(signum)


class Trainer:
    """Trains a network with mini-batches, the book's way, on the network's backend.

    Args:
        network: e.g. a `SimpleConvNet`; its backend decides where training runs.
        x_train, t_train, x_test, t_test: host NumPy (or backend) arrays. Images
            ``(N, C, H, W)`` (flat ``(N, C*H*W)`` rows are reshaped to the network's
            ``input_dim``); labels ``(N,)`` class indices or ``(N, K)`` one-hot.
        epochs: epochs to train in total (a resumed run continues up to this number).
        mini_batch_size: images per step.
        optimizer: a name (``sgd``, ``momentum``, ``adagrad``, ``adam``) or an `Optimizer`.
        optimizer_param: the optimizer's arguments when it is given by name (an `Optimizer`
            already has its own: giving both is a `ConfigError`).
        evaluate_sample_num_per_epoch: None (default) scores the FULL train and test sets
            each epoch; a number scores only that many images, as the book did.
        verbose: print one summary line per epoch.
        seed: seed of the host generator that shuffles the training set.
        log_every: steps between host reads of the loss (progress bar, NaN check).
        eval_batch_size: images per batch when scoring accuracy.
        progress: show a tqdm progress bar per epoch (only when verbose).
        checkpoint_path: where to save a checkpoint after every epoch and on Ctrl-C.
        on_nan: ``"stop"`` raises `TrainingError` when the loss becomes NaN/inf (checked at
            each log point, naming the first bad step); ``"skip"`` checks every step and
            skips the update of a non-finite step (one host sync per step).
        print_fn: where summary lines go (default ``print``).
        epoch_callback: called with the trainer after each epoch is scored (e.g. a search that
            reports the epoch's accuracy and may stop the run by raising).
        cuda_graph: replay the training step as a CUDA graph (`Network.compile_step`: CuPy's
            fast path only, a `ConfigError` elsewhere); each shape of batch is captured once
            (the last, shorter batch of an epoch too). Off by default.
    """

    def __init__(self, network: Any, x_train: Any, t_train: Any, x_test: Any, t_test: Any,
                 epochs: int = 10, mini_batch_size: int = 100, optimizer: "str | Optimizer" = "adagrad",
                 optimizer_param: dict | None = None, evaluate_sample_num_per_epoch: int | None = None,
                 verbose: bool = True, *, seed: int | None = 0, log_every: int = 50,
                 eval_batch_size: int = 500, progress: bool = True,
                 checkpoint_path: "str | os.PathLike[str] | None" = None,
                 on_nan: str = "stop", print_fn: Callable[[str], None] = print,
                 epoch_callback: "Callable[[Trainer], None] | None" = None, cuda_graph: bool = False):
        self.network = network
        self.backend = network.backend
        self.epochs = checks.positive_int(epochs, "epochs", "Trainer")
        self.batch_size = checks.positive_int(mini_batch_size, "mini_batch_size", "Trainer")
        self.log_every = checks.positive_int(log_every, "log_every", "Trainer")
        self.eval_batch_size = checks.positive_int(eval_batch_size, "eval_batch_size", "Trainer")
        if evaluate_sample_num_per_epoch is not None:
            evaluate_sample_num_per_epoch = checks.positive_int(evaluate_sample_num_per_epoch,
                                                         "evaluate_sample_num_per_epoch", "Trainer")
        self.evaluate_sample_num = evaluate_sample_num_per_epoch
        if on_nan not in ON_NAN_CHOICES:
            raise ConfigError(f"Trainer: on_nan must be one of {ON_NAN_CHOICES}, got {on_nan!r}")
        self.on_nan = on_nan
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph:
            if on_nan == "skip":
                raise ConfigError("Trainer: cuda_graph cannot skip a step with a non-finite loss (on_nan='skip'): "
                                  "the update is part of the replayed graph; use on_nan='stop'")
            check_graph_support(self.backend)
        self.verbose, self.progress, self.print_fn = verbose, progress, print_fn
        self.checkpoint_path = None if checkpoint_path is None else str(checkpoint_path)

        if isinstance(optimizer, Optimizer):
            if optimizer_param is not None:
                raise ConfigError(f"Trainer: optimizer_param {optimizer_param} applies to an optimizer given by name, "
                                  f"but an {type(optimizer).__name__} (lr {optimizer.lr}) was given; drop one")
            self.optimizer = optimizer
        else:
            self.optimizer = make_optimizer(optimizer,
                                            **(optimizer_param if optimizer_param is not None else {"lr": 0.01}))

        output_size = int(network.config["output_size"]) if hasattr(network, "config") else None
        self.x_train, self.t_train = self._to_device(x_train, t_train, "training", output_size)
        self.x_test, self.t_test = self._to_device(x_test, t_test, "test", output_size)
        self.train_size = int(self.x_train.shape[0])
        if self.batch_size > self.train_size:
            raise ConfigError(f"Trainer: mini_batch_size {self.batch_size} is larger than the training set "
                              f"({self.train_size} images)")

        self.rng = np.random.default_rng(checks.seed_or_none(seed, "Trainer"))
        self.epoch = 0                      # finished epochs
        self.step_in_epoch = 0              # finished steps of the epoch in progress
        self._epoch_rng_state = self.rng.bit_generator.state
        self.history = History()
        self.extra_state: dict[str, Any] = {}   # saved with every checkpoint (e.g. dataset name)
        self._stop_requested = False
        #: The last SIGINT/SIGTERM received during `train`, kept after it returns: a signal in the last
        #: epoch's scoring ends no training early, but its caller may want to stop.
        self.signal_received = 0
        self.epoch_callback = epoch_callback
        self._phase = "training"            # or "scoring": which batch size an out-of-memory names
        self._compiled_step: Any = None     # the step replayed as a CUDA graph (cuda_graph=True)

    # ---------------------------------------------------------------------- data

    def _to_device(self, x: Any, t: Any, what: str, output_size: int | None) -> tuple[Any, Any]:
        n = x.shape[0]
        if t.shape[0] != n:
            raise ShapeError(f"Trainer: {what} set has {n} images but {t.shape[0]} labels")
        if n == 0:
            raise ShapeError(f"Trainer: {what} set is empty")
        input_dim = tuple(getattr(self.network, "config", {}).get("input_dim", ()))
        if values_are_free_to_read(x):
            if input_dim and x.ndim == 2 and x.shape[1] == math.prod(input_dim):
                x = x.reshape((n, *input_dim))
            if input_dim and tuple(x.shape[1:]) != input_dim:
                raise ShapeError(f"Trainer: {what} images must be (N, {', '.join(map(str, input_dim))}), got {x.shape} "
                                 f"(load them with flatten=False)")
            if not np.issubdtype(x.dtype, np.floating):
                raise DTypeError(f"Trainer: {what} images must be float32 or float64 (load them with normalize=True), "
                                 f"got {x.dtype}")
            if not np.all(np.isfinite(x)):
                raise ConfigError(f"Trainer: {what} images contain NaN or infinite values")
            t = host_class_labels(np.asarray(t), output_size, f"Trainer: {what}")
            return (self.backend.asarray(x, dtype=self.network.dtype), self.backend.asarray(t))
        if not self.backend.owns(x) or not self.backend.owns(t):
            raise ConfigError(f"Trainer: {what} arrays must be host NumPy arrays or live on the network's backend "
                              f"({self.backend})")
        return x, t

    # -------------------------------------------------------------------- resume

    def resume_from(self, checkpoint: Checkpoint) -> None:
        """Continue from a checkpoint: weights, optimizer state, epoch, step, RNG and history.

        The batch size and training-set size must be the checkpoint's: the saved step and the
        replayed permutation only mean the same batches with the same data.
        """
        saved = {"mini_batch_size": checkpoint.extra.get("mini_batch_size"),
                 "train_size": checkpoint.extra.get("train_size")}
        current = {"mini_batch_size": self.batch_size, "train_size": self.train_size}
        differ = [f"{key} {saved[key]} in the checkpoint, {current[key]} here" for key in saved
                  if saved[key] is not None and saved[key] != current[key]]
        if differ:
            raise CheckpointError(f"cannot resume: {'; '.join(differ)}; "
                                  f"resume with the same batch size and training images")
        if checkpoint.step >= self.steps_per_epoch:
            raise CheckpointError(f"cannot resume: the checkpoint is at step {checkpoint.step} of an epoch "
                                  f"that has only {self.steps_per_epoch} steps here")
        restore(checkpoint, self.network, self.optimizer)
        self.epoch, self.step_in_epoch = checkpoint.epoch, checkpoint.step
        if checkpoint.rng_state is not None:
            self.rng = generator_from_state(checkpoint.rng_state)
            self._epoch_rng_state = self.rng.bit_generator.state
        self.history = History.from_dict(checkpoint.history)

    def save_checkpoint(self, path: "str | os.PathLike[str] | None" = None) -> str:
        """Checkpoint of the current state (after the last finished step)."""
        target = path or self.checkpoint_path
        if target is None:
            raise ConfigError("Trainer.save_checkpoint: no path given and no checkpoint_path set")
        return save_checkpoint(target, self.network, self.optimizer, epoch=self.epoch, step=self.step_in_epoch,
                               rng_state=self._epoch_rng_state, history=self.history.to_dict(),
                               extra={**self.extra_state, "epochs": self.epochs, "mini_batch_size": self.batch_size,
                                      "train_size": self.train_size})

    # ---------------------------------------------------------------------- loop

    def train(self) -> History:
        """Train until `epochs` epochs are finished; returns the history."""
        with self._signals_request_stop(), self._out_of_memory_is_one_error():
            while self.epoch < self.epochs:
                self._train_epoch()
                if self._stop_requested and self.epoch < self.epochs:
                    self._interrupt(None)     # Ctrl-C during evaluation: the epoch's checkpoint is written
        return self.history

    def _out_of_memory_is_one_error(self) -> Any:
        """An allocation failure becomes one `DeviceMemoryError` naming the batch size that did
        not fit and the option to lower; the last checkpoint written stays as it was."""
        self._phase = "training"

        def describe() -> tuple[str, str]:
            if self._phase == "scoring":
                what, size, option = "scoring", self.eval_batch_size, "eval_batch_size (--eval-batch-size)"
            else:
                what, size, option = "training", self.batch_size, "mini_batch_size (--batch-size)"
            kept = f"; the last checkpoint written ({self.checkpoint_path}) is kept" if self.checkpoint_path else ""
            return f"{what} a batch of {size} images", f"lower {option}{kept}"

        return out_of_memory_as_error(self.backend, describe)

    def train_step(self, x_batch: Any, t_batch: Any) -> Any:
        """One step on a batch already on the device: gradients, then the update. Returns the loss (0-d, on device)."""
        if self.cuda_graph:
            if self._compiled_step is None:
                self._compiled_step = self.network.compile_step(self.optimizer)
            return self._compiled_step(x_batch, t_batch)
        grads = self.network.gradient(x_batch, t_batch)
        loss = self.network.last_layer.loss
        if self.on_nan == "skip" and not math.isfinite(self.backend.to_float(loss)):
            self.history.skipped_steps += 1
            return loss
        self.optimizer.update(self.network.params, grads)
        return loss

    def _train_epoch(self) -> None:
        xp, be = self.backend.xp, self.backend
        self.rng.bit_generator.state = self._epoch_rng_state
        order = be.asarray(self.rng.permutation(self.train_size))
        next_epoch_rng_state = self.rng.bit_generator.state
        starts = list(range(0, self.train_size, self.batch_size))
        bar = self._progress_bar(len(starts))
        pending: list[Any] = []            # losses since the last log point, still on the device
        be.synchronize()
        start_time = time.perf_counter()
        epoch_loss_start = len(self.history.step_loss) - self.step_in_epoch
        first_step = self.step_in_epoch      # > 0 when resuming inside an epoch
        for step in range(first_step, len(starts)):
            start = starts[step]
            index = order[start:min(start + self.batch_size, self.train_size)]
            loss = self.train_step(xp.take(self.x_train, index, axis=0), xp.take(self.t_train, index, axis=0))
            pending.append(loss)
            self.step_in_epoch = step + 1
            if bar is not None:
                bar.update(1)
            last = step + 1 == len(starts)
            if len(pending) >= self.log_every or last or self._stop_requested:
                self._log_losses(pending, bar, start_time, step + 1 - first_step)
                pending = []
            if self._stop_requested and not last:
                self._interrupt(bar)
        be.synchronize()
        seconds = time.perf_counter() - start_time
        if bar is not None:
            bar.close()
        self._end_epoch(seconds, epoch_loss_start, len(starts) - first_step, next_epoch_rng_state)

    def _log_losses(self, pending: list[Any], bar: Any, start_time: float, steps_done: int) -> None:
        xp = self.backend.xp
        values = self.backend.to_numpy(xp.stack(pending)).astype(float)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size and self.on_nan == "stop":
            steps_per_epoch = self.steps_per_epoch
            epoch_step = self.step_in_epoch - len(values) + int(bad[0]) + 1     # 1-based, in this epoch
            raise TrainingError(
                f"loss became {values[bad[0]]} at step {self.epoch * steps_per_epoch + epoch_step} "
                f"(epoch {self.epoch + 1}, step {epoch_step} of {steps_per_epoch}); training stopped, "
                f"the last checkpoint written is kept. Try a smaller learning rate."
            )
        self.history.step_loss.extend(values.tolist())
        if bar is not None:
            elapsed = max(time.perf_counter() - start_time, 1e-9)
            finite = values[np.isfinite(values)]
            bar.set_postfix(loss=f"{finite.mean():.4f}" if finite.size else "nan",
                            img_s=f"{steps_done * self.batch_size / elapsed:.0f}", refresh=False)

    @property
    def steps_per_epoch(self) -> int:
        """Steps in one epoch (the last batch may be smaller)."""
        return -(-self.train_size // self.batch_size)

    def _end_epoch(self, seconds: float, epoch_loss_start: int, steps_run: int, next_epoch_rng_state: dict) -> None:
        eval_start = time.perf_counter()
        self._phase = "scoring"
        train_acc, test_acc = self._evaluate()
        self._phase = "training"
        eval_seconds = time.perf_counter() - eval_start
        epoch_losses = self.history.step_loss[max(epoch_loss_start, 0):]
        images = min(steps_run * self.batch_size, self.train_size)
        self.epoch += 1
        self.step_in_epoch = 0
        self._epoch_rng_state = next_epoch_rng_state
        h = self.history
        h.epoch.append(self.epoch)
        finite_losses = [v for v in epoch_losses if math.isfinite(v)]   # skipped steps (on_nan="skip") are NaN
        h.train_loss.append(float(np.mean(finite_losses)) if finite_losses else float("nan"))
        h.train_acc.append(train_acc)
        h.test_acc.append(test_acc)
        h.seconds.append(seconds)
        h.eval_seconds.append(eval_seconds)
        h.images_per_second.append(images / seconds if seconds > 0 else float("nan"))
        if self.verbose:
            self.print_fn(
                f"epoch {self.epoch}/{self.epochs}  loss {h.train_loss[-1]:.4f}  train acc {train_acc:.4f}  "
                f"test acc {test_acc:.4f}  ({seconds:.1f} s, {h.images_per_second[-1]:.0f} img/s, "
                f"eval {eval_seconds:.1f} s)"
            )
        if self.checkpoint_path is not None:
            self.save_checkpoint()
        if self.epoch_callback is not None:
            self.epoch_callback(self)

    def _evaluate(self) -> tuple[float, float]:
        def score(x: Any, t: Any) -> float:
            if self.evaluate_sample_num is not None:
                n = min(self.evaluate_sample_num, x.shape[0])
                x, t = x[:n, ...], t[:n, ...]
            return self.network.accuracy(x, t, batch_size=self.eval_batch_size)

        return score(self.x_train, self.t_train), score(self.x_test, self.t_test)

    def _progress_bar(self, total: int) -> Any:
        if not (self.verbose and self.progress):
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.epochs}",
                   unit="step", leave=False, dynamic_ncols=True, disable=None)  # None: off when not a terminal
        return bar

    # ------------------------------------------------------------------ Ctrl-C

    @contextlib.contextmanager
    def _signals_request_stop(self):
        """During training, Ctrl-C (SIGINT) or SIGTERM (``docker stop``) asks the loop to stop
        after the current step, never in the middle of an in-place update."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_requested:          # a second signal: stop right now
                raise KeyboardInterrupt
            self._stop_requested = self.signal_received = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_requested = False

    def _interrupt(self, bar: Any) -> None:
        if bar is not None:
            bar.close()
        path = self.save_checkpoint() if self.checkpoint_path is not None else None
        signum = self._stop_requested if self._stop_requested in STOP_SIGNALS else signal.SIGINT
        where = f"epoch {self.epoch + 1}, step {self.step_in_epoch} of {self.steps_per_epoch}"
        raise TrainingInterrupted(f"interrupted by {signal.Signals(signum).name} at {where}"
                                  + (f"; checkpoint saved to {path}" if path else ""),
                                  path, self.epoch, self.step_in_epoch, signum)
