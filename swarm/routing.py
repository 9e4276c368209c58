"""Routing, sans-IO: which chain of peers carries a token's hidden states, and how fast it is.

Rules of the router:

* Block boundaries 0..L are the nodes of a graph. A candidate serving blocks [s, e) offers an edge
  i -> j for every s <= i < j <= e ("run blocks i..j-1 on that peer").
* An edge costs (all in milliseconds):

      rtt       the measured round trip to the peer (or the optimistic estimate below)
    + compute   ms_per_block * (j - i), the peer's announced time per block
    + load      load * (compute + load_ms)      (see `RouteConfig.load_ms`)
    + hop_ms    a small per-hop epsilon, so of two equally fast chains the shorter wins

* When steps are handed peer to peer (`push`, the client's default), a step crosses the network
  once into each hop and once back, so a route's network time is half of
  rtt(client, first) + sum of rtt(hop, next hop) + rtt(last, client), and the rtt between two
  hops is the one the first of them measured and announced (`links`, see swarm/links.py); where
  none is known the client's own RTT to the later hop stands in for it. The search then runs over
  (boundary, previous peer) states, since the price of a hop depends on who hands it the step.
* The route is the cheapest path from `start` to `end` (Dijkstra with a heap). Exact ties (to a
  micro-millisecond) go to fewer hops, then to the lexicographically smallest list of
  (peer id, start, end): the same inputs always give the same route.
* Blocks no usable candidate serves make the route impossible: `NoRouteError.missing` lists
  exactly those ranges, so the CLI can say which `swarm join --blocks` would fix it.

Because every cost is linear in the number of blocks plus a constant per hop, a cheapest path only
ever switches peers where some candidate's span starts or ends (moving a switch point between two
such boundaries changes the cost linearly, so an end of the interval is never worse). The graph is
therefore built on those boundaries only: the same answer as on all of 0..L, with far fewer edges.
With `push` the same holds as long as the prices obey the triangle inequality (a detour through a
third peer is never quicker than the direct link, as on a real network): a hop shrunk to nothing
is then dropped at no loss.

Nothing here reads a clock or a socket: `now` is an argument, RTTs arrive through
`RttTracker.observe`, fed by the client's pings on connect and by its real calls, and the links
between peers come in as a mapping read from their records.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import NoRouteError

# Costs are compared after rounding to this many decimals of a millisecond, so that float noise
# from adding the same numbers in another order never decides a tie.
_COST_DECIMALS = 6


@dataclass(frozen=True)
class Candidate:
    """One peer's offer as the client learned it from gossip: a block span and how fast it is."""

    peer_id: str
    start: int  # first block served
    end: int  # one past the last block served
    ms_per_block: float  # the peer's announced compute time per block, per step
    load: float = 0.0  # active sessions besides ours, or a 0..1 utilisation; 0 = idle

    def __post_init__(self) -> None:
        # Gossip records are validated on arrival; this catches a client that built one wrong.
        if not (0 <= self.start < self.end):
            raise ValueError(f"candidate {self.peer_id}: bad span [{self.start}, {self.end})")
        if not (math.isfinite(self.ms_per_block) and self.ms_per_block >= 0):
            raise ValueError(f"candidate {self.peer_id}: bad ms_per_block {self.ms_per_block!r}")
        if not (math.isfinite(self.load) and self.load >= 0):
            raise ValueError(f"candidate {self.peer_id}: bad load {self.load!r}")


@dataclass(frozen=True)
class RouteConfig:
    """The router's knobs; defaults suit a LAN swarm."""

    # Wait, per unit of load, added to a busy peer's hop. A peer with load L is assumed to
    # time-share: our compute stretches by L x compute, and the request also queues behind the
    # others' for about load_ms per unit of load. So load 0 costs nothing, and a peer reporting
    # one other session (or 100% utilisation) costs twice its compute plus load_ms.
    load_ms: float = 20.0
    # Per-hop epsilon: deliberately prefers fewer hops when chains are otherwise equal (each hop
    # is another process, connection and encode/decode). Small against any real RTT.
    hop_ms: float = 0.01


