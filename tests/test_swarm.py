"""A real swarm on loopback: peers as processes, the client in this process, transformers as the oracle."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import torch

from swarm import wire
from swarm.client import ClientConfig, SwarmClient

from .conftest import announced_links, reference_generate, run, start_chain, wait_until

CHAT_PROMPT = "What is the capital of France?"


async def _generate(model: str, addrs: list[str], ids: list[int], n: int, logits: list | None = None) -> list[int]:
    cfg = ClientConfig(model=model, bootstrap=tuple(addrs), mdns=False, discovery_timeout=20)
    async with await SwarmClient.connect(cfg) as client:
        out = []
        async for tok in client.stream(ids, n, logits_out=logits):
            out.append(tok)
        return out


@pytest.mark.parametrize("kind,spans", [("llama-gqa", [(0, 3), (3, 6)]), ("llama-mha", [(0, 2), (2, 4), (4, 5)])])
def test_greedy_ids_and_logits_equal_transformers(tiny_models, local_swarm, kind: str, spans) -> None:
    src = tiny_models[kind]
    peers = start_chain(local_swarm(), src, spans)
    ids = [1, 15, 200, 33, 7, 91, 4]
    logits: list[torch.Tensor] = []
    got = run(_generate(str(src), [p.addr for p in peers], ids, 24, logits))
    want = reference_generate(src, ids, 24)
    assert got == want
    # the logits of every step, against the whole model run on the same sequence
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids + got])).logits[0]
    for j, lg in enumerate(logits):
        torch.testing.assert_close(lg, ref_logits[len(ids) - 1 + j], rtol=1e-4, atol=1e-4)


def test_pushed_and_hop_by_hop_steps_give_the_oracles_tokens(tiny_model, local_swarm) -> None:
    """Decode steps go peer to peer by default; with push off every hop goes through the client.
    Both are the same arithmetic, so the same tokens. Once the peers know each other, a pushed
    route is priced by the round trips they measured between themselves."""
    peers = start_chain(local_swarm(), tiny_model, [(0, 2), (2, 4), (4, 6)])
    ids = [1, 15, 200, 33]

    async def answer(push: bool):
        cfg = ClientConfig(model=str(tiny_model), bootstrap=tuple(p.addr for p in peers), mdns=False, discovery_timeout=20, push=push)
        async with await SwarmClient.connect(cfg) as client:
            r = await client.generate(ids, 20, stop_at_eos=False)
            return r.tokens, r.pushed_steps, r.routes[-1]

    pushed, n_pushed, _ = run(answer(True))
    by_hop, n_by_hop, route_by_hop = run(answer(False))
    assert (n_pushed, n_by_hop) == (20, 0)  # every step, the prompt's too, went peer to peer
    assert pushed == by_hop
    want = reference_generate(tiny_model, ids, 20)
    assert pushed[: len(want)] == want
    # introduced by the client, each peer times its gossip with the others and announces its RTT
    # to the peer after it; the next pushed route is priced by those links
    def announced() -> bool:
        near = announced_links(peers[1].addr)
        return all(near.get(a.peer_id, {}).keys() == {b.peer_id} for a, b in zip(peers, peers[1:]))

    wait_until(announced, 30, "the peers announce their links to the next peer")
    # `swarm status --json` (and the API's /v1/swarm) show them
    from swarm.directory import ask_peer
    from swarm.gossip import PeerRecord
    from swarm.status import snapshot

    rows = {r["peer_id"]: r for r in snapshot([PeerRecord.from_wire(x) for x in run(ask_peer(peers[1].addr))])["peers"]}
    assert [set(rows[p.peer_id]["links_ms"]) for p in peers] == [{peers[1].peer_id}, {peers[2].peer_id}, set()]

    again, _, route = run(answer(True))
    assert again == pushed
    # a pushed route is priced by the links the hops measured; hop by hop, by the client's RTTs
    assert [h["link_from"] for h in route] == [None, peers[0].peer_id, peers[1].peer_id]
    assert all(0 <= h["net_ms"] < 1000 for h in route)
    assert all("net_ms" not in h for h in route_by_hop)


async def push_abuse(p1, p2, H: int) -> None:
    """A caller that knows a session's id but not its push token cannot step it; a push cannot
    rewind; a next hop nobody can reach is an error for the step's owner, not a hang."""
    from swarm.directory import ask_peer

    a, b = await RawLink.open(p1.addr), await RawLink.open(p2.addr)
    # p1 learns p2's signed record, as a client's chain would tell it
    rec = next(r for r in await ask_peer(p2.addr) if r["peer_id"] == p2.peer_id)
    from swarm.gossip import GossipRecords

    await a.send(wire.encode(GossipRecords(1, (rec,))))
    assert isinstance(await a.recv(), wire.Closed)
    await a.send(wire.encode(wire.OpenSession(2, start=0, end=2, max_length=8)))
    s1 = await a.recv()
    await b.send(wire.encode(wire.OpenSession(3, start=2, end=4, max_length=8)))
    s2 = await b.recv()
    assert len(s2.push_token) == 16
    h = torch.randn(1, 1, H)
    # a wrong token: p2 refuses it, and p1 tells the step's owner (a) who refused and why
    await a.send(wire.encode(wire.Forward(4, s1.session, 0, h, next=(wire.NextHop(p2.peer_id, s2.session, b"x" * 16),))))
    err = await a.recv()
    assert (err.id, err.code) == (4, "unknown_session") and p2.peer_id[:10] in err.message
    # the right token: the result reaches p2's session owner (b) with the input of every hop
    await a.send(wire.encode(wire.Forward(5, s1.session, 0, h, next=(wire.NextHop(p2.peer_id, s2.session, s2.push_token),))))
    res = await b.recv()
    assert isinstance(res, wire.ForwardResult) and res.id == 5 and len(res.carried) == 2
    assert torch.equal(res.carried[0], h)
    await b.send(wire.encode(wire.Forward(6, s2.session, 0, res.carried[1])))  # the owner's retry of the same row
    assert torch.equal((await b.recv()).hidden, res.hidden)
    # a push may not rewind (p1 may: a's own session; p2 holds a row and refuses position 0)
    await a.send(wire.encode(wire.Forward(7, s1.session, 0, h, next=(wire.NextHop(p2.peer_id, s2.session, s2.push_token),))))
    err = await b.recv()
    assert (err.id, err.code) == (7, "bad_position") and "cannot rewind" in err.message
    # a next hop that is in nobody's table
    await a.send(wire.encode(wire.Forward(8, s1.session, 0, h, next=(wire.NextHop("p" + "a" * 51, 1, b"y" * 16),))))
    err = await a.recv()
    assert (err.id, err.code) == (8, "push_unreachable")
    a.close()
    b.close()


