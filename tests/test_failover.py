"""The fastest chain, and no lost token when a peer drops: routing by measured latency through a
real delay proxy, and SIGKILLed peers in the middle of an answer."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.client import ClientConfig, SwarmClient
from swarm.errors import NoRouteError
from swarm.prepare import prepare

from .conftest import announced_links, reference_generate, run, wait_until

PROXY = Path(__file__).resolve().parent.parent / "tools" / "proxy.py"
IDS = [1, 40, 41, 42, 43, 12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """tools/proxy.py as a process: a TCP proxy on loopback with a delay we can change."""

    def __init__(self, target_port: int, delay_ms: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PROXY), "--listen", "0", "--target", f"127.0.0.1:{target_port}", "--delay-ms", str(delay_ms)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("READY "), line
        self.port = int(line.split()[1])

    def command(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply.startswith("OK"), reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def proxies():
    made: list[Proxy] = []

    def make(target_port: int, delay_ms: float) -> Proxy:
        p = Proxy(target_port, delay_ms)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def _base(model: Path) -> list[str]:
    return ["--model", str(model), "--threads", "1", "--no-mdns"]


async def _answer(model: Path, addrs: list[str], n: int, before_step=None, failovers: list | None = None):
    cfg = ClientConfig(model=str(model), bootstrap=tuple(addrs), mdns=False, discovery_timeout=20)
    async with await SwarmClient.connect(cfg) as client:
        await client.directory.settle(5)
        stats: dict = {}
        tokens = []
        try:
            async for t in client.stream(IDS, n, before_step=before_step, stats=stats, stop_at_eos=False):
                tokens.append(t)
        finally:
            if failovers is not None:
                failovers.extend(stats.get("failovers", []))
        return tokens, stats


def _route_peers(stats: dict) -> list[str]:
    return [h["peer"] for h in stats["routes"][-1]]


def test_the_route_takes_the_fast_replicas_and_follows_a_delay_swap(tiny_model, local_swarm, proxies) -> None:
    prepare(str(tiny_model))
    swarm = local_swarm()
    spans = [(0, 3), (3, 6)]
    fast, slow, proxy_of = {}, {}, {}
    first = None
    for s, e in spans:
        # the "slow" replica is reached only through a proxy that adds 30 ms each way
        port = free_port()
        px = proxies(port, 30)
        extra = ["--peer", first.addr] if first else []
        slow_p = swarm.start([*_base(tiny_model), "--blocks", f"{s}:{e}", "--port", str(port), "--announce", f"127.0.0.1:{px.port}", *extra])
        first = first or slow_p
        port2 = free_port()
        px2 = proxies(port2, 0)
        fast_p = swarm.start([*_base(tiny_model), "--blocks", f"{s}:{e}", "--port", str(port2), "--announce", f"127.0.0.1:{px2.port}", "--peer", first.addr])
        fast[(s, e)], slow[(s, e)] = fast_p, slow_p
        proxy_of[fast_p.peer_id], proxy_of[slow_p.peer_id] = px2, px
    addrs = [first.addr]

    def links_favour(near: dict) -> bool:
        """Steps are pushed peer to peer, so the second hop is priced by the link the first hop
        announced: wait until every first-span peer has measured `near` (span 3:6) as the closer."""
        far = next(p for p in (fast[spans[1]], slow[spans[1]]) if p is not near)
        have = announced_links(first.addr)
        return all(have.get(p.peer_id, {}).get(near.peer_id, 1e9) < 30 < have.get(p.peer_id, {}).get(far.peer_id, 0)
                   for p in (fast[spans[0]], slow[spans[0]]))

    wait_until(lambda: links_favour(fast[spans[1]]), 30, "the peers announce their links")
    tokens, stats = run(_answer(tiny_model, addrs, 8))
    assert _route_peers(stats) == [fast[sp].peer_id for sp in spans]
    hops = stats["routes"][-1]
    assert all(h["rtt_ms"] < 30 for h in hops), hops

    # swap: the fast ones get the delay, the slow ones lose it
    for sp in spans:
        proxy_of[fast[sp].peer_id].command("delay 30")
        proxy_of[slow[sp].peer_id].command("delay 0")
    # the client measures its own RTTs afresh; the peers' links follow within a few gossip rounds
    wait_until(lambda: links_favour(slow[spans[1]]), 30, "the peers' links follow the swap")
    tokens2, stats2 = run(_answer(tiny_model, addrs, 8))
    assert _route_peers(stats2) == [slow[sp].peer_id for sp in spans]
    assert tokens2 == tokens  # same model, same answer, whoever computes it


def _replicated_swarm(model: Path, swarm, spans, replicas: int):
    prepare(str(model))
    first = swarm.start([*_base(model), "--blocks", f"{spans[0][0]}:{spans[0][1]}"])
    rest = [[*_base(model), "--blocks", f"{s}:{e}", "--peer", first.addr] for s, e in spans for _ in range(replicas)][1:]
    peers = [first, *swarm.start_many(rest)]
    return peers


def _killer(peers, at_steps: dict[int, int], route_of, killed: list):
    """A before_step hook: at each chosen step, SIGKILL the peer now on the route for hop k."""

    def hook(step: int) -> None:
        if step in at_steps:
            pid = route_of()[at_steps[step]]
            victim = next(p for p in peers if p.peer_id == pid)
            victim.kill(signal.SIGKILL)
            victim.proc.wait(5)
            killed.append((step, pid))

    return hook


@pytest.mark.parametrize("kill_at", [0, 20], ids=["during-the-prompt", "after-20-tokens"])
def test_a_peer_killed_mid_answer_changes_no_token(tiny_model, local_swarm, kill_at: int) -> None:
    spans = [(0, 3), (3, 6)]
    peers = _replicated_swarm(tiny_model, local_swarm(), spans, 2)
    addrs = [peers[0].addr]
    want_ref = reference_generate(tiny_model, IDS, 40)
    clean, _ = run(_answer(tiny_model, addrs, 40))

    killed: list = []

    async def go():
        cfg = ClientConfig(model=str(tiny_model), bootstrap=tuple(addrs), mdns=False, discovery_timeout=20)
        async with await SwarmClient.connect(cfg) as client:
            await client.directory.settle(5)
            stats: dict = {}
            tokens = []
            hook = _killer(peers, {kill_at: 1}, lambda: [h.hop.peer_id for h in client.active_chains[-1].hops], killed)
            async for t in client.stream(IDS, 40, before_step=hook, stats=stats, stop_at_eos=False):
                tokens.append(t)
            return tokens, stats

    got, stats = run(go())
    assert killed and killed[0][0] == kill_at
    assert got == clean
    # stop_at_eos=False generated past any EOS; the oracle stops there, so compare its length
    assert got[: len(want_ref)] == want_ref
    assert any(ev.dropped == killed[0][1] for ev in stats["failovers"])
    assert killed[0][1] not in _route_peers(stats)
    assert stats["pushed_steps"] >= 38  # the failed step went hop by hop; pushes went on after it


def test_a_hung_peer_is_routed_around_and_changes_no_token(tiny_model, local_swarm) -> None:
    """SIGSTOP, not SIGKILL: the connection stays open and nothing answers. The pushed step
    times out, the step runs again hop by hop, that finds the silent hop, and a replica takes over."""
    spans = [(0, 2), (2, 4), (4, 6)]
    peers = _replicated_swarm(tiny_model, local_swarm(), spans, 2)
    addrs = [peers[0].addr]
    clean, _ = run(_answer(tiny_model, addrs, 30))
    stopped: list = []

    def hook(step: int) -> None:
        if step == 10:
            pid = client_ref[0].active_chains[-1].hops[1].hop.peer_id
            victim = next(p for p in peers if p.peer_id == pid)
            victim.kill(signal.SIGSTOP)
            stopped.append(victim)

    client_ref: list = []

    async def go():
        cfg = ClientConfig(model=str(tiny_model), bootstrap=tuple(addrs), mdns=False, discovery_timeout=20)
        async with await SwarmClient.connect(cfg) as client:
            client_ref.append(client)
            await client.directory.settle(5)
            stats: dict = {}
            out = [t async for t in client.stream(IDS, 30, before_step=hook, stats=stats, stop_at_eos=False)]
            return out, stats

    try:
        got, stats = run(go())
    finally:
        for p in stopped:
            p.kill(signal.SIGCONT)
    assert got == clean
    victim = stopped[0].peer_id
    ev = next(ev for ev in stats["failovers"] if ev.dropped == victim)
    assert ev.stall_s < 10
    assert victim not in _route_peers(stats)
    assert stats["pushed_steps"] >= 25  # pushes went on through the replacement


def test_three_kills_in_one_long_answer(tiny_model, local_swarm) -> None:
    spans = [(0, 2), (2, 4), (4, 6)]
    peers = _replicated_swarm(tiny_model, local_swarm(), spans, 2)
    addrs = [peers[0].addr]
    clean, _ = run(_answer(tiny_model, addrs, 100))
    killed: list = []

    async def go():
        cfg = ClientConfig(model=str(tiny_model), bootstrap=tuple(addrs), mdns=False, discovery_timeout=20)
        async with await SwarmClient.connect(cfg) as client:
            await client.directory.settle(5)
            hook = _killer(peers, {20: 0, 50: 1, 80: 2}, lambda: [h.hop.peer_id for h in client.active_chains[-1].hops], killed)
            stats: dict = {}
            out = [t async for t in client.stream(IDS, 100, before_step=hook, stats=stats, stop_at_eos=False)]
            return out, stats

    got, stats = run(go())
    assert len(killed) == 3
    assert got == clean
    assert len(got) == 100
    assert {pid for _, pid in killed}.isdisjoint(_route_peers(stats))


def test_the_last_replica_killed_stops_with_the_blocks_named_and_tokens_kept(tiny_model, local_swarm) -> None:
    spans = [(0, 3), (3, 6)]
    peers = _replicated_swarm(tiny_model, local_swarm(), spans, 1)
    addrs = [peers[0].addr]
    clean, _ = run(_answer(tiny_model, addrs, 30))
    killed: list = []

    async def go():
        cfg = ClientConfig(model=str(tiny_model), bootstrap=tuple(addrs), mdns=False, discovery_timeout=20)
        async with await SwarmClient.connect(cfg) as client:
            await client.directory.settle(5)
            hook = _killer(peers, {10: 1}, lambda: [h.hop.peer_id for h in client.active_chains[-1].hops], killed)
            out = []
            with pytest.raises(NoRouteError) as err:
                async for t in client.stream(IDS, 30, before_step=hook, stop_at_eos=False):
                    out.append(t)
            return out, err.value

    got, err = run(go())
    assert "block(s) 3:6" in str(err)
    assert err.missing == [(3, 6)]
    assert err.tokens == got == clean[:10]


def test_a_full_peer_is_routed_around(tiny_model, local_swarm) -> None:
    """A replica with no free cache answers `overloaded`; the client uses the other one."""
    prepare(str(tiny_model))
    swarm = local_swarm()
    full = swarm.start([*_base(tiny_model), "--blocks", "0:6", "--max-cache-tokens", "8"])
    roomy = swarm.start([*_base(tiny_model), "--blocks", "0:6", "--peer", full.addr])
    failovers: list = []
    tokens, stats = run(_answer(tiny_model, [full.addr], 20, failovers=failovers))
    assert _route_peers(stats) == [roomy.peer_id]
    assert len(tokens) == 20
