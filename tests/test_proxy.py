"""The latency/drop proxy on real loopback sockets: delay both ways, bytes intact, cut kills."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROXY_PY = ROOT / "tools" / "proxy.py"
WAIT = 10.0  # every wait in these tests is bounded by this many seconds

T = TypeVar("T")


def _load_proxy() -> ModuleType:
    # tools/ is a folder of scripts, not a package: load the file itself.
    spec = importlib.util.spec_from_file_location("swarm_tools_proxy", PROXY_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building classes
    spec.loader.exec_module(module)
    return module


proxy_mod = _load_proxy()


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro(), timeout=4 * WAIT)

    return asyncio.run(bounded())


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """An echo server on 127.0.0.1:<free port>; yields the port."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    t0 = time.perf_counter()
    writer.write(b"x")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(1), WAIT) == b"x"
    return time.perf_counter() - t0


async def echo_bulk(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> bytes:
    """Send payload in uneven pieces while reading the echo back concurrently (no deadlock)."""

    async def send() -> None:
        for i in range(0, len(payload), 7919):
            writer.write(payload[i : i + 7919])
            await writer.drain()

    sender = asyncio.create_task(send())
    got = await asyncio.wait_for(reader.readexactly(len(payload)), WAIT)
    await asyncio.wait_for(sender, WAIT)
    return got


async def closed(reader: asyncio.StreamReader) -> bool:
    """True when the connection ends (EOF or reset) within the bounded wait."""
    try:
        return await asyncio.wait_for(reader.read(1), WAIT) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


@pytest.mark.timeout(60)
def test_delay_applies_both_ways_and_bytes_arrive_in_order() -> None:
    async def body() -> None:
        async with echo_server() as port:
            async with proxy_mod.LatencyProxy("127.0.0.1", port) as proxy:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", proxy.port), WAIT
                )
                fast = min([await round_trip(reader, writer) for _ in range(3)])
                proxy.set_delay(30)
                slow = min([await round_trip(reader, writer) for _ in range(3)])
                assert slow >= 0.060, slow  # 30 ms out + 30 ms back
                assert fast < slow
                payload = os.urandom(1 << 20)
                assert await echo_bulk(reader, writer, payload) == payload
                proxy.set_delay(0)  # lowering the delay mid-stream keeps order
                payload = bytes(range(256)) * 1024
                assert await echo_bulk(reader, writer, payload) == payload
                writer.close()

    run(body)


@pytest.mark.timeout(60)
def test_cut_closes_connections_and_refuses_new_ones_until_heal() -> None:
    async def body() -> None:
        async with echo_server() as port:
            async with proxy_mod.LatencyProxy("127.0.0.1", port, delay_ms=5) as proxy:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                await round_trip(reader, writer)
                assert proxy.connections == 1
                proxy.cut()
                assert await closed(reader)
                writer.close()
                # New connections are reset on accept while cut.
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                assert await closed(reader)
                writer.close()
                proxy.heal()
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                await round_trip(reader, writer)
                writer.close()

    run(body)


@pytest.mark.timeout(60)
def test_target_down_closes_the_client() -> None:
    async def body() -> None:
        async with echo_server() as port:
            pass  # the port is free again: nothing listens there
        async with proxy_mod.LatencyProxy("127.0.0.1", port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            assert await closed(reader)
            writer.close()

    run(body)


@pytest.mark.timeout(60)
def test_process_mode_ready_line_and_stdin_commands() -> None:
    async def body() -> None:
        async with echo_server() as port:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(PROXY_PY),
                "--listen",
                "0",
                "--target",
                f"127.0.0.1:{port}",
                "--delay-ms",
                "0",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdin is not None and proc.stdout is not None
            stdin, stdout = proc.stdin, proc.stdout

            async def command(line: str) -> str:
                stdin.write(line.encode() + b"\n")
                await stdin.drain()
                return (await asyncio.wait_for(stdout.readline(), WAIT)).decode().strip()

            try:
                ready = (await asyncio.wait_for(stdout.readline(), WAIT)).decode().split()
                assert ready[0] == "READY"
                proxy_port = int(ready[1])
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
                await round_trip(reader, writer)
                assert await command("delay 30") == "OK delay 30"
                assert await round_trip(reader, writer) >= 0.060
                assert (await command("bogus")).startswith("ERR")
                assert await command("cut") == "OK cut"
                assert await closed(reader)
                writer.close()
                assert await command("heal") == "OK heal"
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
                assert await round_trip(reader, writer) >= 0.060
                writer.close()
                assert await command("quit") == "OK quit"
                assert await asyncio.wait_for(proc.wait(), WAIT) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await asyncio.wait_for(proc.wait(), WAIT)

    run(body)
