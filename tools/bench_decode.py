"""Decode speed: transformers `generate()` on the whole model in one process against the swarm with
3 local peers (real processes on 127.0.0.1), same model, prompt, threads and 128 greedy tokens.

    python tools/bench_decode.py [--tokens 128] [--threads 2] [--peers 3] [--rounds 5]
    python tools/bench_decode.py --delay-ms 5     # the peers "far apart": push against hop by hop

The swarm runs twice per round: with its decode steps handed peer to peer (the default), and
with every hop going through the client (`ClientConfig.push = False`), to show what the hand-off
saves. The sides take turns, one generation each per round, so a change in the machine's speed (a
shared VM drifts by 10% within minutes) falls on both alike. Prints the median tokens/s of each
side, their ratio, time to first token, and each peer's resident memory against the bytes of its
blocks (a peer holding a third of the blocks must not hold the model).

With `--delay-ms D` each peer sits behind tools/proxy.py, which delays every byte D ms each way
(the peer announces the proxy's address, so the client and the other peers both reach it
through it), and only the swarm's two ways of sending a step are compared: a step handed peer
to peer crosses the network hops + 1 times, one sent hop by hop through the client 2 x hops.

transformers runs in processes of its own, with the environment it would have without swarm, and
a second time with the OpenMP spin setting swarm gives its own processes (swarm/compute.py), to
show the setting is no handicap of the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ORIGINAL_ENV = dict(os.environ)
PROXY = Path(__file__).resolve().parent / "proxy.py"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm.compute import SPIN_ROUNDS  # noqa: E402  (importing swarm sets GOMP_SPINCOUNT)

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def transformers_worker(ids: list[int], tokens: int, threads: int) -> None:
    """Load the whole model once, then time one generation per line read from stdin."""
    import torch
    from transformers import AutoModelForCausalLM

    from swarm.prepare import embedded_gguf

    torch.set_num_threads(threads)
    g = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    model.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
    print("READY", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        dt = time.perf_counter() - t0
        n = out.shape[1] - len(ids)
        # decode rate: all tokens after the first, over the time after the first
        print(f"RESULT {(n - 1) / (dt - ttft)} {ttft}", flush=True)


class Worker:
    """A process that prints READY once set up, then one RESULT line for each line it reads: the
    transformers baseline here, each side of tools/ab_decode.py."""

    def __init__(self, cmd: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._expect("READY")

    def _expect(self, word: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(word):
                return line
        raise SystemExit(f"the {self.name} exited ({self.proc.wait()}) before printing {word}")

    def ask(self) -> list[float]:
        """One more result: the numbers of its RESULT line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return [float(x) for x in self._expect("RESULT").split()[1:]]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def start_baseline(args: argparse.Namespace, env: dict[str, str]) -> Worker:
    """transformers in a process of its own (`transformers_worker`): RESULT tokens/s, TTFT."""
    cmd = [sys.executable, __file__, "--transformers-worker", "--tokens", str(args.tokens), "--threads", str(args.threads)]
    return Worker(cmd, env, "transformers worker")


async def bench_swarm_warm(addr: str) -> None:
    """Touch a one-block peer's weights (one step) so its resident memory is comparable."""
    from swarm import wire
    from swarm.identity import Identity
    from swarm.transport import Connection

    import torch

    host, port = addr.rsplit(":", 1)
    conn = await Connection.open(host, int(port), Identity.generate())
    opened = await conn.request(lambda rid: wire.OpenSession(rid, start=0, end=1, max_length=4))
    await conn.request(lambda rid: wire.Forward(rid, session=opened.session, position=0, hidden=torch.zeros(1, 1, 576)))
    await conn.close()


async def open_client(addrs: list[str], ids: list[int], threads: int):
    from swarm.client import ClientConfig, SwarmClient

    cfg = ClientConfig(bootstrap=tuple(addrs), mdns=False, torch_threads=threads)
    client = await SwarmClient.connect(cfg)
    await client.generate(ids, 8, stop_at_eos=False)  # warm-up: connections, RTTs
    return client


Runs = dict[str, list[tuple[float, float]]]  # side -> (decode tokens/s, time to first token) per round


