"""Gossip membership, sans-IO: who is in the swarm and which blocks each peer holds.

Rules of the table (learned from memberlist/SWIM, reshaped for signed records):

* Every peer owns one `PeerRecord`, signs it and bumps its `version` (a millisecond counter that
  only grows) about once a second: the bump is the heartbeat. Only the owner's key can make a
  record for its id, because the peer id *is* the public key.
* Past `capacity()` peers (128 with the defaults: the fresh records a table can take in per
  second) a table could no longer receive every peer's heartbeat in time, so the heartbeat period
  and both timeouts below stretch by `scale()` = n / capacity (memberlist likewise stretches its
  push-pull interval and suspicion timeout with the cluster size): per-peer traffic stays
  bounded whatever n, and small swarms run at the base timings exactly.
* For each peer a table keeps the record that ranks highest by `(version, leaving, signature)`.
  That order is total, so merging is idempotent and independent of arrival order.
* A peer whose version has not grown for `suspect_after` (x scale) seconds (local clock) is
  *suspected*: still listed, no longer offered by `alive()`. After `dead_after` (x scale) it is
  removed and tombstoned at its last version, so stale copies still circulating cannot bring it
  back; a newer version can.
* A `leaving` record removes its peer at once. The signed leave is kept as a tombstone and gossiped
  on, so everyone learns it and nobody resurrects the peer with an older record.
* One exchange is push-pull: the initiator sends its digest (peer id -> version) and a bounded
  batch of rumors (records with news: a new peer, a changed span or load, a leave; each re-sent a
  few times, ~log N, as in memberlist; a bare heartbeat is no rumor, it travels by digest
  comparison alone, so steady-state traffic stays small); the responder answers with the records the initiator lacks and
  the ids it wants itself; the initiator may send those in a one-way `GossipRecords`. Every message
  carries at most `max_records_per_round` records and `max_digest_entries` digest entries, so a
  round costs the same at 1,000 peers as at 100: above the bound the digest covers a rotating
  window of ids `[lo, hi]`.

Time is always an argument (`now`, seconds on the caller's monotonic clock); nothing here reads a
clock, opens a socket or touches asyncio. The asyncio driver feeds messages and time in.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import msgpack

from .errors import ProtocolError
from .identity import PEER_ID_LEN, Identity, public_from_peer_id, verify as verify_signature
from .wire import Message, message

# --- limits on what a record may hold (a record is a few hundred bytes; these keep it so) --------

MAX_ADDRS = 8
MAX_ADDR_LEN = 262  # "[" + 45-char IPv6 literal + "]:" + port, or a 255-char DNS name + port
MAX_NAME_LEN = 128  # model name
MAX_HASH_LEN = 128  # hex of a manifest hash (sha256 = 64, room for sha512)
MAX_TAG_LEN = 16  # dtype and quant names
MAX_BLOCKS = 100_000
MAX_COUNT = 1 << 40  # free cache tokens, sessions
MAX_RATE = 1e9  # tokens/s, ms per block: anything above is nonsense
MAX_VERSION = (1 << 63) - 1
MAX_EXTRA_FIELDS = 16  # unknown fields kept (and signed over) for newer peers
MAX_EXTRA_VALUE = 256  # bytes/characters of one unknown scalar, items of one unknown list
MAX_RECORD_BYTES = 4096  # the canonical encoding of one record
SIGNATURE_LEN = 64

#: quantizations this version knows; a record may name another (a newer peer's), routing decides
KNOWN_QUANTS = ("none", "int8", "nf4")

#: hard caps a message must respect whatever the sender's config (the receiver's protection)
WIRE_MAX_RECORDS = 512
WIRE_MAX_DIGEST = 4096
WIRE_MAX_WANT = 512

# the signature covers this context string too, so a record signature is never valid elsewhere
_SIGN_CONTEXT = b"swarm/peer-record/1\x00"
_HEX = frozenset("0123456789abcdef")
_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


# --- the record ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerRecord:
    """What one peer announces about itself. Signed by the peer; `version` only grows."""

    peer_id: str
    addrs: tuple[str, ...]  # "host:port" where the peer accepts connections, best first
    model: str  # model name, for people
    model_hash: str  # hex hash of the prepared model's manifest: peers must agree on it
    start: int  # first block served
    end: int  # one past the last block served: the span is [start, end)
    dtype: str  # dtype the blocks compute in ("float32", ...)
    quant: str  # "none" | "int8" | "nf4" (see KNOWN_QUANTS)
    throughput: float  # tokens/s the peer measured over its span; 0 when not yet measured
    ms_per_block: float  # announced compute time per block per token, ms (routing's edge cost)
    free_cache: int  # cache tokens still free for new sessions
    sessions: int  # sessions open now
    version: int  # the owner's counter, e.g. its millisecond clock; only grows
    leaving: bool = False  # the peer is shutting down: remove it now
    signature: bytes = b""
    # unknown fields a newer peer sent, kept sorted and forwarded verbatim so its signature holds
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)

    # ---- signing

    def _fields_map(self) -> dict[str, Any]:
        """Wire map of every field but the signature (unknown ones included). Built once per
        record (records are immutable) because gossip re-sends the same record many times."""
        cached = self.__dict__.get("_wire_cache")
        if cached is None:
            cached = {k: v for k, v in self.extra}
            for name in _SIGNED_FIELDS:
                v = getattr(self, name)
                cached[name] = list(v) if isinstance(v, tuple) else v
            object.__setattr__(self, "_wire_cache", cached)  # a cache, not state: frozen holds
        return dict(cached)

    def signed_bytes(self) -> bytes:
        """Canonical bytes the signature covers: msgpack of all fields but the signature, keys
        sorted, floats as float64, behind a context string."""
        cached = self.__dict__.get("_signed_cache")
        if cached is None:
            d = self._fields_map()
            cached = _SIGN_CONTEXT + msgpack.packb({k: d[k] for k in sorted(d)}, use_bin_type=True)
            object.__setattr__(self, "_signed_cache", cached)
        return cached

    def sign(self, identity: Identity) -> "PeerRecord":
        """A copy signed by `identity`, which must own this record's id."""
        if identity.peer_id != self.peer_id:
            raise ValueError("a record can only be signed by the peer it describes")
        unsigned = replace(self, signature=b"")
        return replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))

    def verify(self) -> bool:
        """True when the key behind `peer_id` signed exactly these fields."""
        return len(self.signature) == SIGNATURE_LEN and verify_signature(
            self.peer_id, self.signed_bytes(), self.signature
        )

    # ---- wire

    def to_wire(self) -> dict[str, Any]:
        d = self._fields_map()
        d["signature"] = self.signature
        return d

    @classmethod
    def from_wire(cls, d: Any) -> "PeerRecord":
        """Parse and range-check a record map. Unknown fields are kept; anything missing, mistyped
        or out of range is a ProtocolError naming the field. The signature is *not* checked here."""
        if not isinstance(d, dict):
            raise ProtocolError("peer record: expected a map")
        peer_id = _get(d, "peer_id", str)
        try:
            public_from_peer_id(peer_id)
        except ValueError:
            raise ProtocolError("peer record: malformed peer_id") from None
        addrs = _get(d, "addrs", list)
        if len(addrs) > MAX_ADDRS:
            raise ProtocolError(f"peer record: more than {MAX_ADDRS} addrs")
        for a in addrs:
            _check_addr(a)
        model = _bounded_str(d, "model", MAX_NAME_LEN)
        model_hash = _bounded_str(d, "model_hash", MAX_HASH_LEN)
        if not set(model_hash) <= _HEX:
            raise ProtocolError("peer record: model_hash must be lowercase hex")
        start, end = _get(d, "start", int), _get(d, "end", int)
        if not 0 <= start < end <= MAX_BLOCKS:
            raise ProtocolError(f"peer record: span [{start}, {end}) outside 0 <= start < end <= {MAX_BLOCKS}")
        dtype, quant = _tag(d, "dtype"), _tag(d, "quant")
        throughput, ms_per_block = _rate(d, "throughput"), _rate(d, "ms_per_block")
        free_cache, sessions = _count(d, "free_cache"), _count(d, "sessions")
        version = _get(d, "version", int)
        if not 1 <= version <= MAX_VERSION:
            raise ProtocolError("peer record: version out of range")
        leaving = _get(d, "leaving", bool)
        signature = _get(d, "signature", bytes)
        if len(signature) != SIGNATURE_LEN:
            raise ProtocolError("peer record: signature must be 64 bytes")
        extra = _extras(d)
        rec = cls(peer_id, tuple(addrs), model, model_hash, start, end, dtype, quant, throughput,
                  ms_per_block, free_cache, sessions, version, leaving, bytes(signature), extra)
        if len(rec.signed_bytes()) > MAX_RECORD_BYTES:
            raise ProtocolError(f"peer record: larger than {MAX_RECORD_BYTES} bytes")
        return rec

    @property
    def pinned(self) -> bool:
        """The peer serves a span it was told (`--blocks S:E`) and never moves to fill a gap. Sent
        among the extra fields, so an unpinned record is unchanged and older peers forward it."""
        return dict(self.extra).get("pinned") is True

    def same_content(self, other: "PeerRecord") -> bool:
        """True when the two differ at most in version and signature: a bare heartbeat."""
        return self.extra == other.extra and all(
            getattr(self, name) == getattr(other, name) for name in _CONTENT_FIELDS)

    @property
    def rank(self) -> tuple[int, bool, bytes]:
        """The total order merges keep the maximum of: newer, then leaving, then signature bytes
        (a tie only an equivocating owner can cause, broken the same way everywhere)."""
        return (self.version, self.leaving, self.signature)


