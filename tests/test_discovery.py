"""Peers find each other: mDNS with no addresses typed, gossip with --peer, leaving, forgery."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

from swarm import wire
from swarm.gossip import GossipPush, GossipReply, PeerRecord
from swarm.directory import ask_peer
from swarm.identity import Identity
from swarm.transport import Connection

from .conftest import run, start_chain, wait_until


async def _table(addr: str) -> set[str]:
    """The peer ids a live peer lists (itself included)."""
    return {r["peer_id"] for r in await ask_peer(addr)}


def tables(peers) -> dict[str, set[str]]:
    async def all_():
        return await asyncio.gather(*(_table(p.addr) for p in peers), return_exceptions=True)

    return {p.peer_id: t for p, t in zip(peers, run(all_())) if not isinstance(t, BaseException)}


def _agree(peers, expected: set[str]) -> bool:
    t = tables(peers)
    return len(t) == len(peers) and all(v == expected for v in t.values())


def test_peers_with_no_addresses_find_each_other_over_mdns(tiny_model, local_swarm) -> None:
    from swarm.prepare import prepare

    prepare(str(tiny_model))
    swarm = local_swarm()
    base = ["--model", str(tiny_model), "--threads", "1", "--mdns-interface", "127.0.0.1"]
    peers = swarm.start_many([[*base, "--blocks", f"{i}:{i + 2}"] for i in range(0, 4)])
    ids = {p.peer_id for p in peers}
    wait_until(lambda: _agree(peers, ids), 30, "4 peers list each other")

    fifth = swarm.start([*base, "--blocks", "4:6"])
    peers.append(fifth)
    took = wait_until(lambda: _agree(peers, ids | {fifth.peer_id}), 15, "a 5th peer appears everywhere")
    print(f"new peer in every table after {took:.1f}s")

    # status with nothing typed either: it finds the swarm on the LAN
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--json", "--discovery-timeout", "8", "--mdns-interface", "127.0.0.1"],
                         capture_output=True, text=True, timeout=60)
    import json

    snap = json.loads(out.stdout)
    assert {p["peer_id"] for p in snap["peers"]} == ids | {fifth.peer_id}
    assert snap["models"][0]["coverage"] == [1, 2, 2, 2, 2, 1]

    killed = peers[1]
    killed.kill(signal.SIGKILL)
    rest = [p for p in peers if p is not killed]
    took = wait_until(lambda: _agree(rest, {p.peer_id for p in rest}), 15, "a SIGKILLed peer disappears everywhere")
    print(f"killed peer gone from every table after {took:.1f}s")

    left = rest[0]
    left.proc.send_signal(signal.SIGINT)
    rest = rest[1:]
    took = wait_until(lambda: _agree(rest, {p.peer_id for p in rest}), 3, "a peer that left (SIGINT) disappears at once")
    print(f"peer that left gone from every table after {took:.1f}s")


def test_gossip_through_one_bootstrap_address_spreads_the_whole_table(tiny_model, local_swarm) -> None:
    from swarm.prepare import prepare

    prepare(str(tiny_model))
    swarm = local_swarm()
    base = ["--model", str(tiny_model), "--threads", "1", "--no-mdns"]
    first = swarm.start([*base, "--blocks", "0:2"])
    # each later peer knows only the one before it: a chain of introductions
    p2 = swarm.start([*base, "--blocks", "2:4", "--peer", first.addr])
    p3 = swarm.start([*base, "--blocks", "4:6", "--peer", p2.addr])
    peers = [first, p2, p3]
    wait_until(lambda: _agree(peers, {p.peer_id for p in peers}), 20, "every peer learns the whole table")


def _forged_records(victim: PeerRecord) -> list[dict]:
    """A wrong signature, a replayed old version, and a record claiming the victim's id."""
    liar = Identity.generate()
    tampered = victim.to_wire()
    tampered["end"] = victim.end + 1  # changed after signing: the signature no longer holds
    replay = dict(victim.to_wire())
    replay["version"] = victim.version - 10_000  # an old version (and its signature is for another)
    impostor_fields = {**victim.to_wire(), "version": victim.version + 10_000, "start": 0, "end": 6}
    impostor_fields["signature"] = liar.sign(b"not the record")  # someone else's key signing the victim's id
    unsigned = PeerRecord.from_wire(impostor_fields)
    forged_by_other = dict(unsigned.to_wire())
    forged_by_other["signature"] = liar.sign(unsigned.signed_bytes())
    return [tampered, replay, impostor_fields, forged_by_other]


def test_forged_records_do_not_change_a_live_peers_table(tiny_model, local_swarm) -> None:
    from swarm.prepare import prepare

    prepare(str(tiny_model))
    swarm = local_swarm()
    base = ["--model", str(tiny_model), "--threads", "1", "--no-mdns"]
    a = swarm.start([*base, "--blocks", "0:3"])
    b = swarm.start([*base, "--blocks", "3:6", "--peer", a.addr])
    wait_until(lambda: _agree([a, b], {a.peer_id, b.peer_id}), 20, "two peers list each other")

    async def attack():
        host, port = a.addr.rsplit(":", 1)
        conn = await Connection.open(host, int(port), Identity.generate(), a.peer_id)
        try:
            info = await conn.request(lambda rid: wire.GetInfo(rid))
            rec_b = PeerRecord.from_wire(next(r for r in info.known if r["peer_id"] == b.peer_id))
            before = {r["peer_id"]: (r["start"], r["end"]) for r in [info.peer, *info.known]}
            # a record for a peer that does not exist, signed by the wrong key
            ghost = Identity.generate()
            ghost_rec = {**rec_b.to_wire(), "peer_id": ghost.peer_id}
            forged = _forged_records(rec_b) + [ghost_rec]
            reply = await conn.request(lambda rid: GossipPush(rid, {}, tuple(forged)))
            assert isinstance(reply, GossipReply)
            info = await conn.request(lambda rid: wire.GetInfo(rid))
            after = {r["peer_id"]: (r["start"], r["end"]) for r in [info.peer, *info.known]}
            return before, after, ghost.peer_id
        finally:
            await conn.close()

    before, after, ghost = run(attack())
    assert after == before
    assert ghost not in after
    assert after[b.peer_id] == (3, 6)


def test_two_callers_meeting_a_new_peer_share_one_link(tiny_model, local_swarm) -> None:
    """A push and a gossip round that dial the same peer at once get one connection; the second
    dial must not close the first under a request in flight."""
    from peers.membership import Membership, MembershipConfig

    (peer,) = start_chain(local_swarm(), tiny_model, [(0, 6)])

    async def scenario() -> None:
        m = Membership(Identity.generate(), dict, MembershipConfig(mdns=False))
        m.table.merge(await ask_peer(peer.addr), 0.0)
        a, b = await asyncio.gather(m.connection(peer.peer_id), m.connection(peer.peer_id))
        try:
            assert a is b and not a.closed
            assert isinstance(await a.request(lambda rid: wire.Ping(rid), timeout=5), wire.Pong)
        finally:
            await a.close()

    run(scenario())
