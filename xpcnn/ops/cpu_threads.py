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

The pool's workers take one slice each per call, handed over through counters in memory. Where
the compiled kernels run, both sides wait for the other's counter by polling it without the GIL
for about 2 ms before sleeping (`polling`): a sleeping thread's wake-up and the GIL's hand-over
cost about 0.12 ms per call on this machine, 0.6 ms of SimpleConvNet's 4.3 ms step, and half
of that with polling (docs/performance.md). Elsewhere they sleep at once. One caller at a
time uses the workers; a second caller (another thread, or a slice that slices its own work)
runs its slices on its own thread, in order.

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
from typing import Any, Callable, Iterator

import numpy as np

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - a dependency; kept optional for minimal installs
    ThreadpoolController = None

from ..errors import ConfigError
from . import cpu_kernels

#: Environment variable that fixes the number of slices (a positive integer).
THREADS_VARIABLE = "XPCNN_CPU_THREADS"

#: Work smaller than this runs on the calling thread (a hand-over costs 0.05-0.12 ms).
MIN_PARALLEL_BYTES = 256 << 10

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"blas": None, "pool": None, "pool_pid": None, "holders": 0,
                          "saved": [], "workers": [], "kept_off": None}


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


#: A job that tells a worker to end (`_Pool.close`).
_CLOSE = object()


class WorkerLost(RuntimeError):
    """A worker thread of the pool ended without finishing its slice (a bug; never expected)."""


class _Pool:
    """The worker threads of `run_over`: worker k takes slice k + 1 of each call, one at a
    time, and the calling thread takes slice 0.

    A job is handed to worker k by storing it in ``jobs[k]`` and counting ``state[k, 0]`` up;
    the worker counts ``state[k, 1]`` up to the same number when it is done. Each side waits for
    the other's counter by polling it in compiled code without the GIL (`polling`) for about
    2 ms, then sleeping on the condition `changed`; without `polling` (Numba missing, or
    ``XPCNN_CPU_KERNELS=numpy``) it sleeps at once, as threads of a ``ThreadPoolExecutor`` do.
    One caller at a time (`busy`): `run_over` runs a second one's slices on its own thread.
    """

    def __init__(self, workers: int, polling: Any):
        self.size, self.polling = workers, polling
        self.state = np.zeros((workers, 2), dtype=np.int64)
        self.jobs: list[Any] = [None] * workers
        self.errors: list[BaseException | None] = [None] * workers
        self.asleep = [False] * workers         # worker k sleeps on `changed`
        self.caller_asleep = False              # the caller sleeps on `changed`
        self.changed = threading.Condition()
        self.busy = threading.Lock()
        self.broken = False                     # a worker thread ended: replace the pool
        self.threads = [threading.Thread(target=self._serve, args=(worker,), name=f"xpcnn-cpu_{worker}", daemon=True)
                        for worker in range(workers)]
        for thread in self.threads:
            thread.start()

    def run(self, bounds: list[tuple[int, int]], work: Callable[[int, int, int], None]) -> None:
        """``work(part, start, end)`` for each of `bounds`, slice 0 on this thread; the first
        error (slice 0's, else the workers' in order) is raised after all have finished."""
        workers = len(bounds) - 1
        with self.changed:
            for worker in range(workers):          # `errors` are all None: each call clears them
                self.jobs[worker] = (work, worker + 1, *bounds[worker + 1])
                self.state[worker, 0] += 1
            if any(self.asleep[:workers]):
                self.changed.notify_all()
        try:
            work(0, *bounds[0])
        finally:
            try:
                self._wait_for(workers)
            finally:
                errors = [error for error in self.errors[:workers] if error is not None]
                self.jobs[:workers] = [None] * workers      # no arrays kept alive by a finished job
                self.errors[:workers] = [None] * workers
        if errors:
            raise errors[0]

    def _wait_for(self, workers: int) -> None:
        """Return once workers ``0..workers-1`` finished their slices, even if interrupted
        meanwhile (Ctrl-C): the interruption is raised then, so no slice of this call runs on
        into the next one."""
        interrupted: BaseException | None = None
        while True:
            try:
                self._wait_once(workers)
                break
            except BaseException as error:  # noqa: BLE001 - raised once the slices are done
                if isinstance(error, WorkerLost):
                    raise
                interrupted = interrupted or error
        if interrupted is not None:
            raise interrupted

    def _wait_once(self, workers: int) -> None:
        if self.polling is not None and self.polling.workers_done(self.state, workers, self.polling.POLLS):
            return
        # Timed waits: with polling, a worker that saw the caller awake just before it fell
        # asleep polls on without notifying (at most `polling.POLLS` polls); and a worker
        # thread that ended (it never should) is noticed instead of waited for.
        timeout = 0.001 if self.polling is not None else 0.1
        with self.changed:
            self.caller_asleep = True
            try:
                while any(self.state[worker, 1] != self.state[worker, 0] for worker in range(workers)):
                    self.changed.wait(timeout)
                    lost = [worker for worker in range(workers) if not self.threads[worker].is_alive()
                            and self.state[worker, 1] != self.state[worker, 0]]
                    if lost:
                        self.broken = True                  # `_pool` makes a new pool for the next call
                        raise WorkerLost(f"xpcnn's CPU worker thread {lost[0]} ended without finishing its "
                                         f"slice; the next call starts new threads")
            finally:
                self.caller_asleep = False

    def _serve(self, worker: int) -> None:
        _register_worker()
        finished = 0
        while True:
            job_number = self._next_job(worker, finished)
            job = self.jobs[worker]
            if job is _CLOSE:
                return
            work, part, start, end = job
            try:
                work(part, start, end)
            except BaseException as error:  # noqa: BLE001 - raised on the caller's thread (`run`)
                self.errors[worker] = error
            finished = job_number
            if self.caller_asleep:
                with self.changed:
                    self.state[worker, 1] = finished
                    self.changed.notify_all()

    def _next_job(self, worker: int, finished: int) -> int:
        """Mark job `finished` done and wait for the next one: its number."""
        if self.polling is not None:
            job_number = self.polling.finish_and_wait(self.state, worker, finished, self.polling.POLLS)
            if job_number >= 0:
                return job_number
        with self.changed:
            self.state[worker, 1] = finished
            self.changed.notify_all()
            while self.state[worker, 0] == finished:
                self.asleep[worker] = True
                self.changed.wait()
            self.asleep[worker] = False
            return int(self.state[worker, 0])

    def close(self) -> None:
        """End the threads, unless a caller is using them (they then sleep on, idle)."""
        if not self.busy.acquire(blocking=False):
            return
        with self.changed:
            for worker in range(self.size):
                self.jobs[worker] = _CLOSE
                self.state[worker, 0] += 1
            self.changed.notify_all()