_FIELD_NAMES = frozenset(f.name for f in fields(PeerRecord)) - {"extra"}
_SIGNED_FIELDS = tuple(f.name for f in fields(PeerRecord) if f.name not in ("signature", "extra"))
# what a heartbeat leaves alone; a record differing from the held one only outside these (in
# version and signature) is not rumored
_CONTENT_FIELDS = tuple(name for name in _SIGNED_FIELDS if name != "version")



def _get(d: dict, key: str, tp: type) -> Any:
    if key not in d:
        raise ProtocolError(f"peer record: missing field {key!r}")
    v = d[key]
    ok = type(v) is tp if tp in (int, bool) else isinstance(v, (bytes, bytearray) if tp is bytes else tp)
    if not ok:
        raise ProtocolError(f"peer record: field {key!r} must be {tp.__name__}")
    return v


def _bounded_str(d: dict, key: str, n: int) -> str:
    v = _get(d, key, str)
    if len(v) > n:
        raise ProtocolError(f"peer record: field {key!r} longer than {n}")
    return v


def _tag(d: dict, key: str) -> str:
    v = _bounded_str(d, key, MAX_TAG_LEN)
    if not v or not set(v) <= _TAG_CHARS:
        raise ProtocolError(f"peer record: field {key!r} must be a short lowercase name")
    return v


