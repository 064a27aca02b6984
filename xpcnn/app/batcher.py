"""The `Batcher` of ``xpcnn serve``: concurrent requests share one forward pass, and the queue
in front of the network is bounded in length and in waiting time.

    >>> batcher = Batcher(model, max_batch=32, max_queue=128, queue_timeout=5.0)
    >>> with batcher.admit() as since:                       # ServerBusy (a 503) when 128 are in already
    ...     proba, maps = await batcher.submit(image, maps=True, since=since)   # ServerBusy when it waited too long

A request holds its place from `admit` (its upload read) until it is answered: while it is
prepared, while it waits for a batch, during the forward pass and while its answer is encoded.
So at most `max_queue` uploads are held in memory past reading, and none waits behind more
than about ``max_queue / max_batch`` forward passes. A request whose forward pass has not begun
`queue_timeout` seconds after `admit` is refused rather than scored late: its client has likely
given up, and scoring it would only delay the requests behind it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

DEFAULT_MAX_BATCH = 32
#: How long the first request of a batch waits for others (seconds).
MAX_WAIT = 0.004
#: A request not in a forward pass this many seconds after its upload arrived is answered 503.
QUEUE_TIMEOUT = 5.0
#: Seconds a refused client is asked to wait (the ``Retry-After`` of every 503).
RETRY_AFTER = 1


def default_max_queue(max_batch: int) -> int:
    """Requests let in at once by default: four forward passes' worth, and at least 32 (with
    small batches the time per request is mostly decoding and encoding, not the network)."""
    return max(32, 4 * int(max_batch))


class ServerBusy(Exception):
    """The queue is full, or a request waited past its deadline: answer 503 with ``Retry-After``."""


class Batcher:
    """Gathers concurrent requests into one forward pass: up to `max_batch` images, the first
    waiting at most `max_wait` seconds for the others. The network runs on one thread only.
    At most `max_queue` requests are let in at once (`admit`), and a request still waiting
    `queue_timeout` seconds after it was let in is refused (`submit`)."""

    def __init__(self, model: Any, max_batch: int = DEFAULT_MAX_BATCH, max_wait: float = MAX_WAIT,
                 max_queue: int | None = None, queue_timeout: float = QUEUE_TIMEOUT) -> None:
        self.model, self.max_batch, self.max_wait = model, max(1, int(max_batch)), float(max_wait)
        self.max_queue = int(max_queue) if max_queue else default_max_queue(self.max_batch)
        self.queue_timeout = float(queue_timeout)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "queued": 0, "late": 0}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="xpcnn-forward")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()           # no bound of its own: `admit` bounds what can reach it
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    @contextmanager
    def admit(self) -> Iterator[float]:
        """A place in the queue from now until the request is answered; yields the event loop's
        time now (`submit`'s `since`). `ServerBusy` when `max_queue` requests hold one already."""
        if self.stats["queued"] >= self.max_queue:
            raise ServerBusy(f"the server is busy ({self.stats['queued']} requests queued, its limit); "
                             f"retry in {RETRY_AFTER} s")
        self.stats["queued"] += 1
        try:
            yield asyncio.get_running_loop().time()
        finally:
            self.stats["queued"] -= 1

    async def submit(self, image: np.ndarray, maps: bool = False,
                     since: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """One prepared image ``(H, W)`` -> its probabilities ``(K,)`` and first-layer maps.
        `since`: when the request was let in (default now); `ServerBusy` when its forward pass
        would begin more than `queue_timeout` seconds after it."""
        if self._queue is None:
            await self.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        await self._queue.put((image, maps, future, loop.time() if since is None else since))
        return await future

    def _refuse_late(self, items: list, now: float) -> list:
        """The items still within their deadline; the others' futures get `ServerBusy`."""
        fresh = []
        for item in items:
            waited = now - item[3]
            if waited <= self.queue_timeout:
                fresh.append(item)
            elif not item[2].done():
                self.stats["late"] += 1
                item[2].set_exception(ServerBusy(
                    f"the server is busy: the request waited {waited:.1f} s for the network, over the limit of "
                    f"{self.queue_timeout:g} s; retry in {RETRY_AFTER} s"))
        return fresh

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list:
        """The next batch: the first item queued, and what else arrives within `max_wait`."""
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
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = self._refuse_late(await self._gather(loop), loop.time())
            if not items:
                continue
            images = np.stack([item[0] for item in items])
            want_maps = any(item[1] for item in items)
            try:
                proba, maps = await loop.run_in_executor(self._executor, self.model.forward, images, want_maps)
            except Exception as exc:            # handed to each waiting request (a 500 without traceback)
                for item in items:
                    if not item[2].done():
                        item[2].set_exception(exc)
                continue
            self.stats["requests"] += len(items)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
            for row, (_, wanted, future, _) in enumerate(items):
                if not future.done():
                    future.set_result((proba[row], maps[row] if wanted and maps is not None else None))