def test_a_push_needs_the_session_token_and_an_honest_session_is_unharmed(tiny_model, local_swarm) -> None:
    peers = start_chain(local_swarm(), tiny_model, [(0, 2), (2, 6)])
    addrs = [p.addr for p in peers]
    ids = [1, 22, 33, 44]
    before = run(_generate(str(tiny_model), addrs, ids, 16))

    async def honest_while_abused():
        task = asyncio.create_task(_generate(str(tiny_model), addrs, ids, 16))
        await push_abuse(peers[0], peers[1], 64)
        return await task

    assert run(honest_while_abused()) == before
    assert all(p.alive() for p in peers)


def test_two_clients_at_once_get_what_they_get_alone(tiny_model, local_swarm) -> None:
    peers = start_chain(local_swarm(), tiny_model, [(0, 2), (2, 6)])
    addrs = [p.addr for p in peers]
    a, b = [1, 50, 60, 70], [1, 9, 8, 7, 6, 5]
    alone_a = run(_generate(str(tiny_model), addrs, a, 20))
    alone_b = run(_generate(str(tiny_model), addrs, b, 20))

    async def both():
        return await asyncio.gather(_generate(str(tiny_model), addrs, a, 20), _generate(str(tiny_model), addrs, b, 20))

    got_a, got_b = run(both())
    assert (got_a, got_b) == (alone_a, alone_b)
    assert alone_a != alone_b


