"""The gossip core driven with values and a fake clock: no sockets, no sleeps."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm import wire
from swarm.errors import ProtocolError
from swarm.gossip import (
    BAD_SIGNATURE,
    DUPLICATE,
    MALFORMED,
    OLD_VERSION,
    OWN,
    TOMBSTONED,
    Digest,
    GossipConfig,
    GossipPush,
    GossipReply,
    GossipTable,
    PeerRecord,
    choose_gossip_targets,
)
from swarm.identity import Identity

IDS = [Identity.generate() for _ in range(4)]
HASH = "ab" * 32


def rec(ident: Identity, version: int, *, leaving: bool = False, start: int = 0, end: int = 10,
        **kw: object) -> PeerRecord:
    r = PeerRecord(
        peer_id=ident.peer_id, addrs=("127.0.0.1:7000",), model="smollm2-135m", model_hash=HASH,
        start=start, end=end, dtype="float32", quant="none", throughput=15.0, ms_per_block=1.5,
        free_cache=4096, sessions=0, version=version, leaving=leaving,
    )
    return replace(r, **kw).sign(ident)  # type: ignore[arg-type]


def state(t: GossipTable) -> tuple:
    """Everything observable about a table's membership."""
    return (
        {p: r for p, r in sorted((r.peer_id, r) for r in t.records())},
        {p: t.last_news(p) for p in sorted(r.peer_id for r in t.records())},
        dict(sorted(t.tombstones().items())),
    )


# --- records ------------------------------------------------------------------------------------


def test_sign_verify_roundtrip_through_msgpack() -> None:
    r = rec(IDS[0], 5)
    assert r.verify()
    d = msgpack.unpackb(msgpack.packb(r.to_wire(), use_bin_type=True), raw=False)
    r2 = PeerRecord.from_wire(d)
    assert r2 == r and r2.verify()


def test_tampered_field_fails_verify() -> None:
    r = rec(IDS[0], 5)
    assert not replace(r, end=30).verify()
    assert not replace(r, peer_id=IDS[1].peer_id).verify()  # someone else's id


def test_unknown_fields_are_kept_signed_and_forwarded() -> None:
    # a newer peer's record with a field we do not know still verifies and survives a re-encode
    base = rec(IDS[0], 5).to_wire()
    base["gpu"] = "h100"
    base["signature"] = b""
    unsigned = PeerRecord.from_wire({**base, "signature": b"\0" * 64})
    signed = unsigned.sign(IDS[0])
    wire_form = signed.to_wire()
    assert wire_form["gpu"] == "h100"
    again = PeerRecord.from_wire(msgpack.unpackb(msgpack.packb(wire_form, use_bin_type=True), raw=False))
    assert again.verify()
    assert not PeerRecord.from_wire({**wire_form, "gpu": "a100"}).verify()


def test_pinned_travels_signed_among_the_extra_fields() -> None:
    assert not rec(IDS[0], 5).pinned  # an unpinned record carries nothing new
    pinned = rec(IDS[0], 5, extra=(("pinned", True),))
    again = PeerRecord.from_wire(msgpack.unpackb(msgpack.packb(pinned.to_wire(), use_bin_type=True), raw=False))
    assert again.verify() and again.pinned
    assert not PeerRecord.from_wire({**pinned.to_wire(), "pinned": False}).verify()  # nobody can unpin it
    assert not replace(rec(IDS[0], 5), extra=(("pinned", "yes"),)).pinned  # only a true boolean pins


@pytest.mark.parametrize(
    "field,value",
    [
        ("peer_id", "pnotanid"),
        ("addrs", ["127.0.0.1:1"] * 9),
        ("addrs", ["no-port"]),
        ("addrs", ["h:70000"]),
        ("model", "m" * 129),
        ("model_hash", "XYZ"),
        ("start", -1),
        ("end", 0),
        ("end", 100_001),
        ("start", 1.5),
        ("dtype", ""),
        ("quant", "NF4!"),
        ("throughput", float("nan")),
        ("ms_per_block", float("inf")),
        ("throughput", -1.0),
        ("free_cache", -1),
        ("sessions", True),
        ("version", 0),
        ("version", 1 << 63),
        ("leaving", 1),
        ("signature", b"short"),
        ("signature", "text"),
    ],
)
def test_from_wire_rejects_bad_fields(field: str, value: object) -> None:
    d = rec(IDS[0], 5).to_wire()
    d[field] = value
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire(d)


