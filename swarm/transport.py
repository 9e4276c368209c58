"""The asyncio glue around the wire codec: a request/response connection and a frame server.

Thin on purpose: framing rules live in `wire`, security in `secure`. A `Connection` lets many
coroutines share one stream (replies are matched to requests by id), and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

from . import wire
from .errors import PeerUnavailable, ProtocolError, RemoteError
from .identity import Identity
from .secure import SwarmKey, open_secure_connection

log = logging.getLogger(__name__)
M = TypeVar("M", bound=wire.Message)

# Request ids are unique across all of a process's connections: a pushed step's reply comes back
# on another connection than the one its request left on (Forward.next). A random start, so
# another client cannot guess ours (a peer pairs a refused push with its step by id).
_request_ids = itertools.count(secrets.randbits(48) + 1)


def next_request_id() -> int:
    return next(_request_ids)


async def read_frame(reader: asyncio.StreamReader, max_frame: int, timeout: float | None) -> bytes | None:
    """The next frame body, None on a clean EOF between frames. Raises ProtocolError (fatal)
    for an oversized length and asyncio.IncompleteReadError for a frame cut short."""
    header = await _bounded(reader.readexactly(wire.HEADER.size), timeout, allow_eof=True)
    if header is None:
        return None
    return await _bounded(reader.readexactly(wire.frame_length(header, max_frame)), timeout, allow_eof=False)


async def _bounded(coro: Awaitable[bytes], timeout: float | None, allow_eof: bool) -> bytes | None:
    try:
        if timeout is None:
            return await coro
        async with asyncio.timeout(timeout):  # no task per read, unlike wait_for
            return await coro
    except asyncio.IncompleteReadError as e:
        if allow_eof and not e.partial:
            return None
        raise


class Connection:
    """A client's connection to one peer. `request()` sends a message and awaits its reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        self.peer = peer  # a label for errors and logs: peer id or address
        self.remote_id: str | None = None  # the verified peer id, when the link is secure
        self.on_unmatched: Callable[[wire.Message], None] | None = None  # replies nobody awaits
        self._reader = reader
        self._writer = writer
        self._max_frame = max_frame
        self._pending: dict[int, asyncio.Future[wire.Message]] = {}
        self._closed: BaseException | None = None
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"read {peer}")

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        identity: Identity,
        expected_peer_id: str | None = None,
        swarm_key: SwarmKey | None = None,
        timeout: float = 5.0,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
    ) -> "Connection":
        """TLS 1.3 and the identity handshake (swarm.secure), then a request/response link.
        With `expected_peer_id`, whoever answers with another key is refused before we send
        it anything; without (a bootstrap address), we learn who answered."""
        reader, writer, remote = await open_secure_connection(host, port, identity, expected_peer_id, swarm_key, timeout)
        conn = cls(reader, writer, remote, max_frame=max_frame)
        conn.remote_id = remote
        return conn

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def request(
        self, msg_factory: Callable[[int], wire.Message], timeout: float | None = 30.0, expect: type[M] | None = None
    ) -> M:
        """Send the message `msg_factory(request_id)` and return the reply. An Error reply raises
        RemoteError with its code; a reply of another type than `expect` raises RemoteError
        ("bad_reply"); a broken link or a timeout raises PeerUnavailable."""
        rid = next_request_id()
        fut = self.expect(rid)
        try:
            await self.send(msg_factory(rid))
            async with asyncio.timeout(timeout):
                reply = await fut
        except asyncio.TimeoutError:
            raise PeerUnavailable(f"{self.peer} did not answer within {timeout:.1f}s", peer=self.peer) from None
        finally:
            self.forget(rid)
        return self.check_reply(reply, expect)

    def check_reply(self, reply: wire.Message, expect: type[M] | None) -> M:
        """An Error reply as RemoteError with its code; a reply of another type than `expect` as
        RemoteError("bad_reply")."""
        if isinstance(reply, wire.Error):
            raise RemoteError(f"{self.peer}: {reply.message}", code=reply.code, peer=self.peer)
        if expect is not None and not isinstance(reply, expect):
            raise RemoteError(f"{self.peer} answered {reply.TYPE!r} where {expect.TYPE!r} was due", code="bad_reply", peer=self.peer)
        return reply  # type: ignore[return-value]

    def expect(self, rid: int) -> asyncio.Future[wire.Message]:
        """A future for the reply with id `rid` on this connection; `forget(rid)` when done."""
        if self._closed is not None:
            raise PeerUnavailable(f"connection to {self.peer} is closed", peer=self.peer)
        fut: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        return fut

    def forget(self, rid: int) -> None:
        self._pending.pop(rid, None)

    async def send(self, msg: wire.Message) -> None:
        """Send one frame; no reply is awaited (see `expect`). Waits only while more than 1 MiB
        is still queued for a slow reader."""
        if self._closed is not None:
            raise PeerUnavailable(f"connection to {self.peer} is closed", peer=self.peer)
        try:
            self._writer.write(wire.encode(msg))
            if self._writer.transport.get_write_buffer_size() > 1 << 20:
                await self._writer.drain()
        except (ConnectionError, OSError) as e:
            raise PeerUnavailable(f"lost connection to {self.peer}: {e}", peer=self.peer) from None

    async def _read_loop(self) -> None:
        err: BaseException = PeerUnavailable(f"{self.peer} closed the connection", peer=self.peer)
        try:
            while True:
                body = await read_frame(self._reader, self._max_frame, None)
                if body is None:
                    break
                msg = wire.decode_body(body)
                fut = self._pending.get(msg.id)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(msg)
                elif self.on_unmatched is not None:
                    self.on_unmatched(msg)
        except asyncio.CancelledError:
            err = PeerUnavailable(f"connection to {self.peer} closed", peer=self.peer)
        except ProtocolError as e:
            err = PeerUnavailable(f"{self.peer} sent a bad frame: {e}", peer=self.peer)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            err = PeerUnavailable(f"lost connection to {self.peer}: {e or type(e).__name__}", peer=self.peer)
        finally:
            self._fail_all(err)

    def _fail_all(self, err: BaseException) -> None:
        self._closed = err
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        self._writer.close()

    async def close(self) -> None:
        if self._reader_task.done() and self._closed is not None:
            return
        self._reader_task.cancel()
        try:
            await self._reader_task
        except (asyncio.CancelledError, Exception):
            pass
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except (asyncio.TimeoutError, OSError, ConnectionError):
            pass


