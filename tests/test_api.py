"""`swarm api` and the Python API against a real swarm: three peers and the API server as processes
on loopback, the official `openai` client as the caller, `swarm generate` and transformers as the
oracles. The pure parts (request checks, text deltas) are tested first, without a swarm."""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from swarm.api import ApiError, TextStream, parse_request

from .conftest import ARTIFACTS, start_chain

PROMPT = "What is the capital of France?"
KEY = "test-key-123"
N_TOKENS = 24
SPANS = [(0, 10), (10, 20), (20, 30)]
CHROMIUM = "/usr/bin/chromium"


# --- the pure parts -------------------------------------------------------------------------------


def _chars(ids: list[int]) -> str:
    """A toy decoder: token i is chr(i); 0xFFFD stands for an incomplete UTF-8 character."""
    return "".join(chr(i) for i in ids)


def _feed(ts: TextStream, text: str) -> list[str]:
    out = [ts.push(ord(c)) for c in text]
    return out + [ts.finish()]


def test_text_stream_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    ts = TextStream(_chars, ("END",))
    deltas = _feed(ts, "abcENxyEND tail")
    assert "".join(deltas) == "abcENxy" == ts.text
    assert ts.stopped
    assert deltas[3:5] == ["", ""]  # "E", "EN" might begin "END": held back until "x" shows they do not


def test_text_stream_holds_back_an_incomplete_character_and_flushes_at_the_end() -> None:
    ts = TextStream(_chars)
    assert ts.push(ord("a")) == "a"
    assert ts.push(0xFFFD) == ""  # the first byte of a character whose rest is still to come
    assert ts.finish() == "\ufffd"
    assert not ts.stopped


def test_text_stream_earliest_of_several_stops_wins() -> None:
    ts = TextStream(_chars, ("zz", "b"))
    assert "".join(_feed(ts, "aazzb")) == "aa"


def _req(body: dict, ids: list[int] | None = None, ctx: int = 100):
    return parse_request(body, "m", lambda b: ids if ids is not None else [1, 2, 3], ctx, 16)


def test_parse_request_defaults_and_errors() -> None:
    r = _req({"model": "m", "messages": [], "temperature": 0, "stop": "x"})
    assert (r.max_tokens, r.sampling.temperature, r.stop, r.stream) == (16, 0.0, ("x",), False)
    assert _req({"model": "m"}, ctx=10).max_tokens == 7  # the room left in the context
    cases = [
        ({"model": "other"}, 404, "model_not_found"),
        ({"model": "m", "n": 2}, 400, None),
        ({"model": "m", "temperature": 3}, 400, None),
        ({"model": "m", "stop": ["a"] * 5}, 400, None),
        ({"model": "m", "max_tokens": 98}, 400, "context_length_exceeded"),
        ({"model": "m", "stream": "yes"}, 400, None),
    ]
    for body, status, code in cases:
        with pytest.raises(ApiError) as e:
            _req(body)
        assert (e.value.status, e.value.code) == (status, code), body
    with pytest.raises(ApiError) as e:
        _req({"model": "m"}, ids=list(range(100)))
    assert e.value.code == "context_length_exceeded"


# --- a real swarm and a real server ---------------------------------------------------------------


def _wait_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline and proc.poll() is None:
        r, _, _ = select.select([proc.stdout], [], [], 0.2)
        if r:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
    raise AssertionError(f"no {prefix!r} line in {timeout:.0f}s; stdout so far: {buf!r}")