@dataclass(frozen=True)
class Hop:
    """One link of a route, with the parts of its cost so `--json` can show why it was chosen."""

    peer_id: str
    start: int
    end: int
    rtt_ms: float  # round trip to the peer, measured or estimated (see rtt_estimated)
    compute_ms: float  # ms_per_block * (end - start)
    cost: float  # rtt_ms (net_ms when pushed) + compute_ms + load_ms + the per-hop epsilon
    load_ms: float = 0.0  # the load penalty included in cost
    rtt_estimated: bool = False  # True when the peer was never measured (optimistic estimate)
    # pushed routes only: the network time charged to this hop (half the way in, plus half the
    # way back to the client on the last hop), and which peer measured the way in (None: the client)
    net_ms: float | None = None
    link_from: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "peer": self.peer_id,
            "span": [self.start, self.end],
            "cost_ms": round(self.cost, 3),
            "rtt_ms": round(self.rtt_ms, 3),
            "rtt_estimated": self.rtt_estimated,
            "compute_ms": round(self.compute_ms, 3),
            "load_ms": round(self.load_ms, 3),
        }
        if self.net_ms is not None:
            out["net_ms"] = round(self.net_ms, 3)
            out["link_from"] = self.link_from
        return out


@dataclass(frozen=True)
class Route:
    """A chain of hops covering [start, end) exactly, in order."""

    hops: tuple[Hop, ...]
    start: int
    end: int

    @property
    def cost(self) -> float:
        return sum(h.cost for h in self.hops)

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(h.peer_id for h in self.hops)

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        return tuple((h.start, h.end) for h in self.hops)

    def __iter__(self) -> Iterator[Hop]:
        return iter(self.hops)

    def __len__(self) -> int:
        return len(self.hops)

    def __getitem__(self, index: int) -> Hop:
        return self.hops[index]

    def to_json(self) -> dict[str, Any]:
        return {
            "span": [self.start, self.end],
            "cost_ms": round(self.cost, 3),
            "hops": [h.to_json() for h in self.hops],
        }


# --- coverage ------------------------------------------------------------------------------------


def coverage(spans: Iterable[tuple[int, int]], num_blocks: int) -> list[int]:
    """How many of the spans [s, e) hold each block 0..num_blocks-1."""
    cov = [0] * num_blocks
    for s, e in spans:
        for b in range(max(0, s), min(num_blocks, e)):
            cov[b] += 1
    return cov


