"""`xpcnn tune`: the book's hyper-parameter search (section 6.5) on Optuna, resumable and parallel.

The book splits a validation set off the training data (never the test set), draws random
``lr = 10**uniform(-6, -2)`` and ``weight_decay = 10**uniform(-8, -4)``, trains the 6 x 100
MultiLayerNet on 400 of 500 training images for 50 epochs per pair, and plots the 20 best.

    >>> from xpcnn.app.tune import tune
    >>> summary = tune("runs/tune", trials=8, epochs=2, train_size=200)
    >>> summary.best["params"], summary.best["train_command"]      # the drawn lr and weight_decay, and
    ...                                                            # the xpcnn train command for them

Optuna (the optional extra ``xpcnn[tune]``) holds the study in a storage: by default a SQLite
file in the output folder (``study.db``), else any URL Optuna's RDB storage takes, e.g.
``postgresql://user@host/db`` shared by workers on many machines. Every worker runs trials
until the study has ``trials`` finished ones (complete or pruned); a trial that fails (a worker
killed, Ctrl-C) does not count, and a new trial takes its place. A worker's trials beat a
heartbeat into the storage: a trial whose worker died is failed once its heartbeat is stale.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import math
import multiprocessing
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..backend.devices import get_backend
from ..data.datasets import load_split
from ..errors import ConfigError, MissingDependency, OutputError, StorageError, TrainingError, XpcnnError
from ..fileio import atomic_write_text
from ..models.registry import MODEL_OPTIONS, check_options, model_entry, run_defaults
from ..training.trainer import Trainer, TrainingInterrupted
from .plots import plot_tune_grid, plot_tune_scatter

OPTUNA_MISSING = "xpcnn tune needs Optuna, an optional extra: pip install 'xpcnn[tune]'"
#: The book's search (section 6.5) and its network: 6 hidden layers of 100 units.
BOOK_SEARCH = {"lr": (1e-6, 1e-2, True), "weight_decay": (1e-8, 1e-4, True)}
BOOK_HIDDEN_SIZES = [100] * 6
#: Run settings that --search may draw (a float or an integer range), and their valid values.
SEARCHABLE: dict[str, tuple[type, Callable[[float], bool], str]] = {
    "lr": (float, lambda v: v > 0, "> 0"),
    "weight_decay": (float, lambda v: v >= 0, ">= 0"),
    "dropout": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_init_std": (float, lambda v: v > 0, "> 0"),
    "batch_size": (int, lambda v: v >= 1, ">= 1"),
}
SAMPLERS = ("random", "tpe")
PRUNERS = ("none", "median")
DONE_STATES = ("COMPLETE", "PRUNED")     # trials that count towards --trials
POLL_SECONDS = 0.5


class SurplusTrial(XpcnnError):
    """Another worker started the study's last missing trial at the same moment: this one is not needed."""


@dataclass(frozen=True)
class SearchParam:
    """One searched setting: drawn from [low, high], log-uniformly when `log`."""

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def text(self) -> str:
        return f"{self.name}={self.low:g}:{self.high:g}" + (":log" if self.log else "")


def default_search(model: str) -> str:
    """The book's search, limited to the settings `model` has (simple/deep have no weight decay)."""
    recipe = model_entry(model).recipe
    return ",".join(f"{name}={low:g}:{high:g}" + (":log" if log else "")
                    for name, (low, high, log) in BOOK_SEARCH.items() if name == "lr" or name in recipe)


