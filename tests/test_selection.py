"""Block selection as pure functions, against exact expected answers; and the manifest signature."""

from __future__ import annotations

import pytest

from peers.selection import Holding, choose_span, coverage, holdings, movers, should_move
from swarm.routing import gaps


def H(pid: str, s: int, e: int, tp: float = 1.0, pinned: bool = False) -> Holding:
    return Holding(pid, s, e, tp, pinned)


def test_empty_swarm_takes_the_first_blocks() -> None:
    assert choose_span([], 30, 10) == (0, 10)
    assert choose_span([], 6, 100) == (0, 6)  # a budget past the model holds the whole model


def test_a_gap_comes_first() -> None:
    assert choose_span([H("a", 0, 2)], 6, 2) == (2, 4)
    assert choose_span([H("a", 0, 2), H("b", 2, 4)], 6, 2) == (4, 6)
    # a gap in the middle: the window covering all of it, not the bigger uncovered tail
    assert choose_span([H("a", 0, 3), H("b", 5, 8)], 8, 2) == (3, 5)
    # more uncovered blocks beat a leftmost window with fewer
    assert choose_span([H("a", 0, 4), H("b", 6, 10)], 10, 3) == (3, 6)


def test_fewest_replicas_then_least_throughput() -> None:
    held = [H("a", 0, 3, 5.0), H("b", 0, 3, 5.0), H("c", 3, 6, 4.0)]
    assert coverage(held, 6) == [2, 2, 2, 1, 1, 1]
    assert choose_span(held, 6, 3) == (3, 6)  # one replica beats two
    # equal replicas: the weakest span wins, and never a window straddling two spans
    held = [H("a", 0, 3, 9.0), H("b", 3, 6, 2.0)]
    assert choose_span(held, 6, 3) == (3, 6)
    held = [H("a", 0, 3, 2.0), H("b", 3, 6, 9.0)]
    assert choose_span(held, 6, 3) == (0, 3)
    assert choose_span([H("a", 0, 3, 1.0), H("b", 3, 6, 1.0)], 6, 3) == (0, 3)  # a full tie: leftmost


def test_three_peers_in_turn_cover_the_model() -> None:
    held: list[Holding] = []
    for pid in "abc":
        s, e = choose_span(held, 6, 2)
        held.append(H(pid, s, e))
    assert [(h.start, h.end) for h in held] == [(0, 2), (2, 4), (4, 6)]
    assert all(coverage(held, 6))
    # a model nobody covers with 30 blocks and budgets of 10, 10, 12
    held = []
    for pid, n in (("a", 10), ("b", 10), ("c", 12)):
        s, e = choose_span(held, 30, n)
        held.append(H(pid, s, e))
    assert [(h.start, h.end) for h in held] == [(0, 10), (10, 20), (18, 30)]


def test_gaps() -> None:
    assert gaps([1, 0, 0, 2, 0]) == [(1, 3), (4, 5)]
    assert gaps([1, 1]) == []


def test_no_move_without_a_gap() -> None:
    held = [H("a", 0, 3), H("b", 0, 3), H("c", 3, 6)]
    assert should_move(held, "a", 6, 3) is None
    assert should_move(held, "b", 6, 3) is None


def test_no_move_that_would_open_a_gap() -> None:
    # blocks 4:6 are uncovered, but a and b each hold blocks nobody else holds
    held = [H("a", 0, 2), H("b", 2, 4)]
    assert movers(held, 6) == []
    assert should_move(held, "a", 6, 2) is None
    assert should_move(held, "b", 6, 2) is None


def test_exactly_one_replica_moves_to_the_gap() -> None:
    # c died: 4:6 uncovered; a and b both hold 0:2 twice over. The slower one moves, alone.
    held = [H("a", 0, 2, 3.0), H("b", 0, 2, 7.0), H("d", 2, 4, 1.0)]
    assert [h.peer_id for h in movers(held, 6)] == ["a", "b"]
    assert should_move(held, "a", 6, 2) == (4, 6)
    assert should_move(held, "b", 6, 2) is None
    assert should_move(held, "d", 6, 2) is None
    # a never moves (pinned, or dead but not yet suspected): b takes over once the gap is older
    assert should_move(held, "b", 6, 2, gap_age=4.9, patience=5.0) is None
    assert should_move(held, "b", 6, 2, gap_age=5.0, patience=5.0) == (4, 6)
    assert should_move(held, "d", 6, 2, gap_age=1e9) is None  # d's blocks are its own: never
    # after a's move the table is settled: nobody moves again (no flapping)
    after = [H("a", 4, 6, 3.0), H("b", 0, 2, 7.0), H("d", 2, 4, 1.0)]
    assert all(should_move(after, p, 6, 2) is None for p in "abd")
    # equal throughput: the smaller id moves
    held = [H("x", 0, 2, 1.0), H("w", 0, 2, 1.0), H("d", 2, 4, 1.0)]
    assert should_move(held, "w", 6, 2) == (4, 6)
    assert should_move(held, "x", 6, 2) is None


def test_pinned_peers_are_not_waited_for() -> None:
    # a (the slower) is pinned with --blocks: b is first in line and moves at once, not 5 s later
    held = [H("a", 0, 2, 3.0, pinned=True), H("b", 0, 2, 7.0), H("d", 2, 4, 1.0)]
    assert [h.peer_id for h in movers(held, 6)] == ["b"]
    assert should_move(held, "b", 6, 2) == (4, 6)
    assert should_move(held, "a", 6, 2, gap_age=1e9) is None
    # from gossip records: the flag comes from PeerRecord.pinned
    from types import SimpleNamespace

    recs = [SimpleNamespace(peer_id="a", start=0, end=2, throughput=3.0, model_hash="m", pinned=True),
            SimpleNamespace(peer_id="b", start=0, end=2, throughput=7.0, model_hash="m", pinned=False)]
    assert [h.pinned for h in holdings(recs, "m")] == [True, False]


def test_a_peer_partly_redundant_does_not_move() -> None:
    # b's 2:4 overlaps a at block 2 only; block 3 is b's alone: b stays even though 4:6 is empty
    held = [H("a", 0, 3), H("b", 2, 4)]
    assert should_move(held, "b", 6, 2) is None


def test_bad_budget() -> None:
    with pytest.raises(ValueError):
        choose_span([], 6, 0)


def test_manifest_signature_checks_hash_and_signer(tiny_model) -> None:
    import hashlib

    from swarm.errors import ModelError
    from swarm.identity import Identity
    from swarm.manifest_sig import ManifestSignature, check_manifest, manifest_bytes, read_signature, verify_bytes
    from swarm.prepare import prepare

    m = prepare(str(tiny_model))
    sig = read_signature(m.root)
    assert sig is not None and verify_bytes(manifest_bytes(m), sig)
    data = manifest_bytes(m)
    check_manifest(data, sig, m.model_hash)
    with pytest.raises(ModelError, match="not the swarm's"):
        check_manifest(data, sig, hashlib.sha256(b"other").hexdigest())
    forged = ManifestSignature(Identity.generate().peer_id, sig.signature)  # someone else claims it
    with pytest.raises(ModelError, match="does not verify"):
        check_manifest(data, forged, m.model_hash)
    tampered = data.replace(b'"dtype":"float32"', b'"dtype":"float16"')
    with pytest.raises(ModelError):
        check_manifest(tampered, sig, hashlib.sha256(tampered).hexdigest())  # a hash that matches, a signature that does not
