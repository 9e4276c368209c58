"""Who may connect: caps on open connections (in all and per address) and on the rate of new
connections per address. No I/O; time is passed in.

A volunteer's peer must stay up for everyone when one address opens connections in a loop or
holds many half-open ones: beyond these limits a new connection is closed at once, before TLS.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class GateLimits:
    max_connections: int = 512  # open at once, from everyone
    max_per_address: int = 64  # open at once, from one IP address
    rate_per_address: float = 20.0  # new connections per second one address may sustain
    burst_per_address: float = 40.0  # ... and in a burst


@dataclass
class ConnectionGate:
    limits: GateLimits = field(default_factory=GateLimits)
    open: Counter = field(default_factory=Counter)  # address -> open connections
    _tokens: dict[str, tuple[float, float]] = field(default_factory=dict)  # address -> (tokens, at)
    refused: Counter = field(default_factory=Counter)  # "total" | "per_address" | "rate" -> count

    def admit(self, address: str, now: float) -> str | None:
        """None to let a new connection in (and count it), or the reason it is refused."""
        lim = self.limits
        tokens, at = self._tokens.get(address, (lim.burst_per_address, now))
        tokens = min(lim.burst_per_address, tokens + (now - at) * lim.rate_per_address)
        reason = kind = None
        if sum(self.open.values()) >= lim.max_connections:
            kind, reason = "total", "too many connections"
        elif self.open[address] >= lim.max_per_address:
            kind, reason = "per_address", f"too many connections from {address}"
        elif tokens < 1.0:
            kind, reason = "rate", f"{address} opens connections too fast"
        if kind is None:
            tokens -= 1.0
            self.open[address] += 1
        else:
            self.refused[kind] += 1
        self._tokens[address] = (tokens, now)
        if len(self._tokens) > 4 * lim.max_connections:  # forget idle addresses, bounded memory
            full = {a: v for a, v in self._tokens.items() if self.open[a] or v[0] < lim.burst_per_address}
            self._tokens = full
        return reason

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]
