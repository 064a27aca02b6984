"""Slices of a batch on the CPU's cores (`xpcnn/ops/cpu_threads.py`), the machinery under
NumPy's fast path: how the batch is cut, how many threads, BLAS held to one thread inside,
errors, a forked child, the pool's hand-overs (polling and sleeping), and the call counter.
The fast entries that use it are compared with the reference in test_fast_ops.py (backend
"numpy-sliced")."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from xpcnn.errors import ConfigError
from xpcnn.ops import cpu_threads
from xpcnn.ops.cpu_threads import THREADS_VARIABLE, run_in_slices, run_over, slice_bounds, thread_count

from helpers import error_line, isolated_env

threadpoolctl = pytest.importorskip("threadpoolctl", reason="a dependency of xpcnn; these tests read BLAS with it")
threadpool_info, threadpool_limits = threadpoolctl.threadpool_info, threadpoolctl.threadpool_limits

BIG = 1 << 30           # bytes of work: always above MIN_PARALLEL_BYTES


def _numpy_blas_threads():
    return min(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")


@pytest.mark.parametrize("n, parts", [(10, 3), (100, 2), (2, 5), (1, 4), (7, 7)])
def test_slice_bounds_cover_the_batch_once_in_order(n, parts):
    bounds = slice_bounds(n, parts)
    assert len(bounds) == min(n, parts)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_thread_count_follows_numpy_blas_and_the_variable(monkeypatch):
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    with threadpool_limits(limits=1, user_api="blas"):
        assert thread_count() == 1
    with threadpool_limits(limits=2, user_api="blas"):
        assert thread_count() == min(2, _numpy_blas_threads())
    monkeypatch.setenv(THREADS_VARIABLE, "5")
    assert thread_count() == 5


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_variable_says_what_it_wants(monkeypatch, value):
    monkeypatch.setenv(THREADS_VARIABLE, value)
    with pytest.raises(ConfigError, match=rf"{THREADS_VARIABLE} must be a positive integer \(the number of threads\), "
                                          f"got '{value}'"):
        thread_count()


def test_the_cli_says_so_in_one_line(tmp_path, cli_dataset):
    result = subprocess.run([sys.executable, "-m", "xpcnn.cli", "train", "--dataset", "mnist", "--data-dir",
                             str(cli_dataset), "--batch-size", "10", "--epochs", "1", "--quiet", "--model", "deep",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path,
                            env=isolated_env(tmp_path, XPCNN_CPU_THREADS="two"), timeout=120)
    assert result.returncode != 0
    assert error_line(result.stderr, result.returncode) == (
        f"xpcnn: error: {THREADS_VARIABLE} must be a positive integer (the number of threads), got 'two'")


def test_each_item_once_each_slice_on_its_own_thread_with_blas_at_one(monkeypatch):
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    seen, threads, blas = np.zeros(10, dtype=int), {}, {}
    together = threading.Barrier(3, timeout=30)     # passes only if the three slices run at once

    def work(part, start, end):
        together.wait()
        seen[start:end] += 1
        threads[part] = threading.get_ident()
        blas[part] = _numpy_blas_threads()

    with threadpool_limits(limits=2, user_api="blas"):
        before = _numpy_blas_threads()
        assert run_in_slices(10, work, BIG) == 3
        after = _numpy_blas_threads()
    assert seen.tolist() == [1] * 10
    assert len(set(threads.values())) == 3 and threads[0] == threading.get_ident()
    assert blas == {0: 1, 1: 1, 2: 1}            # no slice waits on BLAS's own threads
    assert after == before                       # given back afterwards


def test_small_work_and_one_thread_run_in_one_slice(monkeypatch):
    monkeypatch.setenv(THREADS_VARIABLE, "2")
    calls = []
    assert run_in_slices(10, lambda *bounds: calls.append(bounds), cpu_threads.MIN_PARALLEL_BYTES - 1) == 1
    monkeypatch.setenv(THREADS_VARIABLE, "1")
    assert run_in_slices(10, lambda *bounds: calls.append(bounds), BIG) == 1
    assert calls == [(0, 0, 10)] * 2


def test_an_error_in_a_slice_is_raised_after_every_slice_finished(fresh_pool):
    finished = []

    def work(part, start, end):
        if part == 1:
            raise MemoryError("slice 1 ran out")
        threading.Event().wait(0.05)           # the other slices are still running when it fails
        finished.append(part)

    with pytest.raises(MemoryError, match="slice 1 ran out"):
        run_over([(0, 1), (1, 2), (2, 3)], work)
    assert sorted(finished) == [0, 2]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a system that sets threads' CPUs (Linux) and two CPUs to choose from")
def test_workers_are_kept_off_the_callers_cpu_and_nowhere_else(monkeypatch):
    """After an idle spell the scheduler may wake a worker onto the caller's CPU, where the
    two slices share a core (docs/performance.md); the workers may run anywhere else."""
    allowed = os.sched_getaffinity(0)
    first, second = sorted(allowed)[:2]
    monkeypatch.setattr(cpu_threads, "_CURRENT_CPU", lambda: first)
    together = threading.Barrier(3, timeout=30)                 # two workers must exist to pass it
    run_over([(0, 1), (1, 2), (2, 3)], lambda *bounds: together.wait())
    run_over([(0, 1), (1, 2), (2, 3)], lambda *bounds: None)    # now registered, their CPUs set
    workers = list(cpu_threads._STATE["workers"])
    assert len(workers) >= 2
    assert all(os.sched_getaffinity(worker) == allowed - {first} for worker in workers)
    monkeypatch.setattr(cpu_threads, "_CURRENT_CPU", lambda: second)     # the caller moved
    run_over([(0, 1), (1, 2), (2, 3)], lambda *bounds: None)
    assert all(os.sched_getaffinity(worker) == allowed - {second} for worker in workers)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {second})   # one CPU allowed: share it
    run_over([(0, 1), (1, 2), (2, 3)], lambda *bounds: None)
    monkeypatch.undo()
    assert all(os.sched_getaffinity(worker) == {second} for worker in workers)
    run_over([(0, 1), (1, 2), (2, 3)], lambda *bounds: None)             # the real CPU again
    assert all(len(allowed - os.sched_getaffinity(worker)) == 1 for worker in workers)


def _sum_in_slices(queue):
    total = np.zeros(1)

    def work(part, start, end):
        total[0] += 0                          # touch numpy in each thread
    queue.put(run_over([(0, 5), (5, 10)], work))


def test_a_forked_child_gets_threads_of_its_own(monkeypatch):
    """A fork copies the pool but not its threads: the child must make its own, not hang."""
    run_over([(0, 1), (1, 2)], lambda *bounds: None)            # the parent's pool exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_sum_in_slices, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's thread pool")
    assert child.exitcode == 0 and queue.get(timeout=5) == 2


def test_blas_gets_its_threads_back_after_callers_on_several_threads_overlap():
    """Two callers whose blocks overlap: BLAS stays at one thread until the last one leaves,
    then gets its own count back (not the one thread the second caller saw on entry)."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with cpu_threads.blas_at_one_thread():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with cpu_threads.blas_at_one_thread():
            second_in.set()
            first_out.wait(10)
            seen["inside, after the first left"] = _numpy_blas_threads()

    own = _numpy_blas_threads()
    if own == 1:
        pytest.skip("NumPy's BLAS runs one thread here: nothing to give back")
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert seen == {"inside, after the first left": 1}
    assert _numpy_blas_threads() == own