def parse_search(text: str, model: str) -> list[SearchParam]:
    """``"lr=1e-6:1e-2:log,dropout=0:0.5"`` -> search parameters; `ConfigError` naming what is wrong."""
    expected = "NAME=LOW:HIGH[:log] separated by commas, e.g. lr=1e-6:1e-2:log,weight_decay=1e-8:1e-4:log"
    params: list[SearchParam] = []
    for item in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"([A-Za-z_-]+)=([^:=]+):([^:=]+)(:log)?", item)
        if not match:
            raise ConfigError(f"--search: expected {expected}, got {item!r}")
        name = match.group(1).replace("-", "_")
        if name not in SEARCHABLE:
            raise ConfigError(f"--search: expected one of {sorted(SEARCHABLE)} as a name, got {name!r}")
        if name in MODEL_OPTIONS:
            check_options(model, {name: 0.0})
        kind, accept, valid = SEARCHABLE[name]
        try:
            low, high = kind(match.group(2)), kind(match.group(3))
        except ValueError:
            raise ConfigError(f"--search: {name}'s bounds must be {'integers' if kind is int else 'numbers'}, "
                              f"got {match.group(2)!r}:{match.group(3)!r}") from None
        log = match.group(4) is not None
        if not (math.isfinite(low) and math.isfinite(high) and low < high and accept(low) and accept(high)):
            raise ConfigError(f"--search: {name} expects finite bounds LOW < HIGH, both {valid}, got {low:g}:{high:g}")
        if log and low <= 0:
            raise ConfigError(f"--search: a log range needs LOW > 0, got {name}={low:g}:{high:g}:log")
        if any(p.name == name for p in params):
            raise ConfigError(f"--search: {name} is given twice")
        params.append(SearchParam(name, low, high, log, kind is int))
    return params


@dataclass
class TuneConfig:
    """Every setting of a search. `study_settings` are those that define the study (fixed once
    it is created); the others (trials, sampler, pruner, workers, ...) may change on a rerun."""

    out: str = "runs/tune"
    model: str = "mlp"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    trials: int = 100
    search: str | None = None
    sampler: str = "random"
    pruner: str = "none"
    train_size: int = 500
    validation: float = 0.2
    epochs: int = 50
    batch_size: int = 100
    seed: int = 0
    backend: str = "cpu"
    device: int | None = None
    study: str = "xpcnn-tune"
    storage: str | None = None
    jobs: int = 1
    devices: list[int] = field(default_factory=list)
    heartbeat: int = 10
    quiet: bool = False

    def search_params(self) -> list[SearchParam]:
        return parse_search(self.search or default_search(self.model), self.model)

    def fixed_run(self) -> dict[str, Any]:
        """The run settings every trial shares: the model's recipe, the book's 6 x 100 for mlp."""
        run = {**run_defaults(self.model), "dataset": self.dataset, "batch_size": self.batch_size, "seed": self.seed}
        if self.model == "mlp":
            run["hidden_sizes"] = list(BOOK_HIDDEN_SIZES)
        return run

    def study_settings(self) -> dict[str, Any]:
        return {"model": self.model, "dataset": self.dataset, "train_size": self.train_size,
                "validation": self.validation, "epochs": self.epochs, "batch_size": self.batch_size,
                "seed": self.seed, "search": ",".join(p.text() for p in self.search_params())}

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"

    def check(self) -> None:
        model_entry(self.model)
        self.search_params()
        for name, value, low in (("--trials", self.trials, 1), ("--train-size", self.train_size, 2),
                                 ("--epochs", self.epochs, 1), ("--batch-size", self.batch_size, 1),
                                 ("--jobs", self.jobs, 1), ("--heartbeat", self.heartbeat, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")
        if not 0 < self.validation < 1:
            raise ConfigError(f"--validation: expected a fraction in (0, 1), got {self.validation!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler: expected one of {SAMPLERS}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner: expected one of {PRUNERS}, got {self.pruner!r}")


@dataclass
class TuneSummary:
    """What a search left: the study's trials as rows (those of `trials.csv`), the best trial, the files."""

    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    files: list[Path]
    interrupted: bool = False


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MissingDependency(OPTUNA_MISSING) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)     # xpcnn prints its own line per trial
    # The heartbeat that fails a dead worker's trial is marked experimental; it is what we rely on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def mask_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db`` (for messages and files)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def open_storage(config: TuneConfig) -> Any:
    """Optuna's RDB storage (SQLite file or database server) with a heartbeat; `StorageError` in one line."""
    optuna = _import_optuna()
    url = config.storage_url()
    # SQLite: wait up to a minute for another worker's write lock instead of failing at once.
    connect = {"timeout": 60} if url.startswith("sqlite") else {"connect_timeout": 10} if "postgres" in url else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect},
                                          heartbeat_interval=config.heartbeat, grace_period=3 * config.heartbeat)
    except Exception as exc:       # a driver missing, a server down, a bad URL: all one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open the study storage {mask_password(url)}: {reason[:300]}") from None