def test_from_wire_rejects_missing_field_and_non_map() -> None:
    d = rec(IDS[0], 5).to_wire()
    del d["end"]
    with pytest.raises(ProtocolError, match="end"):
        PeerRecord.from_wire(d)
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire([1, 2])


def test_sign_refuses_other_identity() -> None:
    r = rec(IDS[0], 5)
    with pytest.raises(ValueError):
        r.sign(IDS[1])


# --- merge --------------------------------------------------------------------------------------

# a pool covering every interesting case: versions, leaves, an equivocation, forgeries
POOL: list[PeerRecord | dict] = []
for _i in IDS[1:]:
    for _v in (1, 2, 3):
        POOL.append(rec(_i, _v))
    POOL.append(rec(_i, 2, leaving=True))
POOL.append(rec(IDS[1], 3, end=20))  # same version, different content: equivocation
POOL.append(replace(rec(IDS[2], 9), end=30))  # tampered after signing
POOL.append(replace(rec(IDS[3], 9), peer_id=IDS[2].peer_id))  # someone else's id
POOL.append({"peer_id": IDS[1].peer_id, "version": 99})  # malformed
POOL.append(rec(IDS[0], 7))  # the table owner's own id


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(POOL) - 1), max_size=30), st.randoms(use_true_random=False))
def test_merge_is_idempotent_and_order_independent(picks: list[int], rnd: random.Random) -> None:
    items = [POOL[i] for i in picks]
    a = GossipTable(IDS[0].peer_id)
    a.merge(items, now=1.0)
    once = state(a)
    a.merge(items, now=1.0)
    assert state(a) == once  # idempotent
    shuffled = items[:]
    rnd.shuffle(shuffled)
    b = GossipTable(IDS[0].peer_id)
    cut = rnd.randint(0, len(shuffled))
    b.merge(shuffled[:cut], now=1.0)  # in two batches, another order
    b.merge(shuffled[cut:], now=1.0)
    assert state(b) == once


def test_version_only_grows() -> None:
    t = GossipTable(IDS[0].peer_id)
    assert t.merge([rec(IDS[1], 5)], 0.0).accepted == (IDS[1].peer_id,)
    res = t.merge([rec(IDS[1], 4)], 1.0)  # a replayed old version
    assert res.dropped == {OLD_VERSION: 1}
    assert t.get(IDS[1].peer_id).version == 5  # type: ignore[union-attr]
    assert t.last_news(IDS[1].peer_id) == 0.0  # an old record is no news
    assert t.merge([rec(IDS[1], 5)], 2.0).dropped == {DUPLICATE: 1}
    assert t.last_news(IDS[1].peer_id) == 0.0
    t.merge([rec(IDS[1], 6)], 3.0)
    assert t.get(IDS[1].peer_id).version == 6 and t.last_news(IDS[1].peer_id) == 3.0  # type: ignore[union-attr]


def test_forged_records_are_dropped_and_counted() -> None:
    t = GossipTable(IDS[0].peer_id)
    good = rec(IDS[1], 5)
    tampered = replace(good, start=3).to_wire()  # valid fields, signature no longer matches
    stolen = replace(rec(IDS[2], 5), peer_id=IDS[1].peer_id).to_wire()  # IDS[2] claims IDS[1]
    stolen["version"] = 6
    malformed = {**good.to_wire(), "end": "ten", "version": 7}
    own = rec(IDS[0], 9)
    res = t.merge([tampered, stolen, malformed, own], 0.0)
    assert res.accepted == ()
    assert res.dropped == {BAD_SIGNATURE: 2, MALFORMED: 1, OWN: 1}
    assert IDS[1].peer_id not in t
    t.merge([good], 0.0)
    assert t.merge([rec(IDS[1], 2)], 0.0).dropped == {OLD_VERSION: 1}
    assert t.dropped_total[BAD_SIGNATURE] == 2


