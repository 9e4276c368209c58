"""A TCP latency and drop proxy on loopback, to give peers on one machine real distances.

Integration tests put one in front of a peer to make it "far" (a one-way delay on every chunk,
both directions) or to make it vanish (`cut`: every connection is reset and new ones are reset
on accept, as if the machine dropped off the network; `heal` lets connections through again).

Each direction is two tasks joined by a queue: the reader stamps every chunk with
`arrival + delay` and goes on reading; the writer delivers chunks in order, each at its time.
So the delay adds latency without serialising throughput (a 1 MB burst costs one delay, not one
per chunk), and order is preserved even when the delay is lowered mid-stream.

As a library:

    proxy = LatencyProxy("127.0.0.1", 7001, delay_ms=30)
    await proxy.start(); ... proxy.port ...; proxy.set_delay(0); proxy.cut(); await proxy.stop()

As a process (tests wait for the READY line; each command is answered with `OK ...`):

    python tools/proxy.py --listen 0 --target 127.0.0.1:7001 --delay-ms 30
    READY 40123
    stdin: `delay <ms>` | `cut` | `heal` | `quit`   (end of stdin also quits: the parent is gone)

With stdin a file or /dev/null there are no commands; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import stat
import struct
import sys
from dataclasses import dataclass, field

CHUNK = 64 * 1024
# At most this many chunks wait in one direction before the reader stops reading (back-pressure
# to the sender, bounded memory): 1024 x 64 KiB = 64 MiB in flight, far beyond any test's needs.
MAX_QUEUED_CHUNKS = 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0): the far end sees the connection die, not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)  # identity semantics: links live in a set
class _Link:
    """One proxied connection: the client's side, the target's side, and the four pump tasks."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)
        for task in self.tasks:
            task.cancel()


class LatencyProxy:
    """Forwards 127.0.0.1:<port> to a target, with a one-way delay per chunk and a kill switch."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay_ms: float = 0.0,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.connect_timeout = connect_timeout
        self._delay_s = 0.0
        self.set_delay(delay_ms)
        self._cut = False
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    # --- control ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and listen; `port` is valid afterwards."""
        self._server = await asyncio.start_server(
            self._on_client, self.listen_host, self.listen_port
        )

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("LatencyProxy.port read before start()")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def delay_ms(self) -> float:
        return self._delay_s * 1000.0

    def set_delay(self, ms: float) -> None:
        """One-way delay for chunks read from now on (each direction gets it once)."""
        if not ms >= 0:
            raise ValueError(f"delay must be >= 0 ms, got {ms!r}")
        self._delay_s = ms / 1000.0

    def cut(self) -> None:
        """Reset every connection and reset new ones on accept, until `heal()`."""
        self._cut = True
        for link in list(self._links):
            link.reset()
        self._links.clear()

    def heal(self) -> None:
        """Let new connections through again (cut ones stay dead, as after a real outage)."""
        self._cut = False

    @property
    def connections(self) -> int:
        return len(self._links)

    async def stop(self) -> None:
        """Stop listening, reset every connection and wait (bounded) for the tasks to end."""
        if self._server is not None:
            self._server.close()
        pending = set(self._handlers)
        for link in self._links:
            pending |= link.tasks
        self.cut()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5.0)
            self._server = None

    async def __aenter__(self) -> LatencyProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- forwarding ------------------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self._cut:
            _reset(c_writer)
            return
        try:
            u_reader, u_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                timeout=self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError):
            _reset(c_writer)  # the target is down: so is the proxied address
            return
        if self._cut:  # cut while we were connecting
            _reset(c_writer)
            _reset(u_writer)
            return
        link = _Link(c_writer, u_writer)
        self._links.add(link)
        for src, dst in ((c_reader, u_writer), (u_reader, c_writer)):
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(MAX_QUEUED_CHUNKS)
            link.tasks.add(asyncio.create_task(self._read(src, queue, link)))
            link.tasks.add(asyncio.create_task(self._deliver(queue, dst, link)))
        try:
            await asyncio.wait(link.tasks)  # each task ends on EOF, error, or cut
        finally:
            self._links.discard(link)
            for w in (c_writer, u_writer):
                if not w.transport.is_closing():
                    w.close()

    async def _read(
        self, src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]], link: _Link
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await src.read(CHUNK)
                await queue.put((loop.time() + self._delay_s, data))
                if not data:  # EOF travels with the same delay as the data before it
                    return
        except OSError:
            link.reset()  # reset by one side: reset the other too, at once

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter, link: _Link
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()  # half-close: the other direction may still talk
                    return
                dst.write(data)
                await dst.drain()
        except OSError:
            link.reset()  # one side broke: break the other too, as a dead peer would


# --- process mode --------------------------------------------------------------------------------


def _parse_target(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def _command(proxy: LatencyProxy, line: str) -> tuple[str, bool]:
    """Apply one stdin command; returns the reply line and whether to quit."""
    words = line.split()
    if not words:
        return "", False
    match words:
        case ["delay", ms]:
            try:
                proxy.set_delay(float(ms))
            except ValueError:
                return f"ERR bad delay {ms!r}", False
            return f"OK delay {proxy.delay_ms:g}", False
        case ["cut"]:
            proxy.cut()
            return "OK cut", False
        case ["heal"]:
            proxy.heal()
            return "OK heal", False
        case ["quit"]:
            return "OK quit", True
    return f"ERR unknown command {line.strip()!r} (delay <ms> | cut | heal | quit)", False


async def _stdin_reader() -> asyncio.StreamReader | None:
    """stdin as a StreamReader, or None when it cannot be watched (a file, /dev/null)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return None
    # Only pipes, sockets and terminals can be polled; epoll refuses files and /dev/null.
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or sys.stdin.isatty()):
        return None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (OSError, ValueError):
        return None
    return reader


async def _main(args: argparse.Namespace) -> None:
    host, port = args.target
    proxy = LatencyProxy(
        host, port, delay_ms=args.delay_ms, listen_host=args.host, listen_port=args.listen
    )
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {proxy.port}", flush=True)

    async def commands(reader: asyncio.StreamReader) -> None:
        while line := (await reader.readline()).decode("utf-8", "replace"):
            reply, done = _command(proxy, line)
            if reply:
                print(reply, flush=True)
            if done:
                break
        stop.set()  # quit, or end of stdin: whoever started us is gone

    reader = await _stdin_reader()
    task = asyncio.create_task(commands(reader)) if reader is not None else None
    try:
        await stop.wait()
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await proxy.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="TCP latency/drop proxy for loopback tests.")
    parser.add_argument("--listen", type=int, default=0, help="port to listen on (0: any free)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--target", type=_parse_target, required=True, help="HOST:PORT to forward to"
    )
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