def gaps(cov: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of blocks no span holds, as [start, end) spans."""
    out: list[tuple[int, int]] = []
    s = None
    for i, c in enumerate([*cov, 1]):
        if c == 0 and s is None:
            s = i
        elif c and s is not None:
            out.append((s, i))
            s = None
    return out


def uncovered(candidates: Iterable[Candidate], start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of [start, end) that no candidate serves, merged and in order."""
    spans = sorted((max(c.start, start), min(c.end, end)) for c in candidates)
    missing: list[tuple[int, int]] = []
    reach = start  # everything before `reach` is covered
    for s, e in spans:
        if s >= e:
            continue  # outside [start, end)
        if s > reach:
            missing.append((reach, s))
        reach = max(reach, e)
    if reach < end:
        missing.append((reach, end))
    return missing


# --- shortest path -------------------------------------------------------------------------------


def shortest_route(
    candidates: Iterable[Candidate],
    start: int,
    end: int,
    rtt_ms: Mapping[str, float],
    *,
    estimated: Collection[str] = (),
    config: RouteConfig = RouteConfig(),
    push: bool = False,
    links: Mapping[str, Mapping[str, float]] | None = None,
    before: str | None = None,
    after: str | None = None,
) -> Route:
    """The cheapest chain covering blocks [start, end), or `NoRouteError` naming the gaps.

    `rtt_ms` must give an RTT for every candidate's peer (`plan` fills in estimates); the peers
    in `estimated` are only flagged as such in the hops' reasons. With `push`, steps travel peer
    to peer: `links[a][b]` is a's RTT to b as a measured it, and `before`/`after` name the peers
    that hand the step in and take it on when only part of a chain is planned (after a failure);
    None is the client.
    """
    if not (0 <= start <= end):
        raise ValueError(f"bad block range [{start}, {end})")
    useful = [c for c in candidates if c.start < end and c.end > start]
    if start == end:
        return Route((), start, end)
    missing = uncovered(useful, start, end)
    if missing:
        raise NoRouteError(missing)
    for c in useful:
        if c.peer_id not in rtt_ms:
            raise ValueError(f"no RTT given for peer {c.peer_id}")

    # Nodes: the range's ends and every span boundary inside it (see the module docstring).
    nodes = sorted({start, end} | {b for c in useful for b in (c.start, c.end) if start < b < end})
    # Deterministic edge order: by peer id, then span, so equal labels are pushed identically.
    useful.sort(key=lambda c: (c.peer_id, c.start, c.end, c.ms_per_block, c.load))

    links = links or {}

    def net(prev: str | None, c: Candidate, j: int) -> tuple[float, str | None]:
        """A pushed hop's network time: half the way in (measured by `prev` if it announced it),
        and on the last hop half the way on (to `after`, or back to the client)."""
        measured = links.get(prev, {}).get(c.peer_id) if prev is not None else None
        way_in = measured if measured is not None else rtt_ms[c.peer_id]
        if j < end:
            return way_in / 2, prev if measured is not None else None
        if after is None:
            way_on = rtt_ms[c.peer_id]  # back to the client
        else:
            onward = links.get(c.peer_id, {}).get(after)
            way_on = onward if onward is not None else rtt_ms.get(after, rtt_ms[c.peer_id])
        return (way_in + way_on) / 2, prev if measured is not None else None

    # A label is (rounded cost, hops, path signature); lexicographic order is preserved by
    # appending the same hop to two labels of equal hop count, so lazy Dijkstra settles each state
    # at its best label. A state is the node, and with `push` the peer that reached it (the next
    # hop's price depends on it). Entries: (cost_key, n_hops, signature, seq, node, exact_cost,
    # hops); seq (push order) only separates duplicate candidates, so Hops are never compared.
    Label = tuple[float, int, tuple[tuple[str, int, int], ...], int, int, float, tuple[Hop, ...]]
    heap: list[Label] = [(0.0, 0, (), 0, start, 0.0, ())]
    seq = 0
    settled: set[tuple[int, str | None]] = set()
    while heap:
        _key, n_hops, sig, _seq, node, cost, hops = heapq.heappop(heap)
        prev = (hops[-1].peer_id if hops else before) if push else None
        if (node, prev) in settled:
            continue
        if node == end:
            return Route(hops, start, end)
        settled.add((node, prev))
        for c in useful:
            if not (c.start <= node < c.end):
                continue
            stop = min(c.end, end)
            for j in nodes:
                if j <= node or (j, c.peer_id if push else None) in settled:
                    continue
                if j > stop:
                    break
                hop = _hop(c, node, j, rtt_ms[c.peer_id], c.peer_id in estimated, config, net(prev, c, j) if push else None)
                total = cost + hop.cost
                seq += 1
                heapq.heappush(
                    heap,
                    (
                        round(total, _COST_DECIMALS),
                        n_hops + 1,
                        sig + ((c.peer_id, node, j),),
                        seq,
                        j,
                        total,
                        hops + (hop,),
                    ),
                )
    # Unreachable: full coverage always gives a path (block i is an edge i -> i+1).
    raise NoRouteError(uncovered(useful, start, end) or [(start, end)])  # pragma: no cover


def _hop(
    c: Candidate, i: int, j: int, rtt: float, estimated: bool, config: RouteConfig, pushed: tuple[float, str | None] | None = None
) -> Hop:
    """A hop and its price: hop by hop, the client's round trip to the peer; pushed, `pushed`
    gives the network share (see `shortest_route`) and who measured it."""
    compute = c.ms_per_block * (j - i)
    load = c.load * (compute + config.load_ms)
    network = rtt if pushed is None else pushed[0]
    return Hop(
        peer_id=c.peer_id,
        start=i,
        end=j,
        rtt_ms=rtt,
        compute_ms=compute,
        cost=network + compute + load + config.hop_ms,
        load_ms=load,
        rtt_estimated=estimated,
        net_ms=None if pushed is None else pushed[0],
        link_from=None if pushed is None else pushed[1],
    )


# --- RTTs and bans -------------------------------------------------------------------------------


@dataclass
class RttTracker:
    """Round-trip times per peer (an exponential moving average) and a ban list with expiry.

    Feed it the network part of each exchange: pings on connect, and real calls (their time minus
    the compute the peer reports, where it does). Cold start: a peer never measured is given an
    optimistic estimate, `optimism` x the smallest RTT measured so far (or `prior_ms` when nothing
    is measured yet), so it looks slightly better than the best known peer and gets tried; its
    first real sample then replaces the guess. A peer that is in fact far away is thus tried once,
    not never.
    """

    alpha: float = 0.3  # weight of a new sample in the moving average
    prior_ms: float = 1.0  # the estimate for an unmeasured peer when no peer is measured yet
    optimism: float = 0.5  # an unmeasured peer's estimate, as a fraction of the best measured RTT
    _rtt: dict[str, float] = field(default_factory=dict, repr=False)
    _banned_until: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not (self.prior_ms >= 0 and 0 <= self.optimism <= 1):
            raise ValueError("prior_ms must be >= 0 and optimism in [0, 1]")

    def observe(self, peer_id: str, rtt_ms: float) -> None:
        """Fold one measured round trip into the peer's average (the first sample sets it)."""
        if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
            raise ValueError(f"bad RTT sample for {peer_id}: {rtt_ms!r}")
        old = self._rtt.get(peer_id)
        self._rtt[peer_id] = rtt_ms if old is None else old + self.alpha * (rtt_ms - old)

    def rtt(self, peer_id: str) -> float | None:
        """The measured average, or None when the peer was never measured."""
        return self._rtt.get(peer_id)

    def estimate(self, peer_id: str) -> float:
        """The RTT to route with: measured, else the optimistic cold-start estimate."""
        measured = self._rtt.get(peer_id)
        if measured is not None:
            return measured
        if not self._rtt:
            return self.prior_ms
        return self.optimism * min(self._rtt.values())

    def forget(self, peer_id: str) -> None:
        """Drop a peer's measurements (it left, or came back at a new address)."""
        self._rtt.pop(peer_id, None)

    def ban(self, peer_id: str, now: float, seconds: float) -> None:
        """Avoid a failing peer until now + seconds (a later ban never shortens an earlier one)."""
        until = now + seconds
        self._banned_until[peer_id] = max(until, self._banned_until.get(peer_id, until))

    def unban(self, peer_id: str) -> None:
        self._banned_until.pop(peer_id, None)

    def is_banned(self, peer_id: str, now: float) -> bool:
        until = self._banned_until.get(peer_id)
        if until is None:
            return False
        if now >= until:
            del self._banned_until[peer_id]  # expired: forget it
            return False
        return True


def plan(
    candidates: Iterable[Candidate],
    rtt: RttTracker,
    start: int,
    end: int,
    now: float,
    exclude: Collection[str] = (),
    *,
    config: RouteConfig = RouteConfig(),
    push: bool = False,
    links: Mapping[str, Mapping[str, float]] | None = None,
    before: str | None = None,
    after: str | None = None,
) -> Route:
    """The route for blocks [start, end) among candidates not banned at `now` nor excluded.

    The client calls it for the whole model, and for just the uncovered span after a failure
    (between the hops `before` and `after` of the chain, which stay).
    """
    usable = [
        c for c in candidates if c.peer_id not in exclude and not rtt.is_banned(c.peer_id, now)
    ]
    ids = {c.peer_id for c in usable} | ({after} if after is not None else set())
    estimates = {p: rtt.estimate(p) for p in ids}
    estimated = {p for p in ids if rtt.rtt(p) is None}
    return shortest_route(usable, start, end, estimates, estimated=estimated, config=config,
                          push=push, links=links, before=before, after=after)