def _sampler(optuna: Any, config: TuneConfig, worker: int, known_trials: int) -> Any:
    # Seeded by (seed, trials already in the study, worker): one worker's search is reproducible,
    # workers draw different points, and a resumed search does not redraw the first run's points.
    seed = int(np.random.SeedSequence([config.seed, known_trials, worker]).generate_state(1)[0])
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(optuna: Any, config: TuneConfig) -> Any:
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=config.epochs // 5)
    return optuna.pruners.NopPruner()


def create_study(config: TuneConfig, storage: Any) -> Any:
    """Create the study, or load it when it exists (a rerun resumes it); `ConfigError` if the
    existing study was made with other settings."""
    optuna = _import_optuna()
    settings = config.study_settings()
    try:
        study = optuna.create_study(study_name=config.study, storage=storage, direction="maximize",
                                    load_if_exists=True, sampler=_sampler(optuna, config, 0, 0),
                                    pruner=_pruner(optuna, config))
        saved = study.user_attrs.get("xpcnn_settings")
        if saved is None:
            study.set_user_attr("xpcnn_settings", settings)
            saved = settings
    except Exception as exc:
        raise StorageError(f"cannot create or load study {config.study!r} in {mask_password(config.storage_url())}: "
                           f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}"
                           ) from None
    differ = [f"{key} {saved.get(key)!r} (given: {value!r})" for key, value in settings.items()
              if saved.get(key) != value]
    if differ:
        raise ConfigError(f"study {config.study!r} in {mask_password(config.storage_url())} was made with other "
                          f"settings: {'; '.join(differ)}; rerun with the study's settings, or choose another "
                          f"--study or --out")
    return study


