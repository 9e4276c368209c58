"""The floor a chain of processes sets on this machine: the swarm's blocks and head with no swarm.

    python tools/bare_chain.py [--rounds 7] [--tokens 128] [--threads 2] [--peers 3]

Three processes each run a third of SmolLM2's blocks with the same code the peers use
(`swarm.blocks.BlockSpan`), joined by plain blocking loopback sockets: no TLS, no asyncio, no
message codec, no sessions, no checks, one thread each. This process is the client, with the
same head (`swarm.blocks.Head`): it sends a step to the first stage, which hands it to the next,
and the last answers here, the way the swarm pushes a step. Whatever this chain loses against
transformers `generate()` in one process is what taking turns between processes costs on this
machine, before any of the swarm's own work; the swarm's decode speed against it is what the
swarm's protocol, security and bookkeeping cost.

The sides take turns, one 128-token greedy answer each per round: transformers, the bare chain,
the swarm (3 peers, steps pushed). Prints the medians of each side and the ratios, and checks that
the bare chain answers with the swarm's tokens. The bare chain's client runs on this process's
torch thread (swarm.compute), as the swarm's client does: a second thread running torch in one
process would make OpenMP stop spinning for both.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HEADER = struct.Struct("<ii")  # position, rows; then rows x hidden float32


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("the other end closed")
        got += k
    return buf


def recv_step(sock: socket.socket, hidden: int):
    import torch

    position, rows = HEADER.unpack(recv_exact(sock, HEADER.size))
    body = recv_exact(sock, rows * hidden * 4)
    return position, torch.frombuffer(body, dtype=torch.float32).view(1, rows, hidden)


def send_step(sock: socket.socket, position: int, x) -> None:
    sock.sendall(HEADER.pack(position, x.shape[1]) + x.contiguous().numpy().tobytes())


def connect(addr: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def stage(start: int, end: int, threads: int) -> None:
    """One stage: READY <port>, read the next stage's address from stdin, then serve forever."""
    import torch

    from swarm.blocks import BlockSpan
    from swarm.prepare import prepare

    torch.set_num_threads(threads)
    span = BlockSpan.load(prepare("smollm2-135m"), start, end)
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"READY {listener.getsockname()[1]}", flush=True)
    nxt = connect(sys.stdin.readline().strip())
    prev, _ = listener.accept()
    prev.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cache = None
    while True:
        try:
            position, x = recv_step(prev, span.hidden_size)
        except EOFError:
            return
        if position == 0:
            cache = span.new_cache(4096)
        send_step(nxt, position, span.forward(x, position, cache))


