"""Waits that poll a counter without holding the GIL, for the threads of `cpu_threads` (compiled
with Numba, where the compiled kernels run).

A thread that sleeps until the next job (on a lock or a condition) is woken by the operating
system and must then take the GIL. Through a ``ThreadPoolExecutor``, each of SimpleConvNet's
five sliced operations a step lost about 0.12 ms to that on this machine: the caller went on
0.04-0.06 ms after the worker's slice ended, and 0.03 ms went to the hand-over itself
(docs/performance.md). A thread that polls a counter in memory sees it change within a
microsecond, and it polls in compiled code with the GIL released, so the other thread runs
its Python meanwhile; the worker marks a job done from inside its wait, so the caller finds
the GIL free. Between polls a thread gives its CPU away (``sched_yield``): a thread of
another program waiting for that CPU gets it. After `POLLS` polls without a change (about
2 ms here) the waiting thread sleeps as before.

The counters are the rows of an int64 array ``state``, one row per worker: ``state[k, 0]`` is
the number of the last job handed to worker k, ``state[k, 1]`` the number of the last one it
finished. A counter read here only says when to stop polling; what a job wrote reaches the
other thread through the GIL, which each side takes after its wait.

    >>> polling.finish_and_wait(state, k, finished, POLLS)    # a worker: the next job's number, or -1
    >>> polling.workers_done(state, workers, POLLS)           # the caller: True once all finished
"""

from __future__ import annotations

from numba import types

from . import kernel_cache

#: Polls before a waiting thread sleeps instead (each takes about 0.2 us here, most of it the yield).
POLLS = 10_000

#: The C library's ``sched_yield`` (POSIX: Linux, macOS), linked by name into the compiled code.
#: Where it is missing (Windows), calling a wait would crash the process, so `cpu_threads` looks
#: for it first. The waits are plain compiled functions (`kernel_cache.njit`), not `Kernel`s, so
#: a failure to load or compile them never discards the kernels' cache: the pool sleeps instead.
_sched_yield = types.ExternalFunction("sched_yield", types.int32())


@kernel_cache.njit(nogil=True)
def finish_and_wait(state, worker, finished, polls):
    """Worker `worker` marks job `finished` done, then polls for the next job: its number, or
    -1 after `polls` polls without one."""
    state[worker, 1] = finished
    for _ in range(polls):
        job = state[worker, 0]
        if job != finished:
            return job
        _sched_yield()
    return -1


@kernel_cache.njit(nogil=True)
def workers_done(state, workers, polls):
    """Whether workers ``0..workers-1`` finished the last job each was handed, polling up to
    `polls` times."""
    for _ in range(polls):
        done = True
        for worker in range(workers):
            if state[worker, 1] != state[worker, 0]:
                done = False
        if done:
            return True
        _sched_yield()
    return False
