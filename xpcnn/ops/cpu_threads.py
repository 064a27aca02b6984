"""Slices of a batch on the CPU's cores, for NumPy's fast path (`fast_numpy`).

NumPy's BLAS splits one matrix product over the cores, but the products of a convolution's
cache-sized chunks are small and narrow (DeepConvNet's ``(3136, 144) @ (144, 16)``): BLAS
runs most of them on one core, and the window copies around them always run on one. NumPy
releases the GIL inside its loops and BLAS calls, so here each core takes a contiguous slice
of the batch with BLAS held to one thread: copies and products both run in parallel, and no
core waits on the other's BLAS threads.

    >>> run_in_slices(n, lambda part, start, end: work(start, end))

The number of slices is the number of threads NumPy's BLAS is set to use (``OPENBLAS_NUM_THREADS``,
``OMP_NUM_THREADS``, `threadpoolctl.threadpool_limits`), read at each call, so a program that
limits NumPy to one thread gets one slice; ``XPCNN_CPU_THREADS`` overrides it. Without
`threadpoolctl` (it reads and sets that number) everything runs in one slice, as before.
Results do not depend on timing: each slice writes its own rows, and sums over slices are
added in slice order.

Where the system lets a thread be kept off a CPU (Linux), the pool's workers may run on any
CPU the program may use except the one the calling thread is on when it hands them work. The
scheduler otherwise wakes a worker that slept through an idle spell (a pause between
batches, a server between requests) onto the waker's own CPU when the other CPUs look far
asleep, and the two slices then share one core until the load balancer moves them apart
(about 50 ms, docs/performance.md). This is not pinning: nothing is tied to a CPU, and the
workers leave only one CPU out.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - a dependency; kept optional for minimal installs
    ThreadpoolController = None

from ..errors import ConfigError

#: Environment variable that fixes the number of slices (a positive integer).
THREADS_VARIABLE = "XPCNN_CPU_THREADS"

#: Work smaller than this runs on the calling thread (a hand-over to a thread costs ~0.05 ms).
MIN_PARALLEL_BYTES = 256 << 10

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"blas": None, "pool": None, "pool_pid": None, "pool_size": 0,
                          "holders": 0, "saved": [], "workers": [], "kept_off": None}


def _current_cpu_reader() -> Callable[[], int] | None:
    """The C library's ``sched_getcpu`` (the CPU the calling thread runs on), where there is
    one and threads' CPUs can be set (Linux); None elsewhere."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        return None
    function.restype, function.argtypes = ctypes.c_int, []
    return function


_CURRENT_CPU = _current_cpu_reader()


def _blas() -> Any:
    """threadpoolctl's controller of the BLAS libraries NumPy loaded (None without threadpoolctl)."""
    if _STATE["blas"] is None and ThreadpoolController is not None:
        with _LOCK:
            if _STATE["blas"] is None:
                _STATE["blas"] = ThreadpoolController().select(user_api="blas")
    return _STATE["blas"]


def _set_blas_threads(blas: Any, counts: list[int]) -> None:
    """Set each BLAS library's thread count, from whichever thread calls.

    threadpoolctl (3.6 and later) lets only one Python thread at a time set OpenBLAS's count
    and silently ignores the others; our blocks may start and end on different threads (a
    server's worker, the slices of two callers), so control is released around each set.
    """
    for controller, count in zip(blas.lib_controllers, counts):
        release = getattr(type(controller), "clear_controlling_thread", None)
        if release is not None:
            release(force=True)
        controller.set_num_threads(count)
        if release is not None:
            release(force=True)


