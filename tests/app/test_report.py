"""`xpcnn evaluate --report` and `xpcnn.report`: the report's figures are the evaluation's
figures (checked on real Fashion-MNIST against an independent count), every file is written,
and the report works for any network of the book's protocol."""

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from xpcnn import SimpleConvNet, Trainer, save_checkpoint
from xpcnn.app.report import EvaluationReport, evaluate_report, first_convolution, first_layer_maps, write_report
from xpcnn.backend import get_backend
from xpcnn.cli import main
from xpcnn.errors import ConfigError
from xpcnn.nn.layers import Affine, Convolution, ReLU

from helpers import make_learnable_set
from trained import FASHION_DIR, fashion_test_set, trained_checkpoint

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
REPORT_FILES = ["confusion.csv", "confusion.png", "per_class.csv", "mistakes.png", "activations.png", "report.json"]


# ------------------------------------------------------------- real data, through the CLI


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory):
    """``xpcnn evaluate`` and ``xpcnn evaluate --report`` of the shared trained checkpoint."""
    import contextlib
    import io

    checkpoint = trained_checkpoint(tmp_path_factory)
    out = tmp_path_factory.mktemp("report")
    printed = {}
    for key, extra in (("plain", []), ("report", ["--report", str(out)])):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["evaluate", str(checkpoint), "--data-dir", str(FASHION_DIR), *extra]) == 0
        printed[key] = buffer.getvalue()
    return checkpoint, out, printed


@pytest.fixture(scope="module")
def in_memory(cli_report):
    """The trained network, the test set, and its probabilities computed in memory (batch 2000)."""
    from xpcnn.training.checkpoint import build_from_checkpoint, load_checkpoint

    net = build_from_checkpoint(load_checkpoint(cli_report[0]))
    x, t = fashion_test_set()
    return net, x, t, net.predict_proba(x, batch_size=2000)


