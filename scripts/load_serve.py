"""Load test of ``xpcnn serve``, on 127.0.0.1 only: many concurrent clients, real images and a
few bad ones, every answer checked.

    python scripts/load_serve.py runs/latest/checkpoint.npz                    # 2,000 requests, 32 clients
    python scripts/load_serve.py CKPT --requests 500 --clients 8 --max-batch 1,32 --maps 0,1

For each ``--max-batch`` (1: no batching) and ``--maps`` setting it starts ``xpcnn serve CKPT
--port 0`` (a free port of 127.0.0.1), sends the requests from ``--clients`` threads (one
keep-alive connection each), and checks that every good request got exactly the answer
``xpcnn predict --json`` gives for the same file, every bad one its 400 with a JSON error,
that no request was lost, and that ``/healthz`` is still ok at the end. It prints requests per
second and the p50/p99 latency as a Markdown table; exit 1 when any check fails. Bounded:
``--requests`` at most 20,000, ``--clients`` at most 256, ``--time-limit`` seconds per run.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

HOST = "127.0.0.1"          # all traffic stays on this computer


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


def start_server(checkpoint: str, max_batch: int, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-m", "xpcnn.cli", "serve", checkpoint, "--host", HOST, "--port", "0",
                                "--max-batch", str(max_batch)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("listening on "):
            return process, int(line.split()[2].rstrip("/").rsplit(":", 1)[1])
    process.kill()
    raise SystemExit("load_serve: the server did not start")


def _get_json(port: int, path: str) -> dict:
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def run_load(port: int, plan: list[tuple[bytes, object]], clients: int, maps: bool, time_limit: float) -> dict:
    """Send every request of `plan` (``(body, expected answer dict or error fragment)``) from
    `clients` threads; return the counts, failures and latencies."""
    work: queue.Queue = queue.Queue()
    for index in range(len(plan)):
        work.put(index)
    results: list = [None] * len(plan)
    deadline = time.monotonic() + time_limit
    path = f"/api/predict?top=3&maps={int(maps)}"

    def client() -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=60)
        while time.monotonic() < deadline:
            try:
                index = work.get_nowait()
            except queue.Empty:
                break
            body = plan[index][0]
            started = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream"})
                response = connection.getresponse()
                payload = response.read()
                results[index] = (response.status, payload, time.perf_counter() - started)
            except (OSError, http.client.HTTPException) as exc:
                results[index] = ("failed", repr(exc).encode(), time.perf_counter() - started)
                connection.close()
                connection = http.client.HTTPConnection(HOST, port, timeout=60)
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started

    failures, latencies, good, bad = [], [], 0, 0
    for index, ((_, expected), result) in enumerate(zip(plan, results)):
        if result is None:
            failures.append(f"request {index}: never answered (lost, or over the time limit)")
            continue
        status, payload, seconds = result
        latencies.append(seconds)
        if isinstance(expected, dict):
            good += 1
            answer = json.loads(payload) if status == 200 else None
            if answer is None or {k: answer.get(k) for k in expected} != expected:
                failures.append(f"request {index}: {status} {payload[:200]!r}, expected {expected}")
        else:
            bad += 1
            try:
                error = json.loads(payload)
            except ValueError:
                error = {}
            if status != 400 or set(error) != {"error"} or expected not in error["error"]:
                failures.append(f"request {index}: {status} {payload[:200]!r}, expected 400 with {expected!r}")
    latencies_ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"elapsed": elapsed, "good": good, "bad": bad, "failures": failures,
            "rps": len(latencies) / elapsed, "p50": float(np.percentile(latencies_ms, 50)),
            "p99": float(np.percentile(latencies_ms, 99))}


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--requests", type=int, default=2000, help="requests per run (default 2000, at most 20000)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32, at most 256)")
    parser.add_argument("--images", type=int, default=300, help="distinct test images sent (default 300)")
    parser.add_argument("--bad-every", type=int, default=20, help="every Nth request is a bad upload (default 20)")
    parser.add_argument("--max-batch", type=_int_list, default=[1, 32], help="settings to compare (default 1,32)")
    parser.add_argument("--maps", type=_int_list, default=[0, 1], help="feature maps off/on (default 0,1)")
    parser.add_argument("--data-dir", default=None, help="folder holding the dataset's IDX files")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per run at most (default 300)")
    args = parser.parse_args(argv)
    if not (1 <= args.requests <= 20000 and 1 <= args.clients <= 256 and args.bad_every >= 2):
        parser.error("expected 1 <= --requests <= 20000, 1 <= --clients <= 256, --bad-every >= 2")
    checkpoint = os.path.abspath(args.checkpoint)
    env = dict(os.environ)

    with tempfile.TemporaryDirectory(prefix="load-serve-") as tmp:
        folder = Path(tmp)
        names, bodies = make_bodies(_dataset_images(checkpoint, args.data_dir, args.images), folder)
        answers = expected_answers(checkpoint, folder, names, env)
        bad = bad_bodies(bodies[0])
        plan: list[tuple[bytes, object]] = []
        for i in range(args.requests):
            if i % args.bad_every == args.bad_every - 1:
                plan.append(bad[(i // args.bad_every) % len(bad)])
            else:
                plan.append((bodies[i % len(bodies)], answers[i % len(bodies)]))

        print(f"{args.requests} requests ({sum(isinstance(e, str) for _, e in plan)} bad) from {args.clients} "
              f"clients to {HOST}, {os.cpu_count()} CPUs, checkpoint {args.checkpoint}", flush=True)
        print("| --max-batch | maps | requests/s | p50 ms | p99 ms | batches (mean size) | checks |")
        print("| ---: | ---: | ---: | ---: | ---: | --- | --- |")
        failed = False
        for max_batch in args.max_batch:
            for maps in args.maps:
                process, port = start_server(checkpoint, max_batch, env)
                try:
                    result = run_load(port, plan, args.clients, bool(maps), args.time_limit)
                    health = _get_json(port, "/healthz")
                finally:
                    process.terminate()
                    process.wait(timeout=30)
                healthy = (health.get("status") == "ok" and health["requests"] == result["good"]
                           and health["bad_requests"] == result["bad"] and health["server_errors"] == 0)
                ok = not result["failures"] and healthy and result["good"] + result["bad"] == args.requests
                failed |= not ok
                mean = health["requests"] / max(health["batches"], 1)
                print(f"| {max_batch} | {'on' if maps else 'off'} | {result['rps']:.0f} | {result['p50']:.1f} | "
                      f"{result['p99']:.1f} | {health['batches']} ({mean:.1f}) | "
                      f"{'all answers right, none lost, healthy' if ok else 'FAILED'} |", flush=True)
                for line in result["failures"][:10]:
                    print(f"  {line}", file=sys.stderr)
                if not healthy:
                    print(f"  /healthz after the run: {health}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
