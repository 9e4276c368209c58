"""Rebalancing: an auto peer moves to uncovered blocks when it can leave its own span safely.

Every `check_s` seconds the peer asks `peers.selection.should_move` about its live gossip table.
A move happens only when the same target comes back `confirm` checks in a row, and not within
`cooldown_s` of the last move (gossip needs a few rounds to tell everyone), so peers do not flap.

A move is make-before-break: fetch the new span's missing blocks, load them (off the loop), then
swap `server.span` and re-sign our record at once so gossip announces the new span. Sessions
already open keep the old `BlockSpan` (Session.span) until they close; new sessions get the new
one. The old span's memory goes when its last session does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from swarm import compute
from swarm.blocks import BlockSpan
from swarm.identity import Identity
from swarm.quant import block_hook, weight_bytes

from .fetch import FetchConfig
from .join import fetch_blocks
from .selection import coverage, holdings, should_move

log = logging.getLogger("swarm.rebalance")


@dataclass
class RebalanceConfig:
    budget: int  # blocks this peer may hold
    check_s: float = 2.0  # seconds between checks
    confirm: int = 2  # the same decision this many checks in a row before moving
    patience_s: float = 5.0  # the k-th candidate mover waits k * this for the ones before it
    cooldown_s: float = 10.0  # seconds after a move before the next may be decided
    fetch: FetchConfig = field(default_factory=lambda: FetchConfig(progress=False))


class Rebalancer:
    """Create, then `start()`; `close()` on the way out. `server` is a started PeerServer."""

    def __init__(self, server: Any, config: RebalanceConfig, swarm_key: Any = None) -> None:
        self.server = server
        self.config = config
        self.swarm_key = swarm_key
        self.moves: list[tuple[float, tuple[int, int], tuple[int, int]]] = []  # (time, from, to)
        self._streak: tuple[tuple[int, int] | None, int] = (None, 0)
        self._last_move = float("-inf")
        self._gap_since: float | None = None  # when we first saw a block uncovered
        self._task: asyncio.Task | None = None
        self._identity = Identity.generate()  # for fetching: a caller key, separate from the peer's

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="rebalance")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def decide(self, now: float) -> tuple[int, int] | None:
        """The span to move to now, after hysteresis; None to stay."""
        s = self.server
        held = holdings(s.membership.known(), s.manifest.model_hash)
        if all(coverage(held, s.manifest.num_blocks)):
            self._gap_since = None
        elif self._gap_since is None:
            self._gap_since = now
        age = 0.0 if self._gap_since is None else now - self._gap_since
        target = should_move(held, s.identity.peer_id, s.manifest.num_blocks, self.config.budget, age, self.config.patience_s)
        prev, n = self._streak
        self._streak = (target, n + 1 if target == prev else 1)
        if target is None or now - self._last_move < self.config.cooldown_s:
            return None
        return target if self._streak[1] >= self.config.confirm else None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_s)
            try:
                target = self.decide(time.monotonic())
                if target is not None:
                    await self.move(target)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed move leaves us serving the old span
                log.warning("rebalancing failed: %s", e)
                self._last_move = time.monotonic()  # back off before trying again

    async def move(self, target: tuple[int, int]) -> None:
        s = self.server
        old = (s.span.start, s.span.end)
        log.info("moving from blocks %d:%d to %d:%d (uncovered blocks there)", *old, *target)
        records = s.membership.known()
        await fetch_blocks(s.manifest, target, records, self._identity, self.config.fetch, self.swarm_key)
        on_block = block_hook(s.config.quant, s.config.dtype, s.manifest.num_blocks)
        span = await compute.run(BlockSpan.load, s.manifest, target[0], target[1], s.config.dtype, on_block, None, s.config.device)
        s.span = span  # new sessions use it; open ones keep theirs (Session.span)
        s.weight_bytes = weight_bytes(span.layers)
        s.membership.heartbeat()  # announce now, not at the next beat
        self._last_move = time.monotonic()
        self._streak = (None, 0)
        self.moves.append((time.time(), old, target))
        log.info("serving blocks %d:%d (moved from %d:%d)", *target, *old)
