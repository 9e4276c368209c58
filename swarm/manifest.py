"""The manifest of a prepared model: its config, its files and each file's sha256.

A prepared model is a folder:

    manifest.json          this record; written last, so a folder without it is unfinished
    config.json            the transformers config (also inside the manifest)
    tokenizer files        as transformers saves them (optional: a model without them is used by
                           token ids); hashed in the manifest like the weights, so a client can
                           fetch them from the swarm and trust them as much as the head
    client.safetensors     embeddings, final norm, LM head: what a client needs
    blocks/NNNNN.safetensors  one file per transformer block, keys relative to the block

The model's identity in the swarm is `model_hash`: the sha256 of the manifest's canonical JSON.
Two peers serve the same model exactly when their hashes agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError

MANIFEST = "manifest.json"
FORMAT = 2  # 2: tokenizer files are listed and hashed
DEFAULT_MODEL = "smollm2-135m"


def swarm_home() -> Path:
    """Where prepared models live: $SWARM_HOME, else ~/.cache/swarm."""
    return Path(os.environ.get("SWARM_HOME") or Path.home() / ".cache" / "swarm")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class OldFormatError(ModelError):
    """A manifest written by another version of swarm: prepare again (or fetch it again)."""


@dataclass(frozen=True)
class FileEntry:
    file: str  # relative to the model folder
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    name: str
    config: dict[str, Any]
    dtype: str
    num_blocks: int
    hidden_size: int
    blocks: tuple[FileEntry, ...]
    client: FileEntry
    source: str
    root: Path  # where it lies on this machine; not part of the hash
    tokenizer: tuple[FileEntry, ...] = ()  # top-level files the tokenizer was saved as

    @property
    def client_files(self) -> tuple[FileEntry, ...]:
        """What a client loads: the embeddings, final norm and head, and the tokenizer."""
        return (self.client, *self.tokenizer)

    @property
    def files(self) -> tuple[FileEntry, ...]:
        return (*self.blocks, *self.client_files)

    @property
    def model_hash(self) -> str:
        return hashlib.sha256(canonical_json(self.to_json())).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "config": self.config,
            "dtype": self.dtype,
            "num_blocks": self.num_blocks,
            "hidden_size": self.hidden_size,
            "blocks": [vars(b) for b in self.blocks],
            "client": vars(self.client),
            "tokenizer": [vars(t) for t in self.tokenizer],
            "source": self.source,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], root: Path) -> "Manifest":
        try:
            if obj["format"] != FORMAT:
                raise OldFormatError(f"the model in {root} was prepared by another version of swarm (manifest format "
                                     f"{obj['format']}, this one reads {FORMAT}); run `swarm prepare --force` again")
            blocks = tuple(FileEntry(**b) for b in obj["blocks"])
            m = cls(
                name=str(obj["name"]),
                config=dict(obj["config"]),
                dtype=str(obj["dtype"]),
                num_blocks=int(obj["num_blocks"]),
                hidden_size=int(obj["hidden_size"]),
                blocks=blocks,
                client=FileEntry(**obj["client"]),
                source=str(obj.get("source", "")),
                root=root,
                tokenizer=tuple(FileEntry(**t) for t in obj["tokenizer"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"manifest in {root} is malformed ({e}); run `swarm prepare` again") from None
        if len(m.blocks) != m.num_blocks:
            raise ModelError(f"manifest in {root} lists {len(m.blocks)} blocks, expected {m.num_blocks}")
        for entry in m.files:
            p = Path(entry.file)
            if p.is_absolute() or ".." in p.parts:
                raise ModelError(f"manifest in {root} names a file outside its folder: {entry.file}")
        for entry in m.tokenizer:
            if "/" in entry.file or "\\" in entry.file or entry.file in (MANIFEST, "config.json", m.client.file):
                raise ModelError(f"manifest in {root} lists {entry.file!r} as a tokenizer file")
        return m

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            raise ModelError(f"no prepared model in {root}; run `swarm prepare` first")
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read {path}: {e}") from None
        return cls.from_json(obj, root)

    def save(self) -> None:
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))
        os.replace(tmp, self.root / MANIFEST)

    def path(self, entry: FileEntry) -> Path:
        return self.root / entry.file

    def check_file(self, entry: FileEntry) -> None:
        """Raise ModelError unless the file exists and matches its sha256."""
        p = self.path(entry)
        if not p.exists():
            raise ModelError(f"{p} is missing; run `swarm prepare` again")
        if p.stat().st_size != entry.bytes or sha256_file(p) != entry.sha256:
            raise ModelError(
                f"{p} is corrupted (its sha256 does not match the manifest); "
                "run `swarm prepare` again to rebuild it"
            )

    def corrupted(self, entries: tuple[FileEntry, ...] | None = None) -> list[FileEntry]:
        """Every file (of `entries`, default all) that is missing or fails its hash."""
        bad = []
        for entry in self.files if entries is None else entries:
            try:
                self.check_file(entry)
            except ModelError:
                bad.append(entry)
        return bad


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