def test_elementwise_work_leaves_blas_alone(monkeypatch):
    """``uses_blas=False`` (ReLU, pooling, padding): no BLAS thread count to set and restore."""
    monkeypatch.setenv(THREADS_VARIABLE, "2")
    own, seen = _numpy_blas_threads(), []
    run_in_slices(10, lambda *bounds: seen.append(_numpy_blas_threads()), BIG, uses_blas=False)
    run_in_slices(10, lambda *bounds: seen.append(_numpy_blas_threads()), 1, uses_blas=False)
    assert seen == [own] * 3


# ------------------------------------------------------------ the pool's hand-overs

def _waits(polls):
    """The compiled waits (`xpcnn.ops.polling`) with `polls` polls before sleeping; None: sleep at once."""
    if polls is None:
        return None
    polling = pytest.importorskip("xpcnn.ops.polling", reason="the polling waits need Numba")
    return types.SimpleNamespace(POLLS=polls, finish_and_wait=polling.finish_and_wait,
                                 workers_done=polling.workers_done)


@pytest.fixture(params=["polling", "polling briefly", "sleeping"])
def fresh_pool(request, monkeypatch):
    """A new pool whose threads poll (as where the compiled kernels run), poll only 3 times
    before sleeping (so both sides fall asleep often), or sleep at once (NumPy's path)."""
    polls = {"polling": 10_000, "polling briefly": 3, "sleeping": None}[request.param]
    monkeypatch.setattr(cpu_threads, "_polling", lambda: _waits(polls))
    cpu_threads._STATE["pool_pid"] = None             # the next call makes a pool with these waits
    yield request.param
    pool = cpu_threads._STATE["pool"]
    cpu_threads._STATE["pool_pid"] = None             # later tests get a pool of their own
    if pool is not None:
        pool.close()


