"""`swarm join` without model files: learn the model from the swarm, pick a span, fetch its blocks.

The order of decisions (`plan_join`):

1. The model. A local Hugging Face folder is prepared here, as before. A model *name* (or no
   `--model` at all) is looked up in the swarm: the gossip table, read through `--peer` or mDNS
   within `--discovery-timeout`, says which manifest hash the peers serving that name agree on (the
   hash most of them announce). A local copy under SWARM_HOME/models/<name> with that hash is used
   as is; otherwise the manifest is fetched and accepted only if its sha256 is that hash and its
   preparer's signature verifies. With nobody found, the embedded default model is prepared here
   (it needs no swarm); any other name is an error that says what to do.
2. The span. `--blocks S:E` pins it. Otherwise (`auto`) the budget is `--max-blocks`, else what
   `--max-memory` holds (peers/memory.py), else every block; `peers.selection.choose_span` puts
   that many blocks where the swarm needs them most.
3. The weights. Blocks of the span that are missing or fail their hash are fetched from peers that
   hold them (peers/fetch.py). A peer fetches only its own blocks: never the client's files, which a
   peer does not load.

A client (`swarm generate`, the APIs: `plan_client`) learns a model it does not have the same way,
and fetches the client's files instead (embeddings, final norm and head, tokenizer): a laptop can
use a model it could never hold, as long as the swarm serves it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarm import compute
from swarm.directory import Directory
from swarm.errors import ModelError, SwarmError
from swarm.gossip import PeerRecord
from swarm.identity import Identity
from swarm.manifest import DEFAULT_MODEL, FileEntry, Manifest

from .fetch import FetchConfig, Fetcher, block_holders, fetch_manifest, install_manifest, local_manifest
from .selection import choose_span, holdings

log = logging.getLogger("swarm.join")


@dataclass
class JoinOptions:
    model: str | None  # a local folder, a model name, or None: whatever the swarm serves
    blocks: tuple[int, int] | None = None  # pinned span; None: auto
    max_blocks: int | None = None  # auto: at most this many blocks
    max_memory: int | None = None  # auto: bytes for blocks + cache (peers/memory.py)
    dtype: str = "float32"
    quant: str = "none"
    bootstrap: tuple[str, ...] = ()  # --peer addresses
    mdns: bool = True
    mdns_interfaces: list[str] | None = None
    discovery_timeout: float = 5.0  # seconds to wait for the swarm's table
    swarm_key: Any = None
    fetch: FetchConfig | None = None


@dataclass(frozen=True)
class JoinPlan:
    manifest: Manifest
    span: tuple[int, int]
    budget: int  # blocks this peer may hold (what a move keeps)
    records: tuple[PeerRecord, ...]  # the table as we found it
    fetched_bytes: int = 0


async def discover(opts: JoinOptions) -> list[PeerRecord]:
    """The swarm's live records, read through --peer or mDNS; [] when nobody answers in time."""
    if not opts.bootstrap and not opts.mdns:
        return []
    d = Directory("", tuple(opts.bootstrap), mdns=opts.mdns, swarm_key=opts.swarm_key, mdns_interfaces=opts.mdns_interfaces, refresh_s=1.0)
    await d.start()
    try:
        await d.settle(opts.discovery_timeout)
        return d.all_peers()
    finally:
        await d.stop()


def agreed_hash(records: list[PeerRecord], name: str | None) -> tuple[str, str] | None:
    """(model hash, model name) that most peers serving `name` (any name when None) announce."""
    votes = Counter((r.model_hash, r.model) for r in records if name is None or r.model == name)
    if not votes:
        return None
    return max(votes.items(), key=lambda kv: (kv[1], kv[0]))[0]


async def resolve_manifest(opts: JoinOptions, records: list[PeerRecord], identity: Identity, progress: Callable | None) -> Manifest:
    from swarm.prepare import prepare

    if opts.model is not None and Path(opts.model).expanduser().is_dir():
        return await compute.run(prepare, opts.model, progress)
    if opts.model is not None:
        _check_name(opts.model)
    found = agreed_hash(records, opts.model)
    name = found[1] if found else (opts.model or DEFAULT_MODEL)
    local = local_manifest(name)
    if local is not None and (found is None or local.model_hash == found[0]):
        if name == DEFAULT_MODEL and not _absent(local, local.blocks):
            return await compute.run(prepare, name, progress)  # checks hashes, as always
        return local
    if found is not None:
        data, sig = await fetch_manifest(records, found[0], identity, opts.swarm_key)
        m = install_manifest(data, sig, found[0])
        log.info("manifest of %s (hash %s) from the swarm, prepared by %s", m.name, m.model_hash[:12], sig.signer[:10])
        return m
    if name == DEFAULT_MODEL:
        try:
            return await compute.run(prepare, name, progress)
        except ModelError as e:
            raise SwarmError(f"no swarm found{_where(opts)} and the default model cannot be prepared here ({e})") from None
    raise SwarmError(f"no peer serves model {name!r}{_where(opts)}; pass --peer HOST:PORT of a member, or a local model folder as --model")


def _check_name(model: str) -> None:
    """A --model that is neither a folder here nor a plain name (a path that does not exist, say)."""
    if model in ("", ".", "..") or any(c in model for c in "/\\\x00") or model.startswith("~"):
        raise SwarmError(f"no model folder at {model}, and it is not a model name the swarm could serve")


