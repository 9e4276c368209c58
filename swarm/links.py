"""Peer-to-peer round trips, sans-IO: what a peer announces of its links, and how a client reads them.

A step handed peer to peer crosses the link between two hops, not the client's links to them, so
the router (swarm/routing.py) prices that crossing with the RTT the sending peer measured: every
gossip exchange is timed on the same connection a push to that peer uses, and each gossip round
also pings the possible follower measured least recently (peers/membership.py). A peer announces
its RTTs to the peers that could follow it on a chain in its signed record, as a field older
peers keep and forward untouched: `links`, a flat list [peer-id prefix, milliseconds, ...],
nearest first. It is a hint, like the peer's announced compute speed: a malformed entry is skipped, and
a peer without one is priced by the client's own RTT, as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

FIELD = "links"
MAX_LINKS = 8  # peers announced; ~22 bytes each in the record
PREFIX = 12  # characters of a peer id: unique among any swarm's peers in practice, and short
MAX_MS = 600_000.0


def could_follow(start: int, end: int, other_start: int, other_end: int) -> bool:
    """Can a route hand a step from a peer serving [start, end) to one serving [other_start,
    other_end)? Only at a boundary j with start < j <= end that the other serves (j < other_end)."""
    return max(start + 1, other_start) <= min(end, other_end - 1)


def announce(start: int, end: int, others: Iterable[tuple[str, int, int]], rtt_ms: Mapping[str, float]) -> list[Any]:
    """The `links` field of the record of a peer serving [start, end): its measured RTTs to the
    peers (id, start, end) that could follow it, nearest first, at most MAX_LINKS."""
    near = sorted((rtt_ms[p], p) for p, s, e in others if p in rtt_ms and could_follow(start, end, s, e))
    out: list[Any] = []
    for ms, p in near[:MAX_LINKS]:
        out += [p[:PREFIX], round(ms, 3)]
    return out


def parse(value: Any, known: Iterable[str]) -> dict[str, float]:
    """A record's `links` field -> {peer id: RTT ms} for the peers among `known` it names
    unambiguously. Whatever is malformed is skipped."""
    if not isinstance(value, list) or len(value) % 2 or len(value) > 2 * MAX_LINKS:
        return {}
    by_prefix: dict[str, list[str]] = {}
    for pid in known:
        by_prefix.setdefault(pid[:PREFIX], []).append(pid)
    out: dict[str, float] = {}
    for prefix, ms in zip(value[::2], value[1::2]):
        if not isinstance(prefix, str) or len(prefix) != PREFIX or type(ms) not in (int, float):
            continue
        if not (math.isfinite(ms) and 0 <= ms <= MAX_MS):
            continue
        ids = by_prefix.get(prefix, [])
        if len(ids) == 1:
            out[ids[0]] = float(ms)
    return out
