"""Shared fixtures: a private SWARM_HOME, tiny random Llama-family checkpoints, the embedded default
model and its transformers oracle, and real peer processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from swarm.tiny import TINY_CONFIGS, make_tiny_model

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session", autouse=True)
def swarm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test run gets its own cache and key folder; peers started by tests inherit them.
    (The embedded default model is therefore prepared once per test run, ~20 s.)"""
    home = tmp_path_factory.mktemp("swarm-home")
    os.environ["SWARM_HOME"] = str(home)
    os.environ["SWARM_CONFIG"] = str(home / "config")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return home


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny_model(root / k, k, tokenizer=True) for k in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama-gqa"]


def reference_generate(model_dir_or_model, ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: transformers' own generate() on the whole model in one process, greedy."""
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="session")
def default_model(swarm_home: Path):
    """The embedded SmolLM2-135M-Instruct, prepared once for the session."""
    from swarm.prepare import prepare

    return prepare("smollm2-135m")


@pytest.fixture(scope="session")
def default_reference():
    """transformers' whole SmolLM2 model, loaded from the same GGUF file, in this process."""
    from transformers import AutoModelForCausalLM

    from swarm.prepare import embedded_gguf

    g = embedded_gguf()
    return AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()


@pytest.fixture
def local_swarm(tmp_path: Path):
    """Start peers as real processes; all of them are stopped (by PID) when the test ends."""
    from swarm.local import LocalSwarm

    swarms: list[LocalSwarm] = []

    def make(env: dict[str, str] | None = None) -> LocalSwarm:
        s = LocalSwarm(log_dir=tmp_path / "logs", env=dict(env or {}))
        swarms.append(s)
        return s

    yield make
    for s in swarms:
        s.stop()


def start_chain(swarm, model: str | Path, spans: list[tuple[int, int]], extra: list[str] | None = None):
    """Peers for `spans` started in parallel; returns their PeerProcess objects in span order."""
    from swarm.prepare import prepare

    prepare(str(model))
    args = [["--model", str(model), "--blocks", f"{s}:{e}", "--no-mdns", "--threads", "1", *(extra or [])] for s, e in spans]
    return swarm.start_many(args)


def run(coro):
    return asyncio.run(coro)


def announced_links(addr: str) -> dict[str, dict[str, float]]:
    """Each peer's announced RTTs to the peers that could follow it, as the peer at `addr` has
    their signed records: {peer id: {follower id: ms}}."""
    from swarm import links
    from swarm.directory import ask_peer

    recs = {r["peer_id"]: r for r in run(ask_peer(addr))}
    return {p: links.parse(r.get(links.FIELD), recs) for p, r in recs.items()}


def wait_until(pred, timeout: float, what: str) -> float:
    """Poll `pred` until it holds; the seconds it took. Bounded: fails naming `what`, and the last
    error `pred` raised (a peer still starting may refuse a connection)."""
    import time

    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return time.monotonic() - t0
        except Exception as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting until {what}" + (f" (last error: {last!r})" if last else ""))