def test_leave_removes_at_once_and_tombstone_blocks_resurrection() -> None:
    cfg = GossipConfig(tombstone_ttl=30.0)
    t = GossipTable(IDS[0].peer_id, cfg)
    t.merge([rec(IDS[1], 5)], 0.0)
    res = t.merge([rec(IDS[1], 6, leaving=True)], 1.0)
    assert res.removed == (IDS[1].peer_id,)
    assert IDS[1].peer_id not in t and t.alive(1.0) == []
    assert t.merge([rec(IDS[1], 5)], 2.0).dropped == {TOMBSTONED: 1}  # old copies still circulating
    assert IDS[1].peer_id not in t
    assert t.digest()[IDS[1].peer_id] == 6  # the signed leave is gossiped on
    assert [r.leaving for r in t.records_for([IDS[1].peer_id])] == [True]
    t.expire(32.0)  # tombstone forgotten after its ttl
    assert IDS[1].peer_id not in t.digest()
    # a newer version is a genuine return
    t2 = GossipTable(IDS[0].peer_id, cfg)
    t2.merge([rec(IDS[1], 6, leaving=True)], 0.0)
    assert t2.merge([rec(IDS[1], 7)], 1.0).accepted == (IDS[1].peer_id,)
    assert IDS[1].peer_id not in t2.tombstones()


def test_expiry_follows_given_clock() -> None:
    cfg = GossipConfig(suspect_after=3.0, dead_after=6.0, tombstone_ttl=60.0)
    t = GossipTable(IDS[0].peer_id, cfg)
    t.update_own(rec(IDS[0], 1), 0.0)
    t.merge([rec(IDS[1], 1), rec(IDS[2], 1)], 0.0)
    assert t.expire(2.9).suspected == ()
    t.merge([rec(IDS[2], 2)], 2.0)  # IDS[2] keeps heartbeating
    r = t.expire(3.0)
    assert r.suspected == (IDS[1].peer_id,) and r.removed == ()
    assert IDS[1].peer_id in t and t.is_suspected(IDS[1].peer_id, 3.0)
    assert {x.peer_id for x in t.alive(3.0)} == {IDS[0].peer_id, IDS[2].peer_id}
    assert t.expire(3.5).suspected == ()  # reported once
    r = t.expire(6.0)
    assert r.removed == (IDS[1].peer_id,) and IDS[1].peer_id not in t
    assert t.digest()[IDS[1].peer_id] == -1  # tombstone, not servable
    assert t.merge([rec(IDS[1], 1)], 6.5).dropped == {TOMBSTONED: 1}
    assert t.records_for([IDS[1].peer_id]) == []
    assert t.expire(100.0).removed == (IDS[2].peer_id,)  # own record never expires
    assert IDS[0].peer_id in t


def test_timing_is_unchanged_up_to_capacity() -> None:
    # capacity = fanout * max_records_per_round / round_s / 2 = 2 * 64 / 0.5 / 2 = 128 records/s
    t = GossipTable(IDS[0].peer_id)
    assert t.capacity() == 128.0
    t.update_own(rec(IDS[0], 1), 0.0)
    t.merge([rec(i, 1) for i in IDS[1:]], 0.0)
    assert t.scale() == 1.0
    assert (t.heartbeat_interval(), t.suspect_timeout(), t.dead_timeout()) == (1.0, 3.0, 6.0)
    assert t.heartbeat_interval(2.0) == 2.0
    assert GossipTable("x", GossipConfig(fanout=3, round_s=0.25)).capacity() == 384.0