def search_data(config: TuneConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, t_train, x_val, t_val): the first `train_size` TRAINING images, shuffled with `seed`,
    the first `validation` fraction of them held out. The test split is never opened."""
    x, t = load_split(config.dataset, "train", normalize=True, flatten=False, data_dir=config.data_dir,
                      download=config.download, dtype="float32")
    if config.train_size > x.shape[0]:
        raise ConfigError(f"--train-size: expected at most the {x.shape[0]} training images of {config.dataset}, "
                          f"got {config.train_size}")
    order = np.random.default_rng(config.seed).permutation(config.train_size)
    n_val = int(round(config.validation * config.train_size))
    if not 1 <= n_val < config.train_size:
        raise ConfigError(f"--validation {config.validation} of {config.train_size} images leaves {n_val} validation "
                          f"and {config.train_size - n_val} training images: both must be at least 1")
    val, train = order[:n_val], order[n_val:]
    return x[train], t[train], x[val], t[val]


class Objective:
    """One trial: draw the searched settings, train on the search's training part, report the
    validation accuracy after every epoch (so a pruner can stop it), return the last one."""

    def __init__(self, config: TuneConfig, data: tuple, backend: Any, storage: Any = None):
        self.config, self.data, self.backend, self.storage = config, data, backend, storage
        self.stop_signal = 0           # a Ctrl-C/SIGTERM outside training (`stop_on_signals`) or in the last scoring
        self.params = config.search_params()
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _surplus(self, study: Any, trial: Any) -> bool:
        """True when `trials` trials numbered before this one are finished or running."""
        ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number
                 and t.state.name in (*DONE_STATES, "RUNNING")]
        return len(ahead) >= self.config.trials

    def __call__(self, trial: Any) -> float:
        optuna = _import_optuna()
        if self.storage is not None:
            # Optuna's heartbeat thread writes the first beat concurrently; a worker killed before it lands
            # would leave a trial that never goes stale. Beat once here, before any work.
            self.storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("device", str(self.backend))
        if self._surplus(trial.study, trial):
            trial.set_user_attr("reason", "surplus: the study already had its trials finished or running")
            raise SurplusTrial("surplus trial")
        run = self.config.fixed_run()
        for p in self.params:
            suggest = trial.suggest_int if p.integer else trial.suggest_float
            run[p.name] = suggest(p.name, p.low, p.high, log=p.log)
        x_train, t_train, x_val, t_val = self.data
        started = time.perf_counter()
        network = model_entry(run["model"]).build(run, tuple(x_train.shape[1:]), 10,
                                                  {"backend": self.backend, "dtype": run["dtype"],
                                                   "seed": run["seed"]})
        # Without a pruner the per-epoch accuracies are stored once, at the end: one storage write per trial,
        # not one per epoch. A pruner needs each epoch's value when it comes.
        prune = self.config.pruner != "none"

        def after_epoch(trainer: Trainer) -> None:
            if prune:
                trial.report(trainer.history.test_acc[-1], trainer.epoch)
                if trainer.epoch < trainer.epochs and trial.should_prune():
                    self._record(trial, trainer, started, f"pruned by the median rule after epoch {trainer.epoch}",
                                 False)
                    raise optuna.TrialPruned(f"pruned after epoch {trainer.epoch}")

        trainer = Trainer(network, x_train, t_train, x_val, t_val, epochs=self.config.epochs,
                          mini_batch_size=run["batch_size"], optimizer=run["optimizer"],
                          optimizer_param={"lr": run["lr"]}, seed=run["seed"], verbose=False, progress=False,
                          epoch_callback=after_epoch)
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                trainer.train()
        except TrainingError as exc:      # the loss became NaN/inf: a result of these settings
            self._record(trial, trainer, started, "diverged: " + str(exc).split(";")[0], not prune)
            raise optuna.TrialPruned(f"loss diverged in epoch {trainer.epoch + 1}") from None
        except (TrainingInterrupted, KeyboardInterrupt):
            self._record(trial, trainer, started, f"interrupted (Ctrl-C or SIGTERM) in epoch {trainer.epoch + 1}",
                         not prune)
            raise
        if trainer.signal_received:       # Ctrl-C while the last epoch was scored: the trial is whole, stop after it
            self.stop_signal = trainer.signal_received
        self._record(trial, trainer, started, "", not prune)
        return float(trainer.history.test_acc[-1])

    @staticmethod
    def _record(trial: Any, trainer: Trainer, started: float, reason: str, report: bool) -> None:
        if report:
            for epoch, value in enumerate(trainer.history.test_acc, 1):
                trial.report(float(value), epoch)
        trial.set_user_attr("train_acc", [float(v) for v in trainer.history.train_acc])
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
        if reason:
            trial.set_user_attr("reason", reason)


def _counts(study: Any) -> tuple[int, int]:
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return sum(s in DONE_STATES for s in states), states.count("RUNNING")


def _progress_line(study: Any, trial: Any, total: int) -> str:
    done, _ = _counts(study)
    row = trial_row(trial)
    params = "  ".join(f"{name} {value:.3g}" for name, value in trial.params.items())
    if trial.state.name == "COMPLETE":
        what = f"complete  val acc {row['val_acc']:.4f}  train acc {row['train_acc']:.4f}"
    else:
        what = f"{trial.state.name.lower()} ({row['reason'] or 'see trials.csv'})"
    return (f"[{min(done, total):>{len(str(total))}}/{total}] trial {trial.number}: {what}  {params}  "
            f"({row['seconds'] or 0:.1f} s, {row['worker']})")


def run_worker(config: TuneConfig, worker: int = 0, device: int | None = None,
               print_fn: Callable[[str], None] = print, storage: Any = None) -> None:
    """Run trials of the study until it has `config.trials` finished ones; trials run by other
    workers (here or on other machines) count. Raises on Ctrl-C after failing the running trial."""
    optuna = _import_optuna()
    storage = storage if storage is not None else open_storage(config)
    backend = get_backend(config.backend, device=device if device is not None else config.device)
    data = search_data(config)
    study = optuna.load_study(study_name=config.study, storage=storage)
    study.sampler = _sampler(optuna, config, worker, len(study.get_trials(deepcopy=False)))
    study.pruner = _pruner(optuna, config)
    objective = Objective(config, data, backend, storage)

    def report(study: Any, trial: Any) -> None:
        print_fn(_progress_line(study, trial, config.trials))

    with stop_on_signals(objective):
        _trials_until_done(optuna, config, study, objective, report)


@contextlib.contextmanager
def stop_on_signals(objective: Objective) -> Any:
    """During training the Trainer's own handler stops after the current step (the trial is then
    recorded as failed). Outside it, a Ctrl-C or SIGTERM only marks the stop, so that no storage write
    is cut in half: the worker stops before its next trial. A second signal stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        if objective.stop_signal:
            raise KeyboardInterrupt
        objective.stop_signal = signum

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fail_unborn_trials(study: Any, config: TuneConfig) -> None:
    """Fail RUNNING trials whose worker died between creating them and their first heartbeat: Optuna
    never finds those stale. A live worker names itself (the `worker` attribute) right after that
    beat; a trial still unnamed well past the grace period (plus a margin for clock skew) is dead."""
    limit = 3 * config.heartbeat + 30
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(trial_state("RUNNING"),)):
        if "worker" not in trial.user_attrs and trial.datetime_start is not None and \
                (now - trial.datetime_start).total_seconds() > limit:
            with contextlib.suppress(Exception):         # another worker may fail it first
                study._storage.set_trial_state_values(trial._trial_id, state=trial_state("FAIL"))


