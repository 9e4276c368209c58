"""The asyncio driver around the gossip core: heartbeats, push-pull rounds, mDNS, leaving.

Everything it decides comes from `swarm.gossip.GossipTable`; this module only moves messages
and time. Each second the peer re-signs its record with a grown version (the heartbeat); every
half second it exchanges digests with a few random peers; peers found on the LAN or given with
`--peer` are dialled once and gossip takes over from there.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from swarm import links, wire
from swarm.directory import split_addr
from swarm.errors import ProtocolError, SwarmError
from swarm.gossip import GossipConfig, GossipPush, GossipRecords, GossipReply, GossipTable, PeerRecord
from swarm.identity import Identity, short
from swarm.mdns import Discovered, MdnsDiscovery, make_txt
from swarm.routing import RttTracker
from swarm.secure import SwarmKey
from swarm.tasks import TaskSet
from swarm.transport import Connection

log = logging.getLogger("swarm.gossip")


@dataclass
class MembershipConfig:
    heartbeat_s: float = 1.0  # how often our record's version grows (x table.scale() past 128 peers)
    round_s: float = 0.5  # how often we start an exchange
    fanout: int = 2  # peers per round
    call_timeout: float = 3.0  # seconds for one exchange
    bootstrap: tuple[str, ...] = ()  # "host:port" of members to dial until we know others
    mdns: bool = True
    mdns_interfaces: list[str] | None = None  # None: every interface
    gossip: GossipConfig = GossipConfig()


class Membership:
    """Owns the table; `record_fields()` (from the peer) gives what our record says now."""

    def __init__(self, identity: Identity, record_fields: Callable[[], dict], config: MembershipConfig, swarm_key: SwarmKey | None = None) -> None:
        self.identity = identity
        self.record_fields = record_fields
        self.config = config
        self.swarm_key = swarm_key
        # the table stretches heartbeat and timeouts with the swarm's size from these timings
        self.table = GossipTable(identity.peer_id, replace(config.gossip, heartbeat_s=config.heartbeat_s, round_s=config.round_s, fanout=config.fanout))
        self._conns: dict[str, Connection] = {}
        self._dialing: dict[str, asyncio.Lock] = {}  # peer id -> held while dialing it
        self._tasks = TaskSet()
        self._mdns: MdnsDiscovery | None = None
        self._version = 0
        self._rng = random.Random()
        self._leaving = False
        self._mdns_txt: dict[str, str] | None = None
        self.rtt = RttTracker()  # to other peers, from timing every gossip exchange and probe
        self._probed: dict[str, float] = {}  # peer -> when we last pinged it as a possible follower

    # --- our record ------------------------------------------------------------------------------

    def _next_version(self) -> int:
        self._version = max(self._version + 1, int(time.time() * 1000))
        return self._version

    def own_record(self, leaving: bool = False) -> PeerRecord:
        fields = self.record_fields()
        rec = PeerRecord(
            peer_id=self.identity.peer_id,
            addrs=tuple(fields["addrs"]),
            model=fields["model"],
            model_hash=fields["model_hash"],
            start=fields["start"],
            end=fields["end"],
            dtype=fields["dtype"],
            quant=fields["quant"],
            throughput=float(fields["throughput"]),
            ms_per_block=float(fields["ms_per_block"]),
            free_cache=int(fields["free_cache"]),
            sessions=int(fields["sessions"]),
            version=self._next_version(),
            leaving=leaving,
            extra=tuple(sorted((k, v) for k, v in fields.get("extra", {}).items())),
        )
        return rec.sign(self.identity)

    def heartbeat(self) -> None:
        self.table.update_own(self.own_record(), time.monotonic())

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self, port: int) -> None:
        self.heartbeat()
        self._tasks.spawn(self._heartbeat_loop())
        self._tasks.spawn(self._gossip_loop())
        if self.config.mdns:
            try:
                mdns = MdnsDiscovery(self.identity.peer_id, interfaces=self.config.mdns_interfaces, on_found=self._on_found)
                f = self.record_fields()
                await mdns.start(port, make_txt(f["model_hash"], f["start"], f["end"]))
                self._mdns_txt = make_txt(f["model_hash"], f["start"], f["end"])
                self._mdns = mdns  # only now: the heartbeat must not update a half-registered name
            except Exception as e:  # no multicast here: --peer still works
                log.warning("mDNS unavailable (%r); use --peer HOST:PORT to join", e)
                self._mdns = None

    async def leave(self, timeout: float = 2.0) -> None:
        """Sign a leave record and push it to as many peers as answer within `timeout`."""
        self._leaving = True
        await self._tasks.cancel_all()
        if self._mdns is not None:
            try:
                await asyncio.wait_for(self._mdns.stop(), timeout)
            except (asyncio.TimeoutError, Exception):
                pass
        leave = self.own_record(leaving=True)
        self.table.update_own(leave, time.monotonic())
        targets = [r for r in self.table.alive(time.monotonic()) if r.peer_id != self.identity.peer_id][:16]
        if targets:
            await asyncio.wait(
                [asyncio.create_task(self._exchange(r.peer_id, r.addrs, final=leave)) for r in targets], timeout=timeout
            )
        for c in self._conns.values():
            await c.close()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.table.heartbeat_interval())
            self.heartbeat()
            f = self.record_fields()
            txt = make_txt(f["model_hash"], f["start"], f["end"])
            if self._mdns is not None and txt != self._mdns_txt:
                try:
                    await self._mdns.update(txt)  # only when the span changes: not every beat
                    self._mdns_txt = txt
                except Exception as e:
                    log.debug("mDNS update failed: %s", e)

    async def _gossip_loop(self) -> None:
        while True:
            now = time.monotonic()
            gone = self.table.expire(now)
            for pid in gone.removed:
                log.info("peer %s silent: removed", short(pid))
                self.rtt.forget(pid)
                self._probed.pop(pid, None)
                self._dialing.pop(pid, None)
                await self._drop_conn(pid)
            others = [r for r in self.table.alive(now) if r.peer_id != self.identity.peer_id]
            targets = self._rng.sample(others, min(self.config.fanout, len(others)))
            busy = {r.peer_id for r in targets}  # an exchange times those already
            calls = [self._exchange(r.peer_id, r.addrs) for r in targets]
            calls.append(self._probe_follower([r for r in others if r.peer_id not in busy], now))
            if len(others) < 1:
                calls += [self._exchange(None, (a,)) for a in self.config.bootstrap]
            if calls:
                await asyncio.gather(*calls, return_exceptions=True)
            await asyncio.sleep(self.config.round_s)

    def _on_found(self, d: Discovered) -> None:
        if d.peer_id == self.identity.peer_id or d.peer_id in self.table:
            return
        log.info("found %s on the LAN at %s:%d", short(d.peer_id), d.host, d.port)
        self._tasks.spawn(self._exchange(d.peer_id, (f"{d.host}:{d.port}",)))

    # --- one exchange ----------------------------------------------------------------------------

    async def connection(self, peer_id: str) -> Connection:
        """A link to a peer of the table, dialed at the addresses its signed record gives (never
        at an address a caller names); shared with gossip."""
        rec = self.table.get(peer_id)
        if rec is None or peer_id == self.identity.peer_id:
            raise SwarmError(f"peer {short(peer_id)} is not in this peer's table")
        return await self._connect(peer_id, rec.addrs)

    async def _connect(self, peer_id: str | None, addrs: tuple[str, ...]) -> Connection:
        if peer_id is None:  # a bootstrap or LAN address: we learn who it is when it answers
            return await self._dial(None, addrs)
        # one dial at a time per peer: a push and a gossip round meeting a new peer together
        # must share one link, not have the second dial close the first under the push
        async with self._dialing.setdefault(peer_id, asyncio.Lock()):
            c = self._conns.get(peer_id)
            if c is not None and not c.closed:
                return c
            return await self._dial(peer_id, addrs)

    async def _dial(self, peer_id: str | None, addrs: tuple[str, ...]) -> Connection:
        last: Exception | None = None
        for addr in addrs[:4]:
            try:
                host, port = split_addr(addr)
                c = await Connection.open(host, port, self.identity, peer_id, self.swarm_key, self.config.call_timeout)
            except (SwarmError, ValueError) as e:
                last = e
                continue
            if c.remote_id == self.identity.peer_id:  # our own address, via a bootstrap list
                await c.close()
                raise SwarmError("that is us")
            old = self._conns.pop(c.remote_id, None)
            if old is not None:
                await old.close()
            self._conns[c.remote_id] = c  # type: ignore[index]
            return c
        raise SwarmError(f"cannot reach {addrs}: {last}")

    async def _drop_conn(self, peer_id: str) -> None:
        c = self._conns.pop(peer_id, None)
        if c is not None:
            await c.close()

    async def _exchange(self, peer_id: str | None, addrs: tuple[str, ...], final: PeerRecord | None = None) -> None:
        try:
            conn = await self._connect(peer_id, addrs)
            push = self.table.make_push(0)
            if final is not None:  # leaving: our leave record first, whatever the rumor queue says
                push = GossipPush(0, push.digest, (final.to_wire(), *[r for r in push.records if r.get("peer_id") != final.peer_id]), push.lo, push.hi)
            t0 = time.perf_counter()
            reply = await conn.request(lambda rid: GossipPush(rid, push.digest, push.records, push.lo, push.hi), timeout=self.config.call_timeout)
            if not isinstance(reply, GossipReply):
                raise ProtocolError(f"expected a gossip reply, got {reply.TYPE}")
            if conn.remote_id is not None:  # the link a push to that peer would take: see swarm/links.py
                self.rtt.observe(conn.remote_id, (time.perf_counter() - t0) * 1000)
            result, follow = self.table.on_reply(reply, time.monotonic())
            self._log_merge(result)
            if follow is not None:
                await conn.request(lambda rid: GossipRecords(rid, follow.records), timeout=self.config.call_timeout)
        except SwarmError as e:
            log.debug("gossip with %s failed: %s", short(peer_id) if peer_id else addrs, e)
            if peer_id is not None:
                await self._drop_conn(peer_id)

    async def _probe_follower(self, others: list[PeerRecord], now: float) -> None:
        """Ping the peer that could follow us on a chain that we measured least recently, so the
        links we announce stay fresh where the swarm is too big for gossip to meet them all."""
        f = self.record_fields()
        followers = [r for r in others if links.could_follow(f["start"], f["end"], r.start, r.end)]
        if not followers:
            return
        r = min(followers, key=lambda r: (self._probed.get(r.peer_id, -1.0), r.peer_id))
        self._probed[r.peer_id] = now
        try:
            conn = await self._connect(r.peer_id, r.addrs)
            t0 = time.perf_counter()
            await conn.request(lambda rid: wire.Ping(rid), timeout=self.config.call_timeout, expect=wire.Pong)
            self.rtt.observe(r.peer_id, (time.perf_counter() - t0) * 1000)
        except SwarmError as e:
            log.debug("probing %s failed: %s", short(r.peer_id), e)

    # --- the server side -------------------------------------------------------------------------

    def handle(self, msg: wire.Message) -> wire.Message | None:
        """Answer a gossip message that arrived on the peer's server; None if it is not gossip."""
        now = time.monotonic()
        if isinstance(msg, GossipPush):
            reply, result = self.table.on_push(msg, now)
            self._log_merge(result)
            return reply
        if isinstance(msg, GossipRecords):
            self._log_merge(self.table.merge(msg.records, now))
            return wire.Closed(msg.id)  # an acknowledgement, so the caller knows it landed
        return None

    def _log_merge(self, result) -> None:
        for pid in result.accepted:
            r = self.table.get(pid)
            if r is not None and self.table.last_news(pid) is not None:
                log.debug("record of %s: blocks %d:%d v%d", short(pid), r.start, r.end, r.version)
        for pid in result.removed:
            log.info("peer %s left", short(pid))
        if result.dropped:
            bad = {k: v for k, v in result.dropped.items() if k not in ("duplicate", "old_version")}
            if bad:
                log.info("dropped gossip records: %s", bad)

    def known(self) -> list[PeerRecord]:
        return self.table.alive(time.monotonic())

    def links(self, start: int, end: int) -> list:
        """Our record's `links` field for a span [start, end): RTTs to the peers that could follow."""
        others = [r for r in self.known() if r.peer_id != self.identity.peer_id]
        measured = {r.peer_id: ms for r in others if (ms := self.rtt.rtt(r.peer_id)) is not None}
        return links.announce(start, end, ((r.peer_id, r.start, r.end) for r in others), measured)