def _rate(d: dict, key: str) -> float:
    v = d.get(key)
    if type(v) not in (int, float):
        raise ProtocolError(f"peer record: field {key!r} must be a number")
    v = float(v)
    if not (math.isfinite(v) and 0.0 <= v <= MAX_RATE):
        raise ProtocolError(f"peer record: field {key!r} must be finite and in [0, {MAX_RATE:g}]")
    return v


def _count(d: dict, key: str) -> int:
    v = _get(d, key, int)
    if not 0 <= v <= MAX_COUNT:
        raise ProtocolError(f"peer record: field {key!r} out of range")
    return v


def _check_addr(a: Any) -> None:
    if not isinstance(a, str) or not 3 <= len(a) <= MAX_ADDR_LEN:
        raise ProtocolError("peer record: an addr must be a 'host:port' string")
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProtocolError(f"peer record: addr {a[:64]!r} is not 'host:port'")


def _scalar_ok(v: Any) -> bool:
    if v is None or type(v) in (bool, int):
        return type(v) is not int or -(1 << 63) <= v < (1 << 64)
    if type(v) is float:
        return True  # msgpack carries nan/inf faithfully; we never interpret unknown fields
    if isinstance(v, (str, bytes)):
        return len(v) <= MAX_EXTRA_VALUE
    return False


def _extras(d: dict) -> tuple[tuple[str, Any], ...]:
    """Unknown fields of a newer peer, kept so they can be verified and forwarded unchanged.
    Only scalars and flat lists of scalars: enough for new announcements, easy to canonicalize."""
    out = []
    for k in sorted(k for k in d if k not in _FIELD_NAMES):
        if not isinstance(k, str) or len(k) > 32:
            raise ProtocolError("peer record: unknown field names must be short strings")
        v = d[k]
        if isinstance(v, list):
            if len(v) > MAX_EXTRA_VALUE or not all(_scalar_ok(x) for x in v):
                raise ProtocolError(f"peer record: unknown field {k!r} holds an unsupported value")
            v = list(bytes(x) if isinstance(x, bytearray) else x for x in v)
        elif not _scalar_ok(v):
            raise ProtocolError(f"peer record: unknown field {k!r} holds an unsupported value")
        out.append((k, v))
    if len(out) > MAX_EXTRA_FIELDS:
        raise ProtocolError(f"peer record: more than {MAX_EXTRA_FIELDS} unknown fields")
    return tuple(out)


# --- the messages of one exchange ----------------------------------------------------------------


