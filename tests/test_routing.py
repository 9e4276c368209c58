"""The routing core against exact expected routes (no sockets, no clock: values in, route out)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import NoRouteError
from swarm.routing import (
    Candidate,
    Hop,
    Route,
    RouteConfig,
    RttTracker,
    plan,
    shortest_route,
    uncovered,
)

EPS = RouteConfig().hop_ms


def spans(route: Route) -> list[tuple[str, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in route]


def route(cands: list[Candidate], rtts: dict[str, float], a: int, b: int) -> Route:
    return shortest_route(cands, a, b, rtts)


# --- exact routes --------------------------------------------------------------------------------


def test_single_peer_cost_and_reasons() -> None:
    r = route([Candidate("a", 0, 30, 1.0)], {"a": 5.0}, 0, 30)
    assert r.hops == (Hop("a", 0, 30, rtt_ms=5.0, compute_ms=30.0, cost=35.0 + EPS),)
    assert r.cost == pytest.approx(35.0 + EPS)
    assert r.to_json()["hops"][0] == {
        "peer": "a",
        "span": [0, 30],
        "cost_ms": 35.01,
        "rtt_ms": 5.0,
        "rtt_estimated": False,
        "compute_ms": 30.0,
        "load_ms": 0.0,
    }


def test_three_contiguous_peers() -> None:
    cands = [Candidate("c", 20, 30, 1.0), Candidate("a", 0, 10, 1.0), Candidate("b", 10, 20, 1.0)]
    r = route(cands, {"a": 1.0, "b": 2.0, "c": 3.0}, 0, 30)
    assert spans(r) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]
    assert r.peers == ("a", "b", "c")
    assert r.cost == pytest.approx(6.0 + 30.0 + 3 * EPS)


def test_faster_rtt_wins_and_swapping_moves_the_route() -> None:
    cands = [Candidate("a", 0, 30, 1.0), Candidate("b", 0, 30, 1.0)]
    assert spans(route(cands, {"a": 10.0, "b": 2.0}, 0, 30)) == [("b", 0, 30)]
    assert spans(route(cands, {"a": 2.0, "b": 10.0}, 0, 30)) == [("a", 0, 30)]


def test_replica_per_span_picks_fastest_of_each() -> None:
    cands = [
        Candidate("a1", 0, 15, 1.0),
        Candidate("a2", 0, 15, 1.0),
        Candidate("b1", 15, 30, 1.0),
        Candidate("b2", 15, 30, 1.0),
    ]
    rtts = {"a1": 9.0, "a2": 3.0, "b1": 4.0, "b2": 8.0}
    assert spans(route(cands, rtts, 0, 30)) == [("a2", 0, 15), ("b1", 15, 30)]


def test_long_span_beats_two_short_spans_with_equal_compute() -> None:
    cands = [Candidate("x", 0, 15, 1.0), Candidate("y", 15, 30, 1.0), Candidate("z", 0, 30, 1.0)]
    # With RTTs the second hop's round trip decides it...
    assert spans(route(cands, {"x": 1.0, "y": 1.0, "z": 1.0}, 0, 30)) == [("z", 0, 30)]
    # ...and with free round trips the per-hop epsilon still prefers the single hop.
    assert spans(route(cands, {"x": 0.0, "y": 0.0, "z": 0.0}, 0, 30)) == [("z", 0, 30)]
    # Even when "z" sorts after "x": fewer hops first, then peer ids.
    cands2 = [Candidate("b", 0, 15, 1.0), Candidate("c", 15, 30, 1.0), Candidate("a", 0, 30, 1.0)]
    assert spans(route(cands2, {"a": 0.0, "b": 0.0, "c": 0.0}, 0, 30)) == [("a", 0, 30)]


def test_exact_tie_goes_to_smallest_peer_id_in_any_input_order() -> None:
    cands = [Candidate("m", 0, 30, 1.0), Candidate("k", 0, 30, 1.0), Candidate("q", 0, 30, 1.0)]
    for perm in itertools.permutations(cands):
        assert spans(route(list(perm), {"m": 2.0, "k": 2.0, "q": 2.0}, 0, 30)) == [("k", 0, 30)]


def test_a_fast_middle_peer_is_worth_two_extra_hops() -> None:
    # a: 1 ms RTT, 1 ms/block everywhere; b: 0.1 ms/block on [10, 20).
    # a alone: 1 + 30 = 31; a-b-a: 3 + 10 + 1 + 10 = 24.
    cands = [Candidate("a", 0, 30, 1.0), Candidate("b", 10, 20, 0.1)]
    r = route(cands, {"a": 1.0, "b": 1.0}, 0, 30)
    assert spans(r) == [("a", 0, 10), ("b", 10, 20), ("a", 20, 30)]
    assert r.cost == pytest.approx(24.0 + 3 * EPS)


def test_partial_reroute_of_a_sub_range() -> None:
    cands = [Candidate("a", 0, 10, 1.0), Candidate("b", 0, 30, 1.0), Candidate("c", 8, 22, 0.5)]
    r = route(cands, {"a": 1.0, "b": 5.0, "c": 1.0}, 10, 20)
    assert spans(r) == [("c", 10, 20)]
    assert (r.start, r.end) == (10, 20)
    assert r.hops[0].compute_ms == pytest.approx(5.0)
    # Without c, the range is cut out of b's larger span.
    assert spans(route(cands[:2], {"a": 1.0, "b": 5.0}, 10, 20)) == [("b", 10, 20)]


def test_empty_range_is_an_empty_route() -> None:
    assert route([Candidate("a", 0, 30, 1.0)], {"a": 1.0}, 7, 7).hops == ()


# --- coverage ------------------------------------------------------------------------------------


def test_uncovered_blocks_are_reported_exactly() -> None:
    cands = [Candidate("a", 0, 10, 1.0), Candidate("c", 20, 25, 1.0), Candidate("d", 3, 8, 1.0)]
    with pytest.raises(NoRouteError) as err:
        route(cands, {"a": 1.0, "c": 1.0, "d": 1.0}, 0, 30)
    assert err.value.missing == [(10, 20), (25, 30)]
    assert "10:20" in str(err.value) and "swarm join" in str(err.value)
    with pytest.raises(NoRouteError) as err:
        route(cands, {"a": 1.0, "c": 1.0, "d": 1.0}, 5, 22)
    assert err.value.missing == [(10, 20)]
    assert uncovered([], 4, 9) == [(4, 9)]
    assert uncovered(cands, 0, 10) == []


def test_banning_the_only_server_of_a_span_reports_it_missing() -> None:
    cands = [Candidate("a", 0, 10, 1.0), Candidate("b", 10, 20, 1.0), Candidate("c", 20, 30, 1.0)]
    rtt = RttTracker()
    rtt.ban("b", now=0.0, seconds=10.0)
    with pytest.raises(NoRouteError) as err:
        plan(cands, rtt, 0, 30, now=1.0)
    assert err.value.missing == [(10, 20)]
    with pytest.raises(NoRouteError) as err:
        plan(cands, rtt, 0, 30, now=1.0, exclude={"c"})
    assert err.value.missing == [(10, 30)]


# --- RTTs, bans, exploration, load ---------------------------------------------------------------


def test_banned_peer_is_avoided_then_used_again_after_expiry() -> None:
    cands = [Candidate("fast", 0, 30, 1.0), Candidate("slow", 0, 30, 1.0)]
    rtt = RttTracker()
    rtt.observe("fast", 1.0)
    rtt.observe("slow", 20.0)
    assert plan(cands, rtt, 0, 30, now=100.0).peers == ("fast",)
    rtt.ban("fast", now=100.0, seconds=30.0)
    assert rtt.is_banned("fast", 129.9)
    assert plan(cands, rtt, 0, 30, now=110.0).peers == ("slow",)
    rtt.ban("fast", now=101.0, seconds=1.0)  # a shorter ban does not shorten the first
    assert plan(cands, rtt, 0, 30, now=129.0).peers == ("slow",)
    assert plan(cands, rtt, 0, 30, now=130.0).peers == ("fast",)
    assert not rtt.is_banned("fast", 130.0)


def test_exclude_skips_peers_without_banning_them() -> None:
    cands = [Candidate("a", 0, 30, 1.0), Candidate("b", 0, 30, 1.0)]
    rtt = RttTracker()
    rtt.observe("a", 1.0)
    rtt.observe("b", 2.0)
    assert plan(cands, rtt, 0, 30, now=0.0, exclude=["a"]).peers == ("b",)
    assert plan(cands, rtt, 0, 30, now=0.0).peers == ("a",)


def test_moving_average_of_rtt_samples() -> None:
    rtt = RttTracker(alpha=0.5)
    assert rtt.rtt("p") is None
    rtt.observe("p", 10.0)
    assert rtt.rtt("p") == 10.0
    rtt.observe("p", 20.0)
    assert rtt.rtt("p") == 15.0
    rtt.observe("p", 15.0)
    assert rtt.rtt("p") == 15.0
    rtt.forget("p")
    assert rtt.rtt("p") is None
    with pytest.raises(ValueError):
        rtt.observe("p", math.nan)
    with pytest.raises(ValueError):
        rtt.observe("p", -1.0)


def test_unmeasured_peer_is_explored_until_measured() -> None:
    cands = [Candidate("a", 0, 30, 1.0), Candidate("b", 0, 30, 1.0)]
    rtt = RttTracker(prior_ms=1.0, optimism=0.5)
    # Nothing measured: both get the prior; tie to the smaller id.
    r = plan(cands, rtt, 0, 30, now=0.0)
    assert r.peers == ("a",) and r.hops[0].rtt_estimated and r.hops[0].rtt_ms == 1.0
    rtt.observe("a", 10.0)
    # b was never tried: half the best measured RTT makes it the one to try.
    r = plan(cands, rtt, 0, 30, now=0.0)
    assert r.peers == ("b",)
    assert r.hops[0].rtt_ms == 5.0 and r.hops[0].rtt_estimated
    assert r.to_json()["hops"][0]["rtt_estimated"] is True
    rtt.observe("b", 40.0)  # tried, and slow: back to a
    r = plan(cands, rtt, 0, 30, now=0.0)
    assert r.peers == ("a",) and not r.hops[0].rtt_estimated


def test_load_penalty_steers_away_from_a_busy_replica() -> None:
    cands = [Candidate("a", 0, 30, 1.0, load=2.0), Candidate("b", 0, 30, 1.0, load=0.0)]
    rtts = {"a": 1.0, "b": 1.0}
    assert spans(route(cands, rtts, 0, 30)) == [("b", 0, 30)]
    # load 2 on a 30 ms span: 2 x (30 + load_ms) more than b.
    only_a = route(cands[:1], rtts, 0, 30)
    assert only_a.hops[0].load_ms == pytest.approx(2.0 * (30.0 + RouteConfig().load_ms))
    # A nearer busy peer still loses to a farther idle one, until the distance outweighs the load.
    assert spans(route(cands, {"a": 1.0, "b": 50.0}, 0, 30)) == [("b", 0, 30)]
    assert spans(route(cands, {"a": 1.0, "b": 200.0}, 0, 30)) == [("a", 0, 30)]


def test_bad_candidates_and_ranges_are_refused() -> None:
    with pytest.raises(ValueError):
        Candidate("a", 5, 5, 1.0)
    with pytest.raises(ValueError):
        Candidate("a", 0, 5, math.inf)
    with pytest.raises(ValueError):
        Candidate("a", 0, 5, 1.0, load=-1.0)
    with pytest.raises(ValueError):
        route([Candidate("a", 0, 5, 1.0)], {"a": 1.0}, 4, 2)


# --- the compressed graph equals the full block graph --------------------------------------------


def _brute_force(cands: list[Candidate], rtts: dict[str, float], a: int, b: int) -> float:
    """Cheapest cost over every edge i -> j of every candidate (the graph on all of a..b)."""
    cfg = RouteConfig()
    best = [math.inf] * (b + 1)
    best[a] = 0.0
    for i in range(a, b):
        if best[i] == math.inf:
            continue
        for c in cands:
            if c.start <= i < c.end:
                for j in range(i + 1, min(c.end, b) + 1):
                    compute = c.ms_per_block * (j - i)
                    cost = rtts[c.peer_id] + compute + c.load * (compute + cfg.load_ms) + cfg.hop_ms
                    best[j] = min(best[j], best[i] + cost)
    return best[b]


_cand = st.builds(
    lambda pid, s, n, ms, load: Candidate(pid, s, s + n, ms, load),
    st.sampled_from("abcde"),
    st.integers(0, 11),
    st.integers(1, 12),
    st.sampled_from([0.0, 0.5, 1.0, 2.5]),
    st.sampled_from([0.0, 0.0, 1.0]),
)


@settings(max_examples=150, deadline=None)
@given(
    cands=st.lists(_cand, min_size=1, max_size=6),
    rtt_values=st.lists(st.sampled_from([0.0, 1.0, 3.0, 10.0]), min_size=5, max_size=5),
    bounds=st.tuples(st.integers(0, 12), st.integers(0, 12)),
)
def test_route_is_as_cheap_as_the_full_graph(
    cands: list[Candidate], rtt_values: list[float], bounds: tuple[int, int]
) -> None:
    a, b = min(bounds), max(bounds)
    rtts = dict(zip("abcde", rtt_values))
    try:
        r = route(cands, rtts, a, b)
    except NoRouteError as err:
        assert err.missing == uncovered(cands, a, b) != []
        assert _brute_force(cands, rtts, a, b) == math.inf
        return
    assert r.cost == pytest.approx(_brute_force(cands, rtts, a, b), abs=1e-6)
    # The hops chain exactly from a to b, each inside its peer's span.
    edge = a
    for h in r:
        assert h.start == edge and h.end > h.start
        assert any(c.peer_id == h.peer_id and c.start <= h.start and h.end <= c.end for c in cands)
        edge = h.end
    assert edge == b
    # Deterministic regardless of input order.
    assert route(list(reversed(cands)), rtts, a, b).hops == r.hops


# --- steps handed peer to peer: hops priced by the links between them ----------------------------


def test_pushed_route_is_priced_by_the_links_between_hops() -> None:
    """The client is as close to b1 as to b2, so hop by hop b1 wins; but a step pushed from a
    to b1 to c crosses two slow links, and a and b2 measured theirs as fast."""
    cands = [Candidate("a", 0, 10, 1.0), Candidate("b1", 10, 20, 1.0), Candidate("b2", 10, 20, 1.0), Candidate("c", 20, 30, 1.0)]
    rtts = {"a": 1.0, "b1": 1.0, "b2": 1.5, "c": 1.0}
    near = {"a": {"b1": 40.0, "b2": 2.0}, "b1": {"c": 40.0}, "b2": {"c": 2.0}}
    assert route(cands, rtts, 0, 30).peers == ("a", "b1", "c")
    r = shortest_route(cands, 0, 30, rtts, push=True, links=near)
    assert r.peers == ("a", "b2", "c")
    # half the way into each hop, and on the last also half the way back to the client
    assert [(h.net_ms, h.link_from) for h in r] == [(0.5, None), (1.0, "a"), (1.5, "b2")]
    assert r.cost == pytest.approx(3.0 + 30.0 + 3 * EPS)
    assert r.to_json()["hops"][1]["net_ms"] == 1.0 and r.to_json()["hops"][1]["link_from"] == "a"
    assert "net_ms" not in route(cands, rtts, 0, 30).to_json()["hops"][0]
    # links are ignored hop by hop: every hop is a round trip from the client there
    assert shortest_route(cands, 0, 30, rtts, links=near).peers == ("a", "b1", "c")


def test_pushed_route_without_links_uses_the_clients_rtts() -> None:
    cands = [Candidate("c", 20, 30, 1.0), Candidate("a", 0, 10, 1.0), Candidate("b", 10, 20, 1.0)]
    r = shortest_route(cands, 0, 30, {"a": 1.0, "b": 2.0, "c": 3.0}, push=True)
    assert r.peers == ("a", "b", "c")
    assert [h.net_ms for h in r] == [0.5, 1.0, 3.0]  # the last: half of c's way in and back
    assert all(h.link_from is None for h in r)


def test_mending_a_chain_prices_the_links_to_the_hops_that_stay() -> None:
    cands = [Candidate("b1", 10, 20, 1.0), Candidate("b2", 10, 20, 1.0)]
    rtts = RttTracker()
    for p, ms in (("a", 1.0), ("b1", 1.0), ("b2", 1.5), ("c", 1.0)):
        rtts.observe(p, ms)
    near = {"a": {"b1": 40.0, "b2": 2.0}, "b1": {"c": 40.0}, "b2": {"c": 4.0}}
    r = plan(cands, rtts, 10, 20, 0.0, push=True, links=near, before="a", after="c")
    assert r.peers == ("b2",) and r[0].net_ms == 3.0 and r[0].link_from == "a"
    # what b2 does not know of its way on to c, the client's RTT to c stands in for
    r = plan(cands, rtts, 10, 20, 0.0, push=True, links={"a": {"b1": 40.0, "b2": 2.0}}, before="a", after="c")
    assert r.peers == ("b2",) and r[0].net_ms == 1.5


def _brute_force_pushed(cands, rtts, near, a, b, before, after) -> float:
    """Cheapest pushed route over every edge i -> j, with the previous peer as part of the state."""
    cfg = RouteConfig()
    best: dict[tuple[int, str | None], float] = {(a, before): 0.0}
    for i in range(a, b):
        for (node, prev), cost in [kv for kv in best.items() if kv[0][0] == i]:
            for c in cands:
                if not c.start <= i < c.end:
                    continue
                for j in range(i + 1, min(c.end, b) + 1):
                    way_in = near.get(prev, {}).get(c.peer_id) if prev is not None else None
                    net = (rtts[c.peer_id] if way_in is None else way_in) / 2
                    if j == b:
                        way_on = near.get(c.peer_id, {}).get(after) if after is not None else None
                        net += (way_on if way_on is not None else rtts[after if after is not None else c.peer_id]) / 2
                    compute = c.ms_per_block * (j - i)
                    total = cost + net + compute + c.load * (compute + cfg.load_ms) + cfg.hop_ms
                    best[(j, c.peer_id)] = min(best.get((j, c.peer_id), math.inf), total)
    return min((v for (n, _), v in best.items() if n == b), default=math.inf)


@settings(max_examples=150, deadline=None)
@given(
    cands=st.lists(_cand, min_size=1, max_size=6),
    places=st.lists(st.sampled_from([-4.0, 0.0, 1.0, 3.0, 10.0]), min_size=6, max_size=6),
    bounds=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    ends=st.tuples(st.sampled_from([None, "a", "f"]), st.sampled_from([None, "c", "f"])),
)
def test_pushed_route_is_as_cheap_as_the_full_graph(cands, places, bounds, ends) -> None:
    """Peers and the client (at 0) on a line, every RTT their distance: prices that obey the
    triangle inequality, as a network's do, under which the boundary graph loses nothing."""
    a, b = min(bounds), max(bounds)
    before, after = ends
    where = dict(zip("abcdef", places))
    rtts = {p: abs(x) for p, x in where.items()}
    near = {p: {q: abs(x - y) for q, y in where.items() if q != p} for p, x in where.items()}
    try:
        r = shortest_route(cands, a, b, rtts, push=True, links=near, before=before, after=after)
    except NoRouteError:
        assert _brute_force_pushed(cands, rtts, near, a, b, before, after) == math.inf
        return
    assert r.cost == pytest.approx(_brute_force_pushed(cands, rtts, near, a, b, before, after) if a < b else 0.0, abs=1e-6)
    assert shortest_route(list(reversed(cands)), a, b, rtts, push=True, links=near, before=before, after=after).hops == r.hops
