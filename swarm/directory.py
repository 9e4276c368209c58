"""The client's view of the swarm: which peers serve which blocks of our model, and how to dial them.

It learns the table from any peer it can reach (bootstrap addresses, or peers found on the LAN)
by asking for its gossip table, refreshes it in the background, and keeps only peers that serve
the client's model (same manifest hash).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from . import wire
from .errors import NoRouteError, PeerUnavailable, ProtocolError, SwarmError
from .identity import Identity
from .transport import Connection

log = logging.getLogger("swarm.directory")


@dataclass(frozen=True)
class PeerView:
    peer_id: str
    addrs: tuple[str, ...]
    model_hash: str
    start: int
    end: int
    ms_per_block: float
    sessions: int
    free_cache: int
    dtype: str
    quant: str
    record: dict  # as received, for status

    @classmethod
    def from_record(cls, r: dict) -> "PeerView":
        try:
            return cls(
                peer_id=str(r["peer_id"]),
                addrs=tuple(str(a) for a in r["addrs"]),
                model_hash=str(r["model_hash"]),
                start=int(r["start"]),
                end=int(r["end"]),
                ms_per_block=float(r.get("ms_per_block", 0.0)),
                sessions=int(r.get("sessions", 0)),
                free_cache=int(r.get("free_cache", 0)),
                dtype=str(r.get("dtype", "float32")),
                quant=str(r.get("quant", "none")),
                record=r,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed peer record: {e}") from None


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad address {addr!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class Directory:
    def __init__(self, model_hash: str, bootstrap: tuple[str, ...], identity: Identity | None = None, mdns: bool = True, connect_timeout: float = 5.0, swarm_key: Any = None, refresh_s: float = 2.0) -> None:
        self.identity = identity or Identity.generate()  # a client's key: it proves nothing but continuity
        self.model_hash = model_hash
        self.bootstrap = tuple(bootstrap)
        self.mdns = mdns
        self.connect_timeout = connect_timeout
        self.swarm_key = swarm_key
        self.refresh_s = refresh_s
        self._peers: dict[str, PeerView] = {}
        self._seen: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._updated = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def peers(self) -> list[PeerView]:
        return [p for p in self._peers.values() if p.model_hash == self.model_hash]

    def all_peers(self) -> list[PeerView]:
        return list(self._peers.values())

    def get(self, peer_id: str) -> PeerView | None:
        return self._peers.get(peer_id)

    async def dial(self, view: PeerView) -> Connection:
        last: Exception | None = None
        for addr in view.addrs:
            host, port = split_addr(addr)
            try:
                return await Connection.open(host, port, self.identity, view.peer_id, self.swarm_key, self.connect_timeout)
            except PeerUnavailable as e:
                last = e
        raise PeerUnavailable(f"cannot reach {view.peer_id[:10]} at {', '.join(view.addrs)}: {last}", peer=view.peer_id)

    def merge(self, records: list[dict]) -> None:
        for r in records:
            try:
                v = PeerView.from_record(r)
            except ProtocolError as e:
                log.debug("dropped a record: %s", e)
                continue
            old = self._peers.get(v.peer_id)
            if old is None or int(r.get("version", 0)) >= int(old.record.get("version", 0)):
                self._peers[v.peer_id] = v
        self._updated.set()

    async def ask(self, addr: str) -> list[dict]:
        host, port = split_addr(addr)
        conn = await Connection.open(host, port, self.identity, None, self.swarm_key, self.connect_timeout)
        try:
            reply = await conn.request(lambda rid: wire.GetInfo(rid), timeout=self.connect_timeout)
        finally:
            await conn.close()
        assert isinstance(reply, wire.Info)
        return [reply.peer, *reply.known]

    async def refresh(self) -> None:
        addrs = list(self.bootstrap) + [a for p in self._peers.values() for a in p.addrs[:1]]
        seen = set()
        for addr in addrs:
            if addr in seen:
                continue
            seen.add(addr)
            try:
                self.merge(await self.ask(addr))
            except (SwarmError, OSError, ValueError) as e:
                log.debug("cannot ask %s: %s", addr, e)

    async def _refresh_loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def settle(self, timeout: float) -> None:
        """Wait until a refresh learns nothing new, or `timeout` passes (for status)."""
        deadline = time.monotonic() + timeout
        known = -1
        while time.monotonic() < deadline and len(self._peers) != known:
            known = len(self._peers)
            await self.refresh()
            if self._peers and len(self._peers) == known:
                break

    def coverage(self, num_blocks: int) -> list[int]:
        cov = [0] * num_blocks
        for p in self.peers():
            for b in range(max(0, p.start), min(num_blocks, p.end)):
                cov[b] += 1
        return cov

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
                        + (f" at {', '.join(self.bootstrap)}" if self.bootstrap else " on the LAN")
                        + "; start one with `swarm join` or pass --peer HOST:PORT"
                    )
                raise NoRouteError(_gaps(cov))
            self._updated.clear()
            try:
                await asyncio.wait_for(self._updated.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass


def _gaps(cov: list[int]) -> list[tuple[int, int]]:
    gaps, s = [], None
    for i, c in enumerate(cov + [1]):
        if c == 0 and s is None:
            s = i
        elif c and s is not None:
            gaps.append((s, i))
            s = None
    return gaps