@contextlib.contextmanager
def blas_at_one_thread() -> Iterator[None]:
    """NumPy's BLAS at one thread inside the block, its own count given back after the last
    block that runs at the time (several threads may hold one at once)."""
    blas = _blas()
    if not blas:
        yield
        return
    with _LOCK:
        if _STATE["holders"] == 0:
            _STATE["saved"] = [controller.num_threads for controller in blas.lib_controllers]
            _set_blas_threads(blas, [1] * len(_STATE["saved"]))
        _STATE["holders"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _STATE["holders"] -= 1
            if _STATE["holders"] == 0:
                _set_blas_threads(blas, _STATE["saved"])


def thread_count() -> int:
    """How many slices `run_in_slices` uses now (at least 1)."""
    override = os.environ.get(THREADS_VARIABLE)
    if override:
        try:
            count = int(override)
        except ValueError:
            count = 0
        if count < 1:
            raise ConfigError(f"{THREADS_VARIABLE} must be a positive integer (the number of threads), "
                              f"got {override!r}")
        return count
    blas = _blas()
    if not blas or not blas.lib_controllers:
        return 1
    return max(1, min(controller.num_threads for controller in blas.lib_controllers))


def _register_worker() -> None:
    """Run by each new pool thread: its kernel thread id, for `_keep_workers_off_this_cpu`."""
    with _LOCK:
        _STATE["workers"].append(threading.get_native_id())
        _STATE["kept_off"] = None


def _pool(workers: int) -> ThreadPoolExecutor:
    """The worker threads, made again in a forked child (a fork copies the pool, not its threads)."""
    with _LOCK:
        if _STATE["pool_pid"] != os.getpid() or _STATE["pool_size"] < workers:
            if _STATE["pool_pid"] == os.getpid():
                _STATE["pool"].shutdown(wait=False)      # a smaller one: its threads end when idle
            _STATE["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="xpcnn-cpu",
                                                initializer=_register_worker)
            _STATE["pool_pid"], _STATE["pool_size"] = os.getpid(), workers
            _STATE["workers"], _STATE["kept_off"] = [], None
        return _STATE["pool"]


def _keep_workers_off_this_cpu() -> None:
    """Let the pool's workers run on every CPU the calling thread may use but the one it is
    on now (see the module's docstring), or on that one where it is the only one allowed; a
    no-op where threads' CPUs cannot be set, and when nothing changed since the last call (a
    query of the CPU and of the allowed set then)."""
    if _CURRENT_CPU is None:
        return
    cpu, allowed = _CURRENT_CPU(), os.sched_getaffinity(0)
    others = allowed - {cpu} or allowed
    with _LOCK:
        if _STATE["kept_off"] == (cpu, allowed, len(_STATE["workers"])):
            return
        for worker in _STATE["workers"]:
            try:
                os.sched_setaffinity(worker, others)
            except OSError:              # a worker that ended (a pool made again), or not allowed
                pass
        _STATE["kept_off"] = (cpu, allowed, len(_STATE["workers"]))


def slice_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous ``(start, end)`` slices of ``range(n)``, sizes differing by at most one."""
    parts = max(1, min(parts, n))
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + base + (part < extra)
        bounds.append((start, end))
        start = end
    return bounds


def slice_count(n: int, nbytes: int, threads: int | None = None) -> int:
    """How many slices `run_in_slices` cuts ``range(n)`` into for work of about `nbytes`."""
    threads = thread_count() if threads is None else threads
    return max(1, min(threads, n)) if nbytes >= MIN_PARALLEL_BYTES else 1


def run_in_slices(n: int, work: Callable[[int, int, int], None], nbytes: int, *, uses_blas: bool = True) -> int:
    """Call ``work(part, start, end)`` for contiguous slices of ``range(n)``, one per thread,
    with BLAS at one thread meanwhile; returns the number of slices. `nbytes` is about how
    much memory the work reads and writes; ``uses_blas=False`` (elementwise work) leaves
    BLAS's thread count alone.

    One slice, on the calling thread, when NumPy's BLAS uses one thread, when `n` is 1, or
    when the work is under `MIN_PARALLEL_BYTES` (handing it to a thread would cost more than it saves); BLAS
    stays at one thread there too, so that it never wakes its own threads, which would then
    spin on the core the next sliced operation needs.
    """
    threads = thread_count()
    parts = slice_count(n, nbytes, threads)
    if parts <= 1:
        with blas_at_one_thread() if threads > 1 and uses_blas else contextlib.nullcontext():
            work(0, 0, n)
        return 1
    return run_over(slice_bounds(n, parts), work, uses_blas=uses_blas)


def run_over(bounds: list[tuple[int, int]], work: Callable[[int, int, int], None], *,
             uses_blas: bool = True) -> int:
    """Call ``work(part, start, end)`` for each ``(start, end)`` of `bounds`, each on its own
    thread, with BLAS at one thread meanwhile (unless ``uses_blas=False``); returns
    ``len(bounds)``.

    The calling thread does the first; an exception in any is raised here after all have
    finished.
    """
    if len(bounds) == 1:
        work(0, *bounds[0])
        return 1
    pool = _pool(len(bounds) - 1)
    _keep_workers_off_this_cpu()
    with blas_at_one_thread() if uses_blas else contextlib.nullcontext():
        futures = [pool.submit(work, part, start, end)
                   for part, (start, end) in enumerate(bounds) if part > 0]
        try:
            work(0, *bounds[0])
        finally:
            for future in futures:
                future.exception()        # wait for every slice before BLAS gets its threads back
    for future in futures:
        future.result()
    return len(bounds)