def test_timing_scales_with_table_size() -> None:
    # capacity 2 * 4 / 0.5 / 2 = 8 records/s
    cfg = GossipConfig(max_records_per_round=4, fanout=2, round_s=0.5, heartbeat_s=1.0,
                       suspect_after=3.0, dead_after=6.0)
    t = GossipTable(IDS[0].peer_id, cfg)
    assert t.capacity() == 8.0
    assert t.scale() == 1.0  # empty table
    others = [Identity.generate() for _ in range(11)]
    t.update_own(rec(IDS[0], 1), 0.0)
    t.merge([rec(i, 1) for i in others[:7]], 0.0)  # 8 listed: still exactly capacity
    assert (t.scale(), t.heartbeat_interval(), t.suspect_timeout(), t.dead_timeout()) == (1.0, 1.0, 3.0, 6.0)
    t.merge([rec(i, 1) for i in others[7:]], 0.0)  # 12 listed: 12 / 8
    assert t.scale() == 1.5
    assert (t.heartbeat_interval(), t.heartbeat_interval(2.0)) == (1.5, 3.0)
    assert (t.suspect_timeout(), t.dead_timeout()) == (4.5, 9.0)
    silent, beating = others[0], others[1:]
    assert t.expire(4.4).suspected == ()  # 3.0 would have flagged all of them
    t.merge([rec(i, 2) for i in beating], 4.0)
    r = t.expire(4.5)
    assert r.suspected == (silent.peer_id,) and r.removed == ()
    assert t.is_suspected(silent.peer_id, 4.5) and not t.is_suspected(silent.peer_id, 4.4)
    assert silent.peer_id not in {x.peer_id for x in t.alive(4.5)} and len(t.alive(4.5)) == 11
    t.merge([rec(i, 3) for i in beating], 8.0)
    assert t.expire(8.9).removed == ()  # 6.0 would have removed it
    assert t.expire(9.0).removed == (silent.peer_id,)
    assert t.scale() == 11 / 8 and t.dead_timeout() == 6.0 * 11 / 8
    # 1,000 peers with the defaults (fake signatures keep it cheap): heartbeat every 1000/128 s
    big = GossipTable(IDS[0].peer_id, verifier=lambda r: True)
    big.merge([replace(rec(IDS[1], 1), peer_id=Identity.generate().peer_id) for _ in range(1000)], 0.0)
    assert len(big) == 1000 and big.heartbeat_interval() == 1000 / 128
    assert (big.suspect_timeout(), big.dead_timeout()) == (3 * 1000 / 128, 6 * 1000 / 128)


def test_membership_table_follows_driver_timings() -> None:
    from peers.membership import Membership, MembershipConfig

    m = Membership(IDS[0], dict, MembershipConfig(heartbeat_s=2.0, round_s=0.25, fanout=3, mdns=False))
    assert m.table.capacity() == 3 * 64 / 0.25 / 2 and m.table.heartbeat_interval() == 2.0


def test_update_own_requires_growth_and_signature() -> None:
    t = GossipTable(IDS[0].peer_id)
    t.update_own(rec(IDS[0], 2), 0.0)
    with pytest.raises(ValueError):
        t.update_own(rec(IDS[0], 2), 0.0)
    with pytest.raises(ValueError):
        t.update_own(rec(IDS[1], 3), 0.0)
    with pytest.raises(ValueError):
        t.update_own(replace(rec(IDS[0], 3), end=20), 0.0)


def test_coverage_counts_alive_replicas() -> None:
    t = GossipTable(IDS[0].peer_id)
    t.update_own(rec(IDS[0], 1, start=0, end=10), 0.0)
    t.merge([rec(IDS[1], 1, start=5, end=30), rec(IDS[2], 1, start=20, end=40),
             rec(IDS[3], 1, model_hash="cd" * 32)], 0.0)
    cov = t.coverage(HASH, 30)
    assert cov[:5] == [1] * 5 and cov[5:10] == [2] * 5 and cov[10:20] == [1] * 10 and cov[20:] == [2] * 10
    assert t.coverage(HASH, 30, now=10.0) == [1] * 10 + [0] * 20  # only ours is not suspected


# --- exchange -----------------------------------------------------------------------------------


