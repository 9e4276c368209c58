"""What the HTTP API costs: time to first token and decode tokens/s of a streamed chat completion
through `swarm api`, against the swarm client called in-process, on the same 3-peer swarm, the
same prompt, greedy, 128 new tokens.

    python tools/bench_api.py [--tokens 128] [--runs 3] [--threads 1]

Starts three peers and `swarm api` as processes on 127.0.0.1 and stops them (by PID) at the end.
The API side is timed by an HTTP client reading the server-sent events: first token = the first
chunk with text; tokens/s = (completion_tokens - 1) / (last chunk - first chunk). The in-process
side uses the client's own timings (the same definitions). Runs alternate; medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "Write a long story about a dragon who learns to program computers."
SPANS = [(0, 10), (10, 20), (20, 30)]


async def via_api(base: str, n: int) -> tuple[float, float, int]:
    """(ttft_s, decode tokens/s, tokens) of one streamed chat completion."""
    import aiohttp

    body = {
        "model": "smollm2-135m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": n,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    t_first = t_last = None
    tokens = 0
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    t_last = time.perf_counter()
                    t_first = t_first or t_last
    assert t_first is not None and t_last is not None, "no text came back"
    return t_first - t0, (tokens - 1) / (t_last - t_first) if tokens > 1 and t_last > t_first else 0.0, tokens


async def via_client(client, n: int) -> tuple[float, float, int]:
    from swarm.sampling import SamplingConfig

    r = await client.generate(PROMPT, n, SamplingConfig(temperature=0.0))
    return r.ttft_s, r.decode_tokens_per_s, len(r.tokens)


def wait_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    deadline, buf = time.monotonic() + timeout, b""
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
    raise SystemExit(f"no {prefix!r} from `swarm api` in {timeout:.0f}s")


async def bench(addrs: list[str], base: str, n: int, runs: int, threads: int) -> None:
    from swarm.client import ClientConfig, SwarmClient

    cfg = ClientConfig(bootstrap=tuple(addrs), mdns=False, discovery_timeout=30, torch_threads=threads)
    async with await SwarmClient.connect(cfg) as client:
        await via_client(client, 8)  # warm both paths: connections, RTTs, first-call costs
        await via_api(base, 8)
        api, inproc = [], []
        for i in range(runs):
            inproc.append(await via_client(client, n))
            api.append(await via_api(base, n))
            print(f"run {i + 1}: in-process ttft {inproc[-1][0] * 1000:.0f} ms, {inproc[-1][1]:.2f} tok/s ({inproc[-1][2]} tokens);"
                  f" api ttft {api[-1][0] * 1000:.0f} ms, {api[-1][1]:.2f} tok/s ({api[-1][2]} tokens)", flush=True)
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    a_ttft, a_tps, c_ttft, c_tps = med(api, 0), med(api, 1), med(inproc, 0), med(inproc, 1)
    print()
    print(f"{'':<22}{'first token':>14}{'decode tok/s':>15}")
    print(f"{'swarm client (in-proc)':<22}{c_ttft * 1000:>11.0f} ms{c_tps:>15.2f}")
    print(f"{'swarm api (HTTP SSE)':<22}{a_ttft * 1000:>11.0f} ms{a_tps:>15.2f}")
    print(f"{'api / client':<22}{a_ttft / c_ttft:>14.2f}{a_tps / c_tps:>15.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each peer, the API server and the client")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from swarm.local import LocalSwarm
    from swarm.prepare import prepare

    prepare("smollm2-135m")
    logs = Path(tempfile.mkdtemp(prefix="bench-api-"))
    with LocalSwarm(log_dir=logs) as swarm:
        peers = swarm.start_many([["--blocks", f"{s}:{e}", "--no-mdns", "--threads", str(args.threads)] for s, e in SPANS])
        addrs = [p.addr for p in peers]
        with open(logs / "api.log", "wb") as err:
            api = subprocess.Popen(
                [sys.executable, "-m", "swarm.cli", "api", "--port", "0", "--no-mdns", "--threads", str(args.threads), *sum((["--peer", a] for a in addrs), [])],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            base = wait_line(api, "READY ", 120).split()[1]
            print(f"3 peers {', '.join(f'[{s}:{e})' for s, e in SPANS)}, {args.threads} torch thread(s) each; api at {base}; "
                  f"{args.tokens} greedy tokens, {args.runs} runs each", flush=True)
            asyncio.run(bench(addrs, base, args.tokens, args.runs, args.threads))
        finally:
            if api.poll() is None:
                api.send_signal(signal.SIGINT)
                try:
                    api.wait(15)
                except subprocess.TimeoutExpired:
                    api.kill()
                    api.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
