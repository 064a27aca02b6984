"""`xpcnn serve`: the HTTP API answers what `xpcnn predict --json` answers for the same file,
every bad input is a JSON 400/413 that says what was expected (and the server goes on), a burst
of concurrent requests batched into shared forward passes gets bit for bit the one-at-a-time
results, and the command starts, warns and fails the way its docstring table says.

The in-process tests use Starlette's test client; the command's tests start the real server
(uvicorn) on a free port of 127.0.0.1. Trained model: tests/trained.py (shared, about 20 s)."""

import asyncio
import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from xpcnn.app.batcher import Batcher
from xpcnn.app.report import first_layer_maps
from xpcnn.app.serve import Limits, address_lines, create_app
from xpcnn.cli import main
from xpcnn.data.images import read_input_file

from helpers import REPO, error_line, isolated_env, post_bytes, require_serve_extra, start_server, stop_server
from trained import fashion_test_set


@pytest.fixture(scope="module")
def client(model):
    require_serve_extra()
    with warnings.catch_warnings():         # Starlette 1.x would rather have httpx2; httpx works
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    with TestClient(create_app(model, Limits(max_upload=256 * 1024)), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Files a person would send: a test image as a 28x28 PNG, dark-on-light enlarged PNGs and
    a JPEG photo-like picture, and a .npy of one image."""
    folder = tmp_path_factory.mktemp("pictures")
    x, _ = fashion_test_set()
    images = np.round(x[:6, 0] * 255).astype(np.uint8)
    names = []
    Image.fromarray(images[0]).save(folder / "plain.png")
    Image.fromarray(255 - images[1]).resize((300, 300), Image.Resampling.NEAREST).save(folder / "paper.png")
    Image.fromarray(255 - images[2]).resize((210, 140)).convert("RGB").save(folder / "photo.jpg", quality=90)
    canvas = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    canvas.paste(Image.fromarray(images[3]).resize((120, 120)).convert("RGBA"), (40, 30))
    canvas.save(folder / "transparent.png")
    Image.fromarray(255 - images[4]).save(folder / "small.gif")
    np.save(folder / "one.npy", images[5])
    names = ["plain.png", "paper.png", "photo.jpg", "transparent.png", "small.gif", "one.npy"]
    return folder, names


def _predict_json(checkpoint, folder, names, capsys, *extra):
    cwd = os.getcwd()
    os.chdir(folder)                   # the files as given on the command line: their names
    try:
        capsys.readouterr()
        assert main(["predict", str(checkpoint), *names, "--json", "--quiet", *extra]) == 0
    finally:
        os.chdir(cwd)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _decode_png(url):
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


# ------------------------------------------------------------------------- good images


@pytest.mark.parametrize("top", [3, 10])
def test_uploads_answer_what_xpcnn_predict_json_answers(client, model, checkpoint, pictures, capsys, top):
    folder, names = pictures
    expected = _predict_json(checkpoint, folder, names, capsys, "--top", str(top))
    assert len(expected) == len(names)
    for name, line in zip(names, expected):
        data = (folder / name).read_bytes()
        as_file = client.post(f"/api/predict?top={top}", files={"file": (name, data)})
        raw = client.post(f"/api/predict?top={top}&maps=0", content=data,
                          headers={"content-type": "application/octet-stream"})
        assert as_file.status_code == raw.status_code == 200, (as_file.text, raw.text)
        answer, raw_answer = as_file.json(), raw.json()
        assert {k: answer[k] for k in line} == line                 # the same object, key for key
        assert {k: raw_answer[k] for k in line} == {**line, "file": "upload"}
        assert "feature_maps" in answer and "feature_maps" not in raw_answer
        # the image the network received, as the page shows it
        prepared = read_input_file(folder / name, (28, 28), fit="fill").images[0]
        np.testing.assert_array_equal(_decode_png(answer["input"]["png"]),
                                      np.round(prepared * 255).astype(np.uint8))
        maps = answer["feature_maps"]
        assert (maps["layer"], maps["count"], maps["height"], maps["width"]) == ("Conv1", 30, 24, 24)
        assert (maps["columns"], maps["rows"], maps["gap"]) == (10, 3, 2)
        sheet = _decode_png(maps["png"])                                   # gray + alpha
        assert sheet.shape == (3 * 26 - 2, 10 * 26 - 2, 2)
        _, first = first_layer_maps(model.network, prepared[None].astype(np.float32))
        for i in (0, 13, 29):                    # each tile: that map, scaled to its own range
            row, column = (i // 10) * 26, (i % 10) * 26
            one = first[i]
            scaled = (one - one.min()) / (one.max() - one.min())
            np.testing.assert_allclose(sheet[row:row + 24, column:column + 24, 0], np.round(scaled * 255), atol=1)
            assert (sheet[row:row + 24, column:column + 24, 1] == 255).all()
        assert (sheet[24:26, :, 1] == 0).all()                             # transparent gaps


def test_model_and_health(client, model):
    info = client.get("/api/model").json()
    assert info["model"] == "SimpleConvNet" and info["dataset"] == "fashion-mnist"
    assert info["classes"][9] == "Ankle boot" and len(info["classes"]) == 10
    assert info["input_size"] == [28, 28] and info["epoch"] == 2 and info["backend"] == "numpy (cpu)"
    assert 0.7 < info["test_accuracy"] < 0.9
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "/static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text            # no CDN: works offline
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]


# -------------------------------------------------------------------------- bad input


def _png_declaring(width, height):
    """A PNG whose header declares width x height (with one tiny compressed row of data)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _bad_inputs(folder):
    good = (folder / "paper.png").read_bytes()
    npy = io.BytesIO()
    np.save(npy, np.zeros((5, 7), np.uint8))
    several = io.BytesIO()
    np.save(several, np.zeros((3, 28, 28), np.uint8))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return [
        ("empty", b"", {}, 400, "the file is empty; expected a picture"),
        ("not an image", b"hello, I am text", {}, 400, "not a picture Pillow can read (PNG, JPEG"),
        ("truncated", good[:len(good) // 2], {}, 400, "cannot decode the picture (truncated or corrupted?)"),
        ("too many pixels", _png_declaring(20000, 20000), {}, 400, "over the limit of 17 megapixels"),
        ("wrong shape", npy.getvalue(), {}, 400, "holds 5x7 images, but the model takes 28x28"),
        ("several images", several.getvalue(), {}, 400, "holds 3 images; expected one image per request"),
        ("pickle", pickled.getvalue(), {}, 400, "not a readable .npy array"),
        ("over the size limit", b"\0" * (256 * 1024 + 1), {}, 413, "the upload is 262145 bytes, over the limit"),
        ("bad top", good, {"top": "0"}, 400, "top must be an integer >= 1, got '0'"),
        ("bad invert", good, {"invert": "maybe"}, 400, "invert must be one of auto, yes, no, got 'maybe'"),
        ("bad fit", good, {"fit": "stretch"}, 400, "fit must be one of fill, digit, whole, got 'stretch'"),
    ]


def test_every_bad_input_is_a_json_error_saying_what_was_expected(client, pictures):
    folder, _ = pictures
    before = client.get("/healthz").json()["bad_requests"]
    cases = _bad_inputs(folder)
    for what, body, params, status, message in cases:
        response = client.post("/api/predict", params=params, content=body)
        assert response.status_code == status, (what, response.text)
        assert response.headers["content-type"] == "application/json", what
        assert set(response.json()) == {"error"} and message in response.json()["error"], (what, response.text)
        assert "Traceback" not in response.text and 'File "' not in response.text, what
        ok = client.post("/api/predict", content=(folder / "plain.png").read_bytes())    # still serving
        assert ok.status_code == 200, (what, ok.text)
    assert client.get("/healthz").json()["bad_requests"] == before + len(cases)


def test_size_limit_holds_without_a_content_length(client):
    def chunks():                                 # chunked transfer: the limit is counted as it arrives
        for _ in range(80):
            yield b"\0" * 4096
    response = client.post("/api/predict", content=chunks())
    assert response.status_code == 413 and "over the limit of 262144 bytes" in response.json()["error"]


def test_bad_multipart_routes_and_methods_are_json_errors(client, pictures):
    folder, _ = pictures
    no_file = client.post("/api/predict", files={"note": (None, "no file here")})
    assert no_file.status_code == 400
    assert "expected a multipart upload holding one image file (field 'file'), got 0" in no_file.json()["error"]
    two = client.post("/api/predict", files=[("file", ("a.png", b"x")), ("file", ("b.png", b"y"))])
    assert two.status_code == 400 and "one image file" in two.json()["error"]
    broken = client.post("/api/predict", content=b"--xyz\r\nnonsense",
                         headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert broken.status_code == 400 and "error" in broken.json()
    assert client.get("/api/predict").status_code == 405 and "error" in client.get("/api/predict").json()
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert client.get("/static/../serve.py").status_code == 404       # no file outside static/ is served


def test_a_client_path_is_never_opened(client, pictures, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("L", (28, 28), 255).save(secret)
    for body in (str(secret).encode(), f"file://{secret}".encode()):
        response = client.post("/api/predict", content=body)
        assert response.status_code == 400 and "not a picture" in response.json()["error"]
    named = client.post("/api/predict", files={"file": (str(secret), b"not an image")})
    assert named.status_code == 400 and named.json()["error"].startswith("secret.png: ")      # a label only


def test_a_failure_inside_the_server_is_a_json_500_without_traceback(model, pictures, monkeypatch):
    require_serve_extra()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    folder, _ = pictures
    calls = {"n": 0}
    forward = model.forward

    def sometimes_broken(images, maps):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug deep inside, with a secret path /home/someone/x.py")
        return forward(images, maps)

    monkeypatch.setattr(model, "forward", sometimes_broken)
    with TestClient(create_app(model), raise_server_exceptions=False) as test_client:
        body = (folder / "plain.png").read_bytes()
        broken = test_client.post("/api/predict", content=body)
        assert broken.status_code == 500
        assert broken.json() == {"error": "internal error (RuntimeError); the server goes on serving"}
        assert test_client.post("/api/predict", content=body).status_code == 200
        assert test_client.get("/healthz").json()["server_errors"] == 1


# ---------------------------------------------------------------------------- batching


def test_a_batched_burst_equals_one_at_a_time_bit_for_bit(model):
    x, _ = fashion_test_set()
    images = [x[i, 0] for i in range(40)]

    async def one_at_a_time():
        batcher = Batcher(model, max_batch=1)
        await batcher.start()
        try:
            return [await batcher.submit(image, maps=True) for image in images], dict(batcher.stats)
        finally:
            await batcher.stop()

    async def burst():
        batcher = Batcher(model, max_batch=16, max_wait=0.05)
        await batcher.start()
        try:
            return await asyncio.gather(*[batcher.submit(image, maps=i % 2 == 0) for i, image in enumerate(images)]), \
                dict(batcher.stats)
        finally:
            await batcher.stop()

    alone, alone_stats = asyncio.run(one_at_a_time())
    together, stats = asyncio.run(burst())
    assert alone_stats["largest_batch"] == 1 and alone_stats["batches"] == 40
    assert stats["requests"] == 40 and stats["largest_batch"] == 16 and stats["batches"] == 3    # 16 + 16 + 8
    for i, ((proba, maps), (proba_alone, maps_alone)) in enumerate(zip(together, alone)):
        assert proba.dtype == np.float32 and proba.tobytes() == proba_alone.tobytes(), f"image {i}"
        if i % 2 == 0:
            np.testing.assert_array_equal(maps, maps_alone)
        else:
            assert maps is None


# ------------------------------------------------------------------------- the command


def test_the_command_serves_a_concurrent_burst_batched_like_alone(checkpoint, pictures, tmp_path):
    require_serve_extra()
    folder, names = pictures
    x, _ = fashion_test_set()
    bodies = []
    for i in range(64):
        buffer = io.BytesIO()
        Image.fromarray(np.round(x[100 + i, 0] * 255).astype(np.uint8)).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    bodies += [(folder / name).read_bytes() for name in names]
    process, url, lines = start_server(checkpoint, tmp_path, "--max-batch", "32", "--max-wait-ms", "20")
    try:
        assert "this computer only" in lines[-1] and url.startswith("http://127.0.0.1:")
        alone = [post_bytes(f"{url}/api/predict?top=10", body) for body in bodies]
        batches_before = json.loads(urllib.request.urlopen(f"{url}/healthz", timeout=10).read())["batches"]
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(lambda body: post_bytes(f"{url}/api/predict?top=10", body), bodies))
        assert together == alone                  # every probability of every answer, equal
        assert all(status == 200 for status, _ in together)
        health = json.loads(urllib.request.urlopen(f"{url}/healthz", timeout=10).read())
        assert health["largest_batch"] > 1 and health["batches"] - batches_before < len(bodies)
        assert health["requests"] == 2 * len(bodies) and health["server_errors"] == 0
    finally:
        code = stop_server(process)
    assert code == 130
    assert "Traceback" not in "".join(process.errors)


def test_address_lines_warn_off_this_computer():
    out, warning = address_lines("127.0.0.1", 8000)
    assert out == "listening on http://127.0.0.1:8000/ (this computer only; --host 0.0.0.0 to share it)"
    assert warning is None
    out, warning = address_lines("0.0.0.0", 8000)
    assert out == "listening on http://0.0.0.0:8000/"
    assert "anyone who can reach this machine on the network can use this server" in warning
    assert address_lines("::1", 80)[1] is None and address_lines("192.168.1.5", 80)[1] is not None


def test_a_taken_port_is_one_line_exit_10(checkpoint, tmp_path):
    require_serve_extra()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "xpcnn.cli", "serve", str(checkpoint), "--port", str(port)],
                                capture_output=True, text=True, env=isolated_env(tmp_path), timeout=60)
    assert result.returncode == 10
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port" in \
        error_line(result.stderr, 10)


def test_without_the_extra_one_line_says_how_to_install_it(checkpoint, tmp_path):
    blocker = tmp_path / "blocker"
    for name in ("fastapi", "uvicorn"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f'raise ImportError("No module named {name}", name="{name}")\n')
    env = isolated_env(tmp_path)
    env["PYTHONPATH"] = f"{blocker}{os.pathsep}{env['PYTHONPATH']}"
    result = subprocess.run([sys.executable, "-m", "xpcnn.cli", "serve", str(checkpoint)], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 10
    assert error_line(result.stderr, 10) == ("xpcnn: error: xpcnn serve needs the optional web server packages: "
                                             "pip install 'xpcnn[serve]' (fastapi is missing)")
    others = subprocess.run([sys.executable, "-c", "import xpcnn, xpcnn.cli, sys; "
                             "sys.exit(xpcnn.cli.main(['predict', '--help']))"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert others.returncode == 0 and "usage: xpcnn predict" in others.stdout


def test_serve_shuts_down_cleanly_with_requests_in_flight(checkpoint, pictures, tmp_path):
    require_serve_extra()
    folder, _ = pictures
    process, url, _ = start_server(checkpoint, tmp_path)
    body = (folder / "paper.png").read_bytes()
    results = []

    def hammer():
        for _ in range(20):
            try:
                results.append(post_bytes(f"{url}/api/predict", body, timeout=10)[0])
            except OSError:
                results.append("refused")
    thread = threading.Thread(target=hammer)
    thread.start()
    time.sleep(0.3)
    code = stop_server(process)
    thread.join(30)
    assert code == 130 and 200 in results
    assert "Traceback" not in "".join(process.errors)


def test_load_script_checks_every_answer_under_concurrency(checkpoint, tmp_path):
    """scripts/load_serve.py, small: 240 requests (12 bad) from 16 clients, batched and not."""
    require_serve_extra()
    from trained import FASHION_DIR

    result = subprocess.run([sys.executable, "scripts/load_serve.py", str(checkpoint), "--requests", "240",
                             "--clients", "16", "--images", "60", "--max-batch", "1,16", "--maps", "1",
                             "--data-dir", str(FASHION_DIR), "--time-limit", "120"],
                            capture_output=True, text=True, cwd=REPO, env=isolated_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 16 ")]
    assert len(rows) == 2 and all(row.endswith("| all answers right, none lost, healthy |") for row in rows), \
        result.stdout


def test_serve_warms_the_model_up_before_the_first_client(model, monkeypatch):
    """A first forward pass compiles (or loads) the CPU kernels, seconds on a fresh machine:
    `serve` runs it on a blank image before it accepts a connection."""
    from xpcnn.app import serve as serve_module

    events = []
    monkeypatch.setattr(model, "forward", lambda images, maps: events.append(("forward", images.shape, maps)))
    monkeypatch.setattr(serve_module, "open_socket", lambda host, port: events.append(("socket",)) or _NoServer())
    monkeypatch.setattr(serve_module, "protocol_class", lambda *args: _Stop.raise_it())
    with pytest.raises(_Stop):
        serve_module.serve(model, "127.0.0.1", 0)
    assert events == [("socket",), ("forward", (1, *model.size), model.has_maps)]


class _Stop(Exception):
    @classmethod
    def raise_it(cls):
        raise cls()


class _NoServer:
    def getsockname(self):
        return ("127.0.0.1", 0)

    def close(self):
        pass
