"""Trainer and the `xpcnn train` / `xpcnn evaluate` commands on small generated data:
history, outputs, exact resume (between epochs and inside one), and the real-digit check."""

import json
import subprocess
import sys

import numpy as np
import pytest

from xpcnn import SimpleConvNet, Trainer, TrainingInterrupted, load_checkpoint
from xpcnn.cli import main

from helpers import MNIST_DIR, REPO, make_learnable_set


def tiny_net(seed=0, backend="cpu"):
    return SimpleConvNet((1, 12, 12), {"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1}, hidden_size=16,
                         output_size=4, weight_init_std=0.1, backend=backend, seed=seed)


@pytest.fixture(scope="module")
def learnable():
    rng = np.random.default_rng(5)
    (x_train, t_train), (x_test, t_test) = make_learnable_set(rng, 600), make_learnable_set(rng, 200)
    return x_train, t_train, x_test, t_test


def make_trainer(data, epochs=2, **kw):
    kw.setdefault("verbose", False)
    return Trainer(tiny_net(), *data, epochs=epochs, mini_batch_size=30, optimizer="adagrad",
                   optimizer_param={"lr": 0.05}, seed=1, log_every=7, **kw)


def params_of(trainer):
    return {k: trainer.backend.to_numpy(v).copy() for k, v in trainer.network.params.items()}


def test_trainer_learns_and_records_history(learnable, tmp_path):
    lines = []
    trainer = make_trainer(learnable, epochs=3, verbose=True, progress=False, print_fn=lines.append)
    history = trainer.train()
    assert history.epoch == [1, 2, 3]
    assert len(history.step_loss) == 3 * 20                 # every step's loss, gathered at log points
    assert history.test_acc[-1] >= 0.99 and history.train_acc[-1] >= 0.99    # 1.0 from the first epoch here
    assert history.train_loss[-1] < history.train_loss[0]
    assert all(v > 0 for v in history.images_per_second)
    assert len(lines) == 3 and "train acc" in lines[0] and "test acc" in lines[0]
    json_path, csv_path = history.save(tmp_path)
    assert json.loads(json_path.read_text())["test_acc"] == history.test_acc
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc,test_acc") and len(rows) == 4


def test_trainer_keeps_data_on_the_device(backend, learnable):
    trainer = Trainer(tiny_net(backend=backend), *learnable, epochs=1, mini_batch_size=50, verbose=False)
    assert backend.owns(trainer.x_train) and backend.owns(trainer.t_train)
    assert trainer.x_train.dtype == backend.xp.float32
    trainer.train()
    assert len(trainer.history.test_acc) == 1


def test_flat_images_are_reshaped_to_the_network_input(learnable):
    x_train, t_train, x_test, t_test = learnable
    trainer = make_trainer((x_train.reshape(600, -1), t_train, x_test.reshape(200, -1), t_test), epochs=1)
    assert tuple(trainer.x_train.shape) == (600, 1, 12, 12)


def test_book_style_sampled_evaluation(learnable):
    trainer = make_trainer(learnable, epochs=1, evaluate_sample_num_per_epoch=50)
    trainer.train()
    assert trainer.history.test_acc[0] * 50 == pytest.approx(round(trainer.history.test_acc[0] * 50))


def test_resume_between_epochs_gives_identical_weights(learnable, tmp_path):
    straight = make_trainer(learnable, epochs=2)
    straight.train()

    first = make_trainer(learnable, epochs=1, checkpoint_path=tmp_path / "ckpt.npz")
    first.train()
    resumed = make_trainer(learnable, epochs=2)
    resumed.resume_from(load_checkpoint(tmp_path / "ckpt.npz"))
    resumed.train()
    for key, value in params_of(straight).items():
        np.testing.assert_array_equal(params_of(resumed)[key], value)
    assert resumed.history.step_loss == straight.history.step_loss
    assert resumed.history.epoch == [1, 2]


class StopAtStep(Trainer):
    """A Trainer that behaves as if Ctrl-C arrived during step `stop_at` of the run."""

    stop_at = 27

    def train_step(self, x_batch, t_batch):
        loss = super().train_step(x_batch, t_batch)
        self.steps_run = getattr(self, "steps_run", 0) + 1
        if self.steps_run == self.stop_at:
            self._stop_requested = True
        return loss


def test_resume_inside_an_epoch_gives_identical_weights(learnable, tmp_path):
    straight = make_trainer(learnable, epochs=2)
    straight.train()

    ckpt = tmp_path / "ckpt.npz"
    interrupted = StopAtStep(tiny_net(), *learnable, epochs=2, mini_batch_size=30, optimizer="adagrad",
                             optimizer_param={"lr": 0.05}, seed=1, log_every=7, verbose=False, checkpoint_path=ckpt)
    with pytest.raises(TrainingInterrupted, match="epoch 2, step 7 of 20"):
        interrupted.train()
    saved = load_checkpoint(ckpt)
    assert (saved.epoch, saved.step) == (1, 7)

    resumed = make_trainer(learnable, epochs=2)
    resumed.resume_from(saved)
    resumed.train()
    for key, value in params_of(straight).items():
        np.testing.assert_array_equal(params_of(resumed)[key], value)
    assert resumed.history.step_loss == straight.history.step_loss


# ------------------------------------------------------------------------------ CLI


def test_cli_train_writes_every_output_then_resumes_and_evaluates(fashion_like_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--dataset", "fashion-mnist", "--data-dir", str(fashion_like_dir), "--batch-size", "50", "--quiet",
              "--seed", "2"]
    assert main(["train", *common, "--epochs", "1", "--out", str(out)]) == 0
    assert main(["train", *common, "--epochs", "2", "--out", str(out), "--resume", str(out / "checkpoint.npz")]) == 0
    for name in ("checkpoint.npz", "history.json", "history.csv", "loss.png", "accuracy.png", "filters.png"):
        assert (out / name).stat().st_size > 0, name
    history = json.loads((out / "history.json").read_text())
    assert history["epoch"] == [1, 2]

    straight = tmp_path / "straight"
    assert main(["train", *common, "--epochs", "2", "--no-plots", "--out", str(straight)]) == 0
    a, b = np.load(out / "checkpoint.npz"), np.load(straight / "checkpoint.npz")
    for key in (k for k in a.files if k.startswith("param/")):
        np.testing.assert_array_equal(a[key], b[key])

    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint.npz"), "--data-dir", str(fashion_like_dir)]) == 0
    printed = capsys.readouterr().out
    assert "test acc" in printed and "on 200 images of fashion-mnist" in printed
    assert f"{history['test_acc'][-1]:.4f}" in printed


def test_scripts_train_py_runs_the_same_cli():
    script = REPO / "scripts" / "train.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--backend" in done.stdout and "--resume" in done.stdout


# ----------------------------------------------------------------- real digits (slow)


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason=f"real MNIST test set not found in {MNIST_DIR}")
def test_real_mnist_digits_seed_recipe_median_of_three_seeds():
    """The seed's recipe on real digits: train on 8,000 MNIST test images, score the other 2,000.

    5 epochs, AdaGrad lr 0.06, batch 100, weight std 0.01; seeds 1-3 (the spread between
    seeds is wide with this recipe, so the median is judged, never one seed).
    """
    from xpcnn.data import load_split

    x, t = load_split("mnist", "test", data_dir=MNIST_DIR, flatten=False)
    accuracies = []
    for seed in (1, 2, 3):
        net = SimpleConvNet(seed=seed)
        trainer = Trainer(net, x[:8000], t[:8000], x[8000:], t[8000:], epochs=5, mini_batch_size=100,
                          optimizer="adagrad", optimizer_param={"lr": 0.06}, seed=seed, verbose=False)
        accuracies.append(trainer.train().test_acc[-1])
    print(f"\nreal MNIST 8000/2000, 5 epochs, seeds 1-3: test acc {accuracies}, median {np.median(accuracies):.4f}")
    # Measured: 0.9815, 0.9775, 0.9615 (median 0.9775); a little below it, so a real regression fails.
    assert np.median(accuracies) >= 0.965, accuracies


