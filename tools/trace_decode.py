"""Where a decode token's time goes: timestamps in every process of a 3-peer loopback swarm.

    python tools/trace_decode.py [--answers 3] [--tokens 128] [--threads 2]

The peers and the client run unchanged code with probes wrapped around a few functions (this
tool patches them in its own processes only): decoding a frame, a peer's step on its torch
thread, a peer's handling of a pushed step to the moment it has sent it on, the client's pushed
step and its head. Every process writes (probe, position, time) lines to its own file;
`time.perf_counter` is the machine's monotonic clock, the same in every process, so the steps of
one token line up across processes by their position. Prints, for the last answer, each segment's
median and mean over its decode steps: per peer the transit from the previous process's send,
decoding, the hand-off to the torch thread, the compute, and back to the loop, building and
sending on; for the client the same around its head. Read the medians: a process that has just
sent is often preempted by the one it woke, so its "send on" mark can come after the next
process's frame is in hand (a long "send on", a negative transit) in single steps.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_decode import PROMPT  # noqa: E402  (the same answer as the decode benchmark)

_out = None


def mark(probe: str, position: int, t: float) -> None:
    global _out
    if _out is None:
        _out = open(Path(os.environ["SWARM_TRACE_DIR"]) / f"{os.getpid()}.txt", "a", buffering=1)
    _out.write(f"{probe} {position} {t:.7f}\n")


def _around(owner: object, name: str, probe: str, position) -> None:
    """Wrap owner.name (sync or async) so it marks probe+"0" at entry and probe+"1" at return;
    `position(args, result)` says which token's step it was (None: not one to mark)."""
    fn = getattr(owner, name)

    def marked(args: tuple, out: object, t0: float) -> object:
        t1 = time.perf_counter()
        pos = position(args, out)
        if pos is not None:
            mark(probe + "0", pos, t0)
            mark(probe + "1", pos, t1)
        return out

    if asyncio.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapped(*args, **kw):
            t0 = time.perf_counter()
            return marked(args, await fn(*args, **kw), t0)
    else:
        @functools.wraps(fn)
        def wrapped(*args, **kw):
            t0 = time.perf_counter()
            return marked(args, fn(*args, **kw), t0)
    setattr(owner, name, wrapped)


def install_probes() -> None:
    from swarm import wire
    from swarm.chain import Chain
    from swarm.client import SwarmClient
    from peers.server import PeerServer

    def frame_pos(args, out):
        if isinstance(out, wire.Forward):
            return out.position
        return -1 if isinstance(out, wire.ForwardResult) else None

    _around(wire, "decode_body", "dec", frame_pos)
    _around(PeerServer, "_step", "compute", lambda args, out: args[2])
    _around(PeerServer, "_forward", "handled", lambda args, out: args[2].position)
    _around(Chain, "_push_step", "chain", lambda args, out: args[0].position if out[0] is not None else None)
    _around(SwarmClient, "_head_step", "head", lambda args, out: -1)


def peer_main(argv: list[str]) -> None:
    """A peer: `swarm join ARGV` with the probes in place."""
    install_probes()
    from swarm import cli

    sys.exit(cli.main(argv))


def load(path: Path) -> list[tuple[str, int, float]]:
    rows = []
    for line in path.read_text().splitlines():
        probe, pos, t = line.split()
        rows.append((probe, int(pos), float(t)))
    return rows


