"""`xpcnn train --model simple|deep|mlp`: each model's book recipe, the checkpoint records the
model and its configuration, `evaluate` rebuilds it, `--resume` refuses another model, and
options a model does not have are one-line errors."""


import numpy as np
import pytest

from xpcnn.training.checkpoint import load_checkpoint

from helpers import error_line, run_cli


def _train(tmp_path, data, out, *extra):
    return run_cli(["train", "--dataset", "mnist", "--data-dir", str(data), "--batch-size", "10", "--epochs", "1",
                    "--quiet", "--out", str(tmp_path / out), *extra], tmp_path)


def test_deep_recipe_checkpoint_evaluate_and_resume_refusal(tmp_path, cli_dataset):
    result = _train(tmp_path, cli_dataset, "deep", "--model", "deep")
    assert result.returncode == 0, result.stderr
    assert "DeepConvNet" in result.stdout and "Adam lr 0.001" in result.stdout
    ckpt = load_checkpoint(tmp_path / "deep" / "checkpoint.npz")
    assert ckpt.metadata["architecture"]["class"] == "DeepConvNet"
    assert ckpt.extra["run"]["model"] == "deep" and ckpt.extra["run"]["dropout"] == 0.5
    assert ckpt.optimizer_name == "adam" and ckpt.metadata["network_rng"]["draws"] == 8    # 4 steps x 2 Dropout layers
    assert (tmp_path / "deep" / "filters.png").exists()

    evaluated = run_cli(["evaluate", str(tmp_path / "deep" / "checkpoint.npz"), "--data-dir", str(cli_dataset)],
                        tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.startswith("test acc ")

    refused = run_cli(["train", "--resume", str(tmp_path / "deep" / "checkpoint.npz"), "--model", "mlp",
                       "--data-dir", str(cli_dataset), "--out", str(tmp_path / "deep")], tmp_path)
    assert refused.returncode == 5
    line = error_line(refused.stderr, 5)
    assert "DeepConvNet" in line and "--model mlp" in line


def test_mlp_options_are_saved_and_resumed(tmp_path, cli_dataset):
    result = _train(tmp_path, cli_dataset, "mlp", "--model", "mlp", "--batchnorm", "--dropout", "0.2",
                    "--weight-decay", "0.01", "--hidden-sizes", "20", "10", "--activation", "sigmoid",
                    "--weight-init-std", "xavier")
    assert result.returncode == 0, result.stderr
    assert "MultiLayerNetExtend" in result.stdout and "SGD lr 0.01" in result.stdout
    ckpt = load_checkpoint(tmp_path / "mlp" / "checkpoint.npz")
    assert ckpt.config["hidden_size_list"] == [20, 10] and ckpt.config["use_batchnorm"] is True
    assert ckpt.config["dropout_ratio"] == 0.2 and ckpt.config["weight_decay_lambda"] == 0.01
    assert sorted(ckpt.buffers) == ["BatchNorm1/running_mean", "BatchNorm1/running_var",
                                    "BatchNorm2/running_mean", "BatchNorm2/running_var"]
    assert not np.allclose(ckpt.buffers["BatchNorm1/running_mean"], 0)
    assert not (tmp_path / "mlp" / "filters.png").exists()      # no convolution, no filter plot
    assert (tmp_path / "mlp" / "loss.png").exists()

    resumed = run_cli(["train", "--resume", str(tmp_path / "mlp" / "checkpoint.npz"), "--epochs", "2", "--quiet",
                       "--data-dir", str(cli_dataset), "--out", str(tmp_path / "mlp")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "mlp" / "checkpoint.npz").epoch == 2

    # evaluate (and its report) rebuild a network that takes flat input
    evaluated = run_cli(["evaluate", str(tmp_path / "mlp" / "checkpoint.npz"), "--data-dir", str(cli_dataset),
                         "--report", str(tmp_path / "report")], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert (tmp_path / "report" / "report.json").exists()


@pytest.mark.parametrize("argv,code,words", [
    (["--model", "deep", "--batchnorm"], 2, ["--batchnorm", "--model mlp"]),
    (["--model", "simple", "--dropout", "0.3"], 2, ["--dropout", "--model deep/mlp"]),
    (["--model", "mlp", "--dropout", "1.0"], 2, ["[0, 1)"]),
    (["--model", "simple", "--weight-init-std", "he"], 2, ["must be a number"]),
    (["--model", "big"], 2, ["invalid choice"]),
    (["--cuda-graph"], 2, ["CUDA graphs (--cuda-graph) need --backend gpu", "got backend numpy"]),
])
def test_options_a_model_lacks_are_one_line_errors(tmp_path, cli_dataset, argv, code, words):
    result = _train(tmp_path, cli_dataset, "out", *argv)
    assert result.returncode == code, result.stderr
    line = error_line(result.stderr, code)
    assert all(word in line for word in words), line