@pytest.fixture(scope="module")
def swarm3(default_model, tmp_path_factory):
    """Three peers serving SmolLM2 in thirds, for the whole module (they take a while to start)."""
    from swarm.local import LocalSwarm

    s = LocalSwarm(log_dir=tmp_path_factory.mktemp("api-peer-logs"))
    try:
        yield start_chain(s, "smollm2-135m", SPANS)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def api(swarm3, tmp_path_factory):
    """`swarm api` as a process, with a key; yields its base URL. Stopped by its PID."""
    log = tmp_path_factory.mktemp("api-log") / "api.log"
    peers = sum((["--peer", p.addr] for p in swarm3), [])
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swarm.cli", "api", "--port", "0", "--no-mdns", "--api-key", KEY, "--threads", "1", *peers],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        line = _wait_line(proc, "READY ", 120)
        yield line.split()[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        proc.stdout.close()
        if proc.returncode not in (0, -signal.SIGINT):
            print(log.read_text(errors="replace")[-3000:])


@pytest.fixture(scope="module")
def cli_answer(swarm3) -> dict:
    """The oracle for the API: `swarm generate --json`, greedy, as a user runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "generate", PROMPT, "--json", "--temperature", "0", "--max-new-tokens", str(N_TOKENS),
         *sum((["--peer", p.addr] for p in swarm3), [])],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _openai(base: str, key: str = KEY):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def _chat_ids(default_model) -> list[int]:
    from swarm.client import chat_ids, load_tokenizer

    return chat_ids(load_tokenizer(default_model), PROMPT)


def _sessions(peers) -> list[int]:
    from swarm.directory import Directory

    async def ask() -> list[int]:
        d = Directory("", ())
        return [int((await d.ask(p.addr))[0]["sessions"]) for p in peers]

    return asyncio.run(ask())


def _wait_no_sessions(peers, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = _sessions(peers)
        if not any(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.25)


@pytest.mark.slow
def test_openai_client_chat_equals_swarm_generate(api, cli_answer, default_model, swarm3) -> None:
    client = _openai(api)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    msgs = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model="smollm2-135m", messages=msgs, temperature=0, max_tokens=N_TOKENS)
    assert whole.choices[0].message.content == cli_answer["text"]
    assert "Paris" in whole.choices[0].message.content
    assert whole.usage.prompt_tokens == len(_chat_ids(default_model)) == cli_answer["prompt_tokens"]
    assert whole.usage.completion_tokens == len(cli_answer["tokens"])
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    want_reason = "length" if len(cli_answer["tokens"]) == N_TOKENS else "stop"
    assert whole.choices[0].finish_reason == want_reason

    stream = client.chat.completions.create(
        model="smollm2-135m", messages=msgs, temperature=0, max_tokens=N_TOKENS, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == cli_answer["text"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # it did stream
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [want_reason]
    assert chunks[-1].usage.completion_tokens == len(cli_answer["tokens"])
    assert chunks[-1].usage.prompt_tokens == cli_answer["prompt_tokens"]

    # a stop string: the text ends before it, and the reason is "stop"
    cut = client.chat.completions.create(model="smollm2-135m", messages=msgs, temperature=0, max_tokens=N_TOKENS, stop=[" Paris"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == cli_answer["text"].split(" Paris")[0]

    # the text completion endpoint, sampled with a seed: the same seed gives the same text
    a, b = (client.completions.create(model="smollm2-135m", prompt="The sky is", max_tokens=8, temperature=0.8, top_p=0.9, seed=7) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens >= 1
    assert _wait_no_sessions(swarm3) == [0, 0, 0]


@pytest.mark.slow
def test_requests_at_once_are_served_together_and_alike(api, cli_answer) -> None:
    client = _openai(api)

    def ask(_: int) -> str:
        r = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=N_TOKENS)
        return r.choices[0].message.content

    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(ask, range(3)))
    assert texts == [cli_answer["text"]] * 3


@pytest.mark.slow
def test_errors_come_in_openai_shape_with_their_status(api) -> None:
    import openai
    import urllib.request

    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        _openai(api, "wrong").chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        _openai(api).chat.completions.create(model="gpt-4", messages=msgs, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        _openai(api).chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "word " * 9000}], max_tokens=2)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        _openai(api).chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=2, n=2)

    def raw(body: bytes, headers: dict) -> tuple[int, dict]:
        req = urllib.request.Request(f"{api}/v1/chat/completions", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    status, body = raw(b"{not json", {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = raw(b"{}", {})  # no key at all
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


@pytest.mark.slow
def test_a_client_that_drops_a_stream_leaves_no_session_open(api, swarm3) -> None:
    host, port = api.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}], "max_tokens": 400, "stream": True, "temperature": 0}).encode()
    s = socket.create_connection((host, int(port)), timeout=60)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    got = b""
    while got.count(b"data: ") < 4:  # the role chunk and a few tokens
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    # the answer is in flight: every peer holds its session (records are re-signed each second)
    deadline = time.monotonic() + 10
    while (counts := _sessions(swarm3)) != [1, 1, 1] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counts == [1, 1, 1]
    s.close()
    assert _wait_no_sessions(swarm3, 20.0) == [0, 0, 0]
    # and the server goes on serving
    r = _openai(api).chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.usage.completion_tokens >= 1


@pytest.mark.slow
def test_swarm_json_is_status_json_plus_rtt_and_route(api, swarm3) -> None:
    import urllib.request

    _openai(api).chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    req = urllib.request.Request(f"{api}/v1/swarm", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        snap = json.loads(r.read())
    out = subprocess.run(
        [sys.executable, "-m", "swarm.cli", "status", "--json", *sum((["--peer", p.addr] for p in swarm3), [])],
        capture_output=True, text=True, timeout=60,
    )
    status = json.loads(out.stdout)
    assert set(snap) >= set(status)
    assert set(snap["peers"][0]) == set(status["peers"][0]) | {"rtt_ms"}
    assert snap["models"][0]["coverage"] == status["models"][0]["coverage"] == [1] * 30
    assert [h["span"] for h in snap["last_route"]] == [list(s) for s in SPANS]
    assert {p["peer_id"] for p in snap["peers"]} == {p.peer_id for p in swarm3}


@pytest.mark.slow
def test_map_page_shows_every_block_and_peer_in_chromium(api, swarm3, tmp_path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)")
    _openai(api).chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    url = f"{api}/#key={KEY}"
    common = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--virtual-time-budget=5000", "--window-size=1280,900",
    ]
    shot = tmp_path / "swarm-map.png"
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([*common, f"--user-data-dir={profile}", f"--screenshot={shot}", url], capture_output=True, timeout=120)
        assert shot.exists() and shot.stat().st_size > 10_000, out.stderr[-2000:]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([*common, f"--user-data-dir={profile}", "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "swarm-map.png")
    assert "live" in dom and "every block is covered" in dom
    for b in range(30):
        assert f'data-block="{b}"' in dom
    for p in swarm3:
        assert p.peer_id[:10] in dom
        assert p.addr in dom
    hops = re.findall(r'<span class="hop" title="([a-z0-9]+)"', dom)  # the latest answer's route
    assert hops == [p.peer_id for p in swarm3]


@pytest.mark.slow
def test_hf_style_generate_equals_transformers(swarm3, default_reference, default_model) -> None:
    import torch
    from transformers import AutoTokenizer

    from swarm import DistributedModelForCausalLM

    ids = _chat_ids(default_model)
    want = default_reference.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False, pad_token_id=0)

    class Collect:  # transformers' streamer protocol: put(prompt), put(token)..., end()
        def __init__(self) -> None:
            self.puts: list[list[int]] = []
            self.ended = False

        def put(self, value: torch.Tensor) -> None:
            self.puts.append(value.reshape(-1).tolist())

        def end(self) -> None:
            self.ended = True

    streamer = Collect()
    with DistributedModelForCausalLM.from_pretrained("smollm2-135m", peers=[p.addr for p in swarm3]) as model:
        assert isinstance(model.tokenizer, type(AutoTokenizer.from_pretrained(default_model.root)))
        got = model.generate(torch.tensor([ids]), max_new_tokens=N_TOKENS, streamer=streamer)
        again = model.generate(ids, max_new_tokens=4)
    assert got.dtype == torch.long and got.shape == want.shape
    assert got.tolist() == want.tolist()
    assert streamer.puts[0] == ids and sum(streamer.puts[1:], []) == got[0, len(ids) :].tolist() and streamer.ended
    assert again[0].tolist() == want[0, : len(ids) + 4].tolist()
