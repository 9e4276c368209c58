"""The peer server: serves a span of blocks to inference sessions over the peer protocol.

A step comes from the session's owner (the client) or is pushed by the peer before us on the
chain; we run it and send the output on to the next peer when the step names one, else to the
owner, who also hears of any failure.

One asyncio loop per process. Model compute runs in one worker thread, so heartbeats, gossip
and other sessions' frames never wait behind a forward pass; steps are computed one at a time
(the CPU is the bottleneck, and interleaving would only thrash caches).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from swarm import compute, links, wire
from swarm.blocks import BlockSpan, rewind
from swarm.errors import ProtocolError, SwarmError
from swarm.secure import SwarmKey, accept_secure, server_context
from swarm.identity import Identity, short
from swarm.manifest import Manifest
from swarm.quant import block_hook, weight_bytes
from swarm.tasks import TaskSet
from swarm.transport import serve_frames

from .gate import ConnectionGate, GateLimits
from .membership import Membership, MembershipConfig
from .sessions import Limits, SessionError, SessionTable
from .transfer import TransferService

log = logging.getLogger("swarm.peer")


@dataclass
class PeerConfig:
    start: int  # first block served
    end: int  # one past the last block served
    host: str = "127.0.0.1"  # address to listen on
    port: int = 0  # 0: any free port
    dtype: str = "float32"  # dtype of the weights and the compute
    device: str = "cpu"  # where the blocks live and run: cpu, cuda, cuda:N
    limits: Limits = field(default_factory=Limits)
    gate: GateLimits = field(default_factory=GateLimits)  # connections in all, per address, per second
    max_frame: int = wire.DEFAULT_MAX_FRAME  # largest frame accepted, bytes
    conn_idle_timeout: float = 120.0  # seconds a connection may stay silent between frames
    frame_timeout: float = 10.0  # seconds a started frame may take to arrive (slow senders)
    torch_threads: int | None = None  # intra-op threads for compute; None keeps torch's choice
    announce: str | None = None  # "host:port" others should dial (behind NAT, a proxy, or 0.0.0.0)
    quant: str = "none"  # weights held as none (dtype), int8 or nf4 (swarm.quant); compute stays in dtype
    swarm_key: SwarmKey | None = None  # a private swarm's secret; None for the public swarm
    membership: MembershipConfig = field(default_factory=MembershipConfig)  # gossip and mDNS
    test_perturb: float = 0.0  # testing only: add this much relative noise to outputs (a liar)
    pinned: bool = False  # started with an explicit span: it will not move to fill a gap


class PeerServer:
    """Create with `await PeerServer.start(...)`; stop with `await server.close()`."""

    def __init__(self, manifest: Manifest, identity: Identity, config: PeerConfig, span: BlockSpan) -> None:
        self.manifest = manifest
        self.identity = identity
        self.config = config
        self.span = span
        self.sessions = SessionTable(config.limits)
        self.gate = ConnectionGate(config.gate)
        self.transfer = TransferService(lambda: self.manifest)  # block files for joining peers
        self.ms_per_block = 0.0  # moving average of compute time per block per row
        self._conn_ids = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None
        self._tasks = TaskSet()
        self._writers: dict[int, asyncio.StreamWriter] = {}  # connection -> its stream
        self._relayed: OrderedDict[tuple[str, int], int] = OrderedDict()  # (next peer, step) -> owner
        self.port = config.port
        self.started = time.time()
        self.membership: Membership | None = None
        self.weight_bytes = weight_bytes(span.layers)  # quantized storage counted as stored

    @classmethod
    async def start(cls, manifest: Manifest, identity: Identity, config: PeerConfig, span: BlockSpan | None = None) -> "PeerServer":
        if config.torch_threads:
            compute.set_threads(config.torch_threads)
        if span is None:
            on_block = block_hook(config.quant, config.dtype, manifest.num_blocks)
            span = await compute.run(
                BlockSpan.load, manifest, config.start, config.end, config.dtype, on_block, None, config.device
            )
        self = cls(manifest, identity, config, span)
        await self._calibrate()
        self._server = await asyncio.start_server(
            self._on_connect, config.host, config.port, ssl=server_context(identity), ssl_handshake_timeout=config.frame_timeout
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.spawn(self._expire_loop())
        self.membership = Membership(identity, self.record_fields, config.membership, config.swarm_key)
        await self.membership.start(self.port)
        return self

    @property
    def address(self) -> str:
        return self.config.announce or f"{self.config.host}:{self.port}"

    async def close(self) -> None:
        """Leave the swarm cleanly: a signed leave record first, so others drop us at once."""
        if self.membership is not None:
            await self.membership.leave()
        if self._server:
            self._server.close()
        await self._tasks.cancel_all()

    async def _calibrate(self) -> None:
        """Time one single-row step so the first record announces a real compute estimate."""
        cache = self.span.new_cache()
        x = torch.zeros(1, 1, self.span.hidden_size, dtype=self.span.dtype)
        await compute.run(self.span.forward, x, 0, cache)
        t0 = time.perf_counter()
        await compute.run(self.span.forward, x, 1, cache)
        self.ms_per_block = (time.perf_counter() - t0) * 1000 / (self.span.end - self.span.start)

    # --- the record others see -----------------------------------------------------------------

    def record_fields(self) -> dict:
        """What our gossip record says now (Membership signs it with a fresh version)."""
        blocks = self.span.end - self.span.start
        near = self.membership.links(self.span.start, self.span.end) if self.membership is not None else []
        return {
            "addrs": [self.address],
            "model": self.manifest.name,
            "model_hash": self.manifest.model_hash,
            "start": self.span.start,
            "end": self.span.end,
            "dtype": self.config.dtype,
            "quant": self.config.quant,
            "ms_per_block": self.ms_per_block,
            "throughput": 1000.0 / (self.ms_per_block * blocks) if self.ms_per_block else 0.0,
            "free_cache": self.sessions.free_tokens,
            "sessions": len(self.sessions.sessions),
            "extra": {"num_blocks": self.manifest.num_blocks, "weight_bytes": self.weight_bytes}
            | ({"pinned": True} if self.config.pinned else {})
            | ({links.FIELD: near} if near else {}),
        }

    # --- connections ---------------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(self._conn_ids)
        peername = writer.get_extra_info("peername")
        address = str(peername[0]) if peername else "?"
        refused = self.gate.admit(address, time.monotonic())
        if refused is not None:
            log.debug("refused a connection: %s", refused)
            writer.close()
            return
        try:
            try:
                caller = await accept_secure(reader, writer, self.identity, self.config.swarm_key, self.config.frame_timeout)
            except SwarmError as e:
                log.info("refused a caller from %s: %s", address, e)
                return
            await self._serve(conn, caller, reader, writer)
        finally:
            self.gate.release(address)

    async def _serve(self, conn: int, caller: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers[conn] = writer  # pushed steps answer their session's owner here
        try:
            await serve_frames(
                reader,
                writer,
                lambda msg: self._handle(conn, caller, msg),
                max_frame=self.config.max_frame,
                idle_timeout=self.config.conn_idle_timeout,
                frame_timeout=self.config.frame_timeout,
            )
        finally:
            self._writers.pop(conn, None)
            for s in self.sessions.close_owner(conn):
                log.debug("session %d closed with its connection", s.id)

    async def _handle(self, conn: int, caller: str, msg: wire.Message) -> wire.Message | None:
        try:
            if isinstance(msg, wire.Forward):
                return await self._forward(conn, msg)
            if isinstance(msg, wire.OpenSession):
                return self._open(conn, caller, msg)
            if isinstance(msg, wire.CloseSession):
                self.sessions.get(conn, msg.session, time.monotonic())
                self.sessions.close(msg.session)
                return wire.Closed(msg.id)
            if isinstance(msg, wire.Ping):
                return wire.Pong(msg.id)
            if isinstance(msg, wire.GetInfo) and self.membership is not None:
                own = self.membership.table.get(self.identity.peer_id)
                known = tuple(r.to_wire() for r in self.membership.known() if r.peer_id != self.identity.peer_id)
                return wire.Info(msg.id, peer=own.to_wire() if own else {}, known=known)
            reply = await self.transfer.handle(msg)  # GetManifest, GetChunk (peers/transfer.py)
            if reply is not None:
                return reply
            if self.membership is not None:
                reply = self.membership.handle(msg)
                if reply is not None:
                    return reply
            return wire.Error(msg.id, "unsupported", f"message type {msg.TYPE!r} is not served here")
        except SessionError as e:
            return wire.Error(msg.id, e.code, str(e))
        except ProtocolError as e:
            return wire.Error(msg.id, e.code, str(e))
        except Exception as e:  # our bug: report it to this caller only, keep serving everyone
            log.exception("internal error while serving %s", msg.TYPE)
            return wire.Error(msg.id, "internal", f"internal error: {type(e).__name__}")

    def _open(self, conn: int, caller: str, msg: wire.OpenSession) -> wire.Message:
        if not (self.span.start <= msg.start < msg.end <= self.span.end):
            raise SessionError(
                "bad_span", f"blocks {msg.start}:{msg.end} are not inside this peer's span {self.span.start}:{self.span.end}"
            )
        if msg.dtype not in wire.WIRE_DTYPES:
            raise SessionError("bad_dtype", f"dtype {msg.dtype!r} not allowed (allowed: {', '.join(wire.WIRE_DTYPES)})")
        s = self.sessions.open(conn, caller, msg.start, msg.end, msg.max_length, msg.dtype, self.span.new_cache(msg.max_length), time.monotonic())
        s.span = self.span  # a session keeps its blocks until it closes, even if the peer moves
        return wire.SessionOpened(msg.id, session=s.id, push_token=s.token)

    async def _forward(self, conn: int, msg: wire.Forward) -> wire.Message | None:
        """A step. Its answer goes back on `conn`, except for a push (a frame with a token, from
        the peer before us): once the session is known, whatever comes of it is the owner's."""
        now = time.monotonic()
        s = self.sessions.pushed(msg.session, msg.token, now) if msg.token else self.sessions.get(conn, msg.session, now)
        try:
            reply = await self._run_step(s, msg)
        except SessionError as e:
            reply = wire.Error(msg.id, e.code, str(e))
        if reply is not None and msg.token:
            self._send_to(s.owner, reply)
            return None
        return reply

    async def _run_step(self, s, msg: wire.Forward) -> wire.Message | None:
        h = msg.hidden
        if h.dim() != 3 or h.shape[0] != 1 or h.shape[2] != self.span.hidden_size or h.shape[1] < 1:
            raise SessionError("bad_shape", f"hidden must have shape [1, n>=1, {self.span.hidden_size}], got {list(h.shape)}")
        if wire.WIRE_DTYPES[s.dtype] != h.dtype:
            raise SessionError("bad_dtype", f"hidden is {h.dtype}, the session travels in {s.dtype}")
        if len(msg.next) > wire.MAX_PUSH_HOPS or len(msg.carried) > wire.MAX_PUSH_HOPS:
            raise SessionError("bad_request", f"a push may name at most {wire.MAX_PUSH_HOPS} hops")
        if any(c.shape != h.shape or c.dtype != h.dtype for c in msg.carried):
            raise SessionError("bad_shape", "carried rows must have the shape and dtype of hidden")
        async with s.turn:  # a client's retry may arrive while a push of the same step still runs
            if msg.position < 0 or msg.position > s.length:
                raise SessionError("bad_position", f"position {msg.position} is past the session's length {s.length}")
            if msg.token and msg.position != s.length:
                raise SessionError("bad_position", f"a push cannot rewind: position {msg.position}, the session holds {s.length}")
            if msg.position + h.shape[1] > s.max_length:
                raise SessionError("too_long", f"positions up to {msg.position + h.shape[1]} exceed the session's max_length {s.max_length}")
            s.busy = True
            try:
                t0 = time.perf_counter()
                out = await compute.run(self._step, s, msg.position, h)
                dt = (time.perf_counter() - t0) * 1000
            finally:
                s.busy = False
            s.length = msg.position + h.shape[1]
        if h.shape[1] == 1:
            per_block = dt / (s.end - s.start)
            self.ms_per_block = 0.9 * self.ms_per_block + 0.1 * per_block if self.ms_per_block else per_block
        carried = (*msg.carried, h) if msg.next or msg.token else msg.carried
        if not msg.next:
            return wire.ForwardResult(msg.id, hidden=out, carried=carried)
        nxt = msg.next[0]
        try:
            if self.membership is None:
                raise SwarmError("this peer keeps no table of peers")
            link = await self.membership.connection(nxt.peer)
            link.on_unmatched = functools.partial(self._relay_error, nxt.peer)
            await link.send(wire.Forward(msg.id, nxt.session, msg.position, out, next=msg.next[1:], token=nxt.token, carried=carried))
        except SwarmError as e:
            raise SessionError("push_unreachable", f"could not hand on to {short(nxt.peer)}: {e}") from None
        self._relayed[(nxt.peer, msg.id)] = s.owner
        while len(self._relayed) > 4096:  # pushes that went well are never acknowledged
            self._relayed.popitem(last=False)
        return None

    def _relay_error(self, peer: str, msg: wire.Message) -> None:
        """The next peer refused a push before it knew the session (a wrong token, a session
        gone): tell the client whose step it was."""
        owner = self._relayed.pop((peer, msg.id), None)
        if isinstance(msg, wire.Error) and owner is not None:
            self._send_to(owner, wire.Error(msg.id, msg.code, f"{short(peer)}: {msg.message}"))

    def _send_to(self, conn: int, msg: wire.Message) -> None:
        writer = self._writers.get(conn)
        if writer is not None and not writer.is_closing():
            writer.write(wire.encode(msg))

    def _step(self, s, position: int, h: torch.Tensor) -> torch.Tensor:
        """On the torch thread (swarm.compute): check, rewind if asked, run the blocks."""
        if not bool(torch.isfinite(h).all()):
            raise SessionError("non_finite", "hidden states contain NaN or infinity")
        if position < s.length:
            rewind(s.cache, position, s.start)
        out = (s.span or self.span).forward(h, position, s.cache, s.start, s.end)
        if self.config.test_perturb:  # the test suite's lying peer, started with --test-perturb
            out = out + self.config.test_perturb * out.norm() / out.numel() ** 0.5 * torch.randn_like(out)
        if not bool(torch.isfinite(out).all()):
            raise SessionError("non_finite", "the blocks produced NaN or infinity")
        return out.to(device="cpu", dtype=wire.WIRE_DTYPES[s.dtype])

    async def _expire_loop(self) -> None:
        period = max(0.5, min(30.0, self.config.limits.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            for s in self.sessions.expire(time.monotonic()):
                log.info("session %d idle for %.0fs: closed", s.id, self.config.limits.idle_timeout)
