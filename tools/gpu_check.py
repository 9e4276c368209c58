"""Checks for a machine with a CUDA GPU: peers with `--device cuda` in float32, bfloat16, int8 and
nf4 (bitsandbytes on CUDA), against transformers on the whole model on the CPU.

    python tools/gpu_check.py [--device cuda]

1. In-process: a span of every block on the device, one prefill and a few decode steps, for each
   format; the relative distance of its hidden states from the CPU float32 reference, and greedy ids.
2. Real processes: a float32 `--device cuda` peer and an nf4 one on a chain, a CPU client; greedy
   ids against transformers' generate() on the whole model.
3. Decode steps per second of one GPU peer holding every block (in-process, one row at a time).
It runs on the CPU too (`--device cpu`), which is how it is checked where no GPU is.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="swarm-gpu-"))
    os.environ["SWARM_HOME"] = str(home)
    os.environ["SWARM_CONFIG"] = str(home / "config")
    import torch

    from conftest import reference_generate
    from swarm.tiny import make_tiny_model
    from swarm.blocks import BlockSpan, Head
    from swarm.prepare import prepare
    from swarm.quant import block_hook
    from swarm.verify import distance

    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""), flush=True)
    src = make_tiny_model(home / "tiny")
    m = prepare(str(src))
    head = Head.load(m)
    ids = [1, 15, 200, 33, 7, 91, 4, 60]
    ref_span = BlockSpan.load(m, 0, m.num_blocks)
    x = head.embed_ids(ids)
    want = ref_span.forward(x, 0, ref_span.new_cache())
    want_ids = reference_generate(src, ids, 16)
    ok = True
    print("| format | distance from CPU float32 | greedy 16 ids equal transformers |")
    print("| --- | --- | --- |")
    for dtype, quant in (("float32", "none"), ("bfloat16", "none"), ("float32", "int8"), ("float32", "nf4"), ("bfloat16", "nf4")):
        span = BlockSpan.load(m, 0, m.num_blocks, dtype, on_block=block_hook(quant, dtype, m.num_blocks), device=args.device)
        got = span.forward(x, 0, span.new_cache()).to("cpu", torch.float32)
        d = distance(got, want)
        cache, toks, cur, pos = span.new_cache(), [], list(ids), 0
        for _ in range(16):
            h = span.forward(head.embed_ids(cur), pos, cache).to("cpu", torch.float32)
            pos += len(cur)
            cur = [int(head.logits(h).argmax())]
            toks.append(cur[0])
        same = toks[: len(want_ids)] == want_ids
        print(f"| {dtype}/{quant} | {d:.2e} | {same} |", flush=True)
        if quant == "none" and dtype == "float32":
            ok &= d < 1e-4 and same

    from swarm.client import ClientConfig, SwarmClient
    from swarm.local import LocalSwarm

    with LocalSwarm(log_dir=home / "logs") as swarm:
        base = ["--model", str(src), "--no-mdns", "--device", args.device]
        a = swarm.start([*base, "--blocks", "0:3"])
        b = swarm.start([*base, "--blocks", "3:6", "--quant", "nf4", "--peer", a.addr])
        c = swarm.start([*base, "--blocks", "3:6", "--peer", a.addr])

        async def go(exclude: str):
            cfg = ClientConfig(model=str(src), bootstrap=(a.addr,), mdns=False, discovery_timeout=20)
            async with await SwarmClient.connect(cfg) as client:
                await client.directory.settle(5)
                client.rtt.ban(exclude, time.monotonic(), 3600)
                return await client.generate(ids, 16)

        r32 = asyncio.run(go(b.peer_id))
        r4 = asyncio.run(go(c.peer_id))
        print(f"processes, {args.device} float32 chain: ids equal transformers: {r32.tokens == want_ids}; route {[h['peer'][:8] for h in r32.routes[-1]]}")
        print(f"processes, {args.device} float32 + nf4 chain: first 4 ids equal: {r4.tokens[:4] == want_ids[:4]}; route {[h['peer'][:8] for h in r4.routes[-1]]}")
        ok &= r32.tokens == want_ids
        for p in swarm.peers:
            tail = p.log_tail(200)
            if "Traceback" in tail:
                print(tail)
                ok = False

    span = BlockSpan.load(m, 0, m.num_blocks, device=args.device)
    cache = span.new_cache()
    row = torch.zeros(1, 1, span.hidden_size)
    span.forward(row, 0, cache)
    t0 = time.perf_counter()
    for pos in range(1, 201):
        span.forward(row, pos, cache).to("cpu")
    print(f"one peer, all {m.num_blocks} blocks of the tiny model on {args.device}: {200 / (time.perf_counter() - t0):.0f} steps/s")
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