def segments(client: list, peers: list[list]) -> dict[str, list[float]]:
    """Each decode step of the client's last answer, cut into its parts (ms)."""
    by_pos = [defaultdict(dict) for _ in peers]
    for k, rows in enumerate(peers):
        for probe, pos, t in rows:
            by_pos[k][pos][probe] = t
    steps: list[dict] = []  # the client's view, in order: chain0 (sent), dec0/dec1 (the answer), chain1, head0/1
    for probe, pos, t in client:
        if probe == "chain0":
            steps.append({"pos": pos, "sent": t})
        elif steps and probe in ("dec0", "dec1") and pos == -1:
            steps[-1][probe] = t
        elif steps and probe in ("chain1", "head0", "head1"):
            steps[-1][probe] = t
    out: dict[str, list[float]] = defaultdict(list)
    for st, nxt in zip(steps[1:-1], steps[2:]):
        if not {"dec0", "dec1", "chain1", "head0", "head1"} <= st.keys():
            continue
        parts = []
        prev = st["sent"]
        for k, d in enumerate(by_pos):
            e = d.get(st["pos"], {})
            if not {"dec0", "dec1", "compute0", "compute1", "handled1"} <= e.keys():
                break
            parts += [(f"peer {k + 1}: transit from the previous send", e["dec0"] - prev), (f"peer {k + 1}: decode", e["dec1"] - e["dec0"]),
                      (f"peer {k + 1}: to the torch thread", e["compute0"] - e["dec1"]), (f"peer {k + 1}: compute", e["compute1"] - e["compute0"]),
                      (f"peer {k + 1}: back to the loop, build, send on", e["handled1"] - e["compute1"])]
            prev = e["handled1"]
        else:
            parts += [("client: transit", st["dec0"] - prev), ("client: decode", st["dec1"] - st["dec0"]),
                      ("client: to the torch thread", st["head0"] - st["dec1"]), ("client: head, sampling, embedding", st["head1"] - st["head0"]),
                      ("client: back, build, send the next step", nxt["sent"] - st["head1"])]
            for name, dt in parts:
                out[name].append(dt * 1000)
            out["a token"].append((nxt["sent"] - st["sent"]) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", type=int, default=3, help="answers generated; the last one is analysed")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer is not None:
        peer_main(args.peer)
        return 0
    trace_dir = Path(tempfile.mkdtemp(prefix="swarm-trace-"))
    os.environ["SWARM_TRACE_DIR"] = str(trace_dir)
    install_probes()
    from swarm.client import ClientConfig, SwarmClient, chat_ids, load_tokenizer
    from swarm.local import LocalSwarm, thirds
    from swarm.prepare import prepare

    m = prepare("smollm2-135m")
    ids = chat_ids(load_tokenizer(m), PROMPT)
    launcher = [sys.executable, str(Path(__file__).resolve()), "--peer"]
    with LocalSwarm(launcher=launcher) as swarm:
        peers = swarm.start_many([["--blocks", f"{s}:{e}", "--no-mdns", "--threads", str(args.threads)] for s, e in thirds(m.num_blocks, 3)])

        async def answers() -> float:
            cfg = ClientConfig(bootstrap=tuple(p.addr for p in peers), mdns=False, torch_threads=args.threads)
            async with await SwarmClient.connect(cfg) as client:
                start = 0.0
                for i in range(args.answers):
                    start = time.perf_counter()
                    r = await client.generate(ids, args.tokens, stop_at_eos=False)
                    print(f"answer {i + 1}: {r.decode_tokens_per_s:.1f} tokens/s, {r.pushed_steps} steps pushed", flush=True)
                return start

        last_start = asyncio.run(answers())
        pids = [p.pid for p in peers]
    def last_answer(pid: int) -> list[tuple[str, int, float]]:
        # sorted by time: a probe writes both its marks when its function returns
        return sorted((r for r in load(trace_dir / f"{pid}.txt") if r[2] >= last_start), key=lambda r: r[2])

    client = last_answer(os.getpid())
    peer_rows = [last_answer(pid) for pid in pids]
    segs = segments(client, peer_rows)
    if not segs:
        raise SystemExit("no pushed decode step was traced (are the peers pushing?)")
    print(f"\n{len(segs['a token'])} decode steps of the last answer, ms (the transit of peer 1 counts from the client's start of the step):")
    print("| segment | median | mean |")
    print("| --- | --- | --- |")
    for name, v in segs.items():
        print(f"| {name} | {statistics.median(v):.3f} | {statistics.mean(v):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
