"""`xpcnn predict`, `net.predict_proba` and `xpcnn.images`: preprocessing checked pixel by pixel,
every bad input as one clear line (a table), and the proof on real Fashion-MNIST that pictures
a person would make give the model's in-memory predictions."""

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import zlib

import numpy as np
import pytest
from PIL import Image

from xpcnn import SimpleConvNet, Trainer, save_checkpoint
from xpcnn.cli import main
from xpcnn.data import write_idx
from xpcnn.data.images import border_is_light, fit_into, frame, load_images, prepare_image, read_input_file
from xpcnn.errors import ImageFileError
from xpcnn.nn.inference import predict_proba, top_k
from xpcnn.ops import softmax

from helpers import MNIST_DIR, isolated_env
from trained import fashion_test_set, trained_checkpoint


def _tiny_net(backend="cpu", seed=0, size=12):
    return SimpleConvNet((1, size, size), {"filter_num": 4, "filter_size": 3, "pad": 1, "stride": 1}, hidden_size=16,
                         output_size=5, weight_init_std=0.3, backend=backend, seed=seed)


# ------------------------------------------------------------------- predict_proba


def test_predict_proba_is_the_softmax_of_predict_in_batches(backend, rng):
    net = _tiny_net(backend)
    x = rng.random((23, 1, 12, 12), dtype=np.float32)
    proba = backend.to_numpy(net.predict_proba(x, batch_size=5))          # host input, 5 batches
    expected = backend.to_numpy(softmax(net.predict(backend.asarray(x, dtype="float32"))))
    assert proba.shape == (23, 5) and proba.dtype == np.float32
    np.testing.assert_allclose(proba, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    whole = backend.to_numpy(predict_proba(net, backend.asarray(x, dtype="float32"), batch_size=100))
    np.testing.assert_allclose(whole, proba, rtol=1e-5, atol=1e-7)


def test_predict_proba_refuses_no_images_and_bad_batch_size():
    from xpcnn.errors import ConfigError, ShapeError

    net = _tiny_net()
    with pytest.raises(ShapeError, match="no images"):
        net.predict_proba(np.zeros((0, 1, 12, 12), np.float32))
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        net.predict_proba(np.zeros((2, 1, 12, 12), np.float32), batch_size=0)


def test_top_k_orders_by_probability_then_class():
    proba = np.array([[0.1, 0.5, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]])
    classes, probs = top_k(proba, 3)
    assert classes.tolist() == [[1, 2, 3], [0, 1, 2]]
    np.testing.assert_array_equal(probs, [[0.5, 0.2, 0.2], [0.25, 0.25, 0.25]])
    assert top_k(proba, 10)[0].shape == (2, 4)


# ------------------------------------------------------------------ preprocessing


def test_a_dataset_image_saved_as_png_reads_back_exactly(tmp_path, rng):
    pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    pixels[0, :] = pixels[-1, :] = pixels[:, 0] = pixels[:, -1] = 0       # dark border, as the data
    Image.fromarray(pixels).save(tmp_path / "x.png")
    item = read_input_file(tmp_path / "x.png")
    expected = pixels.astype(np.float32)
    expected /= np.float32(255)                                            # how xpcnn.data scales
    assert item.kind == "image" and not item.inverted and item.source_size == (28, 28)
    np.testing.assert_array_equal(item.images[0], expected)


def test_dark_on_light_enlarged_picture_comes_back_to_the_dataset_image(tmp_path, rng):
    pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    pixels[:3, :] = pixels[-3:, :] = pixels[:, :3] = pixels[:, -3:] = 0
    big = Image.fromarray(255 - pixels).resize((280, 280), Image.Resampling.NEAREST)
    big.save(tmp_path / "big.png")
    item = read_input_file(tmp_path / "big.png", fit="whole")
    assert item.inverted and item.source_size == (280, 280)
    np.testing.assert_allclose(item.images[0], pixels / np.float32(255), atol=1e-6)
    kept = read_input_file(tmp_path / "big.png", invert="no", fit="whole")
    assert not kept.inverted and kept.images[0].mean() > 0.5


def test_fit_keeps_the_aspect_ratio_and_centres(tmp_path):
    tall = np.zeros((56, 28), np.float32)
    tall[:, 10:18] = 1.0                    # a bar 8 wide, full height
    out = fit_into(tall, (28, 28))          # -> 28 x 14 content, centred: columns 7..20
    assert out.shape == (28, 28)
    columns = np.flatnonzero(out.max(axis=0) > 0)
    assert columns.min() == 7 + 5 and columns.max() == 7 + 8        # bar columns 10..17 halved: 5..8
    assert out[:, :7].max() == 0 and out[:, 21:].max() == 0
    wide = np.ones((10, 40), np.float32)
    fitted = fit_into(wide, (28, 28))       # -> 7 x 28, rows 10..16
    assert np.flatnonzero(fitted.max(axis=1) > 0).tolist() == list(range(10, 17))
    small = np.ones((7, 7), np.float32)
    assert fit_into(small, (28, 28)).min() == pytest.approx(1.0)     # enlarged to fill


def test_framing_follows_each_dataset_recipe():
    picture = np.zeros((200, 300), np.float32)
    picture[50:130, 100:140] = 0.3                       # an item 80 tall, 40 wide, off-centre
    picture[50:70, 100:140] = 1.0                        # heavier near its top
    filled = frame(picture, (28, 28), "fill")            # Fashion-MNIST: trimmed, 28 tall, 14 wide, centred
    rows, cols = np.flatnonzero(filled.max(axis=1) > 0), np.flatnonzero(filled.max(axis=0) > 0)
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (0, 27, 7, 20)
    digit = frame(picture, (28, 28), "digit")            # MNIST: 20 tall in a 20x20 box, centred by mass
    rows, cols = np.flatnonzero(digit.max(axis=1) > 0), np.flatnonzero(digit.max(axis=0) > 0)
    assert rows[-1] - rows[0] + 1 == 20 and cols[-1] - cols[0] + 1 == 10
    grid_rows, grid_cols = np.indices(digit.shape)
    centre = ((grid_rows * digit).sum() / digit.sum(), (grid_cols * digit).sum() / digit.sum())
    assert abs(centre[0] - 13.5) <= 0.5 and abs(centre[1] - 13.5) <= 0.5
    assert rows[0] == 7                                  # moved down 3: its mass sits high in the item
    whole = frame(picture, (28, 28), "whole")            # margins kept: the item stays small
    assert np.count_nonzero(whole.max(axis=1) > 0) < 14
    on_grey = picture * np.float32(0.7) + np.float32(0.2)          # photographed paper is never pure white
    for fit in ("fill", "digit", "whole"):
        framed = frame(on_grey, (28, 28), fit)
        assert framed[0, 0] == framed[-1, -1] == 0 and framed.max() > 0.5, fit
    np.testing.assert_allclose(frame(on_grey, (28, 28), "fill"), filled * np.float32(0.7), atol=1e-6)
    exact = np.random.default_rng(0).random((28, 28), dtype=np.float32)
    for fit in ("fill", "digit", "whole"):
        assert frame(exact, (28, 28), fit) is exact      # already the model's size: as it is
        assert frame(np.zeros((50, 50), np.float32), (28, 28), fit).max() == 0     # blank stays blank
    with pytest.raises(ImageFileError, match="fit must be one of"):
        frame(picture, (28, 28), "stretch")


def test_cli_frames_pictures_like_the_checkpoints_dataset():
    from xpcnn.app.cli import _picture_fit

    assert _picture_fit("mnist") == "digit" and _picture_fit("fashion-mnist") == "fill"
    assert _picture_fit(None) == "fill" and _picture_fit("my-own") == "fill"


def test_border_decides_inversion():
    dark = np.zeros((28, 28))
    dark[5:20, 5:20] = 1
    assert not border_is_light(dark) and border_is_light(1 - dark)
    touching = dark.copy()
    touching[:, 0] = 1          # an item touching one side: still dark
    assert not border_is_light(touching)
    with pytest.raises(ImageFileError, match="invert must be one of"):
        prepare_image(dark, invert="maybe")


def test_transparent_paper_counts_as_white_and_modes_are_read(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 18:22] = (0, 0, 0, 255)                   # a black stroke on transparent paper
    Image.fromarray(rgba, "RGBA").save(tmp_path / "stroke.png")
    item = read_input_file(tmp_path / "stroke.png", fit="whole")
    assert item.inverted and item.images[0].max() > 0.9 and item.images[0][:3].max() == 0
    # 16-bit grayscale, palette GIF, BMP and a colour JPEG give the same light-on-dark square
    square = np.zeros((28, 28), np.uint8)
    square[8:20, 8:20] = 255
    Image.fromarray(square.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(square).convert("P").save(tmp_path / "pal.gif")
    Image.fromarray(square).save(tmp_path / "plain.bmp")
    Image.fromarray(np.stack([square] * 3, axis=-1)).save(tmp_path / "colour.jpg", quality=95)
    for name, tolerance in (("deep.png", 0), ("pal.gif", 0), ("plain.bmp", 0), ("colour.jpg", 0.08)):
        got = read_input_file(tmp_path / name).images[0]
        np.testing.assert_allclose(got, square / 255.0, atol=tolerance + 1e-6, err_msg=name)


def test_phone_photo_rotation_is_applied(tmp_path):
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, :10] = 255          # bright left quarter
    picture = Image.fromarray(pixels)
    exif = picture.getexif()
    exif[0x0112] = 6                                                     # "rotate 90 CW to view"
    picture.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    item = read_input_file(tmp_path / "photo.jpg", invert="no", fit="whole")
    assert item.source_size == (40, 20)                                  # viewed upright: 20 wide, 40 tall
    rows = item.images[0].max(axis=1)
    assert rows[:10].max() > 0.9 and rows[-8:].max() < 0.1               # the bright part is now at the top


def test_arrays_are_taken_as_they_are(tmp_path, rng):
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", images)
    np.save(tmp_path / "flat.npy", images.reshape(4, 784).astype(np.float64) / 255)
    np.save(tmp_path / "nchw.npy", (images[:, None] / 255).astype(np.float32))
    np.save(tmp_path / "one.npy", images[0])
    write_idx(tmp_path / "imgs-idx3-ubyte.gz", images)
    expected = images.astype(np.float32) / np.float32(255)
    for name, count in (("u8.npy", 4), ("flat.npy", 4), ("nchw.npy", 4), ("one.npy", 1), ("imgs-idx3-ubyte.gz", 4)):
        item = read_input_file(tmp_path / name)
        assert not item.inverted and item.images.shape == (count, 28, 28), name
        np.testing.assert_allclose(item.images, expected[:count], atol=1e-6, err_msg=name)
    assert read_input_file(tmp_path / "u8.npy", invert="yes").inverted
    x = load_images([tmp_path / "u8.npy", tmp_path / "one.npy"], dtype="float64")
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float64


def test_load_images_refuses_colour_models_and_no_files(tmp_path):
    with pytest.raises(ImageFileError, match="1 channel"):
        load_images(["x.png"], input_dim=(3, 28, 28))
    with pytest.raises(ImageFileError, match="no files given"):
        load_images([])


# ------------------------------------------------------------------ bad input table


def _png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _encoded(fmt, size=(100, 100), **kw):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)).save(buffer, fmt, **kw)
    return buffer.getvalue()


