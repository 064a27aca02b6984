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
a JSON ``{"error": ...}``: 400 for a bad image or option, 408 for an upload that does not arrive
in time, 413 for one over the size limit, 503 with ``Retry-After`` when the server is busy (its
queue or its connections full, or a request waited too long: `Limits`); never a traceback. An
answer given before the upload was read says ``Connection: close``, and the server then closes
with a lingering close, so a client still sending reads the answer rather than a reset
(`xpcnn.app.connections`). FastAPI, uvicorn and python-multipart are the optional extra
``serve``, imported only here and in `xpcnn.app.connections`, only when a server is made.
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
from .batcher import DEFAULT_MAX_BATCH, MAX_WAIT, QUEUE_TIMEOUT, RETRY_AFTER, Batcher, ServerBusy, default_max_queue
from .connections import MAX_CONNECTIONS, REQUEST_TIMEOUT, connection_stats, protocol_class
from .predict import Prediction, input_size, prediction_record
from .report import first_convolution, first_layer_outputs

#: An upload larger than this is refused with 413 (the largest picture worth sending is far smaller).
MAX_UPLOAD_BYTES = 8 * 2 ** 20
#: Pictures declaring more pixels than this are refused with 400 before decoding.
MAX_PIXELS = 4096 * 4096
INSTALL_HINT = "xpcnn serve needs the optional web server packages: pip install 'xpcnn[serve]'"
STATIC = Path(__file__).resolve().parent / "static"
LOG = logging.getLogger("xpcnn.serve")


@dataclass(frozen=True)
class Limits:
    """What one ``xpcnn serve`` takes on at once, and how long it waits (docs/serve.md, "Limits").

    `max_batch` images share a forward pass, the first waiting `max_wait` s for the others;
    uploads over `max_upload` bytes are refused (413); at most `max_queue` requests are in hand
    past reading their upload (default `default_max_queue`; more: 503), and one not in a forward
    pass `queue_timeout` s after its upload arrived is refused (503); a request's headers, and
    then its body, must each arrive within `request_timeout` s (408); over `max_connections`
    open connections, new ones are answered 503 (``xpcnn serve`` only: `serve`)."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_wait: float = MAX_WAIT
    max_upload: int = MAX_UPLOAD_BYTES
    max_queue: int = 0                    # 0: default_max_queue(max_batch)
    queue_timeout: float = QUEUE_TIMEOUT
    request_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if not self.max_queue:
            object.__setattr__(self, "max_queue", default_max_queue(self.max_batch))


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

    def warm_up(self) -> None:
        """One forward pass on a blank image, so that what a first pass does once (compiling or
        loading NumPy's compiled kernels, a GPU's first launches) is not a first client's wait."""
        self.forward(np.zeros((1, *self.size), dtype=self.dtype), maps=self.has_maps)

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


class _Refusal(Exception):
    """A request answered with an error: its status and the message of its JSON ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _query_choice(params: Any, name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = params.get(name)
    if value is None:
        return default
    if value not in choices:
        raise _Refusal(400, f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _query_top(params: Any) -> int:
    text = params.get("top", "3")
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise _Refusal(400, f"top must be an integer >= 1, got {text!r}")
    return value


def _options(params: Any) -> tuple[int, str, str | None, bool]:
    """``?top=&invert=&fit=&maps=`` -> ``(top, invert, fit, maps)``, or a 400."""
    return (_query_top(params), _query_choice(params, "invert", INVERT_CHOICES, "auto"),
            _query_choice(params, "fit", FIT_CHOICES, None), _query_choice(params, "maps", ("0", "1"), "1") == "1")


async def _read_body(request: Any, limit: int, timeout: float) -> bytes:
    """The request body: 413 as soon as it passes `limit` bytes (before reading it, when its
    declared length does), 408 when it has not all arrived `timeout` seconds after the headers."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if size is not None and size > limit:
        raise _Refusal(413, f"the upload is {size} bytes, over the limit of {limit} bytes "
                            f"({limit / 2 ** 20:g} MiB); send a smaller picture")
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise _Refusal(413, f"the upload is over the limit of {limit} bytes ({limit / 2 ** 20:g} MiB); "
                                        f"send a smaller picture")
                chunks.append(chunk)
    except TimeoutError:
        of = f" of the {size} declared" if size is not None else ""
        raise _Refusal(408, f"the upload did not arrive within {timeout:g} s ({total} bytes{of} came); "
                            f"send the whole request at once") from None
    except ClientDisconnect:
        raise _Refusal(400, "the client closed the connection before its upload was complete") from None
    return b"".join(chunks)


