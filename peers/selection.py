"""Block selection, pure: which span a peer should serve, and when it should move. No I/O.

The input is what the gossip table says about our model: one `Holding` per peer (its span and
its measured throughput). Rules:

* `choose_span`: of every window of `n` consecutive blocks, take the one whose per-block replica
  counts, sorted ascending, are lexicographically smallest (so a window covering more uncovered
  blocks always wins: a gap first), then the one whose sorted per-block throughputs are smallest
  (the least served blocks), then the leftmost. Comparing sorted vectors, as Petals does with
  throughputs, makes a window inside one weak span beat a window straddling it and a stronger one.
* `should_move` (hysteresis, so peers do not flap): a move happens only when some block is
  uncovered, and only by a peer whose every block has at least `min_replicas` (2) replicas, so
  leaving creates no new gap. Such peers are ranked by least throughput, then smallest id; every
  peer computes the same ranking from the same table, and the peer of rank k moves only once the
  gap is `k * patience` seconds old. So the first moves at once and alone (two replicas of one
  span never leave together), and if it cannot move (one dead but not yet suspected) the next
  takes over a little later. Peers pinned with --blocks S:E say so in their record and are not
  ranked at all. The driver (peers/rebalance.py) also
  requires the answer twice in a row and waits out a cool-down after each move.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from swarm.routing import coverage as span_coverage



@dataclass(frozen=True)
class Holding:
    """One peer's span of our model, as the gossip table announces it."""

    peer_id: str
    start: int
    end: int  # one past the last block
    throughput: float = 0.0  # tokens/s over its span (0 when not measured yet)
    pinned: bool = False  # serves a span it was told and never moves (PeerRecord.pinned)


def holdings(records: Iterable, model_hash: str) -> list[Holding]:
    """`PeerRecord`s (or anything with the same fields) of `model_hash` as Holdings."""
    return [
        Holding(r.peer_id, r.start, r.end, float(r.throughput), bool(getattr(r, "pinned", False)))
        for r in records
        if r.model_hash == model_hash and not getattr(r, "leaving", False)
    ]


def coverage(held: Iterable[Holding], n_blocks: int) -> list[int]:
    """Replicas per block."""
    return span_coverage(((h.start, h.end) for h in held), n_blocks)


def block_throughput(held: Iterable[Holding], n_blocks: int) -> list[float]:
    """Summed announced throughput per block (tokens/s each block can carry)."""
    tp = [0.0] * n_blocks
    for h in held:
        for b in range(max(0, h.start), min(n_blocks, h.end)):
            tp[b] += h.throughput
    return tp


def choose_span(held: Iterable[Holding], n_blocks: int, n: int) -> tuple[int, int]:
    """The best window of min(n, n_blocks) blocks for a peer joining next to `held`."""
    if n_blocks < 1 or n < 1:
        raise ValueError(f"need at least one block (model has {n_blocks}, budget {n})")
    held = list(held)
    n = min(n, n_blocks)
    cov = coverage(held, n_blocks)
    tp = block_throughput(held, n_blocks)
    best = min(range(n_blocks - n + 1), key=lambda s: (sorted(cov[s : s + n]), sorted(tp[s : s + n]), s))
    return best, best + n


def movers(held: list[Holding], n_blocks: int, min_replicas: int = 2) -> list[Holding]:
    """Peers that could leave their span without uncovering a block, in the order they move.
    Pinned peers never move, so nobody waits for them."""
    cov = coverage(held, n_blocks)
    ok = [h for h in held if not h.pinned and all(cov[b] >= min_replicas for b in range(max(0, h.start), min(n_blocks, h.end)))]
    return sorted(ok, key=lambda h: (h.throughput, h.peer_id))


def should_move(
    held: list[Holding], me: str, n_blocks: int, n: int, gap_age: float = 0.0, patience: float = 5.0, min_replicas: int = 2
) -> tuple[int, int] | None:
    """The span peer `me` should move to now, or None to stay. `held` includes our own holding;
    `gap_age` is how long (seconds) some block has been uncovered, as we saw it."""
    cov = coverage(held, n_blocks)
    if all(cov):
        return None
    rank = next((i for i, h in enumerate(movers(held, n_blocks, min_replicas)) if h.peer_id == me), None)
    if rank is None or gap_age < rank * patience:
        return None
    others = [h for h in held if h.peer_id != me]
    target = choose_span(others, n_blocks, n)
    cov_others = coverage(others, n_blocks)
    if not any(cov_others[b] == 0 for b in range(*target)):
        return None  # the best window fills no gap (cannot happen with a gap and n >= 1; kept safe)
    return target
