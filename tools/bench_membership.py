"""Membership with real processes: how long until a new peer is in every table, and until a killed
one (SIGKILL) or one that leaves (SIGINT) is gone from every table.

    python tools/bench_membership.py [--peers 4] [--repeat 3] [--mdns]

Peers are `swarm join` processes on 127.0.0.1 serving a tiny random model (the figures are about
membership, not compute); tables are read with GetInfo, polled every 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


async def _table(addr: str) -> set[str]:
    from swarm.directory import ask_peer

    return {r["peer_id"] for r in await ask_peer(addr)}


def agree(peers, expected: set[str]) -> bool:
    async def all_():
        return await asyncio.gather(*(_table(p.addr) for p in peers), return_exceptions=True)

    tables = asyncio.run(all_())
    return all(t == expected for t in tables)


def until(pred, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    return float("inf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mdns", action="store_true", help="find each other over mDNS (127.0.0.1) instead of --peer")
    args = ap.parse_args()
    import os

    home = Path(tempfile.mkdtemp(prefix="swarm-bench-members-"))
    os.environ["SWARM_HOME"] = str(home)
    os.environ["SWARM_CONFIG"] = str(home / "config")
    from swarm.local import LocalSwarm
    from swarm.prepare import prepare
    from swarm.tiny import make_tiny_model  # a tiny random Llama: membership, not compute

    model = make_tiny_model(home / "tiny")
    prepare(str(model))
    base = ["--model", str(model), "--threads", "1", "--blocks", "0:6"]
    base += ["--mdns-interface", "127.0.0.1"] if args.mdns else ["--no-mdns"]
    appear_ready, appear_start, killed, left = [], [], [], []
    for _ in range(args.repeat):
        with LocalSwarm() as swarm:
            first = swarm.start(base)
            link = [] if args.mdns else ["--peer", first.addr]
            peers = [first, *swarm.start_many([[*base, *link] for _ in range(args.peers - 1)])]
            until(lambda: agree(peers, {p.peer_id for p in peers}))
            t0 = time.monotonic()
            new = swarm.start([*base, *link])
            t_ready = time.monotonic()
            peers.append(new)
            took = until(lambda: agree(peers, {p.peer_id for p in peers}))
            appear_ready.append(took)
            appear_start.append(took + (t_ready - t0))
            victim = peers[1]
            victim.kill(signal.SIGKILL)
            rest = [p for p in peers if p is not victim]
            killed.append(until(lambda: agree(rest, {p.peer_id for p in rest})))
            leaver = rest[-1]
            leaver.proc.send_signal(signal.SIGINT)
            rest = rest[:-1]
            left.append(until(lambda: agree(rest, {p.peer_id for p in rest})))
    how = "mDNS on 127.0.0.1" if args.mdns else "--peer bootstrap"
    print(f"{args.peers} peers + 1 joining, {how}, {args.repeat} runs (median, max)")
    print("| event | median | max | target |")
    print("| --- | --- | --- | --- |")
    for name, xs, target in (
        ("new peer in every table, from READY", appear_ready, "< 3 s"),
        ("new peer in every table, from process start (incl. loading)", appear_start, ""),
        ("SIGKILLed peer gone from every table", killed, "< 10 s"),
        ("peer that left (SIGINT) gone from every table", left, "at once"),
    ):
        print(f"| {name} | {statistics.median(xs):.2f} s | {max(xs):.2f} s | {target} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
