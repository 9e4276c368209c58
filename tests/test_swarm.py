"""A real swarm on loopback: peers as processes, the client in this process, transformers as the oracle."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swarm import wire
from swarm.client import ClientConfig, SwarmClient
from swarm.prepare import prepare
from swarm.sampling import SamplingConfig

from .conftest import reference_generate, run, start_chain

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


def _raw(addr: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def _recv_frame(s: socket.socket) -> wire.Message:
    hdr = b""
    while len(hdr) < 4:
        chunk = s.recv(4 - len(hdr))
        if not chunk:
            raise ConnectionError("closed")
        hdr += chunk
    n = int.from_bytes(hdr, "big")
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return wire.decode_body(body)


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionError, socket.timeout):
        return True


def test_bad_frames_get_errors_and_an_honest_session_is_unharmed(tiny_model, local_swarm) -> None:
    import msgpack

    peers = start_chain(local_swarm(), tiny_model, [(0, 6)])
    addr = peers[0].addr
    ids = [1, 22, 33, 44]
    before = run(_generate(str(tiny_model), [addr], ids, 16))

    async def honest_while_attacked():
        task = asyncio.create_task(_generate(str(tiny_model), [addr], ids, 16))
        await asyncio.to_thread(attack)
        return await task

    def attack():
        H = 64
        # unknown message type: an error frame, the connection stays usable
        s = _raw(addr)
        s.sendall(wire.HEADER.pack(len(b := msgpack.packb({"t": "launch_missiles", "id": 5}))) + b)
        err = _recv_frame(s)
        assert isinstance(err, wire.Error) and "unknown message type" in err.message and err.id == 5
        # malformed msgpack
        s.sendall(wire.HEADER.pack(3) + b"\xc1\xc1\xc1")
        err = _recv_frame(s)
        assert isinstance(err, wire.Error) and "malformed" in err.message
        # a wrongly typed field
        s.sendall(wire.HEADER.pack(len(b := msgpack.packb({"t": "open", "id": 7, "start": "zero", "end": 2, "max_length": 8}))) + b)
        err = _recv_frame(s)
        assert isinstance(err, wire.Error) and "open.start" in err.message and err.id == 7
        # unknown session
        s.sendall(wire.encode(wire.Forward(8, session=999, position=0, hidden=torch.zeros(1, 1, H))))
        err = _recv_frame(s)
        assert isinstance(err, wire.Error) and err.code == "unknown_session"
        # a real session, then wrong dtype, wrong shape, a position past its length, NaN
        s.sendall(wire.encode(wire.OpenSession(9, start=0, end=6, max_length=8)))
        opened = _recv_frame(s)
        assert isinstance(opened, wire.SessionOpened)
        sid = opened.session
        s.sendall(wire.encode(wire.Forward(10, session=sid, position=0, hidden=torch.zeros(1, 1, H, dtype=torch.float16))))
        assert _recv_frame(s).code == "bad_dtype"
        s.sendall(wire.encode(wire.Forward(11, session=sid, position=0, hidden=torch.zeros(1, 1, H + 1))))
        assert _recv_frame(s).code == "bad_shape"
        s.sendall(wire.encode(wire.Forward(12, session=sid, position=3, hidden=torch.zeros(1, 1, H))))
        err = _recv_frame(s)
        assert err.code == "bad_position" and "past the session's length" in err.message
        s.sendall(wire.encode(wire.Forward(13, session=sid, position=0, hidden=torch.full((1, 1, H), float("nan")))))
        assert _recv_frame(s).code == "non_finite"
        s.sendall(wire.encode(wire.Forward(14, session=sid, position=0, hidden=torch.zeros(1, 9, H))))
        assert _recv_frame(s).code == "too_long"
        # a tensor whose bytes disagree with its shape
        bad = {"t": "forward", "id": 15, "session": sid, "position": 0, "hidden": {"dtype": "float32", "shape": [1, 1, H], "data": b"\0" * 10}}
        s.sendall(wire.HEADER.pack(len(b := msgpack.packb(bad))) + b)
        err = _recv_frame(s)
        assert "do not match shape" in err.message
        # and after all that, the same connection still serves a good step
        s.sendall(wire.encode(wire.Forward(16, session=sid, position=0, hidden=torch.zeros(1, 1, H))))
        assert isinstance(_recv_frame(s), wire.ForwardResult)
        s.close()
        # an oversized frame announced: refused, connection closed
        s = _raw(addr)
        s.sendall(wire.HEADER.pack(0xFFFFFFFF))
        err = _recv_frame(s)
        assert err.code == "frame_too_large"
        assert _closed(s)
        s.close()
        # a frame cut in the middle, then the caller goes away
        s = _raw(addr)
        s.sendall(wire.HEADER.pack(1000) + b"\x00" * 10)
        s.close()
        # pure garbage
        s = _raw(addr)
        s.sendall(os.urandom(4096))
        s.close()

    after = run(honest_while_attacked())
    assert after == before
    assert peers[0].alive()


def test_the_default_model_through_three_peers_equals_transformers(default_model, default_reference, local_swarm) -> None:
    peers = start_chain(local_swarm(), "smollm2-135m", [(0, 10), (10, 20), (20, 30)])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model.root)
    ids = tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True, tokenize=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
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
