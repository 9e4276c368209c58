"""Joining with nothing: fetching block weights from peers, resuming, refusing corrupted copies,
auto spans that cover the model, a peer moving into a gap left by a dead one, and a client that
fetches only what it needs to generate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from peers.fetch import FetchConfig, Fetcher, fetch_manifest, install_manifest
from peers.selection import coverage, holdings
from peers.transfer import Chunk, GetChunk
from swarm.directory import ask_peer
from swarm.client import ClientConfig, SwarmClient
from swarm.errors import RemoteError
from swarm.gossip import PeerRecord
from swarm.identity import Identity
from swarm.manifest import Manifest, sha256_file
from swarm.prepare import prepare
from swarm.transport import Connection

from .conftest import reference_generate, run, start_chain, wait_until

BASE = ["--no-mdns", "--threads", "1"]


@dataclass(frozen=True)
class Holder:
    """What the fetcher needs of a gossip record."""

    peer_id: str
    addrs: tuple[str, ...]
    model_hash: str
    start: int = 0
    end: int = 1 << 20


def holder(p, m: Manifest) -> Holder:
    return Holder(p.peer_id, (p.addr,), m.model_hash)


async def _info(addr: str) -> list[PeerRecord]:
    return [PeerRecord.from_wire(r) for r in await ask_peer(addr)]


def table(addr: str) -> list[PeerRecord]:
    return run(_info(addr))


async def _generate(model: str, addrs: list[str], ids: list[int], n: int):
    cfg = ClientConfig(model=model, bootstrap=tuple(addrs), mdns=False, discovery_timeout=20)
    async with await SwarmClient.connect(cfg) as client:
        return await client.generate(ids, n)


def _all_valid(m: Manifest, blocks: range) -> bool:
    return all(sha256_file(m.path(m.blocks[b])) == m.blocks[b].sha256 for b in blocks)


def test_fetch_resumes_from_another_holder_and_bans_a_corrupting_one(tiny_model, local_swarm, tmp_path: Path, monkeypatch) -> None:
    import peers.fetch

    m = prepare(str(tiny_model))
    whole = [*BASE, "--model", str(tiny_model), "--blocks", f"0:{m.num_blocks}"]
    a, b = start_chain(local_swarm(), tiny_model, [(0, m.num_blocks)] * 2)
    liar = local_swarm(env={"SWARM_TEST_CORRUPT_CHUNKS": "1"}).start(whole)
    ha, hb, hl = holder(a, m), holder(b, m), holder(liar, m)
    cfg = FetchConfig(chunk_size=8192, shuffle=False, progress=False, parallel_files=1)

    class Cut(Exception):
        pass

    real_open, dials = peers.fetch.open_to, []

    async def counted_open(rec, *args):
        dials.append(rec.peer_id)
        return await real_open(rec, *args)

    async def scenario():
        # the manifest, from the liar even: it is checked by hash and signature, not by trust
        data, sig = await fetch_manifest([hl], m.model_hash, Identity.generate())
        dst = install_manifest(data, sig, m.model_hash, home=tmp_path / "h1")
        assert dst.model_hash == m.model_hash and dst.root != m.root

        # 1. a transfer from a, cut after three chunks: a .part file of exactly what arrived
        def cut(peer: str, entry, offset: int, n: int) -> None:
            if offset + n >= 3 * 8192:
                raise Cut()

        f = Fetcher(dst, Identity.generate(), cfg, on_chunk=cut)
        with pytest.raises(Cut):
            await f.fetch(dst.blocks, lambda e: [ha, hb])
        await f.close()
        part = dst.root / (dst.blocks[0].file + ".part")
        assert part.stat().st_size == 3 * 8192 and not dst.path(dst.blocks[0]).exists()

        # 2. a is gone (SIGKILL): the next fetch continues the .part from b, byte 24576 on
        a.kill(signal.SIGKILL)
        a.proc.wait(10)
        f = Fetcher(dst, Identity.generate(), cfg)
        stats = await f.fetch(dst.blocks, lambda e: [ha, hb])
        await f.close()
        total = sum(e.bytes for e in dst.blocks)
        assert stats.resumed_bytes == 3 * 8192
        assert stats.fetched_bytes == total - 3 * 8192
        assert set(stats.by_peer) == {b.peer_id}
        assert _all_valid(dst, range(dst.num_blocks)) and not part.exists()

        # 3. the liar first: its first file fails the hash, it is banned, never asked again
        dst2 = install_manifest(data, sig, m.model_hash, home=tmp_path / "h2")
        f = Fetcher(dst2, Identity.generate(), cfg)
        stats = await f.fetch(dst2.blocks, lambda e: [hl, hb])
        await f.close()
        assert stats.banned == {liar.peer_id}
        assert stats.by_peer[liar.peer_id] == dst2.blocks[0].bytes  # one whole file, then nothing
        assert stats.asked_after_ban == 0
        assert _all_valid(dst2, range(dst2.num_blocks))

        # files fetched at once from one holder share one connection (none left open behind)
        monkeypatch.setattr(peers.fetch, "open_to", counted_open)
        dst3 = install_manifest(data, sig, m.model_hash, home=tmp_path / "h3")
        f = Fetcher(dst3, Identity.generate(), replace(cfg, parallel_files=3))
        await f.fetch(dst3.blocks, lambda e: [hb])
        await f.close()
        assert dials == [b.peer_id] and _all_valid(dst3, range(dst3.num_blocks))

        # 4. the serving side refuses names outside the manifest and ranges outside the file
        host, port = b.addr.rsplit(":", 1)
        conn = await Connection.open(host, int(port), Identity.generate(), b.peer_id)
        try:
            for req, code in [
                (lambda rid: GetChunk(rid, "../../config/keys/preparer.pem", 0, 10), "not_found"),
                (lambda rid: GetChunk(rid, "manifest.json", 0, 10), "not_found"),
                (lambda rid: GetChunk(rid, m.blocks[0].file, m.blocks[0].bytes, 10), "bad_offset"),
                (lambda rid: GetChunk(rid, m.blocks[0].file, -1, 10), "bad_offset"),
                (lambda rid: GetChunk(rid, m.blocks[0].file, 0, 64 << 20), "bad_length"),
            ]:
                with pytest.raises(RemoteError) as e:
                    await conn.request(req)
                assert e.value.code == code
            last = await conn.request(lambda rid: GetChunk(rid, m.blocks[0].file, m.blocks[0].bytes - 5, 1000))
            assert isinstance(last, Chunk) and len(last.data) == 5  # clipped at the end of the file
        finally:
            await conn.close()

    run(scenario())


def test_a_peer_with_an_empty_home_joins_fetches_its_blocks_and_serves(tiny_model, local_swarm, tmp_path: Path) -> None:
    m = prepare(str(tiny_model))
    a, b = start_chain(local_swarm(), tiny_model, [(0, 3), (3, 6)])
    home = tmp_path / "empty-home"
    t0 = time.monotonic()
    c = local_swarm(env={"SWARM_HOME": str(home), "SWARM_CONFIG": str(home / "config")}).start(
        [*BASE, "--peer", a.addr, "--max-blocks", "3"]  # no --model, no --blocks
    )
    print(f"empty-home peer serving after {time.monotonic() - t0:.1f}s")
    own = next(r for r in table(c.addr) if r.peer_id == c.peer_id)
    assert own.model_hash == m.model_hash
    assert (own.start, own.end) in [(0, 3), (3, 6)]  # exactly one existing span, never a straddle
    # the records say who may move to fill a gap: a and b were told their blocks, c chose
    pinned = {r.peer_id: r.pinned for p in (a, b, c) for r in table(p.addr)}
    assert pinned == {a.peer_id: True, b.peer_id: True, c.peer_id: False}
    got = Manifest.load(home / "models" / m.name)
    files = sorted(p.name for p in (got.root / "blocks").iterdir())
    assert files == [f"{i:05d}.safetensors" for i in range(own.start, own.end)]  # its blocks, only
    assert _all_valid(got, range(own.start, own.end))
    assert not (got.root / "client.safetensors").exists()
    assert (got.root / "manifest.sig").exists()

    # the peer it duplicated leaves: every route now goes through the newcomer
    twin, other = (a, b) if own.start == 0 else (b, a)
    twin.stop()
    ids = [1, 15, 200, 33, 7]
    res = run(_generate(str(tiny_model), [c.addr, other.addr], ids, 16))
    assert res.tokens == reference_generate(tiny_model, ids, 16)
    assert c.peer_id in {hop["peer"] for hop in res.routes[-1]}


def test_a_client_with_an_empty_home_fetches_the_head_and_tokenizer_and_answers(tiny_model, tiny_models, local_swarm, tmp_path: Path) -> None:
    """`swarm generate` on a machine that has none of the model: it learns the model the swarm
    serves, fetches only the client's files (checked against the signed manifest), and answers as
    transformers does; later runs use those files."""
    from transformers import AutoTokenizer

    m = prepare(str(tiny_model))
    peers = start_chain(local_swarm(), tiny_model, [(0, 3), (3, 6)])
    home = tmp_path / "client-home"
    env = {**os.environ, "SWARM_HOME": str(home), "SWARM_CONFIG": str(home / "config")}
    prompt = "w5 w17 w42 w99"

    def generate(model: str | None, wait: str = "20") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "swarm.cli", "generate", prompt, *(["--model", model] if model else []), *sum((["--peer", p.addr] for p in peers), []),
             "--no-mdns", "--no-chat", "--json", "--max-new-tokens", "8", "--discovery-timeout", wait],
            capture_output=True, text=True, timeout=300, env=env,
        )

    out = generate(None)  # no --model: the one the swarm serves
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    ids = AutoTokenizer.from_pretrained(tiny_model)(prompt)["input_ids"]
    assert ids == [5, 17, 42, 99]
    assert result["tokens"] == reference_generate(tiny_model, ids, 8)
    assert result["text"] == " ".join(f"w{t}" for t in result["tokens"] if t > 2)  # decoded by the fetched tokenizer
    got = Manifest.load(home / "models" / m.name)
    assert got.model_hash == m.model_hash
    for entry in m.client_files:  # the preparer's bytes, and nothing of the blocks
        assert got.path(entry).read_bytes() == m.path(entry).read_bytes()
    assert not (got.root / "blocks").exists() or not any((got.root / "blocks").iterdir())
    # by name, the second time: the files here are checked and used, nothing is fetched again
    stamps = {e.file: got.path(e).stat().st_mtime_ns for e in m.client_files}
    out = generate(m.name)
    assert out.returncode == 0 and json.loads(out.stdout)["tokens"] == result["tokens"], out.stderr
    assert "fetched" not in out.stderr
    assert {e.file: got.path(e).stat().st_mtime_ns for e in m.client_files} == stamps

    # a name nobody serves is a clear error, not a traceback
    out = generate("no-such-model")
    assert out.returncode == 2 and "no peer serves model 'no-such-model'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    # another model, prepared here, that nobody serves: the error says what the swarm does serve
    out = generate(str(tiny_models["llama-mha"]), wait="5")
    assert out.returncode == 2 and "none serves this model" in out.stderr and f"they serve: {m.name} (hash {m.model_hash[:12]}, 2 peers)" in out.stderr, out.stderr
    out = generate(str(tmp_path / "no-such-folder"))
    assert out.returncode == 2 and f"no model folder at {tmp_path / 'no-such-folder'}" in out.stderr, out.stderr


def test_auto_peers_cover_the_model_and_one_moves_into_a_gap(tiny_model, local_swarm, tmp_path: Path) -> None:
    m = prepare(str(tiny_model))
    auto = [*BASE, "--max-blocks", "2", "--rebalance-interval", "1"]
    swarm = local_swarm()
    p1 = swarm.start([*auto, "--model", str(tiny_model)])
    p2 = swarm.start([*auto, "--model", str(tiny_model), "--peer", p1.addr])
    p3 = swarm.start([*auto, "--model", str(tiny_model), "--peer", p1.addr])

    def spans(addr: str) -> dict[str, tuple[int, int]]:
        return {r.peer_id: (r.start, r.end) for r in table(addr) if r.model_hash == m.model_hash}

    wait_until(lambda: len(spans(p1.addr)) == 3, 20, "three peers in the table")
    assert sorted(spans(p1.addr).values()) == [(0, 2), (2, 4), (4, 6)]

    # a fourth with an empty home duplicates one span; then the only holder of another dies
    home = tmp_path / "spare"
    p4 = local_swarm(env={"SWARM_HOME": str(home), "SWARM_CONFIG": str(home / "config")}).start([*auto, "--peer", p1.addr])
    wait_until(lambda: len(spans(p1.addr)) == 4, 20, "the fourth peer in the table")
    s4 = spans(p1.addr)[p4.peer_id]
    victim = next(p for p in (p2, p3) if spans(p1.addr)[p.peer_id] != s4)
    hole = spans(p1.addr)[victim.peer_id]
    victim.kill(signal.SIGKILL)
    live = [p1, p2, p3, p4]
    live.remove(victim)

    def covered() -> bool:
        recs = [r for r in table(p1.addr) if r.peer_id != victim.peer_id]
        return all(coverage(holdings(recs, m.model_hash), m.num_blocks))

    took = wait_until(covered, 30, "another peer moves into the gap")
    print(f"gap {hole} filled {took:.1f}s after the SIGKILL")
    final = {k: v for k, v in spans(p1.addr).items() if k != victim.peer_id}
    assert sorted(final.values()) == [(0, 2), (2, 4), (4, 6)]
    ids = [1, 9, 8, 7, 6, 5]
    res = run(_generate(str(tiny_model), [p.addr for p in live], ids, 16))
    assert res.tokens == reference_generate(tiny_model, ids, 16)