def trial_state(name: str) -> Any:
    return getattr(_import_optuna().trial.TrialState, name)


def _trials_until_done(optuna: Any, config: TuneConfig, study: Any, objective: Objective, report: Callable) -> None:
    while not objective.stop_signal:
        optuna.storages.fail_stale_trials(study)      # trials of workers that died: failed, so others replace them
        _fail_unborn_trials(study, config)
        done, running = _counts(study)
        if done >= config.trials:
            return
        if done + running >= config.trials:             # the last trials run elsewhere: wait for them
            time.sleep(POLL_SECONDS)
            continue
        study.optimize(objective, n_trials=1, catch=(SurplusTrial,), callbacks=[report], gc_after_trial=False)
    raise KeyboardInterrupt


def _worker_process(config: TuneConfig, worker: int, device: int | None) -> None:
    """A worker process of ``--jobs``/``--devices``: its errors are one line, its exit code the CLI's."""
    try:
        run_worker(config, worker, device, print_fn=lambda line: print(line, flush=True))
    except (TrainingInterrupted, KeyboardInterrupt):
        sys.exit(130)
    except XpcnnError as exc:
        print(f"xpcnn: error: worker {worker}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def _run_workers(config: TuneConfig, print_fn: Callable[[str], None], storage: Any) -> None:
    devices: Sequence[int | None] = config.devices or [config.device]
    jobs = max(config.jobs, len(config.devices))
    if jobs == 1:
        run_worker(config, 0, devices[0], print_fn, storage)
        return
    # Each worker gets its share of the CPU's threads (set before the children import NumPy).
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, threads)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_process, args=(config, i, devices[i % len(devices)]),
                               name=f"xpcnn-tune-{i}") for i in range(jobs)]
    for process in workers:
        process.start()
    try:
        for process in workers:
            process.join()
    except KeyboardInterrupt:
        # A Ctrl-C at a terminal reaches the workers too; a SIGINT sent to this process alone is passed on.
        for process in workers:
            process.join(timeout=5)
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in workers:                   # each fails its running trial and exits
            process.join()
        raise
    if any(process.exitcode == 130 for process in workers):
        raise KeyboardInterrupt
    failed = [f"worker {i} (exit {p.exitcode})" for i, p in enumerate(workers) if p.exitcode != 0]
    if failed:
        raise XpcnnError(f"{', '.join(failed)} stopped early (see above); rerun the same command to resume")


