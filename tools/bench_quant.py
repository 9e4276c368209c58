"""Memory, speed and accuracy of float32, bfloat16, int8 and nf4 peers on the default model.

    python tools/bench_quant.py [--tokens 64] [--threads 1] [--modes float32,bfloat16,int8,nf4]

For each mode, a real `swarm join --no-mdns` process serves all 30 blocks of SmolLM2-135M:

- memory: VmRSS of the peer process after it printed READY (from /proc/PID/status). The blocks'
  share is RSS(peer serving 0:30) - RSS(peer serving 0:1), both of the same mode (same imports:
  torch, transformers, bitsandbytes when quantized), times 30/29: the memory that grows with the
  blocks, measured from processes, next to `weight_bytes` (what the tensors occupy, as counted by
  swarm.quant.weight_bytes and announced in the peer's record). VmHWM is the process's peak:
  quantizing one block at a time keeps it near one float block above the final size.
- speed: greedy decode tokens/s of N new tokens through swarm.client.SwarmClient and that peer.
- accuracy: in this process, the same BlockSpan.load + quantize_block, one prefill of a fixed
  ~300-token English paragraph; teacher-forced next-token agreement with the float32 model
  (argmax equal at each position) and the mean KL(float32 || mode) of the next-token distributions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PARAGRAPH = (
    "The lighthouse at the end of the harbour was built in 1874, after a winter storm drove three fishing boats onto the "
    "rocks below the cliffs. For more than a century a keeper lived in the small stone cottage beside it, climbing the "
    "spiral staircase every evening to light the lamp and wind the clockwork that turned the great glass lens. The keeper "
    "kept a logbook in which he wrote down the weather, the ships that passed, and anything unusual he saw on the water. "
    "Most entries are short: a north wind, light rain, two steamers heading south. Some are longer. In the autumn of 1911 "
    "the keeper described a whale that followed the mail boat into the bay and stayed for four days, and in 1923 he wrote "
    "about a fog so thick that he rang the bell every thirty seconds for a night and a day without rest. When the light "
    "was finally automated in 1986, the last keeper handed the logbooks to the town library, where they can still be read "
    "today. Visitors who walk out along the harbour wall can climb the same staircase on summer afternoons. From the "
    "gallery at the top they can see the whole coastline, from the sandy beaches in the south to the dark headland in the "
    "north, and on a clear day the outline of the islands far out to sea. The lens is no longer turned by clockwork, but "
    "it still sends its beam across the water every night, and the fishermen who leave the harbour before dawn say that "
    "they are always glad to see it."
)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

# mode name -> (--dtype, --quant)
MODES = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("float32", "int8"), "nf4": ("float32", "nf4")}
MiB = 2**20


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def accuracy(manifest, mode: str, ids: list[int], ref_logits):
    """(agreement, mean KL(ref || mode), weight bytes) of one prefill of `ids` through all blocks."""
    import torch

    from swarm.blocks import BlockSpan, Head
    from swarm.quant import block_hook, weight_bytes

    dtype, quant = MODES[mode]
    span = BlockSpan.load(manifest, 0, manifest.num_blocks, dtype, on_block=block_hook(quant, dtype, manifest.num_blocks))
    head = Head.load(manifest)
    with torch.inference_mode():
        h = span.forward(head.embed_ids(ids), 0, span.new_cache()).float()
        logits = head.lm_head(head.norm(h))[0].float()  # [n, vocab]
    if ref_logits is None:
        return logits, weight_bytes(span.layers)
    agree = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    ref_lp, lp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())
    return agree, kl, weight_bytes(span.layers)


async def decode_speed(addr: str, n_tokens: int) -> tuple[float, list[int]]:
    from swarm.client import ClientConfig, SwarmClient

    async with await SwarmClient.connect(ClientConfig(bootstrap=(addr,), mdns=False, torch_threads=1)) as client:
        ids = client.encode_prompt(PROMPT)
        r = await client.generate(ids, n_tokens)
        return r.decode_tokens_per_s, r.tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each peer")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from swarm.client import load_tokenizer
    from swarm.local import LocalSwarm
    from swarm.prepare import prepare

    torch.set_num_threads(args.threads)
    manifest = prepare("smollm2-135m")
    L = manifest.num_blocks
    modes = args.modes.split(",")
    ids = load_tokenizer(manifest)(PARAGRAPH)["input_ids"]
    print(f"# accuracy text: {len(ids)} tokens; decode: {args.tokens} greedy tokens; peers with --threads {args.threads}", file=sys.stderr)
    ref_logits, _ = accuracy(manifest, "float32", ids, None)

    rows = []
    for mode in modes:
        dtype, quant = MODES[mode]
        flags = ["--dtype", dtype, "--quant", quant, "--no-mdns", "--threads", str(args.threads)]
        with LocalSwarm() as swarm:
            one = swarm.start(["--blocks", "0:1", *flags])
            base = proc_status(one.pid)
            one.stop()
        with LocalSwarm() as swarm:
            t0 = time.monotonic()
            p = swarm.start(["--blocks", f"0:{L}", *flags])
            load_s = time.monotonic() - t0
            full = proc_status(p.pid)
            tps, toks = asyncio.run(decode_speed(p.addr, args.tokens))
        agree, kl, wbytes = accuracy(manifest, mode, ids, ref_logits)
        blocks = (full["VmRSS"] - base["VmRSS"]) * L / (L - 1)
        rows.append(dict(mode=mode, rss=full["VmRSS"], hwm=full["VmHWM"], base=base["VmRSS"], blocks=blocks, wbytes=wbytes,
                         tps=tps, agree=agree, kl=kl, load=load_s, toks=toks))
        print(f"# {mode}: done ({load_s:.1f}s to READY)", file=sys.stderr)

    f32 = next((r for r in rows if r["mode"] == "float32"), rows[0])
    print(f"\n| peer ({L} blocks) | VmRSS MiB | VmHWM MiB | RSS of 0:1 peer MiB | blocks' RSS MiB | vs float32 | weight_bytes MiB | vs float32 | decode tok/s | agreement | mean KL | same {args.tokens} tokens as float32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        same = sum(a == b for a, b in zip(r["toks"], f32["toks"]))
        first_diff = next((i for i, (a, b) in enumerate(zip(r["toks"], f32["toks"])) if a != b), None)
        print(
            f"| {r['mode']} | {r['rss'] / MiB:.0f} | {r['hwm'] / MiB:.0f} | {r['base'] / MiB:.0f} | {r['blocks'] / MiB:.0f} | "
            f"{r['blocks'] / f32['blocks']:.3f}x | {r['wbytes'] / MiB:.1f} | {r['wbytes'] / f32['wbytes']:.3f}x | {r['tps']:.1f} | "
            f"{r['agree'] * 100:.1f}% | {r['kl']:.4f} | {same}/{len(r['toks'])}" + (f" (first differs at {first_diff})" if first_diff is not None else "") + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