async def _upload(request: Any, limit: int, timeout: float) -> tuple[bytes, str]:
    """``(bytes, name)`` of the image in a raw body or a multipart upload (the name only labels messages)."""
    body = await _read_body(request, limit, timeout)
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
        raise _Refusal(400, f"expected a multipart upload holding one image file: {exc.message}") from None
    files = [value for _, value in form.multi_items() if not isinstance(value, str)]
    if len(files) != 1:
        raise _Refusal(400, f"expected a multipart upload holding one image file (field 'file'), "
                            f"got {len(files)} files")
    data = await files[0].read()
    name = os.path.basename((files[0].filename or "upload").replace("\\", "/"))[:200] or "upload"
    await form.close()
    return data, name


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class _CloseUnreadUploads:
    """ASGI middleware: an answer given before the request's body was read to its end (a 413 on
    the declared length, a 408, a 503, a 404) says ``Connection: close``. uvicorn then closes the
    connection (with `xpcnn.app.connections`' lingering close) instead of keeping it alive to read
    and throw away an upload of any length."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _has_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        read = False

        async def receive_noting_the_end() -> dict:
            nonlocal read
            message = await receive()
            read = read or message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_closing(message: dict) -> None:
            headers = message.get("headers", [])
            if message["type"] == "http.response.start" and not read and all(n != b"connection" for n, _ in headers):
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_noting_the_end, send_closing)


class _Api:
    """What the endpoints do: read an upload, queue it for the `Batcher`, answer, and count the
    refusals by kind (``/healthz``)."""

    def __init__(self, model: ServedModel, limits: "Limits", connections: dict[str, int] | None) -> None:
        self.model, self.limits, self.connections = model, limits, connections
        self.batcher = Batcher(model, limits.max_batch, limits.max_wait, limits.max_queue, limits.queue_timeout)
        self.counts = {"bad_requests": 0, "busy": 0, "server_errors": 0}

    async def predict(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            top, invert, fit, maps = _options(request.query_params)
            data, name = await _upload(request, self.limits.max_upload, self.limits.request_timeout)
            with self.batcher.admit() as since:
                item = await self._prepare(data, name, invert, fit)
                proba, feature_maps = await self.batcher.submit(item.images[0], maps, since)
                record = await asyncio.get_running_loop().run_in_executor(
                    None, self.model.answer, item, proba, feature_maps, top)
        except ServerBusy as exc:
            return self.refuse(503, str(exc))
        except _Refusal as exc:
            return self.refuse(exc.status, exc.message)
        return JSONResponse(record)

    async def _prepare(self, data: bytes, name: str, invert: str, fit: str | None) -> InputFile:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.model.prepare, data, name, invert, fit)
        except ImageFileError as exc:
            raise _Refusal(400, str(exc)) from None
        except (MemoryError, RecursionError, ValueError, OSError) as exc:     # a decoder's own failure
            raise _Refusal(400, f"{name}: cannot decode the picture ({type(exc).__name__}); expected a PNG, JPEG, "
                                f"BMP or GIF picture, or a .npy/IDX array of one image") from None

    def refuse(self, status: int, message: str) -> Any:
        from starlette.responses import JSONResponse

        self.counts["busy" if status == 503 else "bad_requests"] += 1
        headers = {"Retry-After": str(RETRY_AFTER)} if status == 503 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def server_error(self, exc: Exception) -> Any:
        from starlette.responses import JSONResponse

        self.counts["server_errors"] += 1
        LOG.error("internal error: %s: %s", type(exc).__name__, exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server goes on serving"},
                            status_code=500)

    def health(self) -> dict[str, Any]:
        found = {"status": "ok", **self.batcher.stats, **self.counts, "max_batch": self.batcher.max_batch,
                 "max_queue": self.batcher.max_queue}
        if self.connections is not None:
            found["connections"] = dict(self.connections)
        return found

    def info(self) -> dict[str, Any]:
        return {**self.model.info, "max_batch": self.batcher.max_batch, "max_upload_bytes": self.limits.max_upload,
                "max_queue": self.batcher.max_queue}


#: The OpenAPI description of ``POST /api/predict``'s body and query (FastAPI cannot see them:
#: the endpoint reads the raw request).
PREDICT_OPENAPI = {
    "requestBody": {"content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}}}}},
    "parameters": [
        {"name": "top", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 3}},
        {"name": "invert", "in": "query", "schema": {"enum": list(INVERT_CHOICES), "default": "auto"}},
        {"name": "fit", "in": "query", "schema": {"enum": list(FIT_CHOICES)}},
        {"name": "maps", "in": "query", "schema": {"enum": ["0", "1"], "default": "1"}}]}


def create_app(model: ServedModel, limits: Limits | None = None, connections: dict[str, int] | None = None) -> Any:
    """The ASGI application (FastAPI) serving `model` within `limits`; `connections`: the
    counters of `xpcnn.app.connections` for ``/healthz`` (`serve` passes them)."""
    require_server_packages()
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    api = _Api(model, limits or Limits(), connections)

    @asynccontextmanager
    async def lifespan(_app: Any):
        await api.batcher.start()
        yield
        await api.batcher.stop()

    # Swagger's /docs page loads its scripts from a CDN: off, so everything served works offline.
    app = FastAPI(title="xpcnn serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Classify an image with a trained xpcnn checkpoint (see docs/serve.md).")
    app.add_middleware(_CloseUnreadUploads)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Any, exc: Any) -> Any:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request: Any, exc: Exception) -> Any:
        return api.server_error(exc)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="liveness, how requests were batched, and what was refused")
    async def healthz() -> dict[str, Any]:
        return api.health()

    @app.get("/api/model", summary="the served model: name, dataset, classes, input size, accuracy, backend")
    async def model_info() -> dict[str, Any]:
        return api.info()

    @app.post("/api/predict", summary="classify one image (raw bytes or a multipart upload)",
              openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request) -> Any:
        return await api.predict(request)

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


def serve(model: ServedModel, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None, *,
          log_requests: bool = False) -> None:
    """Serve `model` with uvicorn until Ctrl-C; prints the address first (and a warning off 127.0.0.1)."""
    require_server_packages()
    import uvicorn

    limits = limits or Limits()
    connections = connection_stats(limits.max_connections)
    app = create_app(model, limits, connections)
    sock = open_socket(host, port)
    model.warm_up()          # before the first client: compiled CPU kernels load (or compile) now
    bound = sock.getsockname()[1]
    info = model.info
    accuracy = f", test acc {info['test_accuracy']:.4f}" if info.get("test_accuracy") is not None else ""
    print(f"xpcnn {__version__}: serving {info['model']} ({info['dataset'] or 'unknown dataset'}{accuracy}, "
          f"epoch {info['epoch']}) on backend {info['backend']}, batches of up to {limits.max_batch}, "
          f"at most {limits.max_queue} requests queued and {limits.max_connections} connections", flush=True)
    line, warning = address_lines(host, bound)
    print(line, flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    protocol = protocol_class(limits.max_connections, limits.request_timeout, connections)
    config = uvicorn.Config(app, http=protocol, log_level="warning", access_log=log_requests,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