# --------------------------------------------------------------------------- outputs


def trial_row(trial: Any) -> dict[str, Any]:
    """One row of ``trials.csv``: number, state, reason, params, accuracies, time, worker."""
    attrs = trial.user_attrs
    val_curve = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
    train_curve = list(attrs.get("train_acc", []))
    reason = attrs.get("reason") or trial.system_attrs.get("fail_reason", "")
    if trial.state.name == "FAIL" and not reason:
        reason = "its worker stopped (killed, or its heartbeat went stale)"
    return {"number": trial.number, "state": trial.state.name, "reason": str(reason).splitlines()[0] if reason else "",
            "params": dict(trial.params), "val_acc": val_curve[-1] if val_curve else None,
            "train_acc": train_curve[-1] if train_curve else None, "val_acc_per_epoch": val_curve,
            "train_acc_per_epoch": train_curve, "seconds": attrs.get("seconds"), "worker": attrs.get("worker", ""),
            "device": attrs.get("device", "")}


def _csv_text(rows: list[dict[str, Any]], param_names: list[str]) -> str:
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["number", "state", "reason", *param_names, "val_acc", "train_acc", "epochs", "seconds",
                     "worker", "device", "val_acc_per_epoch", "train_acc_per_epoch"])
    for row in rows:
        writer.writerow([row["number"], row["state"], row["reason"], *(row["params"].get(n, "") for n in param_names),
                         "" if row["val_acc"] is None else f"{row['val_acc']:.4f}",
                         "" if row["train_acc"] is None else f"{row['train_acc']:.4f}",
                         len(row["val_acc_per_epoch"]), "" if row["seconds"] is None else row["seconds"],
                         row["worker"], row["device"], " ".join(f"{v:.4f}" for v in row["val_acc_per_epoch"]),
                         " ".join(f"{v:.4f}" for v in row["train_acc_per_epoch"])])
    return table.getvalue()


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished trials, best first: complete ones by final validation accuracy, then pruned ones."""
    finished = [r for r in rows if r["state"] in DONE_STATES and r["val_acc"] is not None]
    return sorted(finished, key=lambda r: (r["state"] == "COMPLETE", r["val_acc"], -r["number"]), reverse=True)


def train_command(config: TuneConfig, params: dict[str, Any]) -> list[str]:
    """The ``xpcnn train`` command that trains the best settings on the full training set."""
    run = {**config.fixed_run(), **params}
    argv = ["xpcnn", "train", "--model", config.model, "--dataset", config.dataset, "--epochs", str(config.epochs),
            "--batch-size", str(run["batch_size"]), "--optimizer", run["optimizer"], "--lr", repr(run["lr"]),
            "--seed", str(config.seed)]
    for key in MODEL_OPTIONS:
        if key not in run or key not in model_entry(config.model).recipe:
            continue
        option, value = "--" + key.replace("_", "-"), run[key]
        if key == "batchnorm":
            argv += [option] if value else []
        elif key == "hidden_sizes":
            argv += [option, *(str(v) for v in value)]
        else:
            argv += [option, repr(value) if isinstance(value, float) else str(value)]
    if config.data_dir:
        argv += ["--data-dir", str(config.data_dir)]
    return [*argv, "--out", str(Path(config.out) / "best-run")]


def write_outputs(config: TuneConfig, study: Any) -> TuneSummary:
    """``trials.csv``, ``best.json``, ``tune.png`` (the book's grid) and ``tune_scatter.png``, written atomically."""
    out = Path(config.out)
    rows = [trial_row(t) for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]
    param_names = [p.name for p in config.search_params()]
    files = []
    try:
        atomic_write_text(out / "trials.csv", _csv_text(rows, param_names))
        files.append(out / "trials.csv")
        best_rows = ranked(rows)
        best = None
        if best_rows and best_rows[0]["state"] == "COMPLETE":
            top = best_rows[0]
            argv = train_command(config, top["params"])
            best = {"study": config.study, "storage": mask_password(config.storage_url()), "trial": top["number"],
                    "params": top["params"], "val_acc": top["val_acc"], "train_acc": top["train_acc"],
                    "settings": config.study_settings(), "train_command": shlex.join(argv), "train_argv": argv}
            atomic_write_text(out / "best.json", json.dumps(best, indent=1) + "\n")
            files.append(out / "best.json")
        if best_rows:
            files.append(plot_tune_grid(best_rows[:20], out / "tune.png"))
            files.append(plot_tune_scatter(rows, param_names, out / "tune_scatter.png"))
    except OSError as exc:
        raise OutputError(f"cannot write the search's results to {out}: {exc.strerror or exc}") from exc
    return TuneSummary(rows, best, files)


def best_table(rows: list[dict[str, Any]], param_names: list[str], count: int = 5) -> str:
    """The best `count` finished trials as a text table."""
    best = ranked(rows)[:count]
    lines = [f"best {len(best)} of {len(ranked(rows))} finished trials (validation accuracy, last epoch):",
             "rank  trial  state     val acc  train acc  " + "  ".join(f"{n:>12}" for n in param_names)]
    for rank, row in enumerate(best, 1):
        lines.append(f"{rank:>4}  {row['number']:>5}  {row['state'].lower():<8}  {row['val_acc']:.4f}   "
                     f"{row['train_acc'] if row['train_acc'] is not None else float('nan'):.4f}     "
                     + "  ".join(f"{row['params'].get(n, float('nan')):>12.4g}" for n in param_names))
    return "\n".join(lines)


def run_tune(config: TuneConfig, print_fn: Callable[[str], None] = print) -> TuneSummary:
    """The whole search: create or resume the study, run the workers, write the outputs.
    A Ctrl-C writes the outputs of what finished, then raises `KeyboardInterrupt`."""
    _import_optuna()
    config.check()
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write to --out {config.out!r}: {exc.strerror or exc}; choose a writable folder")
    storage = open_storage(config)
    study = create_study(config, storage)
    done, running = _counts(study)
    workers = max(config.jobs, len(config.devices))
    print_fn(f"xpcnn tune: study {config.study!r} in {mask_password(config.storage_url())}: "
             f"{config.model} on {config.dataset} ({config.train_size} training images, "
             f"{config.validation:.0%} for validation), {config.epochs} epochs per trial, search "
             f"{config.study_settings()['search']}, sampler {config.sampler}, pruner {config.pruner}; "
             f"{done} of {config.trials} trials done, {workers} worker{'s' if workers > 1 else ''} here")
    started = time.perf_counter()
    interrupted = False
    try:
        _run_workers(config, print_fn, storage)
    except (KeyboardInterrupt, TrainingInterrupted):
        interrupted = True
    summary = write_outputs(config, study)
    summary.interrupted = interrupted
    if summary.rows:
        print_fn(best_table(summary.rows, [p.name for p in config.search_params()]))
    finished = sum(r["state"] in DONE_STATES for r in summary.rows)
    print_fn(f"{'interrupted' if interrupted else 'done'} after {time.perf_counter() - started:.1f} s: "
             f"{finished} of {config.trials} trials finished; outputs in {out}/ "
             f"({', '.join(p.name for p in summary.files)})")
    if summary.best:
        print_fn(f"best: trial {summary.best['trial']}, val acc {summary.best['val_acc']:.4f}; "
                 f"train it on the full set with: {summary.best['train_command']}")
    if interrupted:
        raise KeyboardInterrupt
    return summary


def tune(out: str = "runs/tune", **settings: Any) -> TuneSummary:
    """Library use of ``xpcnn tune``: ``tune("runs/tune", trials=20, epochs=10)``; settings as in `TuneConfig`."""
    unknown = sorted(set(settings) - set(asdict(TuneConfig())))
    if unknown:
        raise ConfigError(f"tune: expected settings among {sorted(asdict(TuneConfig()))}, got {unknown}")
    return run_tune(TuneConfig(out=str(out), **settings))
