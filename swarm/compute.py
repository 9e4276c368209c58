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
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        return _executor


async def run(fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` on the process's torch thread and await its result."""
    return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)


def set_threads(n: int) -> None:
    """torch's intra-op threads, here and on the torch thread (OpenMP keeps it per thread)."""
    import torch

    torch.set_num_threads(n)
    executor().submit(torch.set_num_threads, n).result()
