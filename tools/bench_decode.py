"""Decode speed: transformers `generate()` on the whole model in one process against the swarm with
3 local peers (real processes on 127.0.0.1), same model, prompt, threads and 128 greedy tokens.

    python tools/bench_decode.py [--tokens 128] [--threads 2] [--peers 3] [--repeat 2]

Prints tokens/s of both and their ratio, time to first token, and each peer's resident memory
against the bytes of its blocks (a peer holding a third of the blocks must not hold the model).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_transformers(ids: list[int], tokens: int, threads: int, repeat: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from swarm.prepare import embedded_gguf

    torch.set_num_threads(threads)
    g = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    model.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False)  # warm-up
    best_tps, best_ttft = 0.0, float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        dt = time.perf_counter() - t0
        n = out.shape[1] - len(ids)
        # decode rate: all tokens after the first, over the time after the first
        best_tps = max(best_tps, (n - 1) / (dt - ttft))
        best_ttft = min(best_ttft, ttft)
    return best_tps, best_ttft


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


async def bench_swarm(addrs: list[str], ids: list[int], tokens: int, threads: int, repeat: int):
    from swarm.client import ClientConfig, SwarmClient

    cfg = ClientConfig(bootstrap=tuple(addrs), mdns=False, torch_threads=threads)
    async with await SwarmClient.connect(cfg) as client:
        await client.generate(ids, 8, stop_at_eos=False)  # warm-up: connections, RTTs
        best = None
        for _ in range(repeat):
            r = await client.generate(ids, tokens, stop_at_eos=False)
            if best is None or r.decode_tokens_per_s > best.decode_tokens_per_s:
                best = r
        return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same in every process")
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side; the best is reported")
    ap.add_argument("--transformers-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import AutoTokenizer

    from swarm.local import LocalSwarm, thirds
    from swarm.prepare import prepare

    m = prepare("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(m.root)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])

    if args.transformers_only:  # the baseline, in a process of its own (see below)
        tps, ttft = bench_transformers(ids, args.tokens, args.threads, args.repeat)
        print(f"RESULT {tps} {ttft}")
        return 0

    spans = thirds(m.num_blocks, args.peers)
    with LocalSwarm() as swarm:
        peers = swarm.start_many([["--blocks", f"{s}:{e}", "--no-mdns", "--threads", str(args.threads)] for s, e in spans])
        r = asyncio.run(bench_swarm([p.addr for p in peers], ids, args.tokens, args.threads, args.repeat))
        mem = [(p, rss_mib(p.pid)) for p in peers]
        # the runtime's own share (python, torch, transformers): a peer of one block, less that block
        one = swarm.start(["--blocks", "0:1", "--no-mdns", "--threads", "1"])
        asyncio.run(bench_swarm_warm(one.addr))
        baseline = rss_mib(one.pid) - m.blocks[0].bytes / 2**20
    # transformers runs in a fresh process: once a process has run torch from two threads (our
    # client's torch thread, then this one), OpenMP stops spinning and every op slows down
    # (swarm/compute.py), which would handicap the baseline
    out = subprocess.run(
        [sys.executable, __file__, "--transformers-only", "--tokens", str(args.tokens), "--threads", str(args.threads), "--repeat", str(args.repeat)],
        capture_output=True, text=True, check=True,
    ).stdout
    hf_tps, hf_ttft = (float(x) for x in out.split("RESULT", 1)[1].split())

    total_bytes = sum(b.bytes for b in m.blocks) + m.client.bytes
    print(f"model smollm2-135m fp32, prompt {len(ids)} tokens, {args.tokens} greedy tokens, {args.threads} torch threads per process")
    print("| run | decode tokens/s | time to first token |")
    print("| --- | --- | --- |")
    print(f"| transformers generate(), one process | {hf_tps:.1f} | {hf_ttft * 1000:.0f} ms |")
    print(f"| swarm, {args.peers} peers on loopback (TLS) | {r.decode_tokens_per_s:.1f} | {r.ttft_s * 1000:.0f} ms |")
    print(f"ratio swarm / transformers: {r.decode_tokens_per_s / hf_tps:.3f}")
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