def take_turns(addrs: list[str], ids: list[int], args: argparse.Namespace, runs: Runs, turn) -> None:
    """Open a warmed-up client on the swarm at `addrs`, then once per round await `turn(client)`,
    which appends one result to each side of `runs`, and print the round."""

    async def rounds() -> None:
        client = await open_client(addrs, ids, args.threads)
        try:
            for i in range(args.rounds):
                await turn(client)
                print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}" for k, v in runs.items()) + " tokens/s", flush=True)
        finally:
            await client.close()

    asyncio.run(rounds())


def median(runs: Runs, side: str, i: int = 0) -> float:
    """The median of a side's tokens/s (i=0) or time to first token (i=1)."""
    return statistics.median(r[i] for r in runs[side])


async def both_ways(client, ids: list[int], tokens: int):
    """One answer with steps pushed (each one, or it is no figure of pushing), one hop by hop."""
    out = []
    for push in (True, False):
        client.config.push = push
        r = await client.generate(ids, tokens, stop_at_eos=False)
        if push and r.pushed_steps < tokens - 1:
            raise SystemExit(f"only {r.pushed_steps} of {tokens - 1} decode steps went peer to peer")
        out.append(r)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def far_apart(args: argparse.Namespace, ids: list[int], spans: list[tuple[int, int]]) -> None:
    """Peers behind latency proxies: decode tokens/s with steps pushed and hop by hop."""
    from swarm.local import LocalSwarm

    proxies: list[subprocess.Popen] = []
    runs: Runs = {"push": [], "hop by hop": []}
    try:
        with LocalSwarm() as swarm:
            arg_lists = []
            for s, e in spans:
                port = free_port()
                px = subprocess.Popen([sys.executable, str(PROXY), "--listen", "0", "--target", f"127.0.0.1:{port}", "--delay-ms", str(args.delay_ms)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
                proxies.append(px)
                line = px.stdout.readline() if px.stdout else ""
                if not line.startswith("READY "):
                    raise SystemExit(f"tools/proxy.py did not start: {line!r}")
                arg_lists.append(["--blocks", f"{s}:{e}", "--no-mdns", "--threads", str(args.threads), "--port", str(port),
                                  "--announce", f"127.0.0.1:{line.split()[1]}"])
            peers = swarm.start_many(arg_lists)

            async def turn(client) -> None:
                for name, r in zip(runs, await both_ways(client, ids, args.tokens)):
                    runs[name].append((r.decode_tokens_per_s, r.ttft_s))

            take_turns([p.addr for p in peers], ids, args, runs, turn)
    finally:
        for px in proxies:
            px.terminate()
            px.wait(10)
    push, star = (median(runs, k) for k in ("push", "hop by hop"))
    n = len(spans)
    print()
    print(f"{n} peers, each behind a proxy adding {args.delay_ms:g} ms each way; {args.tokens} greedy tokens, medians of {args.rounds} rounds")
    print("| steps | network crossings per token | decode tokens/s | ms per token |")
    print("| --- | --- | --- | --- |")
    print(f"| handed peer to peer (default) | {n + 1} | {push:.1f} | {1000 / push:.1f} |")
    print(f"| hop by hop through the client | {2 * n} | {star:.1f} | {1000 / star:.1f} |")
    print(f"the hand-off saves {1000 / star - 1000 / push:.1f} ms per token ({(n - 1) * args.delay_ms:g} ms of delay by the count)")
    print(f"time to first token (sessions opened, prompt pushed): {median(runs, 'push', 1) * 1000:.0f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same in every process")
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="turns of each side; medians are reported")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="put each peer behind a proxy with this one-way delay and "
                    "compare pushed steps with hop by hop (no transformers run)")
    ap.add_argument("--transformers-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    from swarm.local import LocalSwarm, thirds
    from swarm.client import chat_ids, load_tokenizer
    from swarm.prepare import prepare

    m = prepare("smollm2-135m")
    ids = chat_ids(load_tokenizer(m), PROMPT)

    if args.transformers_worker:
        transformers_worker(ids, args.tokens, args.threads)
        return 0

    # transformers runs in processes of its own: one process running torch from two threads (our
    # client's torch thread, then the caller's) makes OpenMP stop spinning (swarm/compute.py).
    # `import swarm` set GOMP_SPINCOUNT for us unless the user had; the plain baseline gets the
    # environment it would have had without swarm.
    plain_env = dict(os.environ)
    if os.environ.get("GOMP_SPINCOUNT") == SPIN_ROUNDS and "GOMP_SPINCOUNT" not in ORIGINAL_ENV:
        plain_env.pop("GOMP_SPINCOUNT")
    spans = thirds(m.num_blocks, args.peers)
    if args.delay_ms > 0:
        far_apart(args, ids, spans)
        return 0
    sides = ["transformers", "transformers+spin", "swarm", "swarm hop by hop"]
    runs: Runs = {k: [] for k in sides}
    with LocalSwarm() as swarm:
        peers = swarm.start_many([["--blocks", f"{s}:{e}", "--no-mdns", "--threads", str(args.threads)] for s, e in spans])
        baselines = {"transformers": start_baseline(args, plain_env), "transformers+spin": start_baseline(args, dict(os.environ))}

        async def turn(client) -> None:
            for name, r in zip(("swarm", "swarm hop by hop"), await both_ways(client, ids, args.tokens)):
                runs[name].append((r.decode_tokens_per_s, r.ttft_s))
            for name, b in baselines.items():
                runs[name].append(tuple(await asyncio.to_thread(b.ask)))

        try:
            take_turns([p.addr for p in peers], ids, args, runs, turn)
        finally:
            for b in baselines.values():
                b.close()
        mem = [(p, rss_mib(p.pid)) for p in peers]
        # the runtime's own share (python, torch, transformers): a peer of one block, less that block
        one = swarm.start(["--blocks", "0:1", "--no-mdns", "--threads", "1"])
        asyncio.run(bench_swarm_warm(one.addr))
        baseline = rss_mib(one.pid) - m.blocks[0].bytes / 2**20

    hf_tps = median(runs, "transformers", 0)
    total_bytes = sum(b.bytes for b in m.blocks) + m.client.bytes
    print()
    print(f"model smollm2-135m fp32, prompt {len(ids)} tokens, {args.tokens} greedy tokens, {args.threads} torch threads "
          f"per process, medians of {args.rounds} alternating rounds")
    print("| run | decode tokens/s | time to first token |")
    print("| --- | --- | --- |")
    print(f"| transformers generate(), one process | {hf_tps:.1f} | {median(runs, 'transformers', 1) * 1000:.0f} ms |")
    print(f"| same, GOMP_SPINCOUNT={SPIN_ROUNDS} as in swarm's processes | {median(runs, 'transformers+spin', 0):.1f} | "
          f"{median(runs, 'transformers+spin', 1) * 1000:.0f} ms |")
    print(f"| swarm, {args.peers} peers on loopback (TLS), steps handed peer to peer | {median(runs, 'swarm', 0):.1f} | {median(runs, 'swarm', 1) * 1000:.0f} ms |")
    print(f"| same, each hop through the client (push off) | {median(runs, 'swarm hop by hop', 0):.1f} | {median(runs, 'swarm hop by hop', 1) * 1000:.0f} ms |")
    ratios = [s[0] / h[0] for s, h in zip(runs["swarm"], runs["transformers"])]
    print(f"ratio swarm / transformers: {median(runs, 'swarm', 0) / hf_tps:.3f} (per round: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"against the spin-set baseline {median(runs, 'swarm', 0) / median(runs, 'transformers+spin', 0):.3f})")
    print()
    print(f"| peer | blocks | block files | resident memory | resident above the runtime ({baseline:.0f} MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for (p, rss), (s, e) in zip(mem, spans):
        blocks = sum(b.bytes for b in m.blocks[s:e])
        print(f"| {p.peer_id[:10]} | {s}:{e} | {blocks / 2**20:.0f} MiB | {rss:.0f} MiB | {rss - baseline:.0f} MiB |")
    print(f"whole model (blocks + embeddings/head): {total_bytes / 2**20:.0f} MiB; "
          "runtime = a one-block peer's resident memory less that block")
    return 0


if __name__ == "__main__":
    sys.exit(main())