def test_report_figures_are_the_evaluation_figures(cli_report, in_memory):
    _, out, printed = cli_report
    net, x, t, proba = in_memory
    data = json.loads((out / "report.json").read_text())
    shown = re.search(r"test acc (\d\.\d{4}) on (\d+) images of fashion-mnist", printed["plain"])
    assert shown and shown.group(2) == "10000"
    assert f"{data['accuracy']:.4f}" == shown.group(1)                  # what `xpcnn evaluate` prints
    assert data["accuracy"] == net.accuracy(x, t, batch_size=500)       # exactly, not just to 4 digits

    confusion = np.array(data["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 10000 == data["images"] == t.shape[0]
    assert np.trace(confusion) / 10000 == data["accuracy"]
    assert confusion.sum(axis=1).tolist() == np.bincount(t, minlength=10).tolist()

    # An independent count: the in-memory predictions (other batches, softmax), tallied by a loop.
    predicted = np.argmax(proba, axis=1)
    tally = np.zeros((10, 10), dtype=int)
    for true, guess in zip(t, predicted):
        tally[true, guess] += 1
    np.testing.assert_array_equal(confusion, tally)

    assert data["classes"] == FASHION_NAMES and data["dataset"] == "fashion-mnist" and data["split"] == "test"
    for k, row in enumerate(data["per_class"]):
        assert row["label"] == FASHION_NAMES[k] and row["support"] == confusion[k].sum()
        assert row["recall"] == pytest.approx(confusion[k, k] / confusion[k].sum())
        assert row["precision"] == pytest.approx(confusion[k, k] / confusion[:, k].sum())


def test_report_files_agree_with_report_json(cli_report):
    _, out, printed = cli_report
    data = json.loads((out / "report.json").read_text())
    assert data["files"] == REPORT_FILES
    with open(out / "confusion.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["true \\ predicted", *FASHION_NAMES]
    assert [row[0] for row in rows[1:]] == FASHION_NAMES
    assert [[int(v) for v in row[1:]] for row in rows[1:]] == data["confusion"]
    with open(out / "per_class.csv", newline="") as fh:
        per_class = list(csv.DictReader(fh))
    assert len(per_class) == 11
    for row, expected in zip(per_class, data["per_class"]):
        assert (int(row["class"]), row["label"], int(row["support"])) == (expected["class"], expected["label"],
                                                                          expected["support"])
        assert float(row["precision"]) == pytest.approx(expected["precision"], abs=1e-6)
        assert float(row["recall"]) == pytest.approx(expected["recall"], abs=1e-6)
    assert per_class[-1]["label"] == "overall accuracy" and float(per_class[-1]["recall"]) == pytest.approx(
        data["accuracy"], abs=1e-6)

    table = printed["report"].splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("class"))
    assert table[header].split() == ["class", "precision", "recall", "support"]
    for k, line in enumerate(table[header + 1:header + 11]):
        assert line.startswith(f"{k} {FASHION_NAMES[k]}") and line.split()[-1] == str(data["per_class"][k]["support"])
        assert f"{data['per_class'][k]['recall']:.4f}" in line
    assert table[header + 11].split() == ["accuracy", f"{data['accuracy']:.4f}", "10000"]

    for name in ("confusion.png", "mistakes.png", "activations.png"):
        with Image.open(out / name) as picture:
            picture.verify()
            assert picture.format == "PNG" and min(picture.size) > 200, (name, picture.size)


def test_mistakes_are_the_most_confident_wrong_predictions(cli_report, in_memory):
    _, out, _ = cli_report
    _, _, t, proba = in_memory
    data = json.loads((out / "report.json").read_text())
    mistakes = data["mistakes"]
    assert len(mistakes) == 24
    assert all(m["true"] != m["predicted"] and m["true_label"] == FASHION_NAMES[m["true"]] for m in mistakes)
    assert all(a["prob"] >= b["prob"] for a, b in zip(mistakes, mistakes[1:]))
    wrong = proba.argmax(axis=1) != t
    most_confident = np.sort(proba.max(axis=1)[wrong])[::-1][:24]
    np.testing.assert_allclose([m["prob"] for m in mistakes], most_confident, rtol=1e-5)
    for m in mistakes:
        assert proba[m["index"]].argmax() == m["predicted"] and t[m["index"]] == m["true"]
    assert data["activations"] == {"index": 0, "layer": "Conv1", "feature_maps": 30, "map_size": [24, 24]}


# --------------------------------------------------------------------- CLI errors


def test_report_errors_are_one_line(tmp_path, capsys):
    small = tmp_path / "small.npz"
    save_checkpoint(small, SimpleConvNet((1, 12, 12), seed=0), extra={"dataset": "fashion-mnist"})
    (tmp_path / "file.txt").write_text("x")
    cases = [
        ([str(small), "--report", str(tmp_path / "r")], 5,
         "the checkpoint's network takes (1, 12, 12) images, but the fashion-mnist test images are (1, 28, 28)"),
        ([str(small), "--report", str(tmp_path / "file.txt" / "r")], 7, "cannot write to --report"),
    ]
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
        cases = cases[1:]
    for args, code, message in cases:
        assert main(["evaluate", *args, "--data-dir", str(FASHION_DIR)]) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("xpcnn: error: ") and message in err, err


# ------------------------------------------------------------------ the library, small


@pytest.fixture(scope="module")
def small_trained():
    rng = np.random.default_rng(3)
    (x, t), (x_test, t_test) = make_learnable_set(rng, 400), make_learnable_set(rng, 120)
    net = SimpleConvNet((1, 12, 12), {"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1}, hidden_size=16,
                        output_size=4, weight_init_std=0.1, seed=0)
    Trainer(net, x, t, x_test, t_test, epochs=2, mini_batch_size=40, optimizer="adagrad",
            optimizer_param={"lr": 0.05}, verbose=False).train()
    return net, x_test, t_test


def test_library_report_on_every_backend(backend, small_trained, tmp_path):
    trained, x, t = small_trained
    net = SimpleConvNet((1, 12, 12), {"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1}, hidden_size=16,
                        output_size=4, backend=backend)
    net.set_params(trained.params)
    x_dev, t_dev = backend.asarray(x, dtype="float32"), backend.asarray(t)
    report = evaluate_report(net, x_dev, t_dev, class_names=["NW", "NE", "SW", "SE"], batch_size=7)
    assert report.accuracy == net.accuracy(x_dev, t_dev, batch_size=7) == trained.accuracy(x, t)
    assert report.confusion.sum() == 120
    files = write_report(report, tmp_path / "r", net, x_dev, mistakes=6, activation_index=3)
    assert files == REPORT_FILES
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["activations"]["index"] == 3 and data["activations"]["feature_maps"] == 4
    assert len(data["mistakes"]) == min(6, int(np.count_nonzero(report.predicted != report.labels)))


def test_undefined_precision_and_recall_are_shown_as_such(tmp_path):
    report = EvaluationReport(["a", "b", "c"], np.array([0, 0, 1]), np.array([0, 0, 0]), np.array([0.9, 0.8, 0.7]))
    stats = report.per_class()
    assert (np.isnan(stats["precision"][1]) and np.isnan(stats["recall"][2])
            and stats["precision"][0] == pytest.approx(2 / 3))
    lines = report.format_table().splitlines()
    assert lines[2].split() == ["1", "b", "-", "0.0000", "1"] and lines[3].split() == ["2", "c", "-", "-", "0"]
    data = report.to_dict()
    assert data["per_class"][1]["precision"] is None and data["per_class"][2]["recall"] is None
    assert [m["index"] for m in data["mistakes"]] == [2]


class _Doubling:
    """A layer taking a train flag (like Dropout): doubles its input in training only."""

    def forward(self, x, train_flg=True):
        return x * 2 if train_flg else x


class _ProtocolNet:
    """Only what the report relies on: predict, backend, config, layers (a list here)."""

    def __init__(self, layers, output_size):
        self.backend = get_backend("cpu")
        self.layers = layers
        self.config = {"input_dim": [1, 6, 6], "output_size": output_size}

    def predict(self, x, train_flg=False):
        for layer in self.layers:
            x = layer.forward(x, train_flg) if isinstance(layer, _Doubling) else layer.forward(x)
        return x


def test_first_convolution_is_found_in_any_network(rng, tmp_path):
    weights = rng.standard_normal((2, 1, 3, 3)).astype(np.float32)
    conv = Convolution(weights, np.zeros(2, np.float32))
    net = _ProtocolNet([_Doubling(), conv, ReLU(), Affine(rng.standard_normal((32, 3)).astype(np.float32),
                                                          np.zeros(3, np.float32))], 3)
    name, earlier, layer = first_convolution(net)
    assert layer is conv and name == "Convolution1" and len(earlier) == 1
    image = rng.random((1, 6, 6), dtype=np.float32)
    layer_name, maps = first_layer_maps(net, image)
    np.testing.assert_allclose(maps, Convolution(weights, np.zeros(2, np.float32)).forward(image[None])[0], rtol=1e-6)

    no_conv = _ProtocolNet([Affine(rng.standard_normal((36, 3)).astype(np.float32), np.zeros(3, np.float32))], 3)
    assert first_convolution(no_conv) is None
    x, t = rng.random((9, 1, 6, 6), dtype=np.float32), rng.integers(0, 3, 9)
    report = evaluate_report(no_conv, x, t)
    files = write_report(report, tmp_path, no_conv, x)
    assert "activations.png" not in files and not (tmp_path / "activations.png").exists()
    assert "no convolution" in json.loads((tmp_path / "report.json").read_text())["activations"]["skipped"]


def test_report_refuses_bad_labels_and_names(small_trained):
    from xpcnn.errors import ShapeError

    net, x, t = small_trained
    with pytest.raises(ConfigError, match="3 class names given for a network of 4 classes"):
        evaluate_report(net, x, t, class_names=["a", "b", "c"])
    with pytest.raises(ShapeError, match="class indices must lie in 0..3"):
        evaluate_report(net, x, t + 4)
    with pytest.raises(ShapeError, match="expected 120 labels"):
        evaluate_report(net, x, t[:5])