def _where(opts: JoinOptions) -> str:
    return f" at {', '.join(opts.bootstrap)}" if opts.bootstrap else (" on the LAN" if opts.mdns else " (no --peer and --no-mdns)")


def _absent(m: Manifest, entries: Sequence[FileEntry]) -> list[FileEntry]:
    """Files absent or of the wrong size (a cheap check; the hash comes later)."""
    return [e for e in entries if not m.path(e).exists() or m.path(e).stat().st_size != e.bytes]


def _complete_here(model: str | None) -> bool:
    if model is not None and Path(model).expanduser().is_dir():
        return True
    m = local_manifest(model or DEFAULT_MODEL)
    return m is not None and not _absent(m, m.blocks)


def budget(opts: JoinOptions, m: Manifest) -> int:
    if opts.max_blocks is not None:
        if opts.max_blocks < 1:
            raise SwarmError("--max-blocks must be at least 1")
        return min(opts.max_blocks, m.num_blocks)
    if opts.max_memory is not None:
        from .memory import plan_capacity

        return plan_capacity(opts.max_memory, m, opts.dtype, opts.quant, 0)[0]
    return m.num_blocks


async def fetch_blocks(m: Manifest, span: tuple[int, int], records: list[PeerRecord], identity: Identity, fetch: FetchConfig | None, swarm_key: Any) -> int:
    """Make blocks [start, end) present and valid, fetching what is not; the bytes fetched."""
    return await fetch_files(m, m.blocks[span[0] : span[1]], f"blocks {span[0]}:{span[1]}", records, identity, fetch, swarm_key)


async def fetch_files(m: Manifest, entries: Sequence[FileEntry], what: str, records: list[PeerRecord], identity: Identity, fetch: FetchConfig | None, swarm_key: Any) -> int:
    """Make `entries` of `m` present and valid, fetching what is not; the bytes fetched. `what`
    names them in messages."""
    ours = [r for r in records if r.model_hash == m.model_hash and r.peer_id != identity.peer_id]
    if not ours:
        if _absent(m, entries):
            raise SwarmError(f"{what} of {m.name} are not here and no peer of the swarm serves the model; pass --peer HOST:PORT")
        return 0
    f = Fetcher(m, identity, fetch, swarm_key)
    try:
        stats = await f.fetch(entries, block_holders(m, ours))
    finally:
        await f.close()
    if stats.files:
        log.info("fetched %s: %d file(s), %.1f MB in %.2fs%s", what, stats.files, stats.fetched_bytes / 1e6, stats.seconds,
                 f"; banned {len(stats.banned)} holder(s) for bad data" if stats.banned else "")
    return stats.fetched_bytes


async def plan_join(opts: JoinOptions, progress: Callable | None = None) -> JoinPlan:
    identity = Identity.generate()  # a caller's key for fetching: it proves nothing, needs nothing
    # the table is needed to choose a span, or to fetch what is not here; a pinned span of a
    # model complete here starts without waiting for anyone
    records = [] if (opts.blocks is not None and _complete_here(opts.model)) else await discover(opts)
    if records:
        log.info("found %d peer(s) in the swarm", len(records))
    m = await resolve_manifest(opts, records, identity, progress)
    n = budget(opts, m)
    if opts.blocks is not None:
        span = opts.blocks
        if span[1] > m.num_blocks:
            raise SwarmError(f"--blocks {span[0]}:{span[1]} goes past the model's {m.num_blocks} blocks")
    else:
        span = choose_span(holdings(records, m.model_hash), m.num_blocks, n)
        log.info("auto: blocks %d:%d of %s (%d of %d, coverage %s)", span[0], span[1], m.name, n, m.num_blocks,
                 _cov_text(records, m))
    got = await fetch_blocks(m, span, records, identity, opts.fetch, opts.swarm_key)
    return JoinPlan(m, span, n, tuple(records), got)


async def plan_client(opts: JoinOptions, progress: Callable | None = None) -> Manifest:
    """The model as a client needs it. A local folder, or the embedded default model, is prepared
    here as always; a model whose client files are here and check is used as is; any other (and,
    with no model named, whatever most of the swarm's peers serve) is learned from the swarm like
    a joining peer learns it (`resolve_manifest`), and only its client's files are fetched, each
    checked against the signed manifest."""
    from swarm.prepare import prepare

    name = opts.model
    if name is not None:
        if Path(name).expanduser().is_dir():
            return await compute.run(prepare, name, progress)
        _check_name(name)
        local = local_manifest(name)
        if name == DEFAULT_MODEL and (local is None or not _absent(local, local.blocks)):
            return await compute.run(prepare, name, progress)  # it needs no swarm
        if local is not None and not await compute.run(local.corrupted, local.client_files):
            return local
    records = await discover(opts)
    if records:
        log.info("found %d peer(s) in the swarm", len(records))
    identity = Identity.generate()
    m = await resolve_manifest(opts, records, identity, progress)
    await fetch_files(m, m.client_files, "the client's files (embeddings, head, tokenizer)", records, identity, opts.fetch, opts.swarm_key)
    return m


def _cov_text(records: list[PeerRecord], m: Manifest) -> str:
    from .selection import coverage

    return "".join(str(min(c, 9)) for c in coverage(holdings(records, m.model_hash), m.num_blocks))
