"""Shared fixtures: a private SWARM_HOME, tiny random Llama-family checkpoints, the embedded default
model and its transformers oracle, and real peer processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session", autouse=True)
def swarm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test run gets its own cache and key folder; peers started by tests inherit them.
    The embedded default model is prepared once per machine in a shared folder, because it takes
    a while (SWARM_TEST_MODELS overrides where)."""
    home = tmp_path_factory.mktemp("swarm-home")
    os.environ["SWARM_HOME"] = str(home)
    os.environ["SWARM_CONFIG"] = str(home / "config")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return home


TINY_CONFIGS = {
    # grouped-query attention: 4 query heads share 2 key/value heads
    "llama-gqa": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2),
    # plain multi-head attention, a different width and depth, untied head
    "llama-mha": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=False),
}


def make_tiny_model(path: Path, kind: str = "llama-gqa", seed: int = 0) -> Path:
    """A random Llama-family checkpoint saved as a real Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **TINY_CONFIGS[kind])
    model = LlamaForCausalLM(cfg).eval()
    # larger weights than the default init so that greedy paths are not all one token
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny_model(root / k, k) for k in TINY_CONFIGS}


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