def _finishes(function, seconds=60):
    """Run `function` on a thread; fail if it has not returned within `seconds` (a lost wake-up)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting after {seconds} s: a hand-over was lost")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def test_many_hand_overs_in_a_row_with_pauses_and_long_slices(fresh_pool):
    """Each call's slices all run, at once, and the call returns when the last is done: back to
    back (the workers still polling), after pauses (asleep) and with a slice much longer than
    the caller's polls (the caller asleep)."""
    counts = np.zeros(4, dtype=np.int64)
    together = threading.Barrier(3, timeout=30)

    def calls():
        for call in range(300):
            def work(part, start, end, call=call):
                if call % 50 == 0:
                    together.wait()              # the three slices run at once
                if call % 37 == 5 and part == 2:
                    time.sleep(0.01)             # longer than any polling: the caller sleeps
                counts[start:end] += 1
            assert run_over([(0, 1), (1, 2), (2, 4)], work) == 3
            assert counts.tolist() == [call + 1] * 4    # every slice finished before the call returned
            if call % 60 == 7:
                time.sleep(0.02)                 # the workers' polls run out: they sleep
    _finishes(calls)


def test_a_second_caller_runs_its_slices_on_its_own_thread(fresh_pool):
    """While one caller's slices hold the workers, another caller's run, in order, on its own thread."""
    release, started, seen = threading.Event(), threading.Event(), []

    def first(part, start, end):
        if part == 1:
            started.set()
            release.wait(30)

    holder = threading.Thread(target=run_over, args=([(0, 1), (1, 2), (2, 3)], first))
    holder.start()
    assert started.wait(30)
    try:
        assert _finishes(lambda: run_over([(0, 3), (3, 5), (5, 6)],
                                          lambda *bounds: seen.append((threading.get_ident(), bounds)))) == 3
    finally:
        release.set()
        holder.join(30)
    assert [bounds for _, bounds in seen] == [(0, 0, 3), (1, 3, 5), (2, 5, 6)]
    assert len({thread for thread, _ in seen}) == 1 and seen[0][0] != holder.ident


def test_a_slice_that_slices_again_runs_those_slices_itself(fresh_pool):
    seen = []

    def inner(part, start, end):
        seen.append((part, threading.get_ident()))

    def outer(part, start, end):
        if part == 0:
            run_over([(0, 1), (1, 2)], inner)

    _finishes(lambda: run_over([(0, 1), (1, 2)], outer))
    assert [part for part, _ in seen] == [0, 1] and len({thread for _, thread in seen}) == 1


def test_more_threads_make_a_bigger_pool_and_end_the_smaller_ones_threads(fresh_pool):
    run_over([(0, 1), (1, 2)], lambda *bounds: None)
    small = cpu_threads._STATE["pool"]
    run_over([(0, 1), (1, 2), (2, 3), (3, 4)], lambda *bounds: None)
    assert cpu_threads._STATE["pool"] is not small and cpu_threads._STATE["pool"].size == 3
    for thread in small.threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in small.threads)


def test_the_threads_poll_where_the_compiled_kernels_run(monkeypatch):
    monkeypatch.setenv("XPCNN_CPU_KERNELS", "numpy")
    assert cpu_threads._polling() is None                 # NumPy's path: its threads sleep, as before
    monkeypatch.setenv("XPCNN_CPU_KERNELS", "numba")
    pytest.importorskip("numba", reason="the compiled kernels need Numba")
    polling = cpu_threads._polling()
    assert polling is not None and polling.POLLS > 0


class _Interrupted(Exception):
    """What the test's timer raises in the calling thread (as Ctrl-C raises KeyboardInterrupt)."""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_an_interrupted_call_returns_only_after_its_slices_and_leaves_no_error_behind(fresh_pool):
    """Ctrl-C while the caller waits: the interruption is raised once the workers' slices are
    done, so none runs on into the next call, nor does its error turn up there."""
    finished = []

    def slow_then_failing(part, start, end):
        if part == 1:
            time.sleep(0.3)
            finished.append(part)
            raise ValueError("the first call's error")

    def interrupt(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)      # while the caller waits for slice 1
        with pytest.raises(_Interrupted):
            run_over([(0, 1), (1, 2)], slow_then_failing)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert finished == [1]
    assert run_over([(0, 1), (1, 2)], lambda *bounds: None) == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_lost_worker_thread_is_an_error_not_a_hang_and_the_next_call_gets_new_threads(fresh_pool):
    run_over([(0, 1), (1, 2)], lambda *bounds: None)
    pool = cpu_threads._STATE["pool"]

    def broken(worker, finished):
        raise RuntimeError("a bug in the worker's own loop")
    pool._next_job = broken                                 # the worker dies after its next slice
    outcomes = []
    for _ in range(2):          # that slice's call may still see it done (a sleeping caller is told at once)
        try:
            _finishes(lambda: run_over([(0, 1), (1, 2)], lambda *bounds: None))
            outcomes.append("done")
        except cpu_threads.WorkerLost as lost:
            assert "CPU worker thread 0 ended without finishing its slice" in str(lost)
            outcomes.append("lost")
            break
    assert outcomes in (["lost"], ["done", "lost"])
    seen = []
    assert _finishes(lambda: run_over([(0, 1), (1, 2)], lambda part, *bounds: seen.append(part))) == 2
    assert sorted(seen) == [0, 1] and cpu_threads._STATE["pool"] is not pool
