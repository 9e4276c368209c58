"""The torch thread (swarm/compute.py): one thread runs every job, results and errors come back to
the awaiting loop, and a waiter that gives up harms no later job."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from swarm import compute


def test_jobs_run_on_one_thread_and_answer_their_loop() -> None:
    async def main() -> list[int]:
        idents = await asyncio.gather(*(compute.run(threading.get_ident) for _ in range(20)))
        assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
        assert await compute.run(sorted, [3, 1, 2]) == [1, 2, 3]
        return idents

    first = asyncio.run(main())
    assert asyncio.run(main())[0] == first[0]  # a second event loop reaches the same thread
    assert compute.run_sync(threading.get_ident) == first[0]


def test_an_error_reaches_the_caller_with_its_type() -> None:
    def fail() -> None:
        raise ValueError("bad shape [2, 3]")

    async def main() -> None:
        with pytest.raises(ValueError, match=r"bad shape \[2, 3\]"):
            await compute.run(fail)
        assert await compute.run(int, "7") == 7  # the thread serves on

    asyncio.run(main())
    with pytest.raises(ValueError, match="bad shape"):
        compute.run_sync(fail)


def test_a_cancelled_waiter_does_not_break_the_next_job() -> None:
    async def main() -> None:
        slow = asyncio.ensure_future(compute.run(time.sleep, 0.2))
        await asyncio.sleep(0.02)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert await compute.run(len, "abc") == 3  # queued behind the sleep, answered normally

    asyncio.run(main())


def test_jobs_run_in_the_order_they_were_given() -> None:
    seen: list[int] = []

    async def main() -> None:
        await asyncio.gather(*(compute.run(seen.append, i) for i in range(50)))

    asyncio.run(main())
    assert seen == list(range(50))
