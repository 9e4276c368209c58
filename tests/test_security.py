"""Safe to run on a volunteer's machine: hostile input against a live peer, private swarms,
impersonation, a lying peer caught by --verify, and no unpickling anywhere."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swarm import wire
from swarm.client import ClientConfig, SwarmClient
from swarm.errors import RemoteError
from swarm.identity import Identity
from swarm.prepare import prepare
from swarm.transport import Connection

from .conftest import reference_generate, run, start_chain
from .test_swarm import RawLink, _generate, attack

ROOT = Path(__file__).resolve().parent.parent


async def bombs_and_floods(addr: str, H: int) -> None:
    # msgpack bombs: a container that claims 2^32-1 elements, and nesting far past any sane depth
    s = await RawLink.open(addr)
    await s.send(wire.HEADER.pack(5) + b"\xdd\xff\xff\xff\xff")
    assert "malformed" in (await s.recv()).message
    deep = b"\x91" * 200_000 + b"\x00"
    await s.send(wire.HEADER.pack(len(deep)) + deep)
    assert "malformed" in (await s.recv()).message
    huge_map = b"\xdf\x00\x0f\x42\x40" + b"\x00\x00" * 10  # a map claiming a million entries
    await s.send(wire.HEADER.pack(len(huge_map)) + huge_map)
    assert "malformed" in (await s.recv()).message
    # infinity in the hidden states
    await s.send(wire.encode(wire.OpenSession(1, start=0, end=6, max_length=8)))
    sid = (await s.recv()).session
    await s.send(wire.encode(wire.Forward(2, session=sid, position=0, hidden=torch.full((1, 1, H), float("inf")))))
    assert (await s.recv()).code == "non_finite"
    # thousands of sessions from one caller: the per-caller limit answers, the peer stays up
    codes = []
    for i in range(2000):
        await s.send(wire.encode(wire.OpenSession(10 + i, start=0, end=6, max_length=4)))
    for i in range(2000):
        reply = await s.recv()
        codes.append(reply.code if isinstance(reply, wire.Error) else "ok")
    assert codes.count("ok") == 63  # 64 per caller, one already open
    assert set(codes) == {"ok", "too_many_sessions"}
    s.close()  # ...and they are all freed with the connection


async def slow_sender(addr: str) -> float:
    """A caller that sends one byte a second: the peer drops it (frame_timeout), no one waits."""
    s = await RawLink.open(addr)
    t0 = time.monotonic()
    frame = wire.encode(wire.Ping(1))
    try:
        for b in frame:
            await s.send(bytes([b]))
            await asyncio.sleep(1.0)
            if s.reader.at_eof():
                break
    except (ConnectionError, OSError):
        pass
    assert await s.closed_by_peer()
    return time.monotonic() - t0


def test_a_live_peer_survives_hostile_input_and_an_honest_answer_is_unchanged(tiny_model, local_swarm) -> None:
    peers = start_chain(local_swarm(), tiny_model, [(0, 6)], extra=["--frame-timeout", "3"])
    addr = peers[0].addr
    ids = [1, 22, 33, 44]
    before = run(_generate(str(tiny_model), [addr], ids, 16))

    async def everything():
        honest = asyncio.create_task(_generate(str(tiny_model), [addr], ids, 16))
        slow = asyncio.create_task(slow_sender(addr))
        await attack(addr, 64)
        await bombs_and_floods(addr, 64)
        return await honest, await slow

    after, slow_s = run(everything())
    assert after == before
    assert slow_s < 10, f"a slow sender held a connection for {slow_s:.1f}s"
    assert peers[0].alive()
    assert run(_generate(str(tiny_model), [addr], ids, 16)) == before


def test_a_private_swarm_refuses_outsiders(tiny_model, local_swarm, tmp_path) -> None:
    prepare(str(tiny_model))
    secret = "correct-horse-battery-staple-" + "x" * 8
    key = tmp_path / "swarm.key"
    key.write_text(secret + "\n")
    key.chmod(0o600)
    swarm = local_swarm()
    base = ["--model", str(tiny_model), "--threads", "1", "--no-mdns"]
    a = swarm.start([*base, "--blocks", "0:3", "--swarm-key", str(key)])
    b = swarm.start([*base, "--blocks", "3:6", "--swarm-key", str(key), "--peer", a.addr])
    outsider = swarm.start([*base, "--blocks", "0:6", "--peer", a.addr])  # no key

    def status(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--json", "--no-mdns", "--peer", a.addr, *extra],
                              capture_output=True, text=True, timeout=60)

    # members see each other, with the key
    deadline = time.monotonic() + 20
    while True:
        out = status("--swarm-key", str(key))
        import json

        ids = {p["peer_id"] for p in json.loads(out.stdout)["peers"]} if out.stdout else set()
        if ids == {a.peer_id, b.peer_id} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ids == {a.peer_id, b.peer_id}  # the outsider never made it into the table
    # without the key, nothing: not the table, not a session
    out = status()
    assert json.loads(out.stdout)["peers"] == []

    async def open_without_key():
        host, port = a.addr.rsplit(":", 1)
        await Connection.open(host, int(port), Identity.generate(), a.peer_id, None, 5)

    with pytest.raises(RemoteError):
        run(open_without_key())
    # the key itself never shows up in what peers print
    for p in (a, b, outsider):
        p.stop()
        assert secret not in (p.log_tail(10_000) or "")
    assert secret not in out.stdout + out.stderr


def test_a_client_refuses_an_address_where_another_identity_answers(tiny_model, local_swarm) -> None:
    peers = start_chain(local_swarm(), tiny_model, [(0, 3), (3, 6)])
    a, b = peers

    async def dial_b_expecting_a():
        host, port = b.addr.rsplit(":", 1)
        await Connection.open(host, int(port), Identity.generate(), a.peer_id, None, 5)

    with pytest.raises(RemoteError) as err:
        run(dial_b_expecting_a())
    assert err.value.code == "auth"
    assert a.peer_id[:10] in str(err.value) or "expected" in str(err.value)


def test_verify_all_catches_a_lying_replica_and_keeps_the_honest_answer(tiny_model, local_swarm) -> None:
    prepare(str(tiny_model))
    swarm = local_swarm()
    base = ["--model", str(tiny_model), "--threads", "1", "--no-mdns"]
    first = swarm.start([*base, "--blocks", "3:6"])
    honest = swarm.start_many([[*base, "--blocks", "0:3", "--peer", first.addr] for _ in range(2)])
    liar = swarm.start([*base, "--blocks", "0:3", "--peer", first.addr, "--test-perturb", "0.5"])
    ids = [1, 5, 9, 13, 17]
    want = reference_generate(tiny_model, ids, 24)

    async def go():
        cfg = ClientConfig(model=str(tiny_model), bootstrap=(first.addr,), mdns=False, discovery_timeout=20, verify=1.0)
        async with await SwarmClient.connect(cfg) as client:
            await client.directory.settle(5)
            # make the liar look fastest, so it is the one on the route
            for p in [first, *honest]:
                client.rtt.observe(p.peer_id, 50.0)
            client.rtt.observe(liar.peer_id, 0.01)
            caught: list = []
            r = await client.generate(ids, 24, on_verify=caught.append)
            return r, caught

    r, caught = run(go())
    assert r.tokens == want
    assert [v["liar"] for v in caught] == [liar.peer_id]
    assert liar.peer_id not in [h["peer"] for h in r.routes[-1]]
    assert r.to_json()["verification"]["liars"] == [liar.peer_id]


def test_no_unpickling_of_anything_anywhere() -> None:
    """Network bytes must never reach pickle, marshal, eval or torch.load."""
    pattern = re.compile(r"^\s*(import pickle|from pickle|import marshal|import dill|import cloudpickle)|torch\.load\(|pickle\.loads?\(|marshal\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(")
    hits = []
    for folder in ("swarm", "peers", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []
