"""One thread for torch in each process.

Every OS thread that enters a parallel torch op gets an OpenMP thread team of its own, and once a
process holds more OpenMP threads than the machine has cores, libgomp stops spinning between
parallel regions and puts its threads to sleep instead: every matmul then pays a futex wake-up.
Measured here (2 cores, SmolLM2's 10 blocks, one row): 11.8 ms a step from one thread, 20 ms once
a second thread had run torch, on either thread. So the peer's blocks, the client's head, model
loading and preparation all run on this one worker thread, and the event loop only touches
tensors too small to go parallel (frames, one-row checks).

Second, how long OpenMP's workers spin after a step (`tune_openmp`, below): several swarm processes
share the cores of one machine in turn, and a worker spinning for nothing slows the next one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# How long an OpenMP worker spins for more work before it sleeps. With libgomp's default, 300,000
# rounds of `pause`, a worker here burned 4-6 ms of CPU after each step (its schedstat), while the
# next process on the machine (the next peer of a local swarm, or the client's head) wanted the
# core; 30,000 rounds (0.34 ms of `pause` on that machine) still bridge the gaps between the
# parallel ops of one step.
# Measured (2 cores, 3 peers, SmolLM2 fp32, tools/bench_decode.py): 17.4 -> 21-23 tokens/s;
# 5,000-10,000 are slower again (workers fall asleep inside a step and each op pays a wake-up).
SPIN_ROUNDS = "30000"


def tune_openmp() -> None:
    """Set GOMP_SPINCOUNT unless the user chose an OpenMP wait policy. It must happen before torch
    loads libgomp, so `swarm/__init__.py` calls this."""
    if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_ROUNDS


# The torch thread takes jobs from a SimpleQueue (a C queue: one futex wake) and answers each on
# its caller's loop with one call_soon_threadsafe. A ThreadPoolExecutor behind run_in_executor
# does the same with a concurrent Future chained to an asyncio one, an idle semaphore and a
# Condition: measured here, a no-op round trip from a loop took 342 us hot against 13 us this way
# (165 against 37 us after 30 ms asleep). A peer pays a round trip on every decode step.
_jobs: queue.SimpleQueue = queue.SimpleQueue()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def _settle(fut: asyncio.Future, ok: bool, value: object) -> None:
    if not fut.done():  # the awaiting task may have been cancelled meanwhile
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)  # type: ignore[arg-type]


def _work() -> None:
    while True:
        fn, args, loop, fut = _jobs.get()
        try:
            ok, value = True, fn(*args)
        except BaseException as e:  # handed to the awaiting task, like run_in_executor does
            ok, value = False, e
        del fn, args
        try:
            if loop is None:
                fut.set_result(value) if ok else fut.set_exception(value)
            else:
                loop.call_soon_threadsafe(_settle, fut, ok, value)
        except RuntimeError:  # the caller's loop closed while we computed: nobody is waiting
            pass
        del value, fut, loop


def _submit(fn: Callable, args: tuple, loop: asyncio.AbstractEventLoop | None, fut) -> None:
    global _thread
    if _thread is None:
        with _lock:
            if _thread is None:
                _thread = threading.Thread(target=_work, name="torch", daemon=True)
                _thread.start()
    _jobs.put((fn, args, loop, fut))


async def run(fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` on the process's torch thread and await its result."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    _submit(fn, args, loop, fut)
    return await fut


def run_sync(fn: Callable[..., T], *args: object) -> T:
    """The same from code that is not on an event loop (it blocks until the result is in)."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    _submit(fn, args, None, fut)
    return fut.result()


def set_threads(n: int) -> None:
    """torch's intra-op threads, here and on the torch thread (OpenMP keeps it per thread)."""
    import torch

    torch.set_num_threads(n)
    run_sync(torch.set_num_threads, n)
