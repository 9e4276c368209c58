"""What TLS 1.3 + the identity handshake cost per hop: round trips of one hidden-state row.

    python tools/bench_tls.py [--rounds 2000] [--size 2304] [--handshakes 50]

The echo server runs in a child process (as a real peer would), the client in this one; both on
127.0.0.1. 2304 bytes = 576 float32 values, one decode step's hidden state for the default model.
Each round trip is one length-prefixed frame out and the same frame back. Prints the mean and
median per round trip for plain TCP and for `swarm.secure`, their ratio, and the cost of a
connection setup (TCP + TLS + handshake).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swarm.identity import Identity  # noqa: E402
from swarm.secure import open_secure_connection, start_secure_server  # noqa: E402

HEADER = struct.Struct(">I")


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
            writer.write(HEADER.pack(n) + await reader.readexactly(n))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(mode: str) -> None:
    """Child process: serve echo on an ephemeral port, print `port peer_id`, run until stdin ends."""
    ident = Identity.generate()
    if mode == "tls":
        server = await start_secure_server(lambda r, w, _peer: _echo(r, w), "127.0.0.1", 0, ident)
    else:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(port, ident.peer_id, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # the parent closes stdin to stop us
    server.close()


async def _round_trips(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       payload: bytes, rounds: int) -> list[float]:
    frame = HEADER.pack(len(payload)) + payload
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        writer.write(frame)
        await writer.drain()
        (n,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        await reader.readexactly(n)
        times.append(time.perf_counter() - t0)
    return times


async def bench(mode: str, rounds: int, size: int, handshakes: int) -> tuple[list[float], list[float]]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--serve", mode,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        port_s, server_id = line.decode().split()
        port = int(port_s)
        me = Identity.generate()

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            if mode == "tls":
                r, w, _ = await open_secure_connection("127.0.0.1", port, me, server_id)
                return r, w
            return await asyncio.open_connection("127.0.0.1", port)

        setups = []
        for _ in range(handshakes):
            t0 = time.perf_counter()
            r, w = await connect()
            setups.append(time.perf_counter() - t0)
            w.close()
            await w.wait_closed()
        reader, writer = await connect()
        payload = os.urandom(size)
        await _round_trips(reader, writer, payload, min(200, rounds))  # warm-up
        times = await _round_trips(reader, writer, payload, rounds)
        writer.close()
        return times, setups
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 10)
        except asyncio.TimeoutError:
            child.kill()
            await child.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--size", type=int, default=2304, help="payload bytes per message")
    ap.add_argument("--handshakes", type=int, default=50, help="connection setups to time")
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode, interleaved (noise)")
    ap.add_argument("--serve", choices=["plain", "tls"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    means: dict[str, list[float]] = {"plain": [], "tls": []}
    for run in range(args.repeat):
        for mode in ("plain", "tls"):
            times, setups = asyncio.run(bench(mode, args.rounds, args.size, args.handshakes))
            means[mode].append(statistics.mean(times))
            print(f"run {run} {mode:5s}: {args.rounds} round trips of {args.size} B: "
                  f"mean {statistics.mean(times) * 1e6:7.1f} us, "
                  f"median {statistics.median(times) * 1e6:7.1f} us, total {sum(times):.3f} s; "
                  f"connection setup median {statistics.median(setups) * 1e3:.2f} ms")
    plain, tls = statistics.median(means["plain"]), statistics.median(means["tls"])
    print(f"median of run means: plain {plain * 1e6:.1f} us, tls {tls * 1e6:.1f} us, "
          f"ratio tls/plain {tls / plain:.2f}")


if __name__ == "__main__":
    main()
