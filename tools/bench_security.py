"""What safety costs: decode tokens/s with TLS against the same swarm over plain TCP, and the cost
of `--verify 0.1` (a second peer re-computing a tenth of the steps).

    python tools/bench_security.py [--tokens 128] [--repeat 3] [--threads 2]

The product has no plaintext mode. For the comparison only, this tool runs peers and client with
the secure channel patched out (`python tools/bench_security.py --plaintext-peer join ...` is how
it starts such a peer); nothing outside this file can turn TLS off.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
_PLAIN_ID = "p" + "a" * 52


def patch_plaintext() -> Callable[[], None]:
    """Replace the TLS channel and its handshake by plain TCP, in this process; returns the undo."""
    import peers.server
    import swarm.transport

    saved = (swarm.transport.open_secure_connection, peers.server.accept_secure, peers.server.server_context, asyncio.start_server)

    async def open_plain(host, port, identity, expected_peer_id, swarm_key=None, timeout=5.0):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return reader, writer, expected_peer_id or _PLAIN_ID

    async def accept_plain(reader, writer, identity, swarm_key=None, timeout=5.0):
        return _PLAIN_ID

    real_start_server = asyncio.start_server

    async def start_server(*args, ssl=None, ssl_handshake_timeout=None, **kw):
        return await real_start_server(*args, **kw)

    swarm.transport.open_secure_connection = open_plain
    peers.server.accept_secure = accept_plain
    peers.server.server_context = lambda identity: None
    asyncio.start_server = start_server

    def undo() -> None:
        (swarm.transport.open_secure_connection, peers.server.accept_secure, peers.server.server_context,
         asyncio.start_server) = saved

    return undo


async def decode_rate(addrs: list[str], ids: list[int], tokens: int, threads: int, repeat: int, verify: float = 0.0) -> list[float]:
    from swarm.client import ClientConfig, SwarmClient

    cfg = ClientConfig(bootstrap=tuple(addrs), mdns=False, torch_threads=threads, verify=verify)
    async with await SwarmClient.connect(cfg) as client:
        await client.directory.settle(5)
        await client.generate(ids, 8, stop_at_eos=False)  # warm-up
        rates = []
        for _ in range(repeat):
            r = await client.generate(ids, tokens, stop_at_eos=False)
            rates.append(r.decode_tokens_per_s)
        return rates


def run_swarm(spans: list[tuple[int, int]], ids: list[int], args, plaintext: bool, verify: float = 0.0) -> list[float]:
    from swarm.local import SWARM_CLI, LocalSwarm

    launcher = [sys.executable, str(Path(__file__).resolve()), "--plaintext-peer"] if plaintext else SWARM_CLI
    with LocalSwarm(launcher=launcher) as swarm:
        first = swarm.start(["--blocks", f"{spans[0][0]}:{spans[0][1]}", "--no-mdns", "--threads", str(args.threads)])
        rest = swarm.start_many([["--blocks", f"{s}:{e}", "--no-mdns", "--threads", str(args.threads), "--peer", first.addr] for s, e in spans[1:]])
        addrs = [p.addr for p in [first, *rest]]
        undo = patch_plaintext() if plaintext else (lambda: None)  # the client side too
        try:
            return asyncio.run(decode_rate(addrs, ids, args.tokens, args.threads, args.repeat, verify))
        finally:
            undo()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--plaintext-peer":
        patch_plaintext()
        from swarm.cli import main as cli_main

        return cli_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-verify", action="store_true")
    args = ap.parse_args()
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    from swarm.local import thirds
    from swarm.client import chat_ids, load_tokenizer
    from swarm.prepare import prepare

    m = prepare("smollm2-135m")
    ids = chat_ids(load_tokenizer(m), PROMPT)
    spans = thirds(m.num_blocks, 3)

    # alternate the two modes so that drift in the machine's load hits both alike
    tls, plain = [], []
    for _ in range(2):
        tls += run_swarm(spans, ids, args, plaintext=False)
        plain += run_swarm(spans, ids, args, plaintext=True)
    t, p = statistics.median(tls), statistics.median(plain)
    print(f"smollm2-135m fp32, 3 peers on loopback, {args.tokens} greedy tokens, {args.threads} threads, median of {len(tls)} runs")
    print("| run | decode tokens/s |")
    print("| --- | --- |")
    print(f"| plain TCP (benchmark only) | {p:.2f} |")
    print(f"| TLS 1.3 + identity handshake | {t:.2f} |")
    print(f"TLS cost: {100 * (1 - t / p):+.1f}% of decode speed")
    if not args.skip_verify:
        two = [s for s in spans for _ in range(2)]  # two replicas of each span: someone to check with
        off, on = [], []
        for _ in range(2):
            off += run_swarm(two, ids, args, plaintext=False, verify=0.0)
            on += run_swarm(two, ids, args, plaintext=False, verify=0.1)
        a, b = statistics.median(off), statistics.median(on)
        print()
        print("| run (6 peers: 2 replicas of each third) | decode tokens/s |")
        print("| --- | --- |")
        print(f"| no verification | {a:.2f} |")
        print(f"| --verify 0.1 | {b:.2f} |")
        print(f"--verify 0.1 cost: {100 * (1 - b / a):+.1f}% of decode speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
