"""The peer's table of inference sessions and its limits. No I/O; time is passed in.

A session belongs to the connection that opened it: only that caller can use it, and it ends
when the connection does. The one exception is a push: the peer before it on the chain may hand
rows in, if it shows the session's push token, which only the owner was told. Each session
reserves `max_length` cache tokens up front, so the peer never promises more memory than its
budget; a full peer says `overloaded` and the client routes around it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

from swarm.errors import ProtocolError


class SessionError(ProtocolError):
    """A request that is well-formed but not acceptable; `code` tells the client why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Limits:
    max_sessions: int = 256  # in all, on this peer
    max_sessions_per_caller: int = 64  # one client cannot take every slot
    max_cache_tokens: int = 65536  # tokens of KV cache reserved across all sessions
    max_session_length: int = 8192  # tokens one session may hold (prompt + answer)
    idle_timeout: float = 300.0  # seconds before an unused session is closed and freed


@dataclass
class Session:
    id: int
    owner: int  # the connection that opened it
    caller: str  # the verified peer id of whoever opened it (limits are per caller)
    start: int
    end: int
    max_length: int
    dtype: str
    cache: Any  # the blocks' KV cache; owned by the compute thread while a step runs
    length: int = 0  # tokens in the cache
    last_used: float = 0.0
    busy: bool = False
    span: Any = None  # the BlockSpan it runs on: the old one after the peer moves, until it closes
    token: bytes = field(default_factory=lambda: secrets.token_bytes(16), repr=False)  # for pushes
    turn: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)  # one step at a time


@dataclass
class SessionTable:
    limits: Limits
    sessions: dict[int, Session] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def reserved_tokens(self) -> int:
        return sum(s.max_length for s in self.sessions.values())

    @property
    def free_tokens(self) -> int:
        return max(0, self.limits.max_cache_tokens - self.reserved_tokens)

    def open(self, owner: int, caller: str, start: int, end: int, max_length: int, dtype: str, cache: Any, now: float) -> Session:
        lim = self.limits
        if max_length < 1 or max_length > lim.max_session_length:
            raise SessionError("too_long", f"max_length {max_length} is outside 1..{lim.max_session_length}")
        if len(self.sessions) >= lim.max_sessions:
            raise SessionError("overloaded", f"peer is full: {len(self.sessions)} sessions open")
        if sum(1 for s in self.sessions.values() if s.caller == caller) >= lim.max_sessions_per_caller:
            raise SessionError("too_many_sessions", f"at most {lim.max_sessions_per_caller} sessions per caller")
        if max_length > self.free_tokens:
            raise SessionError(
                "overloaded", f"peer has cache for {self.free_tokens} more tokens, {max_length} asked"
            )
        s = Session(next(self._ids), owner, caller, start, end, max_length, dtype, cache, last_used=now)
        self.sessions[s.id] = s
        return s

    def get(self, owner: int, session_id: int, now: float) -> Session:
        s = self.sessions.get(session_id)
        if s is None or s.owner != owner:  # another caller's session is as good as unknown
            raise SessionError("unknown_session", f"unknown session {session_id}")
        s.last_used = now
        return s

    def pushed(self, session_id: int, token: bytes, now: float) -> Session:
        """The session a push names, if its token is right (as good as unknown otherwise)."""
        s = self.sessions.get(session_id)
        if s is None or not hmac.compare_digest(s.token, token):
            raise SessionError("unknown_session", f"unknown session {session_id} (or a wrong push token)")
        s.last_used = now
        return s

    def close(self, session_id: int) -> Session | None:
        return self.sessions.pop(session_id, None)

    def close_owner(self, owner: int) -> list[Session]:
        gone = [s for s in self.sessions.values() if s.owner == owner]
        for s in gone:
            del self.sessions[s.id]
        return gone

    def expire(self, now: float) -> list[Session]:
        gone = [s for s in self.sessions.values() if not s.busy and now - s.last_used > self.limits.idle_timeout]
        for s in gone:
            del self.sessions[s.id]
        return gone
