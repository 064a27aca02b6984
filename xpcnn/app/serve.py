"""``xpcnn serve``: a trained network behind a web page and a small HTTP API.

    >>> app = create_app(ServedModel.from_checkpoint("runs/latest/checkpoint.npz"))   # an ASGI app
    >>> serve(model, host="127.0.0.1", port=8000)                                    # uvicorn

- ``GET /``: the page (``xpcnn/app/static/``: no CDN, works offline): draw or drop an image, see
  the top classes, the 28 x 28 image the network received and its first layer's feature maps.
- ``POST /api/predict``: an image file's bytes (raw body or a multipart upload; ``?top=N``,
  ``?invert=``, ``?fit=``, ``?maps=0``) -> the JSON object of one line of ``xpcnn predict --json``,
  plus ``input`` (the prepared image as a PNG) and ``feature_maps``.
- ``GET /api/model``, ``GET /healthz``, ``GET /openapi.json``.

Uploads are read with `xpcnn.data.images.read_input_bytes` (the same checks and preparation as
``xpcnn predict``; nothing a client sends is ever used as a path) and classified by a `Batcher`:
requests arriving together share one forward pass (up to ``max_batch`` images, waiting at most
``max_wait`` seconds after the first), and each gets exactly the probabilities it would get alone
(`xpcnn.nn.inference.predict_proba` pads every batch to whole blocks of rows). Every error is
a JSON ``{"error": ...}``: 400 for a bad image or option, 413 for an upload over the size limit;
never a traceback. FastAPI, uvicorn and python-multipart are the optional extra ``serve``,
imported only here, only when a server is made.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (``Request``,
# imported inside `create_app`) when they are defined.
import asyncio
import base64
import importlib
import importlib.util
import io
import logging
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..backend.arrays import dtype_name
from ..backend.devices import get_backend
from ..data.datasets import class_names, get_spec
from ..data.images import FIT_CHOICES, INVERT_CHOICES, InputFile, read_input_bytes
from ..errors import DatasetError, ImageFileError, ServeError
from ..nn.inference import predict_proba, top_k
from ..training.checkpoint import build_from_checkpoint, load_checkpoint
from .predict import Prediction, input_size, prediction_record
from .report import first_convolution, first_layer_outputs

#: An upload larger than this is refused with 413 (the largest picture worth sending is far smaller).
MAX_UPLOAD_BYTES = 8 * 2 ** 20
#: Pictures declaring more pixels than this are refused with 400 before decoding.
MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BATCH = 32
#: How long the first request of a batch waits for others (seconds).
MAX_WAIT = 0.004
INSTALL_HINT = "xpcnn serve needs the optional web server packages: pip install 'xpcnn[serve]'"
STATIC = Path(__file__).resolve().parent / "static"
LOG = logging.getLogger("xpcnn.serve")


def require_server_packages() -> None:
    for name in ("fastapi", "uvicorn", "python_multipart"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found or (name != "python_multipart" and not _imports(name)):
            raise ServeError(f"{INSTALL_HINT} ({name.replace('_', '-')} is missing)")


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _png(gray: np.ndarray, alpha: np.ndarray | None = None) -> str:
    """``(H, W)`` values in [0, 1] (and an 8-bit alpha) -> a ``data:image/png;base64,...`` URL (8-bit gray)."""
    from PIL import Image

    buffer = io.BytesIO()
    picture = Image.fromarray(np.round(np.clip(gray, 0.0, 1.0) * 255).astype(np.uint8))
    if alpha is not None:
        picture.putalpha(Image.fromarray(alpha))
    picture.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class ServedModel:
    """A network ready to serve, with what the page and ``/api/model`` show about it."""

    network: Any
    info: dict[str, Any]
    names: list[str]
    fit: str
    size: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.size = input_size(self.network)          # a colour network fails here, before serving
        self.dtype = dtype_name(self.network.dtype)
        self.has_maps = first_convolution(self.network) is not None

    @classmethod
    def from_checkpoint(cls, path: "str | os.PathLike[str]", backend: Any = None,
                        dataset: str | None = None) -> "ServedModel":
        """Load `path` onto `backend` (a `Backend`, default NumPy): model, dataset, accuracy, epoch."""
        backend = backend if backend is not None else get_backend("cpu")
        checkpoint = load_checkpoint(path)
        network = build_from_checkpoint(checkpoint, backend)
        dataset = dataset or checkpoint.extra.get("dataset")
        dataset = str(dataset) if dataset else None
        try:
            fit = get_spec(dataset).picture_fit if dataset else "fill"
        except DatasetError:
            fit = "fill"
        history = checkpoint.metadata.get("history")
        test_acc = history.get("test_acc") if isinstance(history, dict) else None
        accuracy = float(test_acc[-1]) if test_acc else None
        names = list(class_names(dataset, network.config["output_size"]))
        info = {"model": type(network).__name__, "dataset": dataset, "classes": names,
                "test_accuracy": accuracy, "epoch": int(checkpoint.epoch), "checkpoint": Path(path).name,
                "backend": str(backend), "dtype": dtype_name(network.dtype), "xpcnn": __version__}
        model = cls(network, info, names, fit)
        model.info["input_size"] = list(model.size)
        model.info["fit"] = fit
        return model

    def prepare(self, data: bytes, name: str, invert: str = "auto", fit: str | None = None) -> InputFile:
        """An upload's bytes -> its one prepared image (`ImageFileError` for anything else)."""
        item = read_input_bytes(data, name, self.size, invert, fit=fit or self.fit, max_pixels=MAX_PIXELS)
        if item.images.shape[0] != 1:
            raise ImageFileError(f"{name}: holds {item.images.shape[0]} images; expected one image per request "
                                 f"(send them one at a time)")
        return item

    def forward(self, images: np.ndarray, maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """``(N, H, W)`` prepared images -> host probabilities ``(N, K)`` (exactly those of each
        image alone) and, when `maps`, the first layer's outputs ``(N, FN, OH, OW)``."""
        x = images[:, None].astype(self.dtype, copy=False)
        proba = self.network.backend.to_numpy(predict_proba(self.network, x, x.shape[0]))
        found = first_layer_outputs(self.network, x) if maps and self.has_maps else None
        return proba, None if found is None else found[1]

    def answer(self, item: InputFile, proba: np.ndarray, maps: np.ndarray | None, top: int) -> dict[str, Any]:
        """The JSON object for one image: ``xpcnn predict --json``'s, the prepared image, the maps."""
        classes, probs = top_k(proba[None], top)
        result = Prediction(item.path, None if item.kind == "image" else 0, classes[0].tolist(),
                            [float(p) for p in probs[0]], item.inverted)
        record = prediction_record(result, self.names)
        height, width = item.images.shape[1:]
        record["input"] = {"height": int(height), "width": int(width), "png": _png(item.images[0])}
        if maps is not None:
            record["feature_maps"] = self.map_sheet(maps)
        return record


    def map_sheet(self, maps: np.ndarray, gap: int = 2) -> dict[str, Any]:
        """First-layer maps ``(FN, OH, OW)`` -> one PNG sheet: the maps in rows of `columns`, each
        scaled to its own range (bright: strong response), `gap` transparent pixels apart."""
        count, height, width = maps.shape
        columns = min(count, 10)
        rows = -(-count // columns)
        low = maps.min(axis=(1, 2), keepdims=True)
        span = maps.max(axis=(1, 2), keepdims=True) - low
        scaled = np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0)
        gray = np.zeros((rows * (height + gap) - gap, columns * (width + gap) - gap), np.float32)
        alpha = np.zeros(gray.shape, np.uint8)
        for i in range(count):
            top, left = (i // columns) * (height + gap), (i % columns) * (width + gap)
            gray[top:top + height, left:left + width] = scaled[i]
            alpha[top:top + height, left:left + width] = 255
        return {"layer": first_convolution(self.network)[0], "count": int(count), "height": int(height),
                "width": int(width), "columns": columns, "rows": rows, "gap": gap, "png": _png(gray, alpha)}


class Batcher:
    """Gathers concurrent requests into one forward pass: up to `max_batch` images, the first
    waiting at most `max_wait` seconds for the others. The network runs on one thread only."""

    def __init__(self, model: ServedModel, max_batch: int = DEFAULT_MAX_BATCH, max_wait: float = MAX_WAIT) -> None:
        self.model, self.max_batch, self.max_wait = model, max(1, int(max_batch)), float(max_wait)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="xpcnn-forward")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, image: np.ndarray, maps: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """One prepared image ``(H, W)`` -> its probabilities ``(K,)`` and first-layer maps."""
        if self._queue is None:
            await self.start()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((image, maps, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            images = np.stack([image for image, _, _ in items])
            want_maps = any(maps for _, maps, _ in items)
            try:
                proba, maps = await loop.run_in_executor(self._executor, self.model.forward, images, want_maps)
            except Exception as exc:            # handed to each waiting request (a 500 without traceback)
                for _, _, future in items:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.stats["requests"] += len(items)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
            for row, (_, wanted, future) in enumerate(items):
                if not future.done():
                    future.set_result((proba[row], maps[row] if wanted and maps is not None else None))


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _query_choice(params: Any, name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = params.get(name)
    if value is None:
        return default
    if value not in choices:
        raise _BadRequest(400, f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _query_top(params: Any) -> int:
    text = params.get("top", "3")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise _BadRequest(400, f"top must be an integer >= 1, got {text!r}")
    return value


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BadRequest(413, f"the upload is {int(declared)} bytes, over the limit of {limit} bytes "
                               f"({limit / 2 ** 20:g} MiB); send a smaller picture")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _BadRequest(413, f"the upload is over the limit of {limit} bytes ({limit / 2 ** 20:g} MiB); "
                                   f"send a smaller picture")
        chunks.append(chunk)
    return b"".join(chunks)


async def _upload(request: Any, limit: int) -> tuple[bytes, str]:
    """``(bytes, name)`` of the image in a raw body or a multipart upload (the name only labels messages)."""
    body = await _read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return body, "upload"
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay():
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise _BadRequest(400, f"expected a multipart upload holding one image file: {exc.message}") from None
    files = [value for _, value in form.multi_items() if not isinstance(value, str)]
    if len(files) != 1:
        raise _BadRequest(400, f"expected a multipart upload holding one image file (field 'file'), "
                               f"got {len(files)} files")
    data = await files[0].read()
    name = os.path.basename((files[0].filename or "upload").replace("\\", "/"))[:200] or "upload"
    await form.close()
    return data, name


def create_app(model: ServedModel, *, max_batch: int = DEFAULT_MAX_BATCH, max_wait: float = MAX_WAIT,
               max_upload: int = MAX_UPLOAD_BYTES) -> Any:
    """The ASGI application (FastAPI) serving `model`."""
    require_server_packages()
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    batcher = Batcher(model, max_batch, max_wait)
    errors = {"bad_requests": 0, "server_errors": 0}

    @asynccontextmanager
    async def lifespan(_app: Any):
        await batcher.start()
        yield
        await batcher.stop()

    # Swagger's /docs page loads its scripts from a CDN: off, so everything served works offline.
    app = FastAPI(title="xpcnn serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Classify an image with a trained xpcnn checkpoint (see docs/serve.md).")
    app.state.batcher, app.state.model = batcher, model

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Any, exc: Any) -> Any:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request: Any, exc: Exception) -> Any:
        errors["server_errors"] += 1
        LOG.error("internal error: %s: %s", type(exc).__name__, exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server goes on serving"},
                            status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", summary="liveness, and how many requests were batched together")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", **batcher.stats, **errors, "max_batch": batcher.max_batch}

    @app.get("/api/model", summary="the served model: name, dataset, classes, input size, accuracy, backend")
    async def model_info() -> dict[str, Any]:
        return {**model.info, "max_batch": batcher.max_batch, "max_upload_bytes": max_upload}

    @app.post("/api/predict", summary="classify one image (raw bytes or a multipart upload)",
              openapi_extra={"requestBody": {"content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary"}}}}}},
                  "parameters": [
                      {"name": "top", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 3}},
                      {"name": "invert", "in": "query", "schema": {"enum": list(INVERT_CHOICES), "default": "auto"}},
                      {"name": "fit", "in": "query", "schema": {"enum": list(FIT_CHOICES)}},
                      {"name": "maps", "in": "query", "schema": {"enum": ["0", "1"], "default": "1"}}]})
    async def predict(request: Request) -> Any:
        loop = asyncio.get_running_loop()
        try:
            params = request.query_params
            top = _query_top(params)
            invert = _query_choice(params, "invert", INVERT_CHOICES, "auto")
            fit = _query_choice(params, "fit", FIT_CHOICES, None)
            maps = _query_choice(params, "maps", ("0", "1"), "1") == "1"
            data, name = await _upload(request, max_upload)
            try:
                item = await loop.run_in_executor(None, model.prepare, data, name, invert, fit)
            except ImageFileError as exc:
                raise _BadRequest(400, str(exc)) from None
            except (MemoryError, RecursionError, ValueError, OSError) as exc:     # a decoder's own failure
                raise _BadRequest(400, f"{name}: cannot decode the picture ({type(exc).__name__}); expected a "
                                       f"PNG, JPEG, BMP or GIF picture, or a .npy/IDX array of one image") from None
        except _BadRequest as exc:
            errors["bad_requests"] += 1
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        proba, feature_maps = await batcher.submit(item.images[0], maps)
        record = await loop.run_in_executor(None, model.answer, item, proba, feature_maps, top)
        return JSONResponse(record)

    return app