def exchange(a: GossipTable, b: GossipTable, now: float) -> int:
    """One push-pull round a -> b through the real codec; returns the bytes on the wire."""
    push = a.make_push(1)
    f1 = wire.encode(push)
    push2 = wire.decode_body(f1[4:])
    assert isinstance(push2, GossipPush)
    reply, _ = b.on_push(push2, now)
    f2 = wire.encode(reply)
    reply2 = wire.decode_body(f2[4:])
    assert isinstance(reply2, GossipReply)
    _, follow = a.on_reply(reply2, now)
    n = len(f1) + len(f2)
    if follow is not None:
        f3 = wire.encode(follow)
        b.on_records(wire.decode_body(f3[4:]), now)  # type: ignore[arg-type]
        n += len(f3)
    return n


def test_digest_exchange_converges_both_ways() -> None:
    a, b = GossipTable(IDS[0].peer_id), GossipTable(IDS[1].peer_id)
    a.update_own(rec(IDS[0], 1), 0.0)
    b.update_own(rec(IDS[1], 1), 0.0)
    a.merge([rec(IDS[2], 4)], 0.0)
    b.merge([rec(IDS[2], 5), rec(IDS[3], 1)], 0.0)
    exchange(a, b, 0.5)
    assert a.digest() == b.digest()
    assert a.get(IDS[2].peer_id).version == 5  # type: ignore[union-attr]
    # nothing new: the next exchange carries no records the other side lacks
    send, want = b.on_digest(a.make_digest())
    assert send == [] and want == []


def test_records_per_round_bound_and_digest_window() -> None:
    cfg = GossipConfig(max_records_per_round=8, max_digest_entries=16)
    many = [Identity.generate() for _ in range(40)]
    a = GossipTable(IDS[0].peer_id, cfg)
    a.merge([rec(i, 1) for i in many], 0.0)
    b = GossipTable(IDS[1].peer_id, cfg)
    push = a.make_push(1)
    assert len(push.records) <= 8 and len(push.digest) <= 16 and push.lo and push.hi
    reply, _ = b.on_push(push, 0.0)
    assert len(reply.records) <= 8 and len(reply.want) <= 8
    # the window rotates: a sweep of ceil(40/16) pushes covers every id
    seen: set[str] = set()
    for _ in range(math.ceil(41 / 16)):
        seen |= set(a.make_digest().versions)
    assert seen == set(a.digest())
    # and repeated exchanges still converge under the bound
    for r in range(30):
        exchange(a, b, 1.0)
        exchange(b, a, 1.0)
        if a.digest().keys() - {IDS[1].peer_id} == b.digest().keys() - {IDS[0].peer_id}:
            break
    assert set(b.digest()) >= {i.peer_id for i in many}


def test_window_digest_reveals_what_initiator_lacks() -> None:
    d = Digest({"b": 1}, lo="a", hi="c")
    assert d.covers("a") and d.covers("bz") and not d.covers("d")
    wrap = Digest({}, lo="x", hi="c")
    assert wrap.covers("z") and wrap.covers("a") and not wrap.covers("m")


def test_push_message_validates_sizes() -> None:
    body = GossipPush(1, {}).to_wire()
    body["digest"] = {"x": 1}
    with pytest.raises(ProtocolError):
        GossipPush.from_wire(body)
    body["digest"] = {IDS[0].peer_id: 0}
    with pytest.raises(ProtocolError):
        GossipPush.from_wire(body)
    with pytest.raises(ProtocolError):
        GossipReply.from_wire({"t": "gossip_reply", "id": 1, "records": [{}] * 513})
    with pytest.raises(ProtocolError):
        GossipReply.from_wire({"t": "gossip_reply", "id": 1, "want": ["short"]})


def test_choose_targets_excludes_self_and_is_seeded() -> None:
    t = GossipTable(IDS[0].peer_id)
    t.update_own(rec(IDS[0], 1), 0.0)
    t.merge([rec(i, 1) for i in IDS[1:]], 0.0)
    got = choose_gossip_targets(t, random.Random(1), fanout=2)
    assert len(got) == 2 and IDS[0].peer_id not in got
    assert got == choose_gossip_targets(t, random.Random(1), fanout=2)
    assert len(choose_gossip_targets(t, random.Random(1), fanout=10)) == 3
