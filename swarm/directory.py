"""The client's view of the swarm: which peers serve which blocks of our model, and how to dial them.

It learns the table from any peer it can reach (bootstrap addresses, or peers found on the LAN)
by asking for its gossip table, refreshes it in the background, and keeps only peers that serve
the client's model (same manifest hash).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from . import wire
from .errors import NoRouteError, PeerUnavailable, ProtocolError, SwarmError
from .gossip import PeerRecord
from .identity import Identity
from .mdns import Discovered, MdnsDiscovery
from .routing import coverage, gaps
from .transport import Connection

log = logging.getLogger("swarm.directory")


async def ask_peer(addr: str, identity: Identity | None = None, expected: str | None = None,
                   swarm_key: Any = None, timeout: float = 5.0) -> list[dict]:
    """A peer's own record and its table of live peers, as record maps (not yet verified)."""
    host, port = split_addr(addr)
    conn = await Connection.open(host, port, identity or Identity.generate(), expected, swarm_key, timeout)
    try:
        reply = await conn.request(lambda rid: wire.GetInfo(rid), timeout=timeout, expect=wire.Info)
    finally:
        await conn.close()
    return [reply.peer, *reply.known]


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {addr!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class Directory:
    def __init__(self, model_hash: str, bootstrap: tuple[str, ...], identity: Identity | None = None, mdns: bool = True, connect_timeout: float = 5.0, swarm_key: Any = None, refresh_s: float = 2.0, mdns_interfaces: list[str] | None = None) -> None:
        self.mdns_interfaces = mdns_interfaces
        self.identity = identity or Identity.generate()  # a client's key: it proves nothing but continuity
        self.model_hash = model_hash
        self.bootstrap = tuple(bootstrap)
        self.mdns = mdns
        self.connect_timeout = connect_timeout
        self.swarm_key = swarm_key
        self.refresh_s = refresh_s
        self._peers: dict[str, PeerRecord] = {}
        self._lan: dict[str, str] = {}  # peer id -> "host:port" seen on mDNS
        self._task: asyncio.Task | None = None
        self._mdns: MdnsDiscovery | None = None
        self._updated = asyncio.Event()
        self.dropped = 0  # records that failed validation or their signature
        self.is_usable: Callable[[str], bool] = lambda peer_id: True  # the client plugs in its ban list

    async def start(self) -> None:
        if self.mdns:
            try:
                self._mdns = MdnsDiscovery(self.identity.peer_id, interfaces=self.mdns_interfaces, on_found=self._on_found)
                await self._mdns.start(0, None)  # browse only: a client announces nothing
            except Exception as e:
                log.warning("mDNS unavailable (%r); pass --peer HOST:PORT", e)
                self._mdns = None
        self._task = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._mdns is not None:
            try:
                await asyncio.wait_for(self._mdns.stop(), 2.0)
            except Exception:
                pass

    def _on_found(self, d: Discovered) -> None:
        self._lan[d.peer_id] = f"{d.host}:{d.port}"
        self._updated.set()

    def peers(self) -> list[PeerRecord]:
        return [p for p in self._peers.values() if p.model_hash == self.model_hash]

    def all_peers(self) -> list[PeerRecord]:
        return list(self._peers.values())

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._peers.get(peer_id)

    async def dial(self, view: PeerRecord) -> Connection:
        last: Exception | None = None
        for addr in view.addrs:
            host, port = split_addr(addr)
            try:
                return await Connection.open(host, port, self.identity, view.peer_id, self.swarm_key, self.connect_timeout)
            except PeerUnavailable as e:
                last = e
        raise PeerUnavailable(f"cannot reach {view.peer_id[:10]} at {', '.join(view.addrs)}: {last}", peer=view.peer_id)

    def _parse(self, records: list[dict], out: dict[str, PeerRecord]) -> None:
        for r in records:
            try:
                rec = PeerRecord.from_wire(r)
            except ProtocolError as e:
                self.dropped += 1
                log.debug("dropped a record: %s", e)
                continue
            if rec.leaving or not rec.verify():
                self.dropped += not rec.leaving
                continue
            old = out.get(rec.peer_id)
            if old is None or rec.version > old.version:
                out[rec.peer_id] = rec

    async def ask(self, addr: str, expected: str | None = None) -> list[dict]:
        return await ask_peer(addr, self.identity, expected, self.swarm_key, self.connect_timeout)

    async def refresh(self, fanout: int = 3) -> None:
        """Ask a few peers for their tables; what none of them lists any more is gone."""
        sources: list[tuple[str, str | None]] = [(a, None) for a in self.bootstrap]
        sources += [(a, pid) for pid, a in self._lan.items()]
        known = list(self._peers.values())
        random.shuffle(known)
        sources += [(p.addrs[0], p.peer_id) for p in known if p.addrs]
        fresh: dict[str, PeerRecord] = {}
        answered, seen = 0, set()
        for addr, pid in sources:
            if addr in seen or answered >= fanout:
                continue
            seen.add(addr)
            try:
                self._parse(await self.ask(addr, pid), fresh)
                answered += 1
            except (SwarmError, OSError, ValueError) as e:
                log.debug("cannot ask %s: %s", addr, e)
        if answered:
            self._peers = fresh
        self._updated.set()

    async def _refresh_loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def settle(self, timeout: float) -> None:
        """Wait until two refreshes in a row see the same peers, or `timeout` passes (status)."""
        deadline = time.monotonic() + timeout
        prev: set[str] | None = None
        while (left := deadline - time.monotonic()) > 0:
            if not self.bootstrap and not self._lan and not self._peers:
                self._updated.clear()  # nothing to ask yet: wait for mDNS
                try:
                    await asyncio.wait_for(self._updated.wait(), min(0.25, left))
                except asyncio.TimeoutError:
                    pass
                continue
            await self.refresh()
            ids = set(self._peers)
            if ids and ids == prev:
                return
            prev = ids
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _other_models(self) -> str:
        """Peers answered, but none serves our model: say what they do serve (a stale local copy
        of a re-prepared model, or the wrong --model, reads plainly)."""
        served = Counter((p.model, p.model_hash) for p in self._peers.values())
        listing = ", ".join(f"{name} (hash {h[:12]}, {n} peer{'s' if n > 1 else ''})" for (name, h), n in served.most_common(5))
        return (f"{len(self._peers)} peer(s) answered, but none serves this model (hash {self.model_hash[:12]}); they serve: "
                f"{listing}. Pass --model NAME for one of those (a stale copy of the same name here: run `swarm prepare --force`, "
                "or remove it from $SWARM_HOME/models to fetch the swarm's)")

    def coverage(self, num_blocks: int) -> list[int]:
        """Replicas per block among the peers of our model that we may use (not banned)."""
        return coverage(((p.start, p.end) for p in self.peers() if self.is_usable(p.peer_id)), num_blocks)

    async def wait_for_coverage(self, num_blocks: int, timeout: float) -> None:
        """Return once every block is served by some known peer; NoRouteError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            cov = self.coverage(num_blocks)
            if all(cov):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                if not self._peers:
                    raise SwarmError(
                        "no swarm found: no peer answered"
                        + (f" at {', '.join(self.bootstrap)}" if self.bootstrap else " on the LAN" if self.mdns else " (no --peer, and mDNS is off)")
                        + "; start one with `swarm join` or pass --peer HOST:PORT"
                    )
                if not self.peers():
                    raise SwarmError(self._other_models())
                raise NoRouteError(gaps(cov))
            self._updated.clear()
            try:
                await asyncio.wait_for(self._updated.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
