"""The connections of ``xpcnn serve``: every client gets an answer, and none holds the server.

`protocol_class` makes uvicorn's HTTP/1.1 protocol (``H11Protocol``, h11) with `GuardedConnection`
mixed in, which adds what uvicorn does not do (docs/serve.md, "Limits"):

- **Lingering close** (nginx's ``lingering_close``, Apache's ``ap_lingering_close``): when the
  server closes a connection whose client is still sending (an answer given before the body was
  read: 413, 408, 503), it sends the answer, shuts its own sending side, then reads and throws
  away what still comes, for at most `LINGER_SECONDS`, `LINGER_IDLE_SECONDS` without data or
  `LINGER_BYTES`, and only then closes. Closing at once with unread bytes makes the kernel reset
  the connection, and a client that sends its whole body before it reads (urllib, requests,
  curl without ``Expect``) then sees "connection reset by peer" instead of the answer.
- **A deadline for the headers**: a request's headers must arrive within `request_timeout`
  seconds of its first byte, or it is answered 408 and closed (the body's deadline is the
  application's, `xpcnn.app.serve`). A new connection that sends nothing is closed after
  uvicorn's keep-alive timeout, which uvicorn itself arms only after a first answer.
- **A bound on connections**: a connection opened while `max_connections` are open already gets
  a 503 JSON answer with ``Retry-After`` to its requests (``GET /healthz`` excepted) and is
  closed after it. Such a connection lives a moment (one request), or until a timeout above; one
  opened while `open_limit` connections are open (four times `max_connections`, at most the
  process's open-file limit less 64) is closed at once, unanswered: the last guard of the
  process's file descriptors, against a flood of connections that never send anything.

uvicorn's own ``limit_concurrency`` is not used: its 503 is plain text without ``Retry-After``,
and it answers only connections that send a request (idle ones are never closed). The mixin
relies on ``H11Protocol``'s attributes ``app``, ``conn``, ``connections``, ``loop``,
``transport`` and its keep-alive timer; ``tests/app/test_serve_limits.py`` exercises each rule
against the installed uvicorn. Nothing here imports the web server: `protocol_class` does.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

try:
    import resource
except ImportError:                       # Windows: no open-file limit to read
    resource = None

from .batcher import RETRY_AFTER

#: A lingering close reads and throws away for at most this long ...
LINGER_SECONDS = 10.0
#: ... or until the client sends nothing for this long ...
LINGER_IDLE_SECONDS = 2.0
#: ... or this many bytes (the largest upload accepted is 8 MiB), then closes.
LINGER_BYTES = 64 * 2 ** 20
MAX_CONNECTIONS = 256
#: Seconds a request's headers (from their first byte), and then its body, may take to arrive.
REQUEST_TIMEOUT = 10.0


def open_limit(max_connections: int) -> int:
    """Open connections over which a new one is closed at once: four times `max_connections`,
    at most the process's open-file limit less 64 (files, the listening socket, the log)."""
    limit = 4 * int(max_connections)
    if resource is not None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            limit = min(limit, max(int(max_connections) + 1, soft - 64))
    return limit


def connection_stats(max_connections: int) -> dict[str, int]:
    """The counters `GuardedConnection` keeps (``GET /healthz`` shows them as ``connections``)."""
    return {"open": 0, "max": int(max_connections), "drop_over": open_limit(max_connections), "refused_busy": 0,
            "dropped": 0, "header_timeouts": 0, "lingering_closes": 0}