# ------------------------------------------------------- resume safety and odd runs


def test_resume_refuses_another_batch_size_or_training_set(learnable, tmp_path):
    from xpcnn.errors import CheckpointError

    first = make_trainer(learnable, epochs=1, checkpoint_path=tmp_path / "ckpt.npz")
    first.train()
    saved = load_checkpoint(tmp_path / "ckpt.npz")
    other_batch = Trainer(tiny_net(), *learnable, epochs=2, mini_batch_size=20, verbose=False)
    with pytest.raises(CheckpointError, match="mini_batch_size 30 in the checkpoint, 20 here"):
        other_batch.resume_from(saved)
    x_train, t_train, x_test, t_test = learnable
    fewer_images = Trainer(tiny_net(), x_train[:300], t_train[:300], x_test, t_test, epochs=2, mini_batch_size=30,
                           verbose=False)
    with pytest.raises(CheckpointError, match="train_size 600 in the checkpoint, 300 here"):
        fewer_images.resume_from(saved)


def test_cli_resume_keeps_the_run_settings(fashion_like_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--dataset", "fashion-mnist", "--data-dir", str(fashion_like_dir), "--quiet", "--no-plots"]
    assert main(["train", *common, "--epochs", "1", "--batch-size", "40", "--train-size", "400",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    resume = ["train", *common, "--resume", str(out / "checkpoint.npz"), "--out", str(out), "--epochs", "2"]
    assert main([*resume, "--batch-size", "50"]) == 2
    assert "--batch-size 50 (checkpoint: 40)" in capsys.readouterr().err
    assert main(resume) == 0                                   # batch 40 and 400 images come from the checkpoint
    printed = capsys.readouterr().out
    assert "(400 train / 200 test images)" in printed and "batch 40" in printed


def test_cli_resume_restores_the_checkpoint_once(fashion_like_dir, tmp_path, monkeypatch):
    """``--resume`` puts the checkpoint's weights into the network once (by Trainer.resume_from),
    and the resumed optimizer is the checkpoint's, lr included."""
    from xpcnn.nn.network import Network

    out = tmp_path / "run"
    common = ["--dataset", "fashion-mnist", "--data-dir", str(fashion_like_dir), "--quiet", "--no-plots",
              "--train-size", "200", "--batch-size", "50"]
    assert main(["train", *common, "--epochs", "1", "--lr", "0.05", "--out", str(out)]) == 0
    restored, optimizers = [], []
    real_set_params, real_resume_from = Network.set_params, Trainer.resume_from

    def set_params(self, params):
        restored.append(type(self).__name__)
        real_set_params(self, params)

    def resume_from(self, checkpoint):
        real_resume_from(self, checkpoint)
        optimizers.append((type(self.optimizer).__name__, self.optimizer.lr))

    monkeypatch.setattr(Network, "set_params", set_params)
    monkeypatch.setattr(Trainer, "resume_from", resume_from)
    assert main(["train", *common, "--epochs", "2", "--out", str(out), "--resume", str(out / "checkpoint.npz")]) == 0
    assert restored == ["SimpleConvNet"]
    assert optimizers == [("AdaGrad", 0.05)]


def test_an_optimizer_object_takes_no_optimizer_param(learnable):
    """optimizer_param configures an optimizer given by name; with an `Optimizer` it would be
    ignored, so it is refused."""
    from xpcnn.errors import ConfigError
    from xpcnn.nn.optim import AdaGrad

    with pytest.raises(ConfigError, match=r"optimizer_param \{'lr': 0.5\} applies to an optimizer given by name, "
                                          r"but an AdaGrad \(lr 0.1\) was given"):
        Trainer(tiny_net(), *learnable, epochs=1, mini_batch_size=30, optimizer=AdaGrad(0.1),
                optimizer_param={"lr": 0.5}, verbose=False)


def test_cli_on_nan_skip_finishes_with_plots_and_strict_json(fashion_like_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--dataset", "fashion-mnist", "--data-dir", str(fashion_like_dir), "--optimizer", "sgd",
            "--lr", "1e30", "--on-nan", "skip", "--epochs", "1", "--batch-size", "50", "--quiet", "--out", str(out)]
    assert main(args) == 0
    text = (out / "history.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    history = json.loads(text)
    assert history["skipped_steps"] > 0 and None in history["step_loss"]
    assert (out / "loss.png").stat().st_size > 0


def test_history_save_creates_the_folder(learnable, tmp_path):
    trainer = make_trainer(learnable, epochs=1)
    trainer.train()
    json_path, _ = trainer.history.save(tmp_path / "new" / "folder")
    assert json.loads(json_path.read_text())["epoch"] == [1]


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seeds_are_refused(seed):
    from xpcnn.errors import ConfigError

    with pytest.raises(ConfigError, match="seed must be None or an integer >= 0"):
        SimpleConvNet(seed=seed)


def test_epoch_callback_runs_after_each_scored_epoch_and_a_late_ctrl_c_is_kept(learnable):
    # `xpcnn tune` reports each epoch's accuracy from the callback, and must learn of a Ctrl-C that
    # came while the last epoch was scored: the run ends whole, but the signal is not lost.
    import os
    import signal

    seen = []

    def callback(trainer):
        seen.append((trainer.epoch, len(trainer.history.test_acc)))
        if trainer.epoch == trainer.epochs:
            os.kill(os.getpid(), signal.SIGINT)         # caught by the Trainer's handler: no early stop

    trainer = Trainer(tiny_net(), *learnable, epochs=2, mini_batch_size=50, verbose=False, epoch_callback=callback)
    assert trainer.signal_received == 0
    trainer.train()
    assert seen == [(1, 1), (2, 2)] and trainer.epoch == 2
    assert trainer.signal_received == signal.SIGINT
