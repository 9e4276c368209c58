"""Peer-to-peer RTTs in records (swarm/links.py): what a peer announces, what a client accepts."""

from __future__ import annotations

import math

from swarm import links

A = "pa" + "a" * 51
B = "pb" + "b" * 51
C = "pc" + "c" * 51
B2 = "pb" + "b" * 10 + "x" * 41  # shares B's 12-character prefix


def test_who_could_follow_a_span() -> None:
    # a hop over [0, 10) hands on at a boundary in 1..10 that the next peer serves
    assert links.could_follow(0, 10, 10, 20)  # the usual chain
    assert links.could_follow(0, 10, 5, 20)  # overlapping: switch at 5..10
    assert links.could_follow(0, 10, 0, 20)  # a replica that also runs further: switch at 1..10
    assert not links.could_follow(0, 10, 11, 20)  # a gap
    assert not links.could_follow(5, 10, 0, 6)  # ends where we would begin handing on
    assert not links.could_follow(0, 10, 0, 1)


def test_announce_names_the_nearest_followers_only() -> None:
    others = [(B, 10, 20), (C, 10, 20), (A, 20, 30)] + [(f"p{i:02d}" + "z" * 50, 10, 30) for i in range(10)]
    rtts = {B: 3.25, C: 1.0, A: 0.5} | {f"p{i:02d}" + "z" * 50: 10.0 + i for i in range(10)}
    field = links.announce(0, 10, others, rtts)
    assert field[:4] == [C[:12], 1.0, B[:12], 3.25]  # nearest first; A cannot follow [0, 10)
    assert len(field) == 2 * links.MAX_LINKS
    assert links.announce(0, 10, [(B, 10, 20)], {}) == []  # never measured: nothing to say


def test_parse_reads_back_what_was_announced_and_skips_the_rest() -> None:
    field = links.announce(0, 10, [(B, 10, 20), (C, 10, 20)], {B: 2.0, C: 4.5})
    assert links.parse(field, [A, B, C]) == {B: 2.0, C: 4.5}
    assert links.parse(field, [A, C]) == {C: 4.5}  # a peer we do not know of
    assert links.parse(field, [A, B, B2, C]) == {C: 4.5}  # an ambiguous prefix names nobody
    for bad in (None, "x", {"a": 1}, [B[:12]], [B[:12], "1"], [B[:12], -1.0], [B[:12], math.inf],
                [B[:11], 1.0], [7, 1.0], [B[:12], True], [B[:12], 1.0] * (links.MAX_LINKS + 1)):
        assert links.parse(bad, [A, B, C]) == {}, bad
    assert links.parse([B[:12], math.nan, C[:12], 1.0], [B, C]) == {C: 1.0}