def json_error(status: int, reason: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 answer ``{"error": message}`` that closes the connection."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers), "connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class _LingeringTransport:
    """The transport as uvicorn sees it: ``close()`` asks the connection for a lingering close."""

    def __init__(self, transport: asyncio.Transport, connection: "GuardedConnection") -> None:
        self._transport, self._connection = transport, connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._connection.close_connection()

    def is_closing(self) -> bool:
        return self._connection.closing or self._transport.is_closing()


class GuardedConnection:
    """Mixed in before uvicorn's ``H11Protocol`` by `protocol_class`, which sets the class
    attributes below."""

    max_connections: int = MAX_CONNECTIONS
    request_timeout: float = REQUEST_TIMEOUT
    stats: dict[str, int] = connection_stats(MAX_CONNECTIONS)
    h11: Any = None                       # the h11 module (imported by `protocol_class`)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.raw_transport = transport
        self.closing = self.lingering = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_end, self._lingered = 0.0, 0
        super().connection_made(_LingeringTransport(transport, self))
        self.stats["open"] += 1
        if len(self.connections) > self.stats["drop_over"]:
            self.stats["dropped"] += 1
            self.closing = True
            transport.close()
            return
        if len(self.connections) > self.max_connections:
            self.app = _OverCapacity(self.app, self.max_connections, self.stats)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._discard(len(data))
            return
        if self._header_timer is None and self.conn.their_state is self.h11.IDLE:
            self._header_timer = self.loop.call_later(self.request_timeout, self._headers_timed_out)
        super().data_received(data)
        if self._header_timer is not None and self.conn.their_state is not self.h11.IDLE:
            self._header_timer.cancel()          # the headers are in: the application times the body
            self._header_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats["open"] -= 1
        for timer in (self._header_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self.closing = True
        super().connection_lost(exc)

    def _client_still_sending(self) -> bool:
        """True while the client may be sending the rest of a request: its body, or headers begun."""
        state = self.conn.their_state
        if state in (self.h11.DONE, self.h11.MUST_CLOSE, self.h11.CLOSED):
            return False
        return state is not self.h11.IDLE or bool(self.conn.trailing_data[0])

    def close_connection(self) -> None:
        """Close now, or, while the client is still sending, shut the sending side and linger."""
        if self.closing:
            self.raw_transport.close()
            return
        self.closing = True
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self.raw_transport.is_closing() or not self._client_still_sending():
            self.raw_transport.close()
            return
        self.lingering = True
        self.stats["lingering_closes"] += 1
        if self.raw_transport.can_write_eof():
            self.raw_transport.write_eof()         # after the answer still buffered, if any
        self.raw_transport.resume_reading()
        self._linger_end = self.loop.time() + LINGER_SECONDS
        self._discard(0)

    def _discard(self, size: int) -> None:
        """Throw `size` bytes away; close once the lingering close has lasted or read enough."""
        self._lingered += size
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        left = self._linger_end - self.loop.time()
        if self._lingered > LINGER_BYTES or left <= 0:
            self.raw_transport.close()
            return
        self._linger_timer = self.loop.call_later(min(LINGER_IDLE_SECONDS, left), self.raw_transport.close)

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.closing or self.conn.their_state is not self.h11.IDLE:
            return
        self.stats["header_timeouts"] += 1
        self.raw_transport.write(json_error(
            408, "Request Timeout", f"the request's headers did not arrive within {self.request_timeout:g} s; "
                                    f"send the whole request at once"))
        self.close_connection()


class _OverCapacity:
    """The application of a connection opened over the limit: ``/healthz`` as usual, anything
    else a 503 (the connection then closes)."""

    def __init__(self, app: Any, limit: int, stats: dict[str, int]) -> None:
        self.app, self.limit, self.stats = app, limit, stats

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("path") == "/healthz":
            await self.app(scope, receive, send)
            return
        self.stats["refused_busy"] += 1
        body = json.dumps({"error": f"the server is busy (over {self.limit} connections open, its limit); "
                                    f"retry in {RETRY_AFTER} s"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(RETRY_AFTER).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def protocol_class(max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT,
                   stats: dict[str, int] | None = None) -> type:
    """uvicorn's ``H11Protocol`` with `GuardedConnection` mixed in (``uvicorn.Config(http=...)``)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return type("GuardedH11Protocol", (GuardedConnection, H11Protocol), {
        "max_connections": int(max_connections), "request_timeout": float(request_timeout),
        "stats": stats if stats is not None else connection_stats(max_connections), "h11": h11})