Handler = Callable[[wire.Message], Awaitable[wire.Message | None]]  # None: nothing to send back


async def serve_frames(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Handler,
    *,
    max_frame: int,
    idle_timeout: float,
    frame_timeout: float,
) -> None:
    """Answer requests on one connection until it closes. A frame that does not decode gets an
    Error reply and the connection goes on; a broken stream (oversized or cut frame, a sender
    too slow to finish a frame) closes it. Nothing here can take the server down."""
    try:
        while True:
            try:
                # idle between frames for up to idle_timeout; once a frame starts, all of it must
                # arrive within frame_timeout (a caller trickling bytes cannot hold the peer)
                first = await _bounded(reader.readexactly(1), idle_timeout, allow_eof=True)
                if first is None:
                    return
                async with asyncio.timeout(frame_timeout):  # one bound for the rest of the frame
                    header = first + await reader.readexactly(wire.HEADER.size - 1)
                    try:
                        n = wire.frame_length(header, max_frame)
                    except ProtocolError as e:
                        writer.write(wire.encode(wire.Error(0, "frame_too_large", str(e))))
                        return
                    body = await reader.readexactly(n)
            except asyncio.TimeoutError:
                return  # idle, or a frame trickling in too slowly to be honest
            try:
                msg = wire.decode_body(body)
            except ProtocolError as e:
                writer.write(wire.encode(wire.Error(_request_id(body), e.code, str(e))))
                continue
            except Exception as e:  # a validation gap is our bug, but still the sender's garbage
                log.debug("undecodable frame: %r", e)
                writer.write(wire.encode(wire.Error(_request_id(body), "bad_request", f"malformed frame ({type(e).__name__})")))
                continue
            reply = await handle(msg)
            if reply is None:
                continue
            writer.write(wire.encode(reply))
            if writer.transport.get_write_buffer_size() > 1 << 20:
                await asyncio.wait_for(writer.drain(), idle_timeout)
    except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.TimeoutError):
        return
    finally:
        writer.close()


def _request_id(body: bytes) -> int:
    """Best effort: the id of a request whose body failed validation, so the error pairs up."""
    try:
        import msgpack

        obj = msgpack.unpackb(body, raw=False, max_array_len=1000, max_map_len=1000)
        rid = obj.get("id") if isinstance(obj, dict) else None
        return rid if type(rid) is int else 0
    except Exception:
        return 0
