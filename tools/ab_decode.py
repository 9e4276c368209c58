"""Two swarms side by side, to see a small change in decode speed through the machine's drift.

    python tools/ab_decode.py --old HEAD~1 [--rounds 12]      # the working tree against a revision
    python tools/ab_decode.py --new-env GOMP_SPINCOUNT=15000   # one setting against the default

Each side is a swarm of its own (3 local peers and a client, in processes started from its own
code: a revision is checked out in a temporary git worktree), started once; then the sides take
turns, one 128-token greedy answer each per round, in alternating order. A shared VM's speed moves
by a quarter within an hour and single answers by several percent, so tools/bench_decode.py's
one-run figure hides changes of a few percent; the ratio of each round's pair sees through the
drift. Prints each round and the median and mean of the paired ratios new / old. Two identical
sides read 1.020 over 10 rounds here: differences under ~2% are noise even this way.

The side runner uses the API both revisions share (swarm.local, SwarmClient.generate); a revision
from before that API will not run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def side(repo: str, prompt: str, tokens: int, threads: int) -> None:
    """One swarm from the code in `repo`: READY, then one answer per line read from stdin."""
    os.chdir(repo)  # the peers run `python -m swarm.cli` from here: this side's code
    sys.path.insert(0, repo)
    from swarm.client import ClientConfig, SwarmClient, chat_ids, load_tokenizer
    from swarm.local import LocalSwarm, thirds
    from swarm.prepare import prepare

    m = prepare("smollm2-135m")
    ids = chat_ids(load_tokenizer(m), prompt)
    with LocalSwarm() as swarm:
        peers = swarm.start_many([["--blocks", f"{s}:{e}", "--no-mdns", "--threads", str(threads)] for s, e in thirds(m.num_blocks, 3)])

        async def serve() -> None:
            cfg = ClientConfig(bootstrap=tuple(p.addr for p in peers), mdns=False, torch_threads=threads)
            async with await SwarmClient.connect(cfg) as client:
                await client.generate(ids, 8, stop_at_eos=False)  # warm-up: connections, RTTs
                print("READY", flush=True)
                while await asyncio.to_thread(sys.stdin.readline):
                    r = await client.generate(ids, tokens, stop_at_eos=False)
                    print(f"RESULT {r.decode_tokens_per_s}", flush=True)

        asyncio.run(serve())


def start_side(name: str, repo: Path, env: dict[str, str], args: argparse.Namespace):
    # not at the top: a side process must import no swarm but its own revision's
    from bench_decode import PROMPT, Worker

    cmd = [sys.executable, __file__, "--side", str(repo), "--prompt", PROMPT, "--tokens", str(args.tokens), "--threads", str(args.threads)]
    return Worker(cmd, env, f"{name} side")


def env_with(pairs: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--old-env/--new-env take NAME=VALUE, got {kv!r}")
        env[k] = v
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", help="a git revision for the old side (default: the working tree, as the new side)")
    ap.add_argument("--old-env", action="append", default=[], metavar="NAME=VALUE", help="set in the old side's processes")
    ap.add_argument("--new-env", action="append", default=[], metavar="NAME=VALUE", help="set in the new side's processes")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        side(args.side, args.prompt, args.tokens, args.threads)
        return 0
    if not args.old and not args.old_env and not args.new_env:
        raise SystemExit("nothing to compare: give --old REV, --old-env or --new-env")
    worktree = None
    sides = []
    try:
        old_repo = ROOT
        if args.old:
            worktree = Path(tempfile.mkdtemp(prefix="swarm-ab-"))
            made = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.old], capture_output=True, text=True)
            if made.returncode != 0:
                worktree.rmdir()
                worktree = None
                raise SystemExit(f"cannot check out {args.old!r}: {made.stderr.strip()}")
            old_repo = worktree
        sides.append(start_side("old", old_repo, env_with(args.old_env), args))
        sides.append(start_side("new", ROOT, env_with(args.new_env), args))
        ratios = []
        for i in range(args.rounds):
            got = {}
            for name, w in (zip(("old", "new"), sides) if i % 2 == 0 else zip(("new", "old"), sides[::-1])):
                got[name] = w.ask()[0]
            ratios.append(got["new"] / got["old"])
            print(f"round {i + 1}: old {got['old']:.2f}, new {got['new']:.2f} tokens/s, new/old {ratios[-1]:.3f}", flush=True)
        print(f"new / old over {args.rounds} paired rounds: median {statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f} "
              f"(old: {args.old or 'working tree'} {' '.join(args.old_env)}; new: working tree {' '.join(args.new_env)})")
    finally:
        for w in sides:
            w.close()
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
