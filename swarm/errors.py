"""The error hierarchy.

Two families that callers must tell apart: `RemoteError` (the other side sent garbage or refused
us; drop or retry that peer) and `SwarmError` subclasses raised for our own, local conditions
(no route, bad configuration). Messages say what to do next.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SwarmError):
    """A flag, file or environment value is wrong; the message names it."""


class ModelError(SwarmError):
    """A model or prepared block is missing, unsupported or corrupted."""


class ProtocolError(SwarmError):
    """Bytes that arrived do not form a valid message. The stream may no longer be trusted."""

    #: the error code sent back to the caller in an Error frame
    code = "bad_request"

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        #: True when the byte stream itself is broken and the connection must close
        self.fatal = fatal


class RemoteError(SwarmError):
    """The remote peer answered with an Error frame, or broke the connection."""

    def __init__(self, message: str, *, code: str = "remote", peer: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.peer = peer


class PeerUnavailable(RemoteError):
    """The peer could not be reached, timed out, or closed the connection."""


class NoRouteError(SwarmError):
    """Some blocks are covered by no usable peer."""

    def __init__(self, missing: list[tuple[int, int]], tokens: list[int] | None = None) -> None:
        spans = ", ".join(f"{s}:{e}" if e - s > 1 else f"{s}" for s, e in missing)
        super().__init__(
            f"no peer serves block(s) {spans}; start `swarm join --blocks <S:E>` for them"
        )
        self.missing = missing
        #: tokens generated before the route broke, kept for the caller
        self.tokens = list(tokens or [])
