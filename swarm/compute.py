"""One thread for torch in each process.

Every OS thread that enters a parallel torch op gets an OpenMP thread team of its own, and once a
process holds more OpenMP threads than the machine has cores, libgomp stops spinning between
parallel regions and puts its threads to sleep instead: every matmul then pays a futex wake-up.
Measured here (2 cores, SmolLM2's 10 blocks, one row): 11.8 ms a step from one thread, 20 ms once
a second thread had run torch, on either thread. So the peer's blocks, the client's head, model
loading and preparation all run on this one worker thread, and the event loop only touches
tensors too small to go parallel (frames, one-row checks).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
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
