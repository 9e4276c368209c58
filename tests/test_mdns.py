"""Two real mDNS participants on loopback find each other (zeroconf's own tests do the same).

Other processes on this machine may announce swarm services too, so we wait for specific peer
ids, never for "the only one". Every wait is bounded; nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from swarm.identity import Identity
from swarm.mdns import Discovered, MdnsDiscovery, make_txt

LOOPBACK = ["127.0.0.1"]
WAIT_S = 15.0


async def wait_for(pred: Callable[[], bool], timeout: float = WAIT_S) -> None:
    """Poll `pred` on the loop until true; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met within the timeout")
        await asyncio.sleep(0.05)


async def next_from(q: asyncio.Queue[Discovered], peer_id: str, pred: Callable[[Discovered], bool]) -> Discovered:
    async def take() -> Discovered:
        while True:
            d = await q.get()
            if d.peer_id == peer_id and pred(d):
                return d

    return await asyncio.wait_for(take(), WAIT_S)


def test_two_peers_find_each_other_on_loopback() -> None:
    async def main() -> None:
        a_id, b_id, c_id = (Identity.generate().peer_id for _ in range(3))
        seen_by_cb: list[Discovered] = []
        a = MdnsDiscovery(a_id, interfaces=LOOPBACK)
        b = MdnsDiscovery(b_id, interfaces=LOOPBACK, on_found=seen_by_cb.append)
        client = MdnsDiscovery(c_id, interfaces=LOOPBACK)
        async with a, b, client:
            await asyncio.gather(a.start(7101, make_txt("ab" * 32, 0, 10)),
                                 b.start(7102, make_txt("ab" * 32, 10, 30)),
                                 client.start(0, None))
            got_b = await next_from(a.found, b_id, lambda d: True)
            got_a = await next_from(b.found, a_id, lambda d: True)
            assert (got_b.host, got_b.port, got_b.txt["span"]) == ("127.0.0.1", 7102, "10:30")
            assert (got_a.host, got_a.port, got_a.txt["hash"]) == ("127.0.0.1", 7101, "ab" * 32)
            assert got_a.txt["id"] == a_id and got_a.txt["v"] == "1" and got_a.txt["port"] == "7101"
            assert any(d.peer_id == a_id for d in seen_by_cb)
            # a browse-only client sees both and announces nothing
            await wait_for(lambda: {a_id, b_id} <= client.peers.keys())
            assert c_id not in a.peers and c_id not in b.peers
            # a changed span is re-announced
            await a.update(make_txt("ab" * 32, 0, 5))
            await next_from(b.found, a_id, lambda d: d.txt.get("span") == "0:5")
            # a peer that stops says goodbye
            await a.stop()
            await wait_for(lambda: a_id not in b.peers and a_id not in client.peers)

    asyncio.run(main())


def test_update_before_start_is_refused() -> None:
    async def main() -> None:
        d = MdnsDiscovery(Identity.generate().peer_id, interfaces=LOOPBACK)
        with pytest.raises(RuntimeError):
            await d.update({"span": "0:1"})
        await d.stop()  # stopping a never-started instance is harmless

    asyncio.run(main())
