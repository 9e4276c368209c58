"""One inference session across the swarm: a chain of per-peer sessions, and failover.

A step is pushed: the client sends it to the first hop, each peer hands its output to the next
(wire.Forward.next), and the last answers the client with the output and the input of every hop.
So the client keeps, for every block boundary where a hop starts, the rows that went in there
(the history), as it does when it sends a step hop by hop itself (long prompts, checked steps,
a step whose push failed). When a hop fails, the peer is banned for a while, the hop's span
alone is routed again, and the history at its start boundary is replayed through the new hops
in one prefill: that both rebuilds their caches and computes the step that failed. The other
hops keep their sessions. Greedy output is therefore the same with or without a failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import wire
from .errors import PeerUnavailable, RemoteError, SwarmError
from .gossip import GossipRecords
from .routing import Hop, Route
from .transport import Connection, next_request_id
from .verify import VerifyPolicy, arbitrate, judge, tolerance

log = logging.getLogger("swarm.client")

# errors after which the same peer may still be fine for others, but not for this step
_ROUTE_AROUND = {"overloaded", "too_many_sessions", "busy"}
LIED = "lied"  # the code of a peer caught returning wrong hidden states
_BAN_S = {LIED: 24 * 3600.0}
PUSH_MAX_BYTES = 1 << 20  # rows of a step x hops: above this, a step goes hop by hop


def _ban_seconds(code: str) -> float:
    return 5.0 if code in _ROUTE_AROUND else _BAN_S.get(code, 60.0)


@dataclass
class LiveHop:
    """A hop of the route with its open session on the peer."""

    hop: Hop
    conn: Connection
    session: int
    token: bytes = b""  # the session's push token: the hop before may hand rows in with it

    @property
    def start(self) -> int:
        return self.hop.start

    @property
    def end(self) -> int:
        return self.hop.end


@dataclass
class FailoverEvent:
    at_position: int
    dropped: str
    span: tuple[int, int]
    reason: str
    replaced_by: list[tuple[str, int, int]]
    stall_s: float


class ChainHost(Protocol):
    """What the chain needs from its client (an interface, so tests can drive it in memory)."""

    async def plan(self, start: int, end: int, before: str | None = None, after: str | None = None) -> Route: ...
    async def refresh_rtts(self) -> None: ...
    async def connection(self, peer_id: str) -> Connection: ...
    def expected_ms(self, hop: Hop, rows: int) -> float: ...
    def observe(self, peer_id: str, rtt_ms: float) -> None: ...
    def ban(self, peer_id: str, seconds: float) -> None: ...
    def verifier_candidates(self, start: int, end: int, exclude: set[str]) -> list[Hop]: ...
    def peer_format(self, peer_id: str) -> tuple[str, str]: ...
    def record(self, peer_id: str) -> dict | None: ...


@dataclass
class Shadow:
    """A second peer's session on the same span, fed only the steps that are checked (it
    catches up on the rows it missed in one prefill)."""

    live: LiveHop
    synced: int = 0  # tokens in its cache


@dataclass
class Chain:
    host: ChainHost
    max_length: int
    wire_dtype: str = "float32"
    max_failovers: int = 8  # in one answer; then the error reaches the caller
    on_event: Callable[[FailoverEvent], None] | None = None
    hops: list[LiveHop] = field(default_factory=list)
    position: int = 0  # tokens already in every hop's cache
    history: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # boundary -> rows sent
    failovers: list[FailoverEvent] = field(default_factory=list)
    routes: list[list[dict]] = field(default_factory=list)  # each route used, for --json
    verify: VerifyPolicy | None = None  # which steps a second peer checks; None: none
    on_verify: Callable[[dict], None] | None = None  # told of every mismatch
    shadows: dict[tuple[int, int], Shadow] = field(default_factory=dict)
    verifications: list[dict] = field(default_factory=list)  # one per checked hop, for --json
    distrusted: set[str] = field(default_factory=set)  # caught lying: never used again here
    push: bool = True  # hand steps peer to peer (off once the same peers fail as a chain only)
    pushed_steps: int = 0  # steps that went peer to peer, for --json

    async def open(self, num_blocks: int) -> None:
        """Open a session on every hop of the best route, all at once. A peer that refuses (full,
        gone) is banned for a while and the rest of the chain is routed again from where it failed."""
        await self.host.refresh_rtts()
        start = 0
        while start < num_blocks:
            route = await self.host.plan(start, num_blocks, before=self.hops[-1].hop.peer_id if self.hops else None)
            # every hop at once: between machines each open is a round trip of its own
            opened = await asyncio.gather(*(self._open_hop(hop) for hop in route), return_exceptions=True)
            refused = False
            for hop, got in zip(route, opened):
                if isinstance(got, LiveHop):
                    if refused:  # past a refusal: that part of the route is planned again
                        await self._close_quietly(got)
                    else:
                        self.hops.append(got)
                        start = hop.end
                    continue
                if not isinstance(got, (PeerUnavailable, RemoteError)):
                    raise got
                refused = True
                if len(self.failovers) >= self.max_failovers:
                    raise SwarmError(f"gave up after {self.max_failovers} refused sessions; last error: {got}") from None
                self.host.ban(hop.peer_id, _ban_seconds(getattr(got, "code", "unavailable")))
                self.failovers.append(FailoverEvent(0, hop.peer_id, (hop.start, hop.end), str(got), [], 0.0))
                log.info("%s refused a session for blocks %d:%d: %s", hop.peer_id[:10], hop.start, hop.end, got)
        self.routes.append([h.hop.to_json() for h in self.hops])
        await self._introduce()

    async def _introduce(self) -> None:
        """Give each hop the signed gossip record of the hop after it, so it can push there:
        peers started apart (only --peer to one of them, or none) may not know each other yet.
        A record any peer could gossip; a hop that does not take it is asked hop by hop later."""
        if not self.push or len(self.hops) < 2:
            return

        async def tell(lh: LiveHop, nxt: LiveHop) -> None:
            rec = self.host.record(nxt.hop.peer_id)
            if rec is not None:
                try:
                    await lh.conn.request(lambda rid: GossipRecords(rid, (rec,)), timeout=self._timeout(lh.hop, 1))
                except SwarmError as e:
                    log.debug("could not introduce %s to %s: %s", nxt.hop.peer_id[:10], lh.hop.peer_id[:10], e)

        await asyncio.gather(*(tell(a, b) for a, b in zip(self.hops, self.hops[1:])))

    async def close(self) -> None:
        for lh in [*self.hops, *(s.live for s in self.shadows.values())]:
            if not lh.conn.closed:
                try:
                    await lh.conn.request(lambda rid, s=lh.session: wire.CloseSession(rid, session=s), timeout=2.0)
                except SwarmError:
                    pass
        self.hops = []
        self.shadows = {}

    async def _open_hop(self, hop: Hop) -> LiveHop:
        conn = await self.host.connection(hop.peer_id)
        reply = await conn.request(
            lambda rid: wire.OpenSession(rid, start=hop.start, end=hop.end, max_length=self.max_length, dtype=self.wire_dtype),
            timeout=self._timeout(hop, 1),
            expect=wire.SessionOpened,
        )
        return LiveHop(hop, conn, reply.session, reply.push_token)

    def _timeout(self, hop: Hop, rows: int) -> float:
        # generous against the estimate (the CPU is shared), but far from a fixed minute
        return max(2.0, 8 * self.host.expected_ms(hop, rows) / 1000)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, n, H]: the embeddings of the next n tokens -> their final hidden states."""
        x = hidden.to(wire.WIRE_DTYPES[self.wire_dtype])
        check = self.verify is not None and self.verify.check_this_step()
        routes, suspect = len(self.routes), False
        if self._can_push(x) and not check:
            pushed, suspect = await self._push_step(x)
            if pushed is not None:
                y, sent = pushed
                self._remember(sent, hidden.shape[1])
                self.pushed_steps += 1
                return y
        sent: list[tuple[int, torch.Tensor]] = []  # (boundary, rows sent there) for this step
        i = 0
        while i < len(self.hops):
            lh = self.hops[i]
            try:
                y = await self._forward(lh, x, self.position)
                if check and await self._verify_hop(lh, x, y) == lh.hop.peer_id:
                    pid = lh.hop.peer_id
                    raise RemoteError(f"{pid[:10]} returned wrong hidden states (caught by --verify)", code=LIED, peer=pid)
                sent.append((lh.start, x))
                x = y
                i += 1
            except (PeerUnavailable, RemoteError) as e:
                x, replaced = await self._failover(i, x, e)
                sent.extend(replaced)
                i += len(replaced)
        self._remember(sent, hidden.shape[1])
        if suspect and len(self.routes) == routes:
            self.push = False  # the same peers answer one by one, not as a chain: stop pushing
        return x

    def _remember(self, sent: list[tuple[int, torch.Tensor]], n: int) -> None:
        for b, rows in sent:
            self.history.setdefault(b, []).append(rows)
        self.position += n

    def _can_push(self, x: torch.Tensor) -> bool:
        # not a long prompt: its rows, carried back once per hop, could outgrow a frame
        return self.push and len(self.hops) > 1 and all(lh.token for lh in self.hops) and x.nbytes * len(self.hops) <= PUSH_MAX_BYTES

    async def _push_step(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, list[tuple[int, torch.Tensor]]] | None, bool]:
        """One step handed peer to peer: the client sends to the first hop and hears from the
        last (or from whichever hop failed). Returns (output, rows sent per boundary), or None
        when it did not work out: the caller then runs the step hop by hop, which finds and
        replaces a failed peer as usual. The flag says whether the push itself is suspect (a
        hop could not reach the next, nobody answered, a wrong answer)."""
        hops = self.hops
        rid = next_request_id()
        waits: dict[asyncio.Future[wire.Message], Connection] = {}  # an answer may come on any hop
        try:
            for c in {id(lh.conn): lh.conn for lh in hops}.values():
                waits[c.expect(rid)] = c
            nxt = tuple(wire.NextHop(lh.hop.peer_id, lh.session, lh.token) for lh in hops[1:])
            await hops[0].conn.send(wire.Forward(rid, session=hops[0].session, position=self.position, hidden=x, next=nxt))
            # one bound for the chain: a hung hop costs this once, then hop by hop finds it
            timeout = max(2.0, 8 * sum(self.host.expected_ms(lh.hop, x.shape[1]) for lh in hops) / 1000)
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:  # somewhere on the chain; hop by hop will tell where
                raise RemoteError(f"no answer within {timeout:.1f}s", code="push_timeout", peer=hops[-1].hop.peer_id)
            fut = done.pop()
            reply = waits[fut].check_reply(fut.result(), wire.ForwardResult)
            if waits[fut] is not hops[-1].conn or len(reply.carried) != len(hops):
                raise RemoteError("a pushed step's answer came from the wrong hop", code="bad_reply", peer=waits[fut].peer)
            for r in (reply.hidden, *reply.carried):
                if r.shape != x.shape or r.dtype != x.dtype:
                    raise RemoteError(f"a pushed step returned a tensor of shape {list(r.shape)}", code="bad_reply", peer=waits[fut].peer)
        except SwarmError as e:
            code = getattr(e, "code", "unavailable")
            log.info("a pushed step at position %d failed (%s); running it hop by hop", self.position, e)
            return None, code in ("push_unreachable", "push_timeout", "bad_reply")
        finally:
            for fut, c in waits.items():
                c.forget(rid)
                fut.cancel()
        return (reply.hidden, [(lh.start, rows) for lh, rows in zip(hops, reply.carried)]), False

    async def _forward(self, lh: LiveHop, x: torch.Tensor, position: int) -> torch.Tensor:
        t0 = time.perf_counter()
        reply = await lh.conn.request(
            lambda rid: wire.Forward(rid, session=lh.session, position=position, hidden=x),
            timeout=self._timeout(lh.hop, x.shape[1]),
            expect=wire.ForwardResult,
        )
        out = reply.hidden
        if out.shape != x.shape or out.dtype != x.dtype:
            raise RemoteError(
                f"{lh.hop.peer_id[:10]} returned a tensor of shape {list(out.shape)}, expected {list(x.shape)}",
                code="bad_reply",
                peer=lh.hop.peer_id,
            )
        if x.shape[1] == 1:
            # the network share of the call: total minus the compute the peer announced
            total = (time.perf_counter() - t0) * 1000
            self.host.observe(lh.hop.peer_id, max(0.0, total - lh.hop.compute_ms))
        return out

    def _past(self, boundary: int) -> torch.Tensor | None:
        rows = self.history.get(boundary)
        if not rows:
            return None
        if len(rows) > 1:
            rows[:] = [torch.cat(rows, dim=1)]
        return rows[0]

    async def _failover(self, i: int, x: torch.Tensor, err: SwarmError) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """Replace hop i, whose call failed with `err`, and compute the step through new hops.

        Returns the step's output at the end of hop i's span, and the (boundary, rows) this step
        sent to each new hop, for the history."""
        t0 = time.perf_counter()
        old = self.hops[i]
        span_start, span_end = old.start, old.end
        culprit = old.hop.peer_id
        p = self.position
        past = self._past(span_start)
        full = x if past is None else torch.cat([past[:, :p], x], dim=1)  # [1, p + n, H]
        while True:
            if len(self.failovers) >= self.max_failovers:
                raise SwarmError(f"gave up after {self.max_failovers} failovers in one answer; last error: {err}")
            code = getattr(err, "code", "unavailable")
            self.host.ban(culprit, _ban_seconds(code))
            self.failovers.append(FailoverEvent(p, culprit, (span_start, span_end), str(err), [], 0.0))
            log.info("dropping %s for blocks %d:%d: %s", culprit[:10], span_start, span_end, err)
            # between the hops that stay; NoRouteError reaches the caller
            route = await self.host.plan(
                span_start, span_end,
                before=self.hops[i - 1].hop.peer_id if i > 0 else None,
                after=self.hops[i + 1].hop.peer_id if i + 1 < len(self.hops) else None,
            )
            new_hops: list[LiveHop] = []
            sent: list[tuple[int, torch.Tensor]] = []
            try:
                y = full
                for hop in route:
                    culprit = hop.peer_id
                    lh = await self._open_hop(hop)
                    new_hops.append(lh)
                    sent.append((hop.start, y))
                    y = await self._forward(lh, y, 0)  # replay + this step, as one prefill
                break
            except (PeerUnavailable, RemoteError) as e:
                err = e
                for lh in new_hops:
                    await self._close_quietly(lh)
        self.hops[i : i + 1] = new_hops
        await self._close_quietly(old)
        for b, rows in sent:
            self.history[b] = [rows[:, :p]]  # a new boundary's past, rebuilt by the replay
        ev = self.failovers[-1]
        ev.replaced_by = [(h.hop.peer_id, h.start, h.end) for h in new_hops]
        ev.stall_s = time.perf_counter() - t0
        self.routes.append([h.hop.to_json() for h in self.hops])
        await self._introduce()
        if self.on_event:
            self.on_event(ev)
        return y[:, p:], [(b, rows[:, p:]) for b, rows in sent]

    # --- verification ---------------------------------------------------------------------------

    async def _verify_hop(self, lh: LiveHop, x: torch.Tensor, y: torch.Tensor) -> str | None:
        """Check hop `lh`'s output `y` for input `x` against a second peer. Returns the id of a
        peer caught lying (the primary or the checker), or None."""
        span, p, n = (lh.start, lh.end), self.position, x.shape[1]
        primary = lh.hop.peer_id
        shadow = self.shadows.get(span)
        if shadow is None or shadow.live.conn.closed or shadow.live.hop.peer_id in self.distrusted:
            shadow = await self._open_shadow(lh)
            if shadow is None:
                self.verifications.append({"position": p, "span": list(span), "primary": primary, "checker": None, "ok": None})
                return None
        checker = shadow.live.hop.peer_id
        past = self._past(lh.start)
        rows = x if shadow.synced >= p or past is None else torch.cat([past[:, shadow.synced : p], x], dim=1)
        try:
            z = (await self._forward(shadow.live, rows, min(shadow.synced, p)))[:, -n:]
        except (PeerUnavailable, RemoteError):
            self.shadows.pop(span, None)
            return None
        shadow.synced = p + n
        fmt_p, fmt_c = self.host.peer_format(primary), self.host.peer_format(checker)
        verdict = judge(y, z, tolerance(fmt_p, fmt_c))
        record = {"position": p, "span": list(span), "primary": primary, "checker": checker,
                  "distance": verdict.distance, "tolerance": verdict.tolerance, "ok": verdict.ok, "liar": None}
        self.verifications.append(record)
        if verdict.ok:
            return None
        # a third opinion from a fresh session that replays the whole span's past
        full = x if past is None else torch.cat([past[:, :p], x], dim=1)
        liar = None
        for hop in self.host.verifier_candidates(lh.start, lh.end, {primary, checker} | self.distrusted)[:2]:
            try:
                third = await self._open_hop(hop)
            except (PeerUnavailable, RemoteError):
                continue
            try:
                w = (await self._forward(third, full, 0))[:, -n:]
            except (PeerUnavailable, RemoteError):
                continue
            finally:
                await self._close_quietly(third)
            fmt_t = self.host.peer_format(hop.peer_id)
            liar = arbitrate(primary, y, checker, z, w, tolerance(fmt_p, fmt_t), tolerance(fmt_c, fmt_t))
            break
        record["liar"] = liar
        if self.on_verify:
            self.on_verify(record)
        log.warning("verification at position %d, blocks %d:%d: %s", p, lh.start, lh.end, verdict.describe(primary, checker))
        if liar is not None:
            self.distrusted.add(liar)
            self.host.ban(liar, _ban_seconds(LIED))
        if liar == checker:
            self.shadows.pop(span, None)
            await self._close_quietly(shadow.live)
        return liar

    async def _open_shadow(self, lh: LiveHop) -> Shadow | None:
        exclude = {lh.hop.peer_id} | self.distrusted
        for hop in self.host.verifier_candidates(lh.start, lh.end, exclude)[:3]:
            try:
                shadow = Shadow(await self._open_hop(hop))
            except (PeerUnavailable, RemoteError):
                continue
            self.shadows[(lh.start, lh.end)] = shadow
            return shadow
        return None

    async def _close_quietly(self, lh: LiveHop) -> None:
        if lh.conn is None or lh.conn.closed:
            return
        try:
            await lh.conn.request(lambda rid: wire.CloseSession(rid, session=lh.session), timeout=1.0)
        except SwarmError:
            pass