def _has_sched_yield() -> bool:
    """Whether the C library has POSIX's ``sched_yield`` (Linux, macOS; not Windows), which the
    compiled waits link by name: a name that cannot be linked would crash the process, not
    raise, so it is looked for first."""
    if os.name != "posix":
        return False
    try:
        return hasattr(ctypes.CDLL(None), "sched_yield")
    except OSError:
        return False


def _polling() -> Any:
    """`polling` where the compiled kernels run, ``sched_yield`` exists and the waits compile;
    otherwise None (the pool's threads then sleep between jobs)."""
    if cpu_kernels.requested() != "numba" or not _has_sched_yield():
        return None
    try:
        from . import polling  # imports Numba: an optional library, only where the compiled kernels run
        state = np.zeros((1, 2), dtype=np.int64)
        polling.workers_done(state, 1, 1)                 # both compiled (or loaded) now
        polling.finish_and_wait(state, 0, 0, 1)
    except Exception:  # noqa: BLE001 - no Numba, or it cannot compile them: sleep instead
        return None
    return polling


def _current_pool(workers: int) -> "_Pool | None":
    """This process's pool if it has at least `workers` threads and none was lost (under `_LOCK`)."""
    pool = _STATE["pool"]
    if _STATE["pool_pid"] == os.getpid() and pool.size >= workers and not pool.broken:
        return pool
    return None


def _pool(workers: int) -> _Pool:
    """The worker threads, made again in a forked child (a fork copies the pool, not its
    threads), for more threads, or after a thread was lost."""
    with _LOCK:
        pool = _current_pool(workers)
    if pool is not None:
        return pool
    polling = _polling()                  # may compile: not under the lock
    with _LOCK:
        pool = _current_pool(workers)     # another thread may have made one meanwhile
        if pool is not None:
            return pool
        old = _STATE["pool"] if _STATE["pool_pid"] == os.getpid() else None
        _STATE["workers"], _STATE["kept_off"] = [], None
        pool = _Pool(workers, polling)
        _STATE["pool"], _STATE["pool_pid"] = pool, os.getpid()
    if old is not None:
        old.close()                       # a smaller one, or one that lost a thread
    return pool


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
    with blas_at_one_thread() if uses_blas else contextlib.nullcontext():
        if not pool.busy.acquire(blocking=False):
            # Another caller's slices hold the workers (or this is a slice's own call): this
            # thread runs every slice, in order (the same sums, in the same order).
            for part, (start, end) in enumerate(bounds):
                work(part, start, end)
            return len(bounds)
        try:
            _keep_workers_off_this_cpu()
            pool.run(bounds, work)
        finally:
            pool.busy.release()
    return len(bounds)
