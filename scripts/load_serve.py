"""Load test of ``xpcnn serve``, on 127.0.0.1 only: many concurrent clients, real images and a
few bad ones, every answer checked.

    python scripts/load_serve.py runs/latest/checkpoint.npz                    # 2,000 requests, 32 clients
    python scripts/load_serve.py CKPT --requests 500 --clients 8 --max-batch 1,32 --maps 0,1
    python scripts/load_serve.py CKPT --burst --clients 256                    # overload: 10x what it scores per second
    python scripts/load_serve.py CKPT --slow --clients 40 --request-timeout 10 # uploads that stop half way

Steady (the default): for each ``--max-batch`` (1: no batching) and ``--maps`` setting it starts
``xpcnn serve CKPT --port 0`` (a free port of 127.0.0.1), sends the requests from ``--clients``
threads (one keep-alive connection each), and checks every answer: a good request gets exactly
the answer ``xpcnn predict --json`` gives for the same file, a bad one its 400 with a JSON error,
and a busy server's 503 is JSON with ``Retry-After`` (counted apart); no request is lost, and
``/healthz`` is still ok at the end. It prints requests per second and the p50/p99 latency as a
Markdown table.

Burst (``--burst``): for each setting, first measures how many requests per second the server
scores (a steady run, 32 clients), then sends ``--burst-factor`` (10) times that many requests at
once from ``--clients`` threads, each request sent once (no retries), every 50th an upload over
the size limit (9 MB). Every request must get a whole HTTP answer: 200 with predict's answer,
400/413 with a JSON error, or 503 JSON with ``Retry-After``; none reset, none timed out (60 s).
Meanwhile ``/healthz`` is asked every 0.1 s (it must answer 200 each time) and the server's
resident memory is sampled (``/proc``, Linux): its peak may exceed the resident memory before
the burst by at most ``--memory-bound`` MiB.

Slow clients (``--slow``): ``--clients`` connections each declare a 100 kB upload, send 10 bytes
and stop, and a tenth as many more send half their headers and stop, while 8 other clients send
``--requests`` good requests. Every slow one must be answered 408 (JSON) within the server's
``--request-timeout`` plus 1 s, and be closed by the server within that plus the lingering
close's idle time plus 1 s (or, opened over ``--max-connections``, be answered 503 busy at
once); every good request answered (200, or 503 when the connections are over the bound); the
open connections (``/healthz``) stay within what the clients opened, and fall back to one (the
``/healthz`` asking) afterwards.

Exit 1 when any check fails. Bounded: ``--requests`` at most 20,000, ``--clients`` at most 256,
``--time-limit`` seconds per run; the server is stopped at the end of each run.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

HOST = "127.0.0.1"          # all traffic stays on this computer
OVER_SIZE = 9_000_000       # bytes: over the server's 8 MiB upload limit
CLIENT_TIMEOUT = 60.0       # seconds a client waits for an answer before it counts the request as timed out


def _dataset_images(checkpoint: str, data_dir: str | None, count: int) -> np.ndarray:
    from xpcnn.data import load_split
    from xpcnn.training.checkpoint import load_checkpoint

    dataset = load_checkpoint(checkpoint).extra.get("dataset") or "fashion-mnist"
    x, _ = load_split(str(dataset), "test", flatten=False, data_dir=data_dir)
    return np.round(x[:count, 0] * 255).astype(np.uint8)


def make_bodies(images: np.ndarray, folder: Path) -> tuple[list[str], list[bytes]]:
    """Picture files a person would send (the test images as 28x28 PNGs, and enlarged
    dark-on-light PNGs and JPEGs), written to `folder` for ``xpcnn predict`` and kept as bytes."""
    names, bodies = [], []
    for i, image in enumerate(images):
        kind = i % 3
        picture = Image.fromarray(image) if kind == 0 else Image.fromarray(255 - image).resize((112, 112))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG" if kind == 2 else "PNG", **({"quality": 92} if kind == 2 else {}))
        name = f"img{i:04d}.{'jpg' if kind == 2 else 'png'}"
        (folder / name).write_bytes(buffer.getvalue())
        names.append(name)
        bodies.append(buffer.getvalue())
    return names, bodies


def bad_bodies(good: bytes) -> list[tuple[bytes, str]]:
    """Bad uploads and a fragment of the 400 error each must get."""
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((5, 7), np.uint8))
    return [(b"not an image at all", "not a picture Pillow can read"),
            (good[:len(good) // 2], "cannot decode the picture"),
            (wrong.getvalue(), "but the model takes 28x28"),
            (b"", "the file is empty")]


def expected_answers(checkpoint: str, folder: Path, names: list[str], env: dict[str, str]) -> list[dict]:
    """What ``xpcnn predict --json`` says for each file (``file`` set to ``upload``, as a raw upload is named)."""
    out = subprocess.run([sys.executable, "-m", "xpcnn.cli", "predict", checkpoint, *names, "--json", "--quiet",
                          "--top", "3"], capture_output=True, text=True, cwd=folder, env=env, timeout=600, check=True)
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert [a["file"] for a in answers] == names, "predict did not answer every file"
    return [{**a, "file": "upload"} for a in answers]


def start_server(checkpoint: str, options: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-m", "xpcnn.cli", "serve", checkpoint, "--host", HOST, "--port", "0",
                                *options], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("listening on "):
            return process, int(line.split()[2].rstrip("/").rsplit(":", 1)[1])
    process.kill()
    raise SystemExit("load_serve: the server did not start")


def _get_json(port: int, path: str, timeout: float = 30) -> dict:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def resident_mib(pid: int) -> float | None:
    """The resident memory of process `pid` in MiB (Linux's /proc), or None elsewhere."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def check_answer(expected: object, status: object, headers: dict, payload: bytes) -> str | None:
    """None when the answer is one the request may get, else what is wrong with it.
    `expected`: predict's answer (a good picture), an error fragment (a bad one: 400), or
    ``413`` (an upload over the limit). Any request may get a busy server's 503."""
    if status == "failed":
        return f"no answer: {payload.decode(errors='replace')}"
    try:
        answer = json.loads(payload)
    except ValueError:
        return f"{status}, not JSON: {payload[:200]!r}"
    if status == 503:
        if set(answer) != {"error"} or "busy" not in answer["error"] or headers.get("retry-after") != "1":
            return f"503 without a JSON busy error and Retry-After: {headers} {payload[:200]!r}"
        return None
    if isinstance(expected, dict):
        if status != 200 or {k: answer.get(k) for k in expected} != expected:
            return f"{status} {payload[:200]!r}, expected {expected}"
    elif expected == 413:
        if status != 413 or set(answer) != {"error"} or "over the limit" not in answer["error"]:
            return f"{status} {payload[:200]!r}, expected 413 with a JSON error"
    elif status != 400 or set(answer) != {"error"} or expected not in answer["error"]:
        return f"{status} {payload[:200]!r}, expected 400 with {expected!r}"
    return None


def run_load(port: int, plan: list[tuple[bytes, object]], clients: int, maps: bool, time_limit: float,
             together: bool = False) -> dict:
    """Send every request of `plan` (``(body, expected)``, as `check_answer` takes) from `clients`
    threads, each request once; return the counts, failures and latencies. `together`: the
    clients start at the same moment (a burst)."""
    work: queue.Queue = queue.Queue()
    for index in range(len(plan)):
        work.put(index)
    results: list = [None] * len(plan)
    deadline = time.monotonic() + time_limit
    path = f"/api/predict?top=3&maps={int(maps)}"
    start = threading.Barrier(clients + 1)

    def client() -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=CLIENT_TIMEOUT)
        if together:
            start.wait()
        while time.monotonic() < deadline:
            try:
                index = work.get_nowait()
            except queue.Empty:
                break
            started = time.perf_counter()
            try:
                connection.request("POST", path, body=plan[index][0],
                                   headers={"Content-Type": "application/octet-stream"})
                response = connection.getresponse()
                payload = response.read()
                headers = {k.lower(): v for k, v in response.getheaders()}
                results[index] = (response.status, headers, payload, time.perf_counter() - started)
                if response.will_close:
                    connection.close()         # the next request opens a new connection
            except (OSError, http.client.HTTPException) as exc:
                results[index] = ("failed", {}, repr(exc).encode(), time.perf_counter() - started)
                connection.close()
                connection = http.client.HTTPConnection(HOST, port, timeout=CLIENT_TIMEOUT)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    if together:
        start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started

    failures, latencies, statuses = [], [], {}
    for index, ((_, expected), result) in enumerate(zip(plan, results)):
        if result is None:
            failures.append(f"request {index}: never sent (over the time limit)")
            continue
        status, headers, payload, seconds = result
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            latencies.append(seconds)
        wrong = check_answer(expected, status, headers, payload)
        if wrong:
            failures.append(f"request {index}: {wrong}")
    latencies_ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"elapsed": elapsed, "statuses": statuses, "failures": failures,
            "rps": sum(r is not None for r in results) / elapsed, "scored_per_s": statuses.get(200, 0) / elapsed,
            "p50": float(np.percentile(latencies_ms, 50)), "p99": float(np.percentile(latencies_ms, 99))}