def _jpeg_declaring(width, height):
    data = bytearray(_encoded("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _write(name, payload):
    def make(tmp_path):
        path = tmp_path / name
        if isinstance(payload, np.ndarray):
            np.save(path, payload, allow_pickle=True)
        elif payload is not None:
            path.write_bytes(payload)
        return path
    return make


def _make_dir(tmp_path):
    (tmp_path / "folder").mkdir()
    return tmp_path / "folder"


def _labels_idx(tmp_path):
    write_idx(tmp_path / "labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    return tmp_path / "labels-idx1-ubyte"


BAD_FILES = [  # (id, make(tmp_path) -> path, checkpoint, the line must say)
    ("missing", _write("gone.png", None), "net28", "gone.png: no such file"),
    ("directory", _make_dir, "net28", "folder: is a directory; expected a picture, .npy or IDX file"),
    ("empty", _write("empty.png", b""), "net28", "empty.png: the file is empty"),
    ("not an image", _write("notes.png", b"hello, I am text\n" * 4), "net28",
     "notes.png: not a picture Pillow can read"),
    ("truncated png", _write("cut.png", _encoded("PNG")[:3000]), "net28",
     "cut.png: cannot decode the picture (truncated or corrupted?)"),
    ("truncated jpeg", _write("cut.jpg", _encoded("JPEG")[:1500]), "net28",
     "cut.jpg: cannot decode the picture (truncated or corrupted?)"),
    ("zero width", _write("flat.png", _png_header(0, 28)), "net28",
     "flat.png: the picture is 0 x 28 pixels (width x height): nothing to classify"),
    ("20000x20000 bomb", _write("bomb.png", _png_header(20000, 20000)), "net28",
     "bomb.png: the picture is 20000 x 20000 pixels (400 megapixels), over the limit of 50 megapixels; "
     "refusing to decode"),
    ("60 MP jpeg", _write("huge.jpg", _jpeg_declaring(10000, 6000)), "net28",
     "huge.jpg: the picture is 10000 x 6000 pixels (60 megapixels), over the limit of 50 megapixels"),
    ("npy wrong shape", _write("shape.npy", np.zeros((3, 28, 27), np.uint8)), "net28",
     "shape.npy: holds 28x27 images, but the model takes 28x28"),
    ("npy 5-d", _write("rank.npy", np.zeros((1, 1, 1, 28, 28), np.uint8)), "net28",
     "rank.npy: expected an array of images (H, W), (N, H, W)"),
    ("npy int64", _write("ints.npy", np.zeros((2, 28, 28), np.int64)), "net28",
     "ints.npy: expected uint8 (0..255) or float (0..1) pixels, got dtype int64"),
    ("npy 0..255 floats", _write("scale.npy", np.full((2, 28, 28), 200.0)), "net28",
     "scale.npy: float pixels must lie in [0, 1]"),
    ("npy NaN", _write("nan.npy", np.full((1, 28, 28), np.nan, np.float32)), "net28",
     "nan.npy: holds NaN or infinite values"),
    ("npy pickled objects", _write("objects.npy", np.array([{"a": 1}], dtype=object)), "net28",
     "objects.npy: not a readable .npy array"),
    ("npy truncated", _write("short.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '|u1', 'fortran_order': False, "
                                          b"'shape': (9, 28, 28), }" + b" " * 50 + b"\n" + b"\x00" * 100),
     "net28", "short.npy: not a readable .npy array"),
    ("idx of labels", _labels_idx, "net28", "labels-idx1-ubyte: expected an array of images"),
    ("idx truncated", _write("cut-idx3-ubyte", b"\x00\x00\x08\x03" + struct.pack(">III", 5, 28, 28) + b"\x00" * 100),
     "net28", "cut-idx3-ubyte: expected 3920 bytes of image data for 5x28x28 uint8"),
    ("gzip corrupted", _write("bad.gz", b"\x1f\x8b\x08\x00" + b"\xff" * 40), "net28", "bad.gz: corrupted gzip data"),
    ("checkpoint of another input size", _write("digits.npy", np.zeros((2, 28, 28), np.uint8)), "net12",
     "digits.npy: holds 28x28 images, but the model takes 12x12"),
]


@pytest.fixture(scope="module")
def untrained_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("untrained")
    paths = {}
    for name, size in (("net28", 28), ("net12", 12)):
        paths[name] = folder / f"{name}.npz"
        save_checkpoint(paths[name], SimpleConvNet((1, size, size), seed=0), extra={"dataset": "fashion-mnist"})
    return paths


@pytest.fixture(scope="module")
def good_pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    square = np.zeros((28, 28), np.uint8)
    square[6:22, 9:19] = 220
    Image.fromarray(square).save(folder / "good1.png")
    Image.fromarray(255 - square).resize((90, 90)).save(folder / "good2.jpg")
    return folder / "good1.png", folder / "good2.jpg"


@pytest.mark.parametrize("make, checkpoint, message", [case[1:] for case in BAD_FILES],
                         ids=[case[0] for case in BAD_FILES])
def test_a_bad_file_among_good_ones_is_one_line_and_the_others_are_classified(
        make, checkpoint, message, untrained_checkpoints, good_pictures, tmp_path, capsys):
    bad = make(tmp_path)
    good1, good2 = good_pictures
    code = main(["predict", str(untrained_checkpoints[checkpoint]), str(good1), str(bad), str(good2)])
    out, err = capsys.readouterr()
    assert code == 9
    assert [line.split(":")[0] for line in out.splitlines()] == [str(good1), str(good2)]
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith(f"xpcnn: error: {tmp_path}/") and message in lines[0], lines[0]
    assert lines[1] == "xpcnn: error: 1 of 3 files could not be classified (see above)"
    with pytest.raises(ImageFileError) as caught:                     # the library says the same
        load_images([bad], input_dim=(1, 12, 12) if checkpoint == "net12" else (1, 28, 28))
    assert message in str(caught.value)


def test_pictures_are_fitted_to_a_smaller_model(untrained_checkpoints, good_pictures, capsys):
    assert main(["predict", str(untrained_checkpoints["net12"]), *map(str, good_pictures)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("argv, code, message", [
    (["--invert", "maybe"], 2, "invalid choice: 'maybe'"),
    (["--top", "0"], 2, "expected an integer >= 1, got '0'"),
    (["--dataset", "cifar"], 4, "unknown dataset 'cifar'"),
    (["--backend", "tpu"], 2, "tpu"),
], ids=["invert", "top", "dataset", "backend"])
def test_bad_options_are_one_line(argv, code, message, untrained_checkpoints, good_pictures, capsys):
    try:
        result = main(["predict", str(untrained_checkpoints["net28"]), str(good_pictures[0]), *argv])
    except SystemExit as exc:                         # argparse's own usage errors
        result = exc.code
    err = capsys.readouterr().err
    assert result == code
    assert message in err and "Traceback" not in err


def test_missing_checkpoint_is_exit_5(good_pictures, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "none.npz"), str(good_pictures[0])]) == 5
    assert capsys.readouterr().err.startswith("xpcnn: error: ")


def test_json_lines_and_top_k(untrained_checkpoints, good_pictures, tmp_path, capsys):
    np.save(tmp_path / "two.npy", np.zeros((2, 28, 28), np.uint8))
    assert main(["predict", str(untrained_checkpoints["net28"]), str(good_pictures[1]), str(tmp_path / "two.npy"),
                 "--json", "--top", "4"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["file"], r.get("index")) for r in records] == [
        (str(good_pictures[1]), None), (str(tmp_path / "two.npy"), 0), (str(tmp_path / "two.npy"), 1)]
    assert records[0]["inverted"] is True and records[1]["inverted"] is False
    for record in records:
        top = record["top"]
        assert len(top) == 4 and list(top[0]) == ["class", "label", "prob"]
        assert all(a["prob"] >= b["prob"] for a, b in zip(top, top[1:]))
        names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
        assert all(item["label"] == names[item["class"]] for item in top)


def test_progress_bar_on_a_terminal_for_many_files(untrained_checkpoints, good_pictures, tmp_path):
    files = [str(good_pictures[0])] * 25
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a terminal 100 columns wide
    done = subprocess.run([sys.executable, "-m", "xpcnn.cli", "predict", str(untrained_checkpoints["net28"]), *files],
                          stdout=subprocess.PIPE, stderr=follower, env=isolated_env(tmp_path), timeout=120)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert done.returncode == 0 and len(done.stdout.decode().splitlines()) == 25
    assert b"predict:" in shown and b"file" in shown, shown
    quiet = subprocess.run([sys.executable, "-m", "xpcnn.cli", "predict", str(untrained_checkpoints["net28"]), *files],
                           capture_output=True, env=isolated_env(tmp_path), timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == b""          # no terminal: no bar


def test_predict_on_gpu_matches_cpu(gpu_backend, untrained_checkpoints, good_pictures, capsys):
    args = ["predict", str(untrained_checkpoints["net28"]), *map(str, good_pictures), "--json"]
    assert main(args) == 0
    cpu = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main([*args, "--backend", "gpu"]) == 0
    gpu = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for a, b in zip(cpu, gpu):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        np.testing.assert_allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=1e-5)


# ------------------------------------------------------------- the proof on real data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from xpcnn.training.checkpoint import build_from_checkpoint, load_checkpoint

    path = trained_checkpoint(tmp_path_factory)
    x, t = fashion_test_set()
    return path, build_from_checkpoint(load_checkpoint(path)), x, t


def _render(x, folder, kind):
    """Files a person would make from dataset images ``(N, 1, 28, 28)``: 28x28 PNGs as stored,
    280x280 dark-on-light PNGs (enlarged with bicubic), or 280x280 dark-on-light JPEGs."""
    folder.mkdir()
    paths = []
    for i, image in enumerate(np.rint(x[:, 0] * 255).astype(np.uint8)):
        picture = Image.fromarray(image)
        if kind == "png28":
            path = folder / f"{i:05d}.png"
            picture.save(path)
        else:
            picture = Image.fromarray(255 - image).resize((280, 280), Image.Resampling.BICUBIC)
            path = folder / (f"{i:05d}.png" if kind == "png280" else f"{i:05d}.jpg")
            picture.save(path, **({"quality": 90} if kind == "jpeg280" else {}))
        paths.append(str(path))
    return paths


def _cli_classes(checkpoint, paths, capsys, fit="auto"):
    assert main(["predict", str(checkpoint), *paths, "--json", "--top", "1", "--quiet", "--batch-size", "500",
                 "--fit", fit]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in records] == paths
    return np.array([r["top"][0]["class"] for r in records]), [r["inverted"] for r in records]


def _proof(checkpoint, net, x, t, tmp_path, capsys, what):
    """Render `x` as files, predict them through the CLI (default framing, and "whole"), and
    compare with the in-memory predictions of the same images."""
    in_memory = net.predict_proba(x, batch_size=500).argmax(axis=1)
    memory_acc = float(np.mean(in_memory == t))
    results = {}
    for kind in ("png28", "png280", "jpeg280"):
        paths = _render(x, tmp_path / kind, kind)
        for fit in ("auto", "whole") if kind == "png280" else ("auto",):
            classes, inverted = _cli_classes(checkpoint, paths, capsys, fit)
            assert all(inverted) if kind != "png28" else not any(inverted)
            results[f"{kind} {fit}"] = (round(float(np.mean(classes == t)), 4),
                                        int(np.count_nonzero(classes != in_memory)))
    print(f"\n{x.shape[0]} {what}, in memory acc {memory_acc:.4f}; through files (acc, predictions changed): {results}")
    assert results["png28 auto"][1] == 0                     # 28x28 light-on-dark PNGs: identical classes
    for key, (accuracy, _) in results.items():
        assert abs(accuracy - memory_acc) <= 0.03, (key, results[key], memory_acc)


def test_pictures_through_the_cli_give_the_in_memory_predictions(trained, tmp_path, capsys):
    checkpoint, net, x, t = trained
    _proof(checkpoint, net, x[:300], t[:300], tmp_path, capsys, "Fashion-MNIST test images")


@pytest.mark.slow
def test_pictures_through_the_cli_give_the_in_memory_predictions_2000(trained, tmp_path, capsys):
    checkpoint, net, x, t = trained
    _proof(checkpoint, net, x[:2000], t[:2000], tmp_path, capsys, "Fashion-MNIST test images")


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason=f"real MNIST test set not found in {MNIST_DIR}")
def test_digit_pictures_through_the_cli_give_the_in_memory_predictions(tmp_path, capsys):
    """Real digits, framed with MNIST's recipe (--fit auto -> digit for an MNIST checkpoint):
    train on 8,000 of the MNIST test images, render the other 2,000 as files."""
    from xpcnn.data import load_split

    x, t = load_split("mnist", "test", data_dir=MNIST_DIR, flatten=False)
    net = SimpleConvNet(seed=1)
    trainer = Trainer(net, x[:8000], t[:8000], x[8000:8500], t[8000:8500], epochs=2, mini_batch_size=100,
                      optimizer="adagrad", optimizer_param={"lr": 0.06}, seed=1, verbose=False)
    trainer.extra_state.update(dataset="mnist")
    trainer.train()
    trainer.save_checkpoint(tmp_path / "mnist.npz")
    _proof(tmp_path / "mnist.npz", net, x[8000:], t[8000:], tmp_path, capsys, "MNIST test digits")
