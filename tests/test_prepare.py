"""Model preparation: per-block files, the manifest, reuse, corruption, reconstruction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swarm.blocks import BlockSpan, Head
from swarm.errors import ModelError
from swarm.manifest import Manifest, OldFormatError, sha256_file
from swarm.prepare import prepare


def test_blocks_put_back_together_equal_the_original(tiny_models: dict[str, Path]) -> None:
    for kind, src in tiny_models.items():
        m = prepare(str(src))
        original = load_file(str(src / "model.safetensors"))
        rebuilt: dict[str, torch.Tensor] = {}
        for i, entry in enumerate(m.blocks):
            for k, v in load_file(str(m.path(entry))).items():
                rebuilt[f"model.layers.{i}.{k}"] = v
        client = load_file(str(m.path(m.client)))
        rebuilt["model.embed_tokens.weight"] = client["embed_tokens.weight"]
        rebuilt["model.norm.weight"] = client["norm.weight"]
        if "lm_head.weight" in client:
            rebuilt["lm_head.weight"] = client["lm_head.weight"]
        assert set(rebuilt) == set(original), kind
        for k in original:
            assert torch.equal(rebuilt[k], original[k]), (kind, k)
        assert m.num_blocks == json.loads((src / "config.json").read_text())["num_hidden_layers"]


def test_manifest_hashes_every_file_and_names_the_model(tiny_model: Path) -> None:
    m = prepare(str(tiny_model))
    again = Manifest.load(m.root)
    assert again.model_hash == m.model_hash and len(m.model_hash) == 64
    assert m.corrupted() == []
    assert all(len(b.sha256) == 64 for b in m.blocks)


def test_preparing_twice_reuses_the_cache(tiny_model: Path) -> None:
    m1 = prepare(str(tiny_model))
    stamp = m1.path(m1.blocks[0]).stat().st_mtime_ns
    m2 = prepare(str(tiny_model))
    assert m2.model_hash == m1.model_hash
    assert m2.path(m2.blocks[0]).stat().st_mtime_ns == stamp  # not rewritten


def test_a_corrupted_block_is_detected_reported_and_rebuilt(tiny_model: Path, tmp_path: Path) -> None:
    m = prepare(str(tiny_model))
    path = m.path(m.blocks[2])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"corrupted.*sha256"):
        BlockSpan.load(m, 2, 3)
    assert [e.file for e in m.corrupted()] == [m.blocks[2].file]
    # a peer holding only other blocks is unaffected: it reads only its own files
    BlockSpan.load(m, 0, 2)
    rebuilt = prepare(str(tiny_model))
    assert rebuilt.corrupted() == [] and rebuilt.model_hash == m.model_hash


def test_the_tokenizer_files_are_hashed_like_the_weights(tiny_model: Path) -> None:
    """A client may fetch the tokenizer from the swarm: the manifest (whose hash is the model's
    identity) lists and hashes its files, so a changed one is caught like a changed block."""
    m = prepare(str(tiny_model))
    assert {t.file for t in m.tokenizer} == {"tokenizer.json", "tokenizer_config.json"}
    assert all(sha256_file(m.path(t)) == t.sha256 and m.path(t).stat().st_size == t.bytes for t in m.tokenizer)
    assert m.client_files == (m.client, *m.tokenizer)
    path = m.path(next(t for t in m.tokenizer if t.file == "tokenizer.json"))
    path.write_text(path.read_text().replace('"w42"', '"w24"'))
    assert [e.file for e in m.corrupted()] == ["tokenizer.json"]
    rebuilt = prepare(str(tiny_model))
    assert rebuilt.corrupted() == [] and rebuilt.model_hash == m.model_hash


def test_a_model_prepared_by_another_version_is_prepared_again(tiny_model: Path) -> None:
    m = prepare(str(tiny_model))
    obj = json.loads((m.root / "manifest.json").read_text())
    old = {k: v for k, v in obj.items() if k != "tokenizer"} | {"format": 1}
    (m.root / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(OldFormatError, match=r"another version of swarm.*swarm prepare --force"):
        Manifest.load(m.root)
    assert prepare(str(tiny_model)).model_hash == m.model_hash


@pytest.mark.parametrize("name", ["../evil.json", "manifest.json", "config.json", "sub/tokenizer.json"])
def test_a_manifest_naming_a_bad_tokenizer_file_is_refused(tiny_model: Path, name: str) -> None:
    m = prepare(str(tiny_model))
    obj = m.to_json()
    obj["tokenizer"] = [{"file": name, "sha256": "0" * 64, "bytes": 1}]
    with pytest.raises(ModelError, match="outside its folder|as a tokenizer file"):
        Manifest.from_json(obj, m.root)


def test_a_span_loads_only_its_own_blocks(tiny_model: Path) -> None:
    m = prepare(str(tiny_model))
    span = BlockSpan.load(m, 1, 3)
    assert len(span.layers) == 2
    per_block = sum(v.numel() * v.element_size() for v in load_file(str(m.path(m.blocks[1]))).values())
    assert span.weight_bytes() == 2 * per_block


def test_unknown_models_and_missing_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown model"):
        prepare(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        prepare(str(tmp_path / "empty"))


def test_span_and_head_match_the_whole_model(tiny_model: Path) -> None:
    """Our execution of the blocks against transformers' forward of the whole model."""
    from transformers import AutoModelForCausalLM

    m = prepare(str(tiny_model))
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = [5, 17, 99, 3, 42, 7]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    head = Head.load(m)
    spans = [BlockSpan.load(m, 0, 2), BlockSpan.load(m, 2, m.num_blocks)]
    caches = [s.new_cache() for s in spans]
    # prompt of 4 rows, then one row at a time: both paths through the cache
    got = []
    h = head.embed_ids(ids[:4])
    for s, c in zip(spans, caches):
        h = s.forward(h, 0, c)
    got.append(head.logits(h))
    for pos in range(4, len(ids)):
        h = head.embed_ids([ids[pos]])
        for s, c in zip(spans, caches):
            h = s.forward(h, pos, c)
        got.append(head.logits(h))
    for j, logits in enumerate(got):
        torch.testing.assert_close(logits, want[3 + j], rtol=1e-4, atol=1e-4)


