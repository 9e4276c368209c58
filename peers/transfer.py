"""Block transfer over the peer protocol: the messages, and the serving side.

A joining peer asks any member for the model's manifest (`GetManifest` -> `ManifestReply`, the
canonical manifest JSON with the preparer's signature), then fetches files in chunks
(`GetChunk` -> `Chunk`) from peers that hold them (peers/fetch.py).

Rules of the serving side:

* Only files the manifest lists (block files, the client file, tokenizer files) are served, and
  only when the file on disk has the manifest's size: a `.part` file or a block we never had is
  `not_found`.
  Nothing outside the model folder can be named (the manifest already refuses `..` and absolute
  paths; the name must also equal a listed entry exactly).
* A chunk is at most MAX_CHUNK bytes (well under the 16 MiB frame limit); `offset` and `length`
  must lie inside the file.
* Reads run off the event loop (a thread), so a transfer never stalls heartbeats or inference.
* The receiver checks each file's sha256 against the signed manifest before using it: a chunk is
  only as trusted as the whole file's hash.

Hidden testing switch: `SWARM_TEST_CORRUPT_CHUNKS=1` in the environment makes this peer flip a
byte in every chunk it serves (the tests' dishonest holder). It is not a flag and not in --help.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from swarm.manifest import Manifest
from swarm.manifest_sig import SIG_FILE, ManifestSignature, manifest_bytes, read_signature
from swarm.wire import Error, Message, message

log = logging.getLogger("swarm.transfer")

CHUNK = 1 << 20  # what fetchers ask for by default: 1 MiB
MAX_CHUNK = 4 << 20  # the most one Chunk may carry (frames are limited to 16 MiB)
CORRUPT_ENV = "SWARM_TEST_CORRUPT_CHUNKS"


@message
@dataclass(frozen=True)
class GetManifest(Message):
    """Ask a peer for the manifest of the model it serves."""

    TYPE: ClassVar[str] = "get_manifest"


@message
@dataclass(frozen=True)
class ManifestReply(Message):
    """The canonical manifest JSON (its sha256 is the model hash) and the preparer's signature."""

    TYPE: ClassVar[str] = "manifest"
    manifest_json: bytes
    signature: bytes
    signer: str


@message
@dataclass(frozen=True)
class GetChunk(Message):
    """Bytes [offset, offset + length) of `file`, a path exactly as the manifest lists it."""

    TYPE: ClassVar[str] = "get_chunk"
    file: str
    offset: int
    length: int


@message
@dataclass(frozen=True)
class Chunk(Message):
    TYPE: ClassVar[str] = "chunk"
    data: bytes


class TransferService:
    """Answers GetManifest and GetChunk for the model a peer serves. `manifest()` is read on every
    request, so a peer that changes what it serves needs no new service."""

    def __init__(self, manifest: Callable[[], Manifest], corrupt: bool | None = None) -> None:
        self._manifest = manifest
        self.corrupt = os.environ.get(CORRUPT_ENV) == "1" if corrupt is None else corrupt
        self.served_bytes = 0

    async def handle(self, msg: Message) -> Message | None:
        """The reply to a transfer message; None if `msg` is not one."""
        if isinstance(msg, GetChunk):
            return await self._chunk(msg)
        if isinstance(msg, GetManifest):
            return self._manifest_reply(msg)
        return None

    def _manifest_reply(self, msg: GetManifest) -> Message:
        m = self._manifest()
        sig: ManifestSignature | None = read_signature(m.root)
        if sig is None:
            return Error(msg.id, "no_signature", f"this peer's model has no {SIG_FILE}; fetch it from another peer")
        return ManifestReply(msg.id, manifest_json=manifest_bytes(m), signature=sig.signature, signer=sig.signer)

    async def _chunk(self, msg: GetChunk) -> Message:
        m = self._manifest()
        entry = next((e for e in m.files if e.file == msg.file), None)
        if entry is None:
            return Error(msg.id, "not_found", f"{msg.file[:200]!r} is not a file of this model")
        if not 0 < msg.length <= MAX_CHUNK:
            return Error(msg.id, "bad_length", f"length must be 1..{MAX_CHUNK}, got {msg.length}")
        if not 0 <= msg.offset < entry.bytes:
            return Error(msg.id, "bad_offset", f"offset {msg.offset} is outside the file's {entry.bytes} bytes")
        path = m.path(entry)
        try:
            data = await asyncio.to_thread(_read_range, path, entry.bytes, msg.offset, min(msg.length, entry.bytes - msg.offset))
        except FileNotFoundError:
            data = None
        if data is None:
            return Error(msg.id, "not_found", f"this peer does not hold {msg.file}")
        if self.corrupt and data:
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        self.served_bytes += len(data)
        return Chunk(msg.id, data=data)


def _read_range(path: os.PathLike[str], size: int, offset: int, length: int) -> bytes | None:
    """Bytes of a complete file (its size as the manifest says), None for a partial one."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            return None
        return os.pread(f.fileno(), length, offset)
