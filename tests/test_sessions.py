"""The peer's pure tables: sessions with their limits and idle expiry, and the connection gate."""

from __future__ import annotations

import pytest

from peers.gate import ConnectionGate, GateLimits
from peers.sessions import Limits, SessionError, SessionTable


def table(**kw) -> SessionTable:
    return SessionTable(Limits(**kw))


def test_a_session_belongs_to_its_connection_only() -> None:
    t = table()
    s = t.open(owner=1, caller="a", start=0, end=2, max_length=16, dtype="float32", cache=None, now=0.0)
    assert t.get(1, s.id, 1.0) is s
    with pytest.raises(SessionError) as e:
        t.get(2, s.id, 1.0)  # another connection cannot even see it
    assert e.value.code == "unknown_session"
    assert [x.id for x in t.close_owner(1)] == [s.id]
    assert t.sessions == {}


def test_cache_budget_and_session_caps_answer_with_distinct_codes() -> None:
    t = table(max_cache_tokens=100, max_sessions=3, max_sessions_per_caller=2, max_session_length=64)
    t.open(1, "a", 0, 2, 60, "float32", None, 0.0)
    with pytest.raises(SessionError) as e:
        t.open(1, "b", 0, 2, 50, "float32", None, 0.0)  # 60 + 50 > 100 reserved tokens
    assert e.value.code == "overloaded" and "40 more tokens" in str(e.value)
    with pytest.raises(SessionError) as e:
        t.open(1, "b", 0, 2, 65, "float32", None, 0.0)
    assert e.value.code == "too_long"
    t.open(1, "a", 0, 2, 10, "float32", None, 0.0)
    with pytest.raises(SessionError) as e:
        t.open(2, "a", 0, 2, 10, "float32", None, 0.0)  # per caller, across its connections
    assert e.value.code == "too_many_sessions"
    t.open(3, "c", 0, 2, 10, "float32", None, 0.0)
    with pytest.raises(SessionError) as e:
        t.open(4, "d", 0, 2, 10, "float32", None, 0.0)
    assert e.value.code == "overloaded" and "full" in str(e.value)
    assert t.free_tokens == 20


def test_idle_sessions_expire_by_the_clock_given_but_never_mid_step() -> None:
    t = table(idle_timeout=10.0)
    a = t.open(1, "a", 0, 2, 8, "float32", None, now=0.0)
    b = t.open(1, "a", 0, 2, 8, "float32", None, now=0.0)
    t.get(1, b.id, now=8.0)  # used: its clock restarts
    a.busy = True
    assert t.expire(now=10.5) == []  # a is computing, b was used at 8
    a.busy = False
    assert [s.id for s in t.expire(now=10.5)] == [a.id]
    assert [s.id for s in t.expire(now=18.5)] == [b.id]
    assert t.free_tokens == t.limits.max_cache_tokens


def test_the_gate_caps_connections_and_their_rate_per_address() -> None:
    g = ConnectionGate(GateLimits(max_connections=5, max_per_address=3, rate_per_address=1.0, burst_per_address=4.0))
    assert [g.admit("1.1.1.1", 0.0) for _ in range(3)] == [None, None, None]
    assert "too many connections from 1.1.1.1" == g.admit("1.1.1.1", 0.0)
    g.release("1.1.1.1")
    assert g.admit("1.1.1.1", 0.0) is None  # a slot again, and the 4th token of the burst
    g.release("1.1.1.1")
    assert "too fast" in g.admit("1.1.1.1", 0.5)  # burst spent; half a token back
    assert g.admit("1.1.1.1", 1.0) is None  # one token a second
    assert g.admit("2.2.2.2", 1.0) is None
    assert g.admit("3.3.3.3", 1.0) is None
    assert g.admit("4.4.4.4", 1.0) == "too many connections"  # 5 open in all
    assert dict(g.refused) == {"per_address": 1, "rate": 1, "total": 1}


def test_a_push_needs_the_sessions_token() -> None:
    t = table()
    a = t.open(1, "a", 0, 2, 8, "float32", None, now=0.0)
    b = t.open(1, "a", 0, 2, 8, "float32", None, now=0.0)
    assert len(a.token) == 16 and a.token != b.token
    assert t.pushed(a.id, a.token, now=5.0) is a and a.last_used == 5.0
    for sid, token in ((a.id, b.token), (a.id, b""), (999, a.token)):
        with pytest.raises(SessionError) as e:
            t.pushed(sid, token, now=6.0)
        assert e.value.code == "unknown_session"
    assert a.last_used == 5.0