def open_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port` (0: a free port), or `ServeError` in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host!r}: {exc.strerror}; expected an address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                         f"(or stop what uses it)") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def address_lines(host: str, port: int) -> tuple[str, str | None]:
    """The line saying where the server listens, and the warning printed when that is not this computer only."""
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    if is_loopback(host):
        return f"listening on {url} (this computer only; --host 0.0.0.0 to share it)", None
    return (f"listening on {url}",
            f"xpcnn: warning: --host {host}: anyone who can reach this machine on the network can use this server "
            f"(there is no login); use --host 127.0.0.1 to keep it on this computer")


def serve(model: ServedModel, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = DEFAULT_MAX_BATCH,
          max_wait: float = MAX_WAIT, max_upload: int = MAX_UPLOAD_BYTES, log_requests: bool = False) -> None:
    """Serve `model` with uvicorn until Ctrl-C; prints the address first (and a warning off 127.0.0.1)."""
    require_server_packages()
    import uvicorn

    app = create_app(model, max_batch=max_batch, max_wait=max_wait, max_upload=max_upload)
    sock = open_socket(host, port)
    bound = sock.getsockname()[1]
    info = model.info
    accuracy = f", test acc {info['test_accuracy']:.4f}" if info.get("test_accuracy") is not None else ""
    print(f"xpcnn {__version__}: serving {info['model']} ({info['dataset'] or 'unknown dataset'}{accuracy}, "
          f"epoch {info['epoch']}) on backend {info['backend']}, batches of up to {max_batch}", flush=True)
    line, warning = address_lines(host, bound)
    print(line, flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=log_requests, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