class BareChain:
    """The stages as processes, and this process as their client."""

    def __init__(self, spans: list[tuple[int, int]], threads: int) -> None:
        from swarm import compute
        from swarm.blocks import Head
        from swarm.prepare import prepare

        compute.set_threads(threads)
        self.head = compute.run_sync(Head.load, prepare("smollm2-135m"))
        self.hidden = int(self.head.config.hidden_size)
        self.procs = [
            subprocess.Popen([sys.executable, __file__, "--stage", f"{s}:{e}", "--threads", str(threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for s, e in spans
        ]
        ports = []
        for p in self.procs:
            line = p.stdout.readline() if p.stdout else ""
            if not line.startswith("READY "):
                raise SystemExit(f"a stage exited ({p.wait()}) before it was ready")
            ports.append(int(line.split()[1]))
        back = socket.create_server(("127.0.0.1", 0))
        addrs = [f"127.0.0.1:{port}" for port in ports[1:]] + [f"127.0.0.1:{back.getsockname()[1]}"]
        for p, addr in zip(self.procs, addrs):
            assert p.stdin is not None
            p.stdin.write(addr + "\n")
            p.stdin.flush()
        self.out = connect(f"127.0.0.1:{ports[0]}")
        self.back, _ = back.accept()
        back.close()

    def generate(self, ids: list[int], tokens: int) -> tuple[list[int], float, float]:
        """Greedy tokens, decode tokens/s (after the first), time to first token. Call it on the
        torch thread (`compute.run`)."""
        t0 = time.perf_counter()
        x = self.head.embed_ids(ids)
        position = 0
        out: list[int] = []
        t_first = t0
        for _ in range(tokens):
            send_step(self.out, position, x)
            position += x.shape[1]
            _, h = recv_step(self.back, self.hidden)
            tok = int(self.head.logits(h).argmax())
            out.append(tok)
            if len(out) == 1:
                t_first = time.perf_counter()
            x = self.head.embed_ids([tok])
        return out, (tokens - 1) / (time.perf_counter() - t_first), t_first - t0

    def close(self) -> None:
        self.out.close()
        self.back.close()
        for p in self.procs:
            p.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same in every process")
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7, help="turns of each side; medians are reported")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--transformers-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        s, e = (int(v) for v in args.stage.split(":"))
        stage(s, e, args.threads)
        return 0

    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    from bench_decode import ORIGINAL_ENV, PROMPT, SPIN_ROUNDS, Runs, median, start_baseline, take_turns

    from swarm import compute
    from swarm.client import chat_ids, load_tokenizer
    from swarm.local import LocalSwarm, thirds
    from swarm.prepare import prepare

    m = prepare("smollm2-135m")
    ids = chat_ids(load_tokenizer(m), PROMPT)
    spans = thirds(m.num_blocks, args.peers)
    env = dict(os.environ)
    if env.get("GOMP_SPINCOUNT") == SPIN_ROUNDS and "GOMP_SPINCOUNT" not in ORIGINAL_ENV:
        env.pop("GOMP_SPINCOUNT")  # transformers as it runs without swarm, as bench_decode does
    runs: Runs = {"transformers": [], "bare chain": [], "swarm": []}
    answers: dict[str, list[int]] = {}
    with LocalSwarm() as swarm:
        peers = swarm.start_many([["--blocks", f"{s}:{e}", "--no-mdns", "--threads", str(args.threads)] for s, e in spans])
        baseline = start_baseline(args, env)
        bare = BareChain(spans, args.threads)
        compute.run_sync(bare.generate, ids, 8)  # warm-up, as the swarm's client gets

        async def turn(client) -> None:
            runs["transformers"].append(tuple(await asyncio.to_thread(baseline.ask)))
            answers["bare chain"], tps, ttft = await compute.run(bare.generate, ids, args.tokens)
            runs["bare chain"].append((tps, ttft))
            r = await client.generate(ids, args.tokens, stop_at_eos=False)
            answers["swarm"] = r.tokens
            runs["swarm"].append((r.decode_tokens_per_s, r.ttft_s))

        try:
            take_turns([p.addr for p in peers], ids, args, runs, turn)
        finally:
            baseline.close()
            bare.close()
    if answers["bare chain"] != answers["swarm"]:
        raise SystemExit("the bare chain and the swarm answered with different tokens")
    hf, chain, sw = (median(runs, k) for k in ("transformers", "bare chain", "swarm"))
    print()
    print(f"model smollm2-135m fp32, {args.tokens} greedy tokens, {args.threads} torch threads per process, "
          f"{args.peers} stages, medians of {args.rounds} rounds (the same tokens from both chains)")
    print("| run | decode tokens/s | of transformers |")
    print("| --- | --- | --- |")
    print(f"| transformers generate(), one process | {hf:.1f} | 1 |")
    print(f"| bare chain: the same blocks and head, plain blocking sockets | {chain:.1f} | {chain / hf:.3f} |")
    print(f"| swarm, steps handed peer to peer | {sw:.1f} | {sw / hf:.3f} |")
    print(f"swarm / bare chain: {sw / chain:.3f} (per round: "
          + ", ".join(f"{s[0] / c[0]:.2f}" for s, c in zip(runs["swarm"], runs["bare chain"])) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