def _check_digest(digest: dict, lo: str, hi: str, what: str) -> None:
    if len(digest) > WIRE_MAX_DIGEST:
        raise ProtocolError(f"{what}: digest of {len(digest)} entries exceeds {WIRE_MAX_DIGEST}")
    for k, v in digest.items():
        if not isinstance(k, str) or len(k) != PEER_ID_LEN:
            raise ProtocolError(f"{what}: digest key is not a peer id")
        if type(v) is not int or not -MAX_VERSION <= v <= MAX_VERSION or v == 0:
            raise ProtocolError(f"{what}: digest version out of range")
    if bool(lo) != bool(hi) or len(lo) > PEER_ID_LEN or len(hi) > PEER_ID_LEN:
        raise ProtocolError(f"{what}: digest range must be two peer ids or none")


def _check_records(records: tuple, what: str) -> None:
    if len(records) > WIRE_MAX_RECORDS:
        raise ProtocolError(f"{what}: {len(records)} records exceed {WIRE_MAX_RECORDS}")
    # each record is validated on its own by GossipTable.merge: one bad record does not sink the
    # message, it is dropped and counted


@message
@dataclass(frozen=True)
class GossipPush(Message):
    """Request of one exchange: the initiator's digest (peer id -> version; a negative version -v
    means "I hold a tombstone at v") covering the ids in [lo, hi] (wrapping; both empty = all
    ids), and up to max_records_per_round fresh records it is spreading."""

    TYPE: ClassVar[str] = "gossip_push"
    digest: dict
    records: tuple[dict, ...] = ()
    lo: str = ""
    hi: str = ""

    def __post_init__(self) -> None:
        _check_digest(self.digest, self.lo, self.hi, self.TYPE)
        _check_records(self.records, self.TYPE)


@message
@dataclass(frozen=True)
class GossipReply(Message):
    """Reply: the records the initiator lacks or holds older (plus fresh ones if room), and the
    ids the responder wants from the initiator's digest."""

    TYPE: ClassVar[str] = "gossip_reply"
    records: tuple[dict, ...] = ()
    want: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_records(self.records, self.TYPE)
        if len(self.want) > WIRE_MAX_WANT or any(len(w) != PEER_ID_LEN for w in self.want):
            raise ProtocolError(f"{self.TYPE}: want must be at most {WIRE_MAX_WANT} peer ids")


@message
@dataclass(frozen=True)
class GossipRecords(Message):
    """One-way (id 0) answer to a reply's `want`: the records the responder asked for."""

    TYPE: ClassVar[str] = "gossip_records"
    records: tuple[dict, ...] = ()

    def __post_init__(self) -> None:
        _check_records(self.records, self.TYPE)


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GossipConfig:
    """Timings for a swarm small enough that every table can take in every peer's heartbeat
    (heartbeats every `heartbeat_s`, a gossip round every `round_s`); larger swarms stretch the
    heartbeat and both timeouts by `GossipTable.scale()` (see there)."""

    suspect_after: float = 3.0  # s without a new version before a peer is flagged (3 heartbeats)
    dead_after: float = 6.0  # s without a new version before it is removed: gone everywhere < 10 s
    heartbeat_s: float = 1.0  # base period of our version bumps (the driver's, before scaling)
    round_s: float = 0.5  # the driver's gossip round period
    fanout: int = 2  # exchanges the driver starts per round
    tombstone_ttl: float = 60.0  # s a removed/left peer's last version is remembered
    max_records_per_round: int = 64  # records in one message, whatever the swarm's size
    max_digest_entries: int = 256  # digest entries in one push; above it a rotating window
    retransmit_mult: int = 3  # a fresh record is re-sent mult * ceil(log10(n + 1)) times
    max_rumors: int = 256  # records being spread at once; past it the oldest rumor is dropped
    # (digest comparison still delivers it): keeps a mass join from flooding every round


@dataclass(frozen=True)
class Tombstone:
    version: int
    until: float  # local time it is forgotten
    record: PeerRecord | None  # the signed leave, gossiped on; None for a peer that timed out

    @property
    def rank(self) -> tuple[int, bool, bytes]:
        # a timed-out peer's tombstone outranks any record at its version, never a newer one
        return self.record.rank if self.record is not None else (self.version, True, b"\xff" * 65)