class RawLink:
    """A caller that speaks TLS and the handshake, then writes whatever bytes it likes."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, addr: str) -> "RawLink":
        from swarm.identity import Identity
        from swarm.secure import open_secure_connection

        host, port = addr.rsplit(":", 1)
        reader, writer, _ = await open_secure_connection(host, int(port), Identity.generate(), None)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> wire.Message:
        hdr = await asyncio.wait_for(self.reader.readexactly(4), 20)
        body = await asyncio.wait_for(self.reader.readexactly(int.from_bytes(hdr, "big")), 20)
        return wire.decode_body(body)

    async def closed_by_peer(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), 20) == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        self.writer.close()


def _frame(obj) -> bytes:
    import msgpack

    body = msgpack.packb(obj)
    return wire.HEADER.pack(len(body)) + body


async def attack(addr: str, H: int) -> None:
    """Garbage, truncated, oversized and wrongly typed frames against a live peer."""
    s = await RawLink.open(addr)
    # unknown message type: an error frame that names it; the connection stays usable
    await s.send(_frame({"t": "launch_missiles", "id": 5}))
    err = await s.recv()
    assert isinstance(err, wire.Error) and "unknown message type" in err.message and err.id == 5
    await s.send(wire.HEADER.pack(3) + b"\xc1\xc1\xc1")  # malformed msgpack
    err = await s.recv()
    assert isinstance(err, wire.Error) and "malformed" in err.message
    await s.send(_frame({"t": "open", "id": 7, "start": "zero", "end": 2, "max_length": 8}))
    err = await s.recv()
    assert isinstance(err, wire.Error) and "open.start" in err.message and err.id == 7
    await s.send(wire.encode(wire.Forward(8, session=999, position=0, hidden=torch.zeros(1, 1, H))))
    assert (await s.recv()).code == "unknown_session"
    # a real session, then wrong dtype, wrong shape, a position past its length, NaN, too long
    await s.send(wire.encode(wire.OpenSession(9, start=0, end=6, max_length=8)))
    opened = await s.recv()
    assert isinstance(opened, wire.SessionOpened)
    sid = opened.session
    await s.send(wire.encode(wire.Forward(10, session=sid, position=0, hidden=torch.zeros(1, 1, H, dtype=torch.float16))))
    assert (await s.recv()).code == "bad_dtype"
    await s.send(wire.encode(wire.Forward(11, session=sid, position=0, hidden=torch.zeros(1, 1, H + 1))))
    assert (await s.recv()).code == "bad_shape"
    await s.send(wire.encode(wire.Forward(12, session=sid, position=3, hidden=torch.zeros(1, 1, H))))
    err = await s.recv()
    assert err.code == "bad_position" and "past the session's length" in err.message
    await s.send(wire.encode(wire.Forward(13, session=sid, position=0, hidden=torch.full((1, 1, H), float("nan")))))
    assert (await s.recv()).code == "non_finite"
    await s.send(wire.encode(wire.Forward(14, session=sid, position=0, hidden=torch.zeros(1, 9, H))))
    assert (await s.recv()).code == "too_long"
    # a tensor whose bytes disagree with its shape
    await s.send(_frame({"t": "forward", "id": 15, "session": sid, "position": 0, "hidden": {"dtype": "float32", "shape": [1, 1, H], "data": b"\0" * 10}}))
    assert "do not match shape" in (await s.recv()).message
    # and after all that, the same connection still serves a good step, and a retried one alike
    row = torch.randn(1, 1, H)
    await s.send(wire.encode(wire.Forward(16, session=sid, position=0, hidden=torch.ones(1, 1, H))))
    assert isinstance(await s.recv(), wire.ForwardResult)
    await s.send(wire.encode(wire.Forward(17, session=sid, position=1, hidden=row)))
    once = (await s.recv()).hidden
    await s.send(wire.encode(wire.Forward(18, session=sid, position=1, hidden=row)))  # a retry: rewinds
    assert torch.equal((await s.recv()).hidden, once)
    s.close()
    # an oversized frame announced (4 GiB): refused, connection closed
    s = await RawLink.open(addr)
    await s.send(wire.HEADER.pack(0xFFFFFFFF))
    assert (await s.recv()).code == "frame_too_large"
    assert await s.closed_by_peer()
    s.close()
    # a frame cut in the middle, then the caller goes away
    s = await RawLink.open(addr)
    await s.send(wire.HEADER.pack(1000) + b"\x00" * 10)
    s.close()
    # pure garbage inside TLS, and plain garbage without TLS
    s = await RawLink.open(addr)
    await s.send(os.urandom(4096))
    s.close()
    host, port = addr.rsplit(":", 1)
    r, w = await asyncio.open_connection(host, int(port))
    w.write(os.urandom(4096))
    assert await asyncio.wait_for(r.read(), 20) is not None
    w.close()


def test_bad_frames_get_errors_and_an_honest_session_is_unharmed(tiny_model, local_swarm) -> None:
    peers = start_chain(local_swarm(), tiny_model, [(0, 6)])
    addr = peers[0].addr
    ids = [1, 22, 33, 44]
    before = run(_generate(str(tiny_model), [addr], ids, 16))

    async def honest_while_attacked():
        task = asyncio.create_task(_generate(str(tiny_model), [addr], ids, 16))
        await attack(addr, 64)
        return await task

    after = run(honest_while_attacked())
    assert after == before
    assert peers[0].alive()


def test_the_default_model_through_three_peers_equals_transformers(default_model, default_reference, local_swarm) -> None:
    peers = start_chain(local_swarm(), "smollm2-135m", [(0, 10), (10, 20), (20, 30)])
    from swarm.client import chat_ids, load_tokenizer

    ids = chat_ids(load_tokenizer(default_model), CHAT_PROMPT)
    want = reference_generate(default_reference, ids, 40)
    # through the CLI, as a user runs it
    out = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "generate", CHAT_PROMPT, "--json", "--temperature", "0", "--max-new-tokens", "40",
         *sum((["--peer", p.addr] for p in peers), [])],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tokens"] == want
    assert "Paris" in result["text"]
    assert [h["span"] for h in result["route"]] == [[0, 10], [10, 20], [20, 30]]
    assert {h["peer"] for h in result["route"]} == {p.peer_id for p in peers}
    assert result["timings"]["decode_tokens_per_s"] > 0
    assert result["pushed_steps"] == len(result["tokens"])  # every step went peer to peer


def test_status_shows_peers_and_coverage(tiny_model, local_swarm) -> None:
    peers = start_chain(local_swarm(), tiny_model, [(0, 2), (4, 6)])
    out = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "status", *sum((["--peer", p.addr] for p in peers), [])],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "[11..11]" in out.stdout
    assert "GAP: blocks 2:4" in out.stdout
    for p in peers:
        assert p.peer_id[:10] in out.stdout
    js = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "status", "--json", "--peer", peers[0].addr, "--peer", peers[1].addr],
        capture_output=True, text=True, timeout=60,
    )
    snap = json.loads(js.stdout)
    assert snap["models"][0]["coverage"] == [1, 1, 0, 0, 1, 1]
    assert sorted((p["start"], p["end"]) for p in snap["peers"]) == [(0, 2), (4, 6)]


def test_generate_without_full_coverage_says_which_blocks_are_missing(default_model, local_swarm) -> None:
    peers = start_chain(local_swarm(), "smollm2-135m", [(0, 10), (20, 30)])
    out = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "generate", "hi", "--peer", peers[0].addr, "--peer", peers[1].addr, "--discovery-timeout", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "block(s) 10:20" in out.stderr
    assert "Traceback" not in out.stderr