def test_rewinding_a_cache_recomputes_the_same_rows(tiny_model: Path) -> None:
    """A retried or replayed step: the cache is cut back and the rows computed again, identically."""
    from swarm.blocks import rewind

    m = prepare(str(tiny_model))
    span = BlockSpan.load(m, 2, 5)
    cache = span.new_cache()
    x = torch.randn(1, 6, m.hidden_size)
    first = span.forward(x[:, :4], 0, cache)
    step = span.forward(x[:, 4:5], 4, cache)
    assert span.cache_length(cache) == 5
    rewind(cache, 4, span.start)
    assert span.cache_length(cache) == 4
    torch.testing.assert_close(span.forward(x[:, 4:5], 4, cache), step, rtol=0, atol=0)
    rewind(cache, 0, span.start)
    torch.testing.assert_close(span.forward(x[:, :4], 0, cache), first, rtol=0, atol=0)


def test_the_appending_cache_gives_transformers_dynamic_cache_bits(tiny_model: Path) -> None:
    """Peers' caches write each step into spare room (swarm.blocks._growing_layer_class) instead of
    concatenating: through growth past that room, and a rewind, the outputs must be the same bits
    as with transformers' own DynamicCache."""
    from transformers import DynamicCache

    from swarm.blocks import rewind

    m = prepare(str(tiny_model))
    span = BlockSpan.load(m, 0, m.num_blocks)
    ours, theirs = span.new_cache(max_length=100), DynamicCache(config=span.config)
    assert type(ours.layers[0]).__name__ == "GrowingLayer"
    torch.manual_seed(0)
    x = torch.randn(1, 100, m.hidden_size)
    a = [span.forward(x[:, :30], 0, ours)]
    b = [span.forward(x[:, :30], 0, theirs)]
    for pos in range(30, 100):  # one row at a time, past the first room of 64 rows
        if pos == 70:  # a retried step
            rewind(ours, 66, span.start)
            rewind(theirs, 66, span.start)
            a.append(span.forward(x[:, 66:70], 66, ours))
            b.append(span.forward(x[:, 66:70], 66, theirs))
        a.append(span.forward(x[:, pos : pos + 1], pos, ours))
        b.append(span.forward(x[:, pos : pos + 1], pos, theirs))
    assert span.cache_length(ours) == span.cache_length(theirs) == 100
    assert ours.layers[0]._room[0].shape[-2] == 100  # room capped at the session's max_length
    for got, want in zip(a, b):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
