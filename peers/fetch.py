"""Fetching a model's manifest and block files from other peers, chunk by chunk.

Trust: a manifest is accepted only if its sha256 is the `model_hash` the swarm announces in its
gossip records and the preparer's signature over it verifies (swarm.manifest_sig). Every file is
then checked against the manifest's sha256 before it is renamed into place; until then it lives
as `<file>.part`, so a peer never loads a file that was not checked.

Rules of the fetcher:

* Resume: a `.part` file is continued from its size, by whichever holder answers (the whole file's
  hash decides at the end, so mixing holders is safe).
* A holder that fails (refused, closed, error reply, or slower than `chunk_timeout` for one
  chunk) is skipped for that file and the next holder continues from the same offset.
* A file whose hash does not match is deleted and fetched again from scratch. If one holder sent
  all of it, that holder is banned for the rest of the fetch; if several did, all of them become
  suspects, tried only after everyone else.
* Files land where `swarm prepare` puts them (SWARM_HOME/models/<name>), so the peer then loads
  them as usual.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarm.directory import split_addr
from swarm.errors import ModelError, SwarmError
from swarm.identity import Identity, short
from swarm.manifest import MANIFEST, FileEntry, Manifest, OldFormatError, sha256_file, swarm_home
from swarm.manifest_sig import ManifestSignature, check_manifest, write_signature
from swarm.transport import Connection

from .transfer import CHUNK, Chunk, GetChunk, GetManifest, ManifestReply

log = logging.getLogger("swarm.fetch")


class FetchError(SwarmError):
    """A file could not be fetched from any holder; the message says which and why."""


@dataclass
class FetchConfig:
    chunk_size: int = CHUNK  # bytes per GetChunk
    chunk_timeout: float = 10.0  # seconds one chunk may take before we try another holder
    connect_timeout: float = 5.0  # seconds for TCP + TLS + handshake
    parallel_files: int = 2  # files fetched at once (each from one holder at a time)
    max_passes: int = 4  # whole-file attempts (after hash mismatches) before giving up
    shuffle: bool = True  # spread files over holders; tests turn it off to pick who goes first
    progress: bool = True  # a tqdm bar on stderr


@dataclass
class FetchStats:
    fetched_bytes: int = 0  # bytes received this run
    resumed_bytes: int = 0  # bytes already in .part files when we started
    present_files: int = 0  # files already complete and valid
    files: int = 0  # files fetched and checked this run
    by_peer: Counter = field(default_factory=Counter)  # peer id -> bytes received
    banned: set[str] = field(default_factory=set)  # holders caught sending a bad file
    suspects: set[str] = field(default_factory=set)
    asked_after_ban: int = 0  # requests sent to a banned holder (should stay 0)
    seconds: float = 0.0


Holders = Callable[[FileEntry], Sequence[Any]]  # PeerRecord-like: .peer_id, .addrs
OnChunk = Callable[[str, FileEntry, int, int], None]  # (peer id, file, offset, length) after each write


class Fetcher:
    """Fetch `entries` of `manifest` into `manifest.root`. Create, `await fetch(...)`, `await close()`."""

    def __init__(self, manifest: Manifest, identity: Identity, config: FetchConfig | None = None, swarm_key: Any = None, on_chunk: OnChunk | None = None) -> None:
        self.manifest = manifest
        self.identity = identity
        self.config = config or FetchConfig()
        self.swarm_key = swarm_key
        self.on_chunk = on_chunk
        self.stats = FetchStats()
        self._conns: dict[str, Connection] = {}
        self._dialing: dict[str, asyncio.Lock] = {}
        self._fails: Counter = Counter()  # peer id -> failures (for ordering)
        self._bar: Any = None

    async def close(self) -> None:
        for c in self._conns.values():
            await c.close()
        self._conns.clear()

    async def fetch(self, entries: Sequence[FileEntry], holders: Holders) -> FetchStats:
        t0 = time.monotonic()
        todo = []
        for e in entries:
            if await asyncio.to_thread(_valid, self.manifest.root / e.file, e):
                self.stats.present_files += 1
            else:
                todo.append(e)
        total = sum(e.bytes for e in todo)
        if self.config.progress and todo:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"fetching {len(todo)} file(s)", unit="B", unit_scale=True, file=sys.stderr, leave=False, dynamic_ncols=True)
        sem = asyncio.Semaphore(max(1, self.config.parallel_files))

        async def one(i: int, e: FileEntry) -> None:
            async with sem:
                await self._fetch_file(i, e, holders)

        try:
            async with asyncio.TaskGroup() as tg:
                for i, e in enumerate(todo):
                    tg.create_task(one(i, e))
        except ExceptionGroup as eg:  # one file's failure ends the fetch: report it plainly
            raise eg.exceptions[0] from None
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    # --- one file ------------------------------------------------------------------------------

    async def _fetch_file(self, index: int, entry: FileEntry, holders: Holders) -> None:
        final = self.manifest.root / entry.file
        part = final.with_name(final.name + ".part")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            final.unlink()  # present but failed its hash (fetch() checked)
        for _ in range(self.config.max_passes):
            contributors = await self._fill(index, entry, part, holders)
            if await asyncio.to_thread(_valid, part, entry):
                os.replace(part, final)
                self.stats.files += 1
                return
            part.unlink(missing_ok=True)
            if len(contributors) == 1:
                (bad,) = contributors
                self.stats.banned.add(bad)
                log.warning("%s sent a corrupted %s (sha256 mismatch): banned for this fetch", short(bad), entry.file)
                await self._drop(bad)
            else:
                self.stats.suspects |= contributors
                log.warning("%s failed its hash; its holders %s are suspects", entry.file, ", ".join(map(short, contributors)))
        raise FetchError(f"{entry.file}: no holder sent a copy matching the manifest's sha256 in {self.config.max_passes} tries")

    async def _fill(self, index: int, entry: FileEntry, part: Path, holders: Holders) -> set[str]:
        """Bring `part` to the file's full size; the holders that sent bytes this pass (a resumed
        prefix counts as from nobody, the hash still covers it)."""
        size = part.stat().st_size if part.exists() else 0
        if size > entry.bytes:
            part.unlink()
            size = 0
        if size:
            self.stats.resumed_bytes += size
            if self._bar is not None:
                self._bar.update(size)
        contributors: set[str] = set()
        failed: set[str] = set()
        part.touch()  # an empty file has no chunk to fetch, yet must exist to be checked
        while size < entry.bytes:
            src = self._pick(index, entry, holders, failed)
            if src is None:
                raise FetchError(
                    f"{entry.file}: no holder left to fetch it from (tried {', '.join(map(short, failed)) or 'none'}; "
                    f"banned {', '.join(map(short, self.stats.banned)) or 'none'})"
                )
            n = min(self.config.chunk_size, entry.bytes - size)
            try:
                data = await self._request_chunk(src, entry.file, size, n)
            except (SwarmError, OSError, asyncio.TimeoutError, ValueError) as e:
                log.info("chunk %s@%d from %s failed (%s); trying another holder", entry.file, size, short(src.peer_id), e)
                failed.add(src.peer_id)
                self._fails[src.peer_id] += 1
                await self._drop(src.peer_id)
                continue
            if len(data) != n:
                log.warning("%s sent %d bytes for a %d-byte chunk: banned", short(src.peer_id), len(data), n)
                self.stats.banned.add(src.peer_id)
                continue
            await asyncio.to_thread(_append, part, data, size)
            contributors.add(src.peer_id)
            self.stats.fetched_bytes += n
            self.stats.by_peer[src.peer_id] += n
            if self._bar is not None:
                self._bar.update(n)
            if self.on_chunk is not None:
                self.on_chunk(src.peer_id, entry, size, n)
            size += n
        return contributors

    def _pick(self, index: int, entry: FileEntry, holders: Holders, failed: set[str]) -> Any | None:
        cands = [h for h in holders(entry) if h.peer_id not in failed and h.peer_id not in self.stats.banned and h.peer_id != self.identity.peer_id]
        if not cands:
            return None
        if self.config.shuffle:
            k = index % len(cands)  # spread files over holders, deterministically per file
            cands = cands[k:] + cands[:k]
        order = {h.peer_id: i for i, h in enumerate(cands)}
        return min(cands, key=lambda h: (h.peer_id in self.stats.suspects, self._fails[h.peer_id], order[h.peer_id]))

    async def _request_chunk(self, src: Any, file: str, offset: int, length: int) -> bytes:
        if src.peer_id in self.stats.banned:
            self.stats.asked_after_ban += 1
        conn = await self._conn(src)
        reply = await conn.request(lambda rid: GetChunk(rid, file, offset, length), timeout=self.config.chunk_timeout)
        if not isinstance(reply, Chunk):
            raise SwarmError(f"expected a chunk, got {reply.TYPE}")
        return reply.data

    async def _conn(self, src: Any) -> Connection:
        """One connection per holder, shared by the files fetched at once (a lock, so two files
        starting together do not both dial and leave one connection open)."""
        async with self._dialing.setdefault(src.peer_id, asyncio.Lock()):
            c = self._conns.get(src.peer_id)
            if c is not None and not c.closed:
                return c
            c = await open_to(src, self.identity, self.swarm_key, self.config.connect_timeout)
            self._conns[src.peer_id] = c
            return c

    async def _drop(self, peer_id: str) -> None:
        c = self._conns.pop(peer_id, None)
        if c is not None:
            await c.close()


async def open_to(rec: Any, identity: Identity, swarm_key: Any, timeout: float) -> Connection:
    """A connection to a peer by its record (tries each announced address)."""
    last: Exception | None = None
    for addr in rec.addrs[:4]:
        try:
            host, port = split_addr(addr)
            return await Connection.open(host, port, identity, rec.peer_id, swarm_key, timeout)
        except (SwarmError, OSError, ValueError) as e:
            last = e
    raise SwarmError(f"cannot reach {short(rec.peer_id)}: {last}")


def _valid(path: Path, entry: FileEntry) -> bool:
    return path.exists() and path.stat().st_size == entry.bytes and sha256_file(path) == entry.sha256


def _append(part: Path, data: bytes, offset: int) -> None:
    with open(part, "r+b" if part.exists() else "wb") as f:
        f.truncate(offset)  # what a crashed writer left past `offset` is not trusted
        f.seek(offset)
        f.write(data)


# --- the manifest ----------------------------------------------------------------------------------


def block_holders(manifest: Manifest, records: Sequence[Any]) -> Holders:
    """For a block file: the peers whose announced span holds it, then (as a fallback, since a
    peer serves any complete file it has) every other peer of the model. For the client file:
    every peer of the model."""
    index = {e.file: i for i, e in enumerate(manifest.blocks)}

    def holders(entry: FileEntry) -> list[Any]:
        recs = [r for r in records if r.model_hash == manifest.model_hash]
        b = index.get(entry.file)
        if b is None:
            return recs
        first = [r for r in recs if r.start <= b < r.end]
        return first + [r for r in recs if not r.start <= b < r.end]

    return holders


async def fetch_manifest(records: Sequence[Any], model_hash: str, identity: Identity, swarm_key: Any = None, timeout: float = 10.0) -> tuple[bytes, ManifestSignature]:
    """The manifest bytes and signature from the first peer (of `model_hash`) whose copy checks."""
    errors = []
    for rec in [r for r in records if r.model_hash == model_hash]:
        try:
            conn = await open_to(rec, identity, swarm_key, timeout)
            try:
                reply = await conn.request(lambda rid: GetManifest(rid), timeout=timeout)
            finally:
                await conn.close()
            if not isinstance(reply, ManifestReply):
                raise SwarmError(f"expected a manifest, got {reply.TYPE}")
            sig = ManifestSignature(reply.signer, reply.signature)
            check_manifest(reply.manifest_json, sig, model_hash)
            return reply.manifest_json, sig
        except SwarmError as e:
            errors.append(f"{short(rec.peer_id)}: {e}")
    raise FetchError(f"no peer gave a manifest matching the swarm's hash {model_hash[:12]}: " + "; ".join(errors or ["no peer serves it"]))


def install_manifest(data: bytes, sig: ManifestSignature, model_hash: str, home: Path | None = None) -> Manifest:
    """Write a checked manifest (and its signature and config.json) into SWARM_HOME/models/<name>."""
    check_manifest(data, sig, model_hash)
    try:
        obj = json.loads(data)
        name = str(obj["name"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"the swarm's manifest is malformed ({e})") from None
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or len(name) > 128:
        raise ModelError(f"the swarm's manifest names the model {name[:40]!r}, which is not a safe folder name")
    root = (home or swarm_home()) / "models" / name
    root.mkdir(parents=True, exist_ok=True)
    m = Manifest.from_json(obj, root)
    if m.model_hash != model_hash:  # the JSON round trip must not change a byte of what is hashed
        raise ModelError("the manifest does not survive a round trip unchanged; refusing it")
    (root / "config.json").write_text(json.dumps(m.config, indent=1, sort_keys=True))
    write_signature(root, sig)
    m.save()
    return Manifest.load(root)


def local_manifest(name: str, home: Path | None = None) -> Manifest | None:
    """The manifest under SWARM_HOME/models/<name>; None when there is none, or when another
    version of swarm wrote it (the swarm's is fetched again, and files that fail it refetched)."""
    root = (home or swarm_home()) / "models" / name
    try:
        return Manifest.load(root) if (root / MANIFEST).exists() else None
    except OldFormatError:
        return None