@dataclass(frozen=True)
class MergeResult:
    accepted: tuple[str, ...] = ()  # ids whose record changed (joined or updated)
    removed: tuple[str, ...] = ()  # ids that left
    dropped: Mapping[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def joined_or_changed(self) -> bool:
        return bool(self.accepted or self.removed)


@dataclass(frozen=True)
class ExpireResult:
    suspected: tuple[str, ...] = ()  # newly suspected this call
    removed: tuple[str, ...] = ()  # timed out and tombstoned this call


@dataclass(frozen=True)
class Digest:
    """Peer id -> version (negative: tombstoned at that version), covering ids in [lo, hi]
    (wrapping when lo > hi; everything when both are empty)."""

    versions: Mapping[str, int]
    lo: str = ""
    hi: str = ""

    def covers(self, peer_id: str) -> bool:
        if not self.lo:
            return True
        if self.lo <= self.hi:
            return self.lo <= peer_id <= self.hi
        return peer_id >= self.lo or peer_id <= self.hi


# drop reasons (keys of MergeResult.dropped)
MALFORMED = "malformed"  # did not parse or was out of range
BAD_SIGNATURE = "bad_signature"  # forged, tampered, or signed by a key other than its id's
OLD_VERSION = "old_version"  # older than what we hold (a replay, or news we already had)
DUPLICATE = "duplicate"  # exactly what we hold (normal gossip redundancy)
TOMBSTONED = "tombstoned"  # for a peer that left or timed out, not newer than its tombstone
OWN = "own"  # claims our own id: only we make our record
# "foreign" (signed by a key other than the id's) is indistinguishable from BAD_SIGNATURE, since
# the id *is* the key; finding the real signer would cost a verify per known peer. Counted there.


class GossipTable:
    """One peer's view of the swarm. Feed it records and time; ask it what to send."""

    def __init__(
        self,
        own: str,
        config: GossipConfig | None = None,
        verifier: Callable[[PeerRecord], bool] = PeerRecord.verify,
    ) -> None:
        self.own = own
        self.config = config or GossipConfig()
        self._verify = verifier  # injectable so simulators can share one verify cache
        self._records: dict[str, PeerRecord] = {}  # live and suspected peers, ours included
        self._last_news: dict[str, float] = {}  # local time each peer's version last grew
        self._tombs: dict[str, Tombstone] = {}
        self._suspected: set[str] = set()
        self._rumors: deque[str] = deque()  # ids whose current record we are still spreading
        self._sent: dict[str, int] = {}  # id -> transmissions of its current record
        self._sorted: list[str] | None = None  # digest ids in order, rebuilt on membership change
        self._listed: list[str] | None = None  # listed ids in order, likewise
        self._cursor = 0  # start of the next digest window
        self.dropped_total: Counter[str] = Counter()

    # ---- reading

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._records.get(peer_id)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._records

    def listed_ids(self) -> list[str]:
        """Ids of every listed peer (ours included), sorted; cached until membership changes."""
        if self._listed is None:
            self._listed = sorted(self._records)
        return self._listed

    def records(self) -> list[PeerRecord]:
        """Every listed record, suspected ones included."""
        return list(self._records.values())

    def tombstones(self) -> Mapping[str, Tombstone]:
        return dict(self._tombs)

    def last_news(self, peer_id: str) -> float | None:
        return self._last_news.get(peer_id)

    # ---- timing, scaled with the swarm's size

    def capacity(self) -> float:
        """Fresh records per second one peer can take in with room to spare:
        fanout * max_records_per_round / round_s / 2. A peer pulls at most
        `max_records_per_round` records in the reply to each of its `fanout` pushes per round;
        the one-way `GossipRecords` answering what it wants from the pushes it receives add
        about as many, but a new version typically reaches a table twice in a round (once each
        way), and loss must heal too, so only half the raw rate is counted. (Counting all of it
        saturates the caps at 1,000 peers: ~5% false suspicions in tools/gossip_sim.py; with the
        half, none.) With the defaults: 2 * 64 / 0.5 / 2 = 128 records/s."""
        c = self.config
        return c.fanout * c.max_records_per_round / c.round_s / 2

    def scale(self) -> float:
        """max(1, n / capacity) for the n peers this table lists (ours included). Each table must
        see every peer's version grow within `suspect_after`; n peers beating every
        `heartbeat_s` produce n / heartbeat_s fresh records per second, more than a table can
        take in once n > capacity * heartbeat_s. So past that, heartbeats slow down and the
        timeouts stretch by the same factor: per-peer traffic stays ~capacity records/s whatever
        n, and each peer is still expected to beat suspect_after / heartbeat_s times before it
        is suspected. Up to `capacity` peers (128 with the defaults) nothing changes. Tables of
        one swarm list about the same n, so they agree on the factor; a joiner's table fills
        within a few rounds (unknown peers are pulled first)."""
        return max(1.0, len(self._records) / self.capacity())

    def heartbeat_interval(self, base: float | None = None) -> float:
        """Seconds between our version bumps: `base` (default `config.heartbeat_s`) times
        `scale()`. The driver asks again before every beat, so it follows the swarm's size."""
        return (self.config.heartbeat_s if base is None else base) * self.scale()

    def suspect_timeout(self) -> float:
        """Seconds without a new version before a peer is suspected: suspect_after * scale()."""
        return self.config.suspect_after * self.scale()

    def dead_timeout(self) -> float:
        """Seconds without a new version before a peer is removed: dead_after * scale()."""
        return self.config.dead_after * self.scale()

    def is_suspected(self, peer_id: str, now: float) -> bool:
        if peer_id == self.own or peer_id not in self._records:
            return False
        return now - self._last_news[peer_id] >= self.suspect_timeout()

    def alive(self, now: float) -> list[PeerRecord]:
        """Records routing may use: listed, not suspected, not leaving."""
        suspect = self.suspect_timeout()
        return [
            r for pid, r in self._records.items()
            if not r.leaving and (pid == self.own or now - self._last_news[pid] < suspect)
        ]

    def coverage(self, model_hash: str, n_blocks: int, now: float | None = None) -> list[int]:
        """Replicas per block among peers serving `model_hash` (alive ones when `now` is given)."""
        cov = [0] * n_blocks
        recs = self.alive(now) if now is not None else [r for r in self._records.values() if not r.leaving]
        for r in recs:
            if r.model_hash == model_hash:
                for b in range(max(0, r.start), min(n_blocks, r.end)):
                    cov[b] += 1
        return cov

    def digest(self) -> dict[str, int]:
        """Every id we know -> its version; tombstones as negative versions."""
        d = {pid: r.version for pid, r in self._records.items()}
        for pid, t in self._tombs.items():
            d[pid] = t.version if t.record is not None else -t.version
        return d

    # ---- writing

    def update_own(self, record: PeerRecord, now: float) -> None:
        """Install our own (signed) record; its version must grow. A leaving record stays listed
        as ours so it is gossiped before we go."""
        if record.peer_id != self.own:
            raise ValueError("update_own: record is not for this table's own id")
        cur = self._records.get(self.own)
        if cur is not None and record.version <= cur.version:
            raise ValueError(f"update_own: version {record.version} does not grow past {cur.version}")
        if not self._verify(record):
            raise ValueError("update_own: record is not signed by its owner")
        if cur is None:
            self._sorted = self._listed = None
        self._records[self.own] = record
        self._last_news[self.own] = now
        if cur is None or not record.same_content(cur):
            self._spread(self.own)

    def merge(self, records: Iterable[PeerRecord | dict], now: float) -> MergeResult:
        """Keep, per peer, the highest-ranked valid record; drop the rest and count why.
        Accepts parsed records or wire maps (parsed here, so a malformed one is only counted)."""
        accepted: list[str] = []
        removed: list[str] = []
        dropped: Counter[str] = Counter()
        for item in records:
            reason = self._merge_one(item, now, accepted, removed)
            if reason is not None:
                dropped[reason] += 1
        self.dropped_total.update(dropped)
        return MergeResult(tuple(accepted), tuple(removed), dict(dropped))

    def _merge_one(self, item: PeerRecord | dict, now: float, accepted: list[str],
                   removed: list[str]) -> str | None:
        if isinstance(item, dict):
            # cheap pre-check before parsing: most gossip is news we already hold
            pid, v = item.get("peer_id"), item.get("version")
            if isinstance(pid, str) and type(v) is int:
                held = self._held_rank(pid)
                if held is not None and v < held[0]:
                    return TOMBSTONED if pid in self._tombs else OLD_VERSION
                if held is not None and v == held[0] and item.get("signature") == held[2] \
                        and item.get("leaving") is held[1]:
                    return DUPLICATE
            try:
                rec = PeerRecord.from_wire(item)
            except ProtocolError:
                return MALFORMED
        elif isinstance(item, PeerRecord):
            cur = self._records.get(item.peer_id)
            if item is cur:
                return DUPLICATE  # the very object we hold (in-process simulators share them)
            if cur is not None and item.version < cur.version and item.peer_id != self.own:
                return OLD_VERSION  # the rank check below, without building ranks
            rec = item
        else:
            return MALFORMED
        pid = rec.peer_id
        if pid == self.own:
            return OWN
        held = self._held_rank(pid)
        if held is not None and rec.rank <= held:
            if rec.rank == held:
                return DUPLICATE
            return TOMBSTONED if pid in self._tombs else OLD_VERSION
        if not self._verify(rec):
            return BAD_SIGNATURE
        cur = self._records.get(pid)
        if rec.leaving:
            if cur is not None:
                self._forget(pid)
                removed.append(pid)
            self._tombs[pid] = Tombstone(rec.version, now + self.config.tombstone_ttl, rec)
            self._sorted = self._listed = None
            self._spread(pid)  # a leave must reach everyone
            return None
        if cur is None:
            self._sorted = self._listed = None
        if pid in self._tombs:
            del self._tombs[pid]  # a newer version than the tombstone: the peer is back
        if cur is None or rec.version > cur.version:
            self._last_news[pid] = now
        self._records[pid] = rec
        self._suspected.discard(pid)
        if cur is None or not rec.same_content(cur):
            self._spread(pid)  # news; a bare heartbeat travels by digest comparison only
        accepted.append(pid)
        return None

    def _held_rank(self, pid: str) -> tuple[int, bool, bytes] | None:
        cur = self._records.get(pid)
        if cur is not None:
            return cur.rank
        t = self._tombs.get(pid)
        return t.rank if t is not None else None

    def _forget(self, pid: str) -> None:
        self._records.pop(pid, None)
        self._last_news.pop(pid, None)
        self._suspected.discard(pid)
        self._sorted = self._listed = None

    def expire(self, now: float) -> ExpireResult:
        """Suspect peers silent for suspect_timeout(), remove (and tombstone) those silent for
        dead_timeout() (both scaled with the table's size, fixed for this call), forget
        tombstones past their time. Call it every round."""
        suspected, removed = [], []
        suspect, dead = self.suspect_timeout(), self.dead_timeout()
        for pid in list(self._records):
            if pid == self.own:
                continue
            silent = now - self._last_news[pid]
            if silent >= dead:
                rec = self._records[pid]
                self._forget(pid)
                self._tombs[pid] = Tombstone(rec.version, now + self.config.tombstone_ttl, None)
                removed.append(pid)
            elif silent >= suspect and pid not in self._suspected:
                self._suspected.add(pid)
                suspected.append(pid)
        for pid in [p for p, t in self._tombs.items() if t.until <= now]:
            del self._tombs[pid]
            self._sorted = self._listed = None
        return ExpireResult(tuple(suspected), tuple(removed))

    # ---- what to send

    def _spread(self, pid: str) -> None:
        """(Re)start rumoring `pid`'s current record: fresh news goes to the front."""
        if self._sent.get(pid) is None:
            self._rumors.appendleft(pid)
        self._sent[pid] = 0
        while len(self._rumors) > self.config.max_rumors:
            del self._sent[self._rumors.pop()]

    def _transmit_limit(self) -> int:
        n = len(self._records) + 1
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def _servable(self, pid: str) -> PeerRecord | None:
        r = self._records.get(pid)
        if r is not None:
            return r
        t = self._tombs.get(pid)
        return t.record if t is not None else None

    def take_rumors(self, limit: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[PeerRecord]:
        """Up to `limit` records being spread, freshest first; each counts as one transmission."""
        out: list[PeerRecord] = []
        cap = self._transmit_limit()
        for _ in range(len(self._rumors)):
            if len(out) >= limit:
                break
            pid = self._rumors.popleft()
            rec = self._servable(pid)
            if rec is None:
                self._sent.pop(pid, None)
                continue
            if pid not in exclude:
                out.append(rec)
                self._sent[pid] += 1
            if self._sent[pid] < cap:
                self._rumors.append(pid)
            else:
                del self._sent[pid]
        return out

    def make_digest(self) -> Digest:
        """Our digest, or past max_digest_entries the next window of it (ids in sorted order,
        wrapping), so a full sweep takes ceil(n / max) rounds and a push never grows with n."""
        k = self.config.max_digest_entries
        if len(self._records) + len(self._tombs) <= k:
            return Digest(self.digest())
        ids = self._sorted_ids()
        c = self._cursor % len(ids)
        window = ids[c:c + k] + ids[: max(0, c + k - len(ids))]
        self._cursor = (c + k) % len(ids)
        return Digest({pid: self._digest_version(pid) for pid in window}, window[0], window[-1])

    def _sorted_ids(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted([*self._records, *self._tombs])
        return self._sorted

    def _digest_version(self, pid: str) -> int:
        r = self._records.get(pid)
        if r is not None:
            return r.version
        t = self._tombs[pid]
        return t.version if t.record is not None else -t.version

    def on_digest(self, remote: Digest) -> tuple[list[PeerRecord], list[str]]:
        """Compare a remote digest with ours: (records the remote lacks or holds older, ids we
        want from it), each bounded by max_records_per_round and most-behind first (versions are
        millisecond clocks, so the gap is staleness; a missing peer counts as most behind), so
        no peer's heartbeat is starved by ones that happen to sort first."""
        cap = self.config.max_records_per_round
        send: list[tuple[int, str]] = []
        want: list[tuple[int, str]] = []
        seen = remote.versions
        for pid, dv in seen.items():
            mine = self._servable(pid)
            rv = -dv if dv < 0 else dv
            if mine is not None and mine.version > rv:
                send.append((mine.version - rv, pid))
            elif dv > 0 and pid != self.own:
                held = self._held_rank(pid)
                if held is None:
                    want.append((MAX_VERSION, pid))
                elif held[0] < dv:
                    want.append((dv - held[0], pid))
        for pid in self._ids_covered(remote):
            if pid not in seen and self._servable(pid) is not None:
                send.append((MAX_VERSION, pid))
        top = heapq.nlargest(cap, send) if len(send) > cap else send
        return ([self._servable(pid) for _, pid in top],  # type: ignore[misc]
                [pid for _, pid in (heapq.nlargest(cap, want) if len(want) > cap else want)])

    def _ids_covered(self, remote: Digest) -> Iterable[str]:
        """Our ids inside the remote digest's range (a bisect of our sorted ids for a window)."""
        if not remote.lo:
            return list(self._records) + list(self._tombs)
        ids = self._sorted_ids()
        i, j = bisect.bisect_left(ids, remote.lo), bisect.bisect_right(ids, remote.hi)
        return ids[i:j] if remote.lo <= remote.hi else ids[i:] + ids[:j]

    def records_for(self, ids: Iterable[str]) -> list[PeerRecord]:
        """The records we hold for `ids` (leaves included), at most max_records_per_round."""
        out = []
        for pid in ids:
            r = self._servable(pid)
            if r is not None:
                out.append(r)
                if len(out) >= self.config.max_records_per_round:
                    break
        return out

    # ---- one exchange, as messages (the driver's view)

    def push_contents(self) -> tuple[Digest, list[PeerRecord]]:
        """What a push carries: our digest (window) and the rumors we are spreading."""
        return self.make_digest(), self.take_rumors(self.config.max_records_per_round)

    def answer(self, digest: Digest, records: Iterable[PeerRecord | dict],
               now: float) -> tuple[list[PeerRecord], list[str], MergeResult]:
        """The responder's side of an exchange: merge the pushed records, then (records the
        initiator lacks, topped up with rumors; ids we want)."""
        result = self.merge(records, now)
        send, want = self.on_digest(digest)
        room = self.config.max_records_per_round - len(send)
        if room > 0:
            send += self.take_rumors(room, exclude={r.peer_id for r in send})
        return send, want, result

    def make_push(self, request_id: int) -> GossipPush:
        """Start an exchange with a peer."""
        d, recs = self.push_contents()
        return GossipPush(request_id, dict(d.versions), tuple(r.to_wire() for r in recs), d.lo, d.hi)

    def on_push(self, push: GossipPush, now: float) -> tuple[GossipReply, MergeResult]:
        """Answer a push: merge its records, send what it lacks and ask for what we lack."""
        send, want, result = self.answer(Digest(push.digest, push.lo, push.hi), push.records, now)
        return GossipReply(push.id, tuple(r.to_wire() for r in send), tuple(want)), result

    def on_reply(self, reply: GossipReply, now: float) -> tuple[MergeResult, GossipRecords | None]:
        """Merge a reply; return the one-way GossipRecords to send back when it wanted any."""
        result = self.merge(reply.records, now)
        recs = self.records_for(reply.want)
        follow = GossipRecords(0, tuple(r.to_wire() for r in recs)) if recs else None
        return result, follow

    def on_records(self, msg: GossipRecords, now: float) -> MergeResult:
        return self.merge(msg.records, now)


def choose_gossip_targets(table: GossipTable, rng: random.Random, fanout: int = 3) -> list[str]:
    """Up to `fanout` distinct peers to exchange with this round, uniformly at random among the
    listed ones (suspected included: talking to them is how a false suspicion heals)."""
    ids = [pid for pid in table.listed_ids() if pid != table.own]
    return rng.sample(ids, min(fanout, len(ids)))
