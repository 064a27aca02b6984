"""`xpcnn serve` under overload, over-size and trickling uploads (docs/serve.md, "Limits"): every
client gets a whole answer, and none holds the server.

The queue's bound and deadline are checked on the application in-process (Starlette's test
client, requests sent from threads, a forward pass held back on purpose); the rest starts the
real server (uvicorn) on a free port of 127.0.0.1 and talks to it the way urllib, http.client,
curl and raw sockets do. Time bounds on cuts are generous (the machine is shared); nothing
asserts how fast an answer is."""

import asyncio
import http.client
import io
import json
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import pytest
from PIL import Image

from xpcnn.app.batcher import Batcher, ServerBusy
from xpcnn.app.connections import LINGER_BYTES, LINGER_IDLE_SECONDS
from xpcnn.app.serve import Limits, create_app

from helpers import REPO, isolated_env, require_serve_extra, start_server, stop_server, unavailable
from trained import fashion_test_set

#: The slow-client server's --request-timeout (seconds).
TIMEOUT = 2.0
#: Slack on every time bound: a cut must come within its timeout plus this (a busy machine).
SLACK = 8.0


@pytest.fixture(scope="module")
def picture():
    x, _ = fashion_test_set()
    buffer = io.BytesIO()
    Image.fromarray(np.round(x[0, 0] * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """`xpcnn serve --request-timeout 2` (the other limits at their defaults): ``base URL``."""
    require_serve_extra()
    folder = tmp_path_factory.mktemp("serve-limits")
    process, url, _ = start_server(checkpoint, folder, "--request-timeout", str(TIMEOUT))
    yield url
    assert stop_server(process) == 130
    assert "Traceback" not in "".join(process.errors)


def _port(url):
    return int(url.rsplit(":", 1)[1])


def _health(url):
    with urllib.request.urlopen(f"{url}/healthz", timeout=30) as response:
        return json.loads(response.read())


def _read_answer(sock, timeout=30.0):
    """Everything the server sends until it closes: ``(status, headers, JSON body or None, raw)``."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    if not data:
        return None, {}, None, data
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None, data


# ------------------------------------------------------- the queue: bound and deadline


def test_the_batcher_admits_at_most_max_queue_and_refuses_late_requests(model):
    x, _ = fashion_test_set()

    async def scenario():
        batcher = Batcher(model, max_batch=4, max_queue=2, queue_timeout=0.5)
        await batcher.start()
        try:
            with batcher.admit(), batcher.admit():
                assert batcher.stats["queued"] == 2
                with pytest.raises(ServerBusy, match=r"busy \(2 requests queued, its limit\); retry in 1 s"):
                    with batcher.admit():
                        pass
            assert batcher.stats["queued"] == 0                # places are given back, errors or not
            now = asyncio.get_running_loop().time()
            late, fresh = await asyncio.gather(batcher.submit(x[0, 0], since=now - 5.0),
                                               batcher.submit(x[1, 0], since=now), return_exceptions=True)
            assert isinstance(late, ServerBusy) and "waited 5.0 s for the network, over the limit of 0.5 s" in str(late)
            assert fresh[0].shape == (10,)                     # its batch-mate is scored
            return dict(batcher.stats)
        finally:
            await batcher.stop()

    stats = asyncio.run(scenario())
    assert stats["late"] == 1 and stats["requests"] == 1


def _test_client(app):
    require_serve_extra()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    return TestClient(app, raise_server_exceptions=False)


class _HeldForward:
    """`ServedModel.forward` that waits for `release` (and says when it is entered)."""

    def __init__(self, forward):
        self.forward, self.entered, self.release = forward, threading.Event(), threading.Event()

    def __call__(self, images, maps):
        self.entered.set()
        assert self.release.wait(30), "the test never released the forward pass"
        return self.forward(images, maps)


def test_a_full_queue_answers_503_json_with_retry_after_at_once(model, picture, monkeypatch):
    held = _HeldForward(model.forward)
    monkeypatch.setattr(model, "forward", held)
    app = create_app(model, Limits(max_batch=1, max_queue=2, queue_timeout=60))
    with _test_client(app) as client, ThreadPoolExecutor(6) as pool:
        post = lambda _: client.post("/api/predict?maps=0", content=picture)    # noqa: E731
        first = pool.submit(post, 0)
        assert held.entered.wait(30)
        second = pool.submit(post, 1)                       # waits behind the first: the queue is full
        deadline = time.monotonic() + 30
        while client.get("/healthz").json()["queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = [pool.submit(post, i) for i in range(3)]   # answered while the forward pass is held
        done, _ = wait(refused, timeout=30)
        held.release.set()
        assert len(done) == 3, "requests over the queue's bound waited for the forward pass"
        assert first.result().status_code == second.result().status_code == 200
        for response in (future.result() for future in refused):
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json() == {"error": "the server is busy (2 requests queued, its limit); retry in 1 s"}
        health = client.get("/healthz").json()
        assert (health["busy"], health["queued"], health["max_queue"], health["requests"]) == (3, 0, 2, 2)


def test_a_request_that_waited_past_the_deadline_is_answered_503_not_scored(model, picture, monkeypatch):
    held = _HeldForward(model.forward)
    monkeypatch.setattr(model, "forward", held)
    app = create_app(model, Limits(max_batch=1, queue_timeout=0.2))
    with _test_client(app) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/api/predict?maps=0", content=picture)
        assert held.entered.wait(30)
        late = pool.submit(client.post, "/api/predict?maps=0", content=picture)
        deadline = time.monotonic() + 30
        while client.get("/healthz").json()["queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.4)                                     # the second has now waited over 0.2 s
        held.release.set()
        assert first.result().status_code == 200
        response = late.result()
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "for the network, over the limit of 0.2 s; retry in 1 s" in response.json()["error"]
        health = client.get("/healthz").json()
        assert (health["requests"], health["late"], health["busy"]) == (1, 1, 1)


def test_an_answer_before_the_upload_is_read_says_connection_close(model, picture):
    with _test_client(create_app(model, Limits(max_upload=1000))) as client:
        refused = client.post("/api/predict", content=b"\0" * 5000)           # refused on its declared length
        assert refused.status_code == 413 and refused.headers["connection"] == "close"
        bad = client.post("/api/predict?top=0", content=picture)               # refused before reading
        assert bad.status_code == 400 and bad.headers["connection"] == "close"
        for response in (client.post("/api/predict", content=b"not a picture"),   # read to the end: kept alive
                         client.get("/healthz")):
            assert "connection" not in response.headers, response.headers


# ------------------------------------------------------------- over-size uploads


def test_an_over_size_upload_sent_before_reading_gets_the_413_json_not_a_reset(server):
    """urllib sends the whole body, then reads (with ``Connection: close``); the server answers
    on the declared length and reads the rest away before it closes (a lingering close)."""
    request = urllib.request.Request(f"{server}/api/predict", data=b"\0" * 30_000_000, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code == 413 and error.value.headers["Connection"] == "close"
    assert json.loads(error.value.read()) == {"error": "the upload is 30000000 bytes, over the limit of 8388608 "
                                                       "bytes (8 MiB); send a smaller picture"}
    connection = http.client.HTTPConnection("127.0.0.1", _port(server), timeout=60)   # keep-alive, as requests
    for _ in range(2):
        connection.request("POST", "/api/predict", body=b"\0" * 9_000_000)
        response = connection.getresponse()
        assert response.status == 413 and response.will_close
        assert "over the limit" in json.loads(response.read())["error"]
    connection.close()


def test_curl_gets_the_413_json_with_and_without_expect_100_continue(server):
    if shutil.which("curl") is None:
        unavailable("curl is not installed")
    for extra in ([], ["-H", "Expect:"]):                # curl sends Expect: 100-continue for large bodies
        result = subprocess.run(["curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}", *extra, "--data-binary",
                                 "@-", f"{server}/api/predict"], input=b"\0" * 20_000_000, capture_output=True,
                                timeout=90)
        assert result.returncode == 0, result.stderr
        body, status = result.stdout.rsplit(b"\n", 1)
        assert status == b"413" and "over the limit" in json.loads(body)["error"], (extra, result.stdout[:300])


def test_the_server_reads_an_endless_upload_away_only_up_to_its_bound(server):
    sock = socket.create_connection(("127.0.0.1", _port(server)))
    sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
    sock.settimeout(30)
    answer = b""
    while b"send a smaller picture" not in answer:
        chunk = sock.recv(65536)
        assert chunk, answer
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower()
    sent, chunk, started = 0, b"\0" * 2 ** 20, time.monotonic()
    with pytest.raises(OSError):                         # the server closes: a broken pipe or a reset
        while sent < 4 * LINGER_BYTES:
            sock.sendall(chunk)
            sent += len(chunk)
    sock.close()
    assert sent <= LINGER_BYTES + 32 * 2 ** 20, f"the server read {sent} bytes"     # plus socket buffers
    assert time.monotonic() - started < 10 + SLACK


# ----------------------------------------------------------------- slow clients


def test_slow_clients_are_cut_with_408_and_idle_ones_closed(server, picture):
    """40 clients declare a 100 kB body, send 10 bytes and stop; 5 send half their headers; 5
    connect and send nothing. The server answers the others meanwhile."""
    port, started = _port(server), time.monotonic()
    slow_body = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    for sock in slow_body:
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: 100000\r\n\r\n0123456789")
    slow_headers = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    for sock in slow_headers:
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: x\r\n")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    assert _health(server)["connections"]["open"] >= 50
    request = urllib.request.Request(f"{server}/api/predict?maps=0", data=picture, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:            # not held up by them
        assert response.status == 200

    cut = {}
    for kind, sockets in (("body", slow_body), ("headers", slow_headers), ("idle", idle)):
        for sock in sockets:
            status, headers, body, raw = _read_answer(sock, timeout=TIMEOUT + LINGER_IDLE_SECONDS + 5 + SLACK)
            cut.setdefault(kind, []).append((status, time.monotonic() - started))
            if kind == "idle":
                assert raw == b"", raw                   # closed without a word, as after a keep-alive
                continue
            assert status == 408 and headers["connection"] == "close" and headers["content-type"] == \
                "application/json", raw
            what = "upload" if kind == "body" else "request's headers"
            assert f"the {what} did not arrive within 2 s" in body["error"], body
            if kind == "body":
                assert "(10 bytes of the 100000 declared came)" in body["error"]
            sock.close()
    # every one closed by the server, none before its timeout, all within it plus the slack
    assert all(TIMEOUT - 0.5 <= seconds < TIMEOUT + LINGER_IDLE_SECONDS + SLACK for _, seconds in cut["body"])
    assert all(5 - 0.5 <= seconds < 5 + SLACK for _, seconds in cut["idle"])     # uvicorn's keep-alive timeout
    health = _health(server)
    assert health["connections"]["header_timeouts"] >= 5 and health["connections"]["open"] <= 2, health


# ------------------------------------------------------------- connection bound


def _dropped_at_once(sockets):
    """How many of `sockets` the server closes without a word (the others stay open: idle)."""
    closed = set()
    while True:
        readable = select.select([sock for sock in sockets if sock not in closed], [], [], 1.0)[0]
        if not readable:
            return len(closed)
        for sock in readable:
            assert sock.recv(100) == b""
            closed.add(sock)


def _health_when_served(url):
    """/healthz, asked again while the server is still closing connections over its bound."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return _health(url)
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_connections_over_the_bound_get_503_json_and_four_times_over_are_closed(checkpoint, picture, tmp_path):
    require_serve_extra()
    process, url, _ = start_server(checkpoint, tmp_path, "--max-connections", "8")
    port, held = _port(url), []
    try:
        try:
            held += [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("POST", "/api/predict", body=picture)
            response = connection.getresponse()
            assert response.status == 503 and response.getheader("Retry-After") == "1" and response.will_close
            assert json.loads(response.read()) == {"error": "the server is busy (over 8 connections open, its "
                                                            "limit); retry in 1 s"}
            connection.close()
            health = _health(url)                            # /healthz still answers over the bound
            assert health["status"] == "ok" and health["connections"]["refused_busy"] == 1
            held += [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]    # 38 open: over 4 x 8
            dropped = _dropped_at_once(held[8:])
        finally:
            for sock in held:
                sock.close()
        health = _health_when_served(url)
        assert health["connections"]["drop_over"] == 32
        assert dropped >= 6 and health["connections"]["dropped"] == dropped, health
    finally:
        assert stop_server(process) == 130
    assert "Traceback" not in "".join(process.errors)


# ---------------------------------------------------------------------- bursts


def test_a_burst_of_ten_times_the_scoring_rate_from_200_clients_is_answered_whole(checkpoint, tmp_path):
    """scripts/load_serve.py --burst, small: it measures what the server scores per second, then
    sends ten times that at once from 200 clients; every request gets 200 with predict's answer,
    or a 400/413/503 JSON; none reset or timed out; memory within 200 MiB more; /healthz answers."""
    require_serve_extra()
    from trained import FASHION_DIR

    result = subprocess.run([sys.executable, "scripts/load_serve.py", str(checkpoint), "--burst", "--clients", "200",
                             "--images", "60", "--calibration", "200", "--max-batch", "16",
                             "--max-connections", "128", "--data-dir", str(FASHION_DIR), "--time-limit", "120"],
                            capture_output=True, text=True, cwd=REPO, env=isolated_env(tmp_path), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 16 ")]
    assert len(rows) == 1 and "every request answered, none reset, memory within bound, healthy" in rows[0], \
        result.stdout


@pytest.mark.slow
def test_the_load_script_cuts_40_slow_uploads_and_serves_meanwhile(checkpoint, tmp_path):
    """scripts/load_serve.py --slow, as in the issue: 40 uploads that stop after 10 of 100,000
    bytes and 4 unfinished headers, each cut with 408 in time, 200 good requests answered."""
    require_serve_extra()
    from trained import FASHION_DIR

    result = subprocess.run([sys.executable, "scripts/load_serve.py", str(checkpoint), "--slow", "--clients", "40",
                             "--request-timeout", str(TIMEOUT), "--images", "30", "--data-dir", str(FASHION_DIR)],
                            capture_output=True, text=True, cwd=REPO, env=isolated_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 40 x ") or line.startswith("| 4 x ")]
    assert len(rows) == 2 and all("408" in row and row.endswith("| all cut in time, all answered |") for row in rows), \
        result.stdout
