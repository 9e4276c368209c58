"""Figures for joining with nothing: fetch throughput, join-to-serving time, gap-to-filled time.

    python tools/bench_fetch.py [--blocks 10] [--home DIR]

Uses the embedded default model (SmolLM2-135M, 30 blocks of 13.5 MB), prepared once in --home
(default: $SWARM_HOME, else ~/.cache/swarm). Three pinned peers serve 0:10, 10:20, 20:30 from it;
every fetching side gets an empty, temporary SWARM_HOME. Prints:

1. loopback transfer throughput of `--blocks` block files (GetChunk over TLS, 1 MiB chunks, two
   files at a time) against `shutil.copyfile` of the same files (both from the page cache);
2. seconds from starting `swarm join --peer P --max-blocks N` with an empty SWARM_HOME to READY,
   against a pinned `swarm join --blocks 0:N` whose files are already here (process start,
   imports, loading and calibration are in both; the difference is discovery + fetch);
3. after SIGKILL of the only holder of a span: seconds until the gap shows in the table (gossip
   suspicion), and from then until an auto peer has moved there (fetch + load + announce);
4. seconds for `swarm generate` (8 tokens, no --model) with an empty SWARM_HOME, which learns the
   model and fetches only the client's files, against the same command with the model here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--home", default=os.environ.get("SWARM_HOME") or str(Path.home() / ".cache" / "swarm"))
    args = ap.parse_args()
    os.environ["SWARM_HOME"] = args.home
    os.environ.setdefault("SWARM_CONFIG", str(Path(args.home) / "config"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from peers.fetch import FetchConfig, Fetcher, fetch_manifest, install_manifest
    from peers.selection import coverage, holdings
    from swarm.directory import ask_peer
    from swarm.gossip import PeerRecord
    from swarm.identity import Identity
    from swarm.local import LocalSwarm
    from swarm.manifest import DEFAULT_MODEL
    from swarm.prepare import prepare

    m = prepare(DEFAULT_MODEL)
    n = args.blocks
    tmp = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    common = ["--no-mdns", "--threads", "1"]

    async def table(addr: str) -> list[PeerRecord]:
        return [PeerRecord.from_wire(r) for r in await ask_peer(addr)]

    class Src:
        def __init__(self, p) -> None:
            self.peer_id, self.addrs, self.model_hash, self.start, self.end = p.peer_id, (p.addr,), m.model_hash, 0, m.num_blocks

    try:
        with LocalSwarm(log_dir=tmp / "logs") as swarm:
            t0 = time.monotonic()
            p0 = swarm.start(["--model", DEFAULT_MODEL, "--blocks", f"0:{n}", *common])
            local_ready = time.monotonic() - t0
            rest = swarm.start_many([["--model", DEFAULT_MODEL, "--blocks", f"{s}:{min(s + n, m.num_blocks)}", "--peer", p0.addr, *common]
                                     for s in range(n, m.num_blocks, n)])
            pinned = [p0, *rest]

            # 1. throughput
            async def fetch_all() -> tuple[int, float]:
                data, sig = await fetch_manifest([Src(p0)], m.model_hash, Identity.generate())
                dst = install_manifest(data, sig, m.model_hash, home=tmp / "fetch")
                f = Fetcher(dst, Identity.generate(), FetchConfig(progress=False))
                stats = await f.fetch(dst.blocks[:n], lambda e: [Src(p0)])
                await f.close()
                return stats.fetched_bytes, stats.seconds

            nbytes, secs = asyncio.run(fetch_all())
            (tmp / "copy").mkdir()
            t0 = time.perf_counter()
            for e in m.blocks[:n]:
                shutil.copyfile(m.path(e), tmp / "copy" / Path(e.file).name)
            copy_s = time.perf_counter() - t0

            # 4. a client with nothing, against one with the model here (same swarm, same command)
            def generate(env_home: Path) -> tuple[float, list[int]]:
                env = {**os.environ, "SWARM_HOME": str(env_home), "SWARM_CONFIG": str(env_home / "config")}
                t0 = time.monotonic()
                out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "Hello", "--peer", p0.addr, "--no-mdns", "--json",
                                      "--max-new-tokens", "8", "--discovery-timeout", "30"], capture_output=True, text=True, env=env, timeout=300)
                if out.returncode:
                    raise SystemExit(f"swarm generate failed: {out.stderr[-2000:]}")
                return time.monotonic() - t0, json.loads(out.stdout)["tokens"]

            client_here, tokens_here = generate(Path(args.home))
            client_empty, tokens_empty = generate(tmp / "client-empty")
            assert tokens_empty == tokens_here, (tokens_empty, tokens_here)
            client_mb = sum(e.bytes for e in m.client_files) / 1e6
            model_mb = sum(e.bytes for e in m.files) / 1e6

            # 2. join to serving with an empty home
            home = tmp / "empty"
            spare_swarm = LocalSwarm(log_dir=tmp / "logs", env={"SWARM_HOME": str(home), "SWARM_CONFIG": str(home / "config")})
            t0 = time.monotonic()
            spare = spare_swarm.start(["--peer", p0.addr, "--max-blocks", str(n), *common])
            fetch_ready = time.monotonic() - t0
            try:
                deadline = time.monotonic() + 20
                recs = asyncio.run(table(p0.addr))
                while not any(r.peer_id == spare.peer_id for r in recs) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    recs = asyncio.run(table(p0.addr))
                s_spare = next((r.start, r.end) for r in recs if r.peer_id == spare.peer_id)
                by_id = {r.peer_id: (r.start, r.end) for r in recs}
                # 3. kill the only holder of another span
                victim = next(p for p in pinned if by_id.get(p.peer_id) != s_spare and p is not p0)
                hole = by_id[victim.peer_id]
                live = [p for p in pinned if p is not victim]
                victim.kill(signal.SIGKILL)
                t_kill = time.monotonic()
                t_gap = t_fill = None
                while time.monotonic() - t_kill < 90:
                    recs = [r for r in asyncio.run(table(live[0].addr)) if r.peer_id != victim.peer_id or t_gap is None]
                    cov = coverage(holdings(recs, m.model_hash), m.num_blocks)
                    if t_gap is None and not all(cov):
                        t_gap = time.monotonic()
                    elif t_gap is not None and all(cov):
                        t_fill = time.monotonic()
                        break
                    time.sleep(0.1)
            finally:
                spare_swarm.stop()

        mb = nbytes / 1e6
        print(f"model {m.name}: {m.num_blocks} blocks of {m.blocks[0].bytes / 1e6:.1f} MB; fetched {n} blocks = {mb:.0f} MB")
        print(f"loopback fetch (TLS, 1 MiB chunks, 2 files at once): {mb / secs:7.1f} MB/s  ({secs:.2f}s)")
        print(f"shutil.copyfile of the same files:                    {mb / copy_s:7.1f} MB/s  ({copy_s:.2f}s)")
        print(f"join -> READY, empty SWARM_HOME, {n} blocks fetched:    {fetch_ready:6.1f} s")
        print(f"join -> READY, same blocks already here (pinned):      {local_ready:6.1f} s")
        print(f"generate (8 tokens), empty SWARM_HOME, fetching {client_mb:.0f} of the model's {model_mb:.0f} MB: {client_empty:6.1f} s")
        print(f"generate (8 tokens), model prepared here:                          {client_here:6.1f} s  (same tokens)")
        if t_gap and t_fill:
            print(f"SIGKILL of the only holder of {hole[0]}:{hole[1]} -> gap seen in the table: {t_gap - t_kill:.1f} s")
            print(f"gap seen -> filled by a moving auto peer (fetch + load + announce): {t_fill - t_gap:.1f} s")
        else:
            print(f"gap {hole} not filled within 90 s (see {tmp / 'logs'})")
    finally:
        shutil.rmtree(tmp / "fetch", ignore_errors=True)
        shutil.rmtree(tmp / "copy", ignore_errors=True)
        shutil.rmtree(tmp / "empty", ignore_errors=True)
        shutil.rmtree(tmp / "client-empty", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