class Watch:
    """While a burst runs: the server's resident memory, sampled every 20 ms, and ``/healthz``
    asked every 0.1 s on a new connection (status and seconds of each answer)."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid, self.port = pid, port
        self.peak_mib = resident_mib(pid) or 0.0
        self.health: list[tuple[object, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._memory), threading.Thread(target=self._healthz)]

    def __enter__(self) -> "Watch":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _memory(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mib = max(self.peak_mib, resident_mib(self.pid) or 0.0)

    def _healthz(self) -> None:
        while not self._stop.wait(0.1):
            started = time.perf_counter()
            try:
                connection = http.client.HTTPConnection(HOST, self.port, timeout=CLIENT_TIMEOUT)
                connection.request("GET", "/healthz")
                status = connection.getresponse().status
                connection.close()
            except (OSError, http.client.HTTPException) as exc:
                status = repr(exc)
            self.health.append((status, time.perf_counter() - started))


def build_plan(count: int, bodies: list[bytes], answers: list[dict], bad_every: int,
               over_size_every: int = 0) -> list[tuple[bytes, object]]:
    bad = bad_bodies(bodies[0])
    over_size = b"\0" * OVER_SIZE if over_size_every else b""       # one buffer, sent many times
    plan: list[tuple[bytes, object]] = []
    for i in range(count):
        if over_size_every and i % over_size_every == over_size_every // 2:
            plan.append((over_size, 413))
        elif i % bad_every == bad_every - 1:
            plan.append(bad[(i // bad_every) % len(bad)])
        else:
            plan.append((bodies[i % len(bodies)], answers[i % len(bodies)]))
    return plan


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def _server_options(args: argparse.Namespace, max_batch: int) -> list[str]:
    options = ["--max-batch", str(max_batch)]
    for name in ("max_queue", "max_connections", "queue_timeout"):
        value = getattr(args, name)
        if value is not None:
            options += [f"--{name.replace('_', '-')}", str(value)]
    return options


def _statuses(statuses: dict) -> str:
    return ", ".join(f"{count} x {status}" for status, count in sorted(statuses.items(), key=lambda kv: str(kv[0])))


def steady(args: argparse.Namespace, checkpoint: str, plan: list, env: dict[str, str]) -> bool:
    print("| --max-batch | maps | requests/s | p50 ms | p99 ms | batches (mean size) | busy (503) | checks |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    failed = False
    for max_batch in args.max_batch:
        for maps in args.maps:
            process, port = start_server(checkpoint, _server_options(args, max_batch), env)
            try:
                result = run_load(port, plan, args.clients, bool(maps), args.time_limit)
                health = _get_json(port, "/healthz")
            finally:
                process.terminate()
                process.wait(timeout=30)
            statuses = result["statuses"]
            bad = sum(isinstance(expected, str) for _, expected in plan)
            healthy = (health.get("status") == "ok" and health["requests"] == statuses.get(200, 0)
                       and health["bad_requests"] == statuses.get(400, 0) and health["busy"] == statuses.get(503, 0)
                       and health["server_errors"] == 0)
            ok = not result["failures"] and healthy and sum(statuses.values()) == args.requests
            failed |= not ok
            mean = health["requests"] / max(health["batches"], 1)
            print(f"| {max_batch} | {'on' if maps else 'off'} | {result['rps']:.0f} | {result['p50']:.1f} | "
                  f"{result['p99']:.1f} | {health['batches']} ({mean:.1f}) | {statuses.get(503, 0)} | "
                  f"{'all answers right, none lost, healthy' if ok else 'FAILED'} |", flush=True)
            for line in result["failures"][:10]:
                print(f"  {line}", file=sys.stderr)
            if not healthy:
                print(f"  /healthz after the run ({bad} bad requests sent): {health}", file=sys.stderr)
    return not failed


def burst(args: argparse.Namespace, checkpoint: str, bodies: list[bytes], answers: list[dict],
          env: dict[str, str]) -> bool:
    print("| --max-batch | maps | scored/s (steady) | burst: requests | answers | in | 200 p99 ms | "
          "/healthz: answered, slowest | resident MiB: before, peak, after | checks |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | --- |")
    failed = False
    for max_batch in args.max_batch:
        for maps in args.maps:
            process, port = start_server(checkpoint, _server_options(args, max_batch), env)
            try:
                calibration = run_load(port, build_plan(args.calibration, bodies, answers, args.bad_every), 32,
                                       bool(maps), args.time_limit)
                rate = calibration["scored_per_s"]
                count = min(20000, max(args.requests, math.ceil(args.burst_factor * rate)))
                plan = build_plan(count, bodies, answers, args.bad_every, over_size_every=50)
                before = resident_mib(process.pid)
                with Watch(process.pid, port) as watch:
                    result = run_load(port, plan, args.clients, bool(maps), args.time_limit, together=True)
                time.sleep(0.5)
                health = _get_json(port, "/healthz")
                after = resident_mib(process.pid)
            finally:
                process.terminate()
                process.wait(timeout=30)
            health_ok = all(status == 200 for status, _ in watch.health) and health.get("status") == "ok"
            grown = None if before is None else watch.peak_mib - before
            memory_ok = grown is None or grown <= args.memory_bound
            problems = list(result["failures"])
            if calibration["failures"]:
                problems += [f"calibration: {line}" for line in calibration["failures"]]
            if not health_ok:
                problems.append(f"/healthz: {[s for s, _ in watch.health if s != 200][:5]}, after: {health}")
            if not memory_ok:
                problems.append(f"resident memory grew {grown:.0f} MiB, over the bound of {args.memory_bound} MiB")
            if health.get("server_errors"):
                problems.append(f"{health['server_errors']} server errors")
            ok = not problems and sum(result["statuses"].values()) == count
            failed |= not ok
            slowest = max((seconds for _, seconds in watch.health), default=0.0)
            memory = "n/a" if before is None else f"{before:.0f}, {watch.peak_mib:.0f}, {after:.0f}"
            print(f"| {max_batch} | {'on' if maps else 'off'} | {rate:.0f} | {count} from {args.clients} clients | "
                  f"{_statuses(result['statuses'])} | {result['elapsed']:.1f} s | {result['p99']:.0f} | "
                  f"{len(watch.health)}, {slowest:.2f} s | {memory} | "
                  f"{'every request answered, none reset, memory within bound, healthy' if ok else 'FAILED'} |",
                  flush=True)
            print(f"  /healthz after: {json.dumps(health)}", flush=True)
            for line in problems[:10]:
                print(f"  {line}", file=sys.stderr)
    return not failed


SLOW_BODY = (b"POST /api/predict HTTP/1.1\r\nHost: load\r\nContent-Type: application/octet-stream\r\n"
             b"Content-Length: 100000\r\n\r\n0123456789")
SLOW_HEADERS = b"POST /api/predict HTTP/1.1\r\nHost: load\r\n"


def _slow_client(port: int, request: bytes, wait: float, out: list, index: int) -> None:
    """Send `request` (an unfinished one) and stop; record ``(status, seconds to the answer,
    seconds to the close, error text)`` in ``out[index]``."""
    started = time.perf_counter()
    status, answered, error = None, None, ""
    try:
        with socket.create_connection((HOST, port), timeout=wait) as sock:
            sock.sendall(request)
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                if not data:
                    answered = time.perf_counter() - started
                data += chunk
        if data:
            status = int(data.split(b" ", 2)[1])
            body = data.partition(b"\r\n\r\n")[2]
            error = json.loads(body)["error"] if body else ""
    except (OSError, ValueError, IndexError) as exc:
        error = repr(exc)
    out[index] = (status, answered, time.perf_counter() - started, error)


def slow(args: argparse.Namespace, checkpoint: str, bodies: list[bytes], answers: list[dict],
         env: dict[str, str]) -> bool:
    from xpcnn.app.connections import LINGER_IDLE_SECONDS

    options = _server_options(args, args.max_batch[0])
    if args.request_timeout is not None:
        options += ["--request-timeout", str(args.request_timeout)]
    timeout = args.request_timeout or 10.0
    print("| slow clients | cut | answer after s: min, median, max | closed after s: max | open connections: "
          "peak, after | good requests meanwhile | checks |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    process, port = start_server(checkpoint, options, env)
    try:
        kinds = [("body", SLOW_BODY)] * args.clients + [("headers", SLOW_HEADERS)] * max(1, args.clients // 10)
        out: list = [None] * len(kinds)
        threads = [threading.Thread(target=_slow_client, args=(port, request, timeout + 30, out, i))
                   for i, (_, request) in enumerate(kinds)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        peak = _get_json(port, "/healthz")["connections"]["open"]
        good = run_load(port, build_plan(args.requests, bodies, answers, args.bad_every), 8, False, args.time_limit)
        for thread in threads:
            thread.join()
        time.sleep(0.5)
        health = _get_json(port, "/healthz")
    finally:
        process.terminate()
        process.wait(timeout=30)
    problems = [f"good requests: {line}" for line in good["failures"]]
    answer_bound, close_bound = timeout + 1.0, timeout + LINGER_IDLE_SECONDS + 1.0
    rows = []
    for kind in ("body", "headers"):
        found = [result for (name, _), result in zip(kinds, out) if name == kind]
        what = "upload" if kind == "body" else "request's headers"
        for status, answered, closed, error in found:
            if status == 503 and "busy" in error:
                continue                        # opened over --max-connections: answered busy at once
            if status != 408 or f"the {what} did not arrive within {timeout:g} s" not in error:
                problems.append(f"slow {kind}: {status} {error!r}, expected 408")
            elif not (timeout - 0.5 <= answered <= answer_bound and closed <= close_bound):
                problems.append(f"slow {kind}: answered after {answered:.1f} s, closed after {closed:.1f} s; "
                                f"expected {timeout:g} to {answer_bound:g} s, closed by {close_bound:g} s")
        times = sorted(answered for _, answered, _, _ in found if answered is not None) or [float("nan")]
        rows.append((kind, len(found), _statuses(Counter(status for status, _, _, _ in found)), times,
                     max(closed for _, _, closed, _ in found)))
    if peak > len(kinds) + 8 + 1 or health["connections"]["open"] > 1:
        problems.append(f"open connections: {peak} with {len(kinds)} slow clients, {health['connections']['open']} "
                        f"after")
    ok = not problems
    for kind, count, cut, times, closed in rows:
        label = "100 kB declared, 10 bytes sent" if kind == "body" else "half the headers sent"
        print(f"| {count} x {label} | {cut} | {times[0]:.1f}, {times[len(times) // 2]:.1f}, {times[-1]:.1f} | "
              f"{closed:.1f} | {peak}, {health['connections']['open']} | {_statuses(good['statuses'])} | "
              f"{'all cut in time, all answered' if ok else 'FAILED'} |", flush=True)
    print(f"  /healthz after: {json.dumps(health)}", flush=True)
    for line in problems[:10]:
        print(f"  {line}", file=sys.stderr)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per run (default 2000; with --burst: at least this many, default 0; "
                             "with --slow: good ones meanwhile, default 200)")
    parser.add_argument("--clients", type=int, default=None,
                        help="concurrent clients (default 32; with --burst 256, with --slow 40; at most 256)")
    parser.add_argument("--images", type=int, default=300, help="distinct test images sent (default 300)")
    parser.add_argument("--bad-every", type=int, default=20, help="every Nth request is a bad upload (default 20)")
    parser.add_argument("--max-batch", type=_int_list, default=None,
                        help="settings to compare (default 1,32; with --burst or --slow 32)")
    parser.add_argument("--maps", type=_int_list, default=None, help="feature maps off/on (default 0,1; burst: 1)")
    parser.add_argument("--max-queue", type=int, default=None, help="the server's --max-queue (default its own)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="the server's --max-connections (default its own)")
    parser.add_argument("--queue-timeout", type=float, default=None, help="the server's --queue-timeout")
    parser.add_argument("--request-timeout", type=float, default=None, help="the server's --request-timeout")
    parser.add_argument("--burst", action="store_true", help="overload the server (see above)")
    parser.add_argument("--slow", action="store_true", help="slow clients (see above)")
    parser.add_argument("--burst-factor", type=float, default=10.0,
                        help="burst requests per request scored per second (default 10)")
    parser.add_argument("--calibration", type=int, default=400,
                        help="requests of the steady run that measures the scoring rate (default 400)")
    parser.add_argument("--memory-bound", type=float, default=200.0,
                        help="MiB the server's resident memory may grow during a burst (default 200)")
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset's IDX files")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per run at most (default 300)")
    args = parser.parse_args(argv)
    if args.burst and args.slow:
        parser.error("--burst and --slow are two different runs: give one")
    args.requests = args.requests if args.requests is not None else (0 if args.burst else 200 if args.slow else 2000)
    args.clients = args.clients or (256 if args.burst else 40 if args.slow else 32)
    args.max_batch = args.max_batch or ([32] if args.burst or args.slow else [1, 32])
    args.maps = args.maps or ([1] if args.burst else [0, 1])
    if not (0 <= args.requests <= 20000 and (args.burst or args.requests >= 1) and 1 <= args.clients <= 256
            and args.bad_every >= 2 and 1 <= args.calibration <= 5000):
        parser.error("expected 1 <= --requests <= 20000, 1 <= --clients <= 256, --bad-every >= 2, "
                     "1 <= --calibration <= 5000")
    checkpoint = os.path.abspath(args.checkpoint)
    env = dict(os.environ)

    with tempfile.TemporaryDirectory(prefix="load-serve-") as tmp:
        folder = Path(tmp)
        names, bodies = make_bodies(_dataset_images(checkpoint, args.data_dir, args.images), folder)
        answers = expected_answers(checkpoint, folder, names, env)
        if args.slow:
            print(f"{args.clients} slow uploads and {max(1, args.clients // 10)} slow headers to {HOST}, meanwhile "
                  f"{args.requests} good requests from 8 clients, {os.cpu_count()} CPUs", flush=True)
            ok = slow(args, checkpoint, bodies, answers, env)
        elif args.burst:
            print(f"burst of {args.burst_factor:g}x the scoring rate from {args.clients} clients to {HOST}, "
                  f"{os.cpu_count()} CPUs, checkpoint {args.checkpoint}", flush=True)
            ok = burst(args, checkpoint, bodies, answers, env)
        else:
            plan = build_plan(args.requests, bodies, answers, args.bad_every)
            print(f"{args.requests} requests ({sum(isinstance(e, str) for _, e in plan)} bad) from {args.clients} "
                  f"clients to {HOST}, {os.cpu_count()} CPUs, checkpoint {args.checkpoint}", flush=True)
            ok = steady(args, checkpoint, plan, env)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
