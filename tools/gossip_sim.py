"""Simulate the gossip core for N peers in one process: how fast tables agree, what a round costs.

Every peer runs a real `GossipTable` with real Ed25519 records, driven through the table's
object-level exchange API (`push_contents`, `answer`, `merge`, `records_for`: what `make_push`,
`on_push` and `on_reply` wrap). Each message's size is that of its real frame (`swarm.wire`
encoding, records' msgpack included); it is then dropped (loss) or delivered after a delay of
whole rounds. Records travel as objects, not re-parsed (the parser is covered by the tests). One round is one gossip interval (0.5 s of simulated time, so the table's
timeouts in seconds apply unchanged); each peer bumps its version every
`table.heartbeat_interval()` (1 s up to 128 peers' worth of capacity, stretched past it, as the
driver does), and tables suspect and remove on their scaled timeouts.

Two phases per size:

1. bootstrap: every peer knows only itself and one seed (a random earlier peer: the sparsest
   connected start), heartbeats on. Reported: rounds until every live table has seen every live
   peer ("seen"), rounds until every live table lists exactly the live peers ("agree"; "flaps"
   when heartbeat staleness keeps causing false removals), bytes sent per peer per round.
2. steady: one peer is killed silently and one new peer joins at the start (plus
   `--churn` of the peers per round killed and replaced). Reported: seconds until the joiner is in
   every live table, seconds until the killed peer is gone from every table, live peers wrongly
   suspected and wrongly removed (both phases), and bytes per peer per round. By default the
   phase lasts until the kill and the join have been seen everywhere (at most twice the scaled
   removal timeout).

Run: `python tools/gossip_sim.py` (10, 100, 1000 peers, 5% loss) or with --peers/--loss/--seed/
--churn/--delay. Signature checks are shared through one cache (each distinct record is verified
once for the whole simulation, not once per peer) to keep 1,000 peers within about a minute of CPU.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm import wire  # noqa: E402
from swarm.gossip import (  # noqa: E402
    GossipConfig,
    GossipPush,
    GossipRecords,
    GossipReply,
    GossipTable,
    PeerRecord,
    choose_gossip_targets,
)
from swarm.identity import Identity  # noqa: E402

ROUND_S = 0.5  # one gossip interval
HASH = "ab" * 32


class SharedVerifier:
    """Verifies each distinct record once for all simulated peers (real Ed25519 underneath)."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, int, bytes], bool] = {}

    def __call__(self, rec: PeerRecord) -> bool:
        key = (rec.peer_id, rec.version, rec.signature)
        ok = self.cache.get(key)
        if ok is None:
            ok = self.cache[key] = rec.verify()
        return ok


@dataclass
class SimPeer:
    ident: Identity
    table: GossipTable
    seeds: list[str]
    start: int
    alive: bool = True
    next_beat: float = 0.0  # simulated time of the next heartbeat
    sent_bytes: int = 0
    seen_ever: set[str] = field(default_factory=set)

    @property
    def pid(self) -> str:
        return self.ident.peer_id

    def beat(self, now: float) -> None:
        """Sign and install a new version of our record (the heartbeat)."""
        v = 1 + int(now * 1000)
        r = PeerRecord(self.pid, (f"10.0.0.1:{7000 + self.start}",), "smollm2-135m", HASH,
                       self.start, self.start + 10, "float32", "none", 15.0, 1.5, 4096, 0, v)
        self.table.update_own(r.sign(self.ident), now)


@dataclass
class Sim:
    n: int
    loss: float
    delay: int
    churn: float
    rng: random.Random
    fanout: int = 3
    config: GossipConfig = field(default_factory=lambda: GossipConfig(round_s=ROUND_S, fanout=3))
    verifier: SharedVerifier = field(default_factory=SharedVerifier)
    peers: dict[str, SimPeer] = field(default_factory=dict)
    queue: dict[int, list[tuple]] = field(default_factory=lambda: defaultdict(list))
    round: int = 0
    msg_id: int = 0
    false_removals: int = 0
    false_suspicions: int = 0
    rec_sizes: dict[tuple[str, int, bytes], int] = field(default_factory=dict)
    skel_sizes: dict[tuple[str, int, int, bool], int] = field(default_factory=dict)

    def add_peer(self, seeds: list[str], now: float) -> SimPeer:
        ident = Identity.generate()
        p = SimPeer(ident, GossipTable(ident.peer_id, self.config, self.verifier), seeds,
                    start=self.rng.randrange(0, 20))
        p.beat(now)
        p.next_beat = now + self.rng.uniform(0.5, 1.0) * p.table.heartbeat_interval()
        self.peers[p.pid] = p
        return p

    def live(self) -> list[SimPeer]:
        return [p for p in self.peers.values() if p.alive]

    def send(self, src: SimPeer, kind: str, dst: str, payload: tuple, size: int) -> None:
        src.sent_bytes += size
        if self.rng.random() < self.loss:
            return
        self.queue[self.round + self.delay].append((kind, src.pid, dst, payload))

    def size(self, skeleton: wire.Message, records: list[PeerRecord]) -> int:
        """Exact framed size of `skeleton` carrying `records`: msgpack encodes a list as a
        header plus its items, so the records' cached encodings add up."""
        # the skeleton's size depends only on its type, id width, want count and window (ids are fixed-size)
        want = getattr(skeleton, "want", ())
        key = (skeleton.TYPE, len(msgpack.packb(skeleton.id)), len(want), bool(getattr(skeleton, "lo", "")))
        n = self.skel_sizes.get(key)
        if n is None:
            n = self.skel_sizes[key] = len(wire.encode(skeleton)) - 1  # minus the empty list's header
        n += 1 if len(records) < 16 else 3
        for r in records:
            key = (r.peer_id, r.version, r.signature)
            b = self.rec_sizes.get(key)
            if b is None:
                b = self.rec_sizes[key] = len(msgpack.packb(r.to_wire(), use_bin_type=True))
            n += b
        return n

    def step(self, heartbeats: bool) -> None:
        now = self.round * ROUND_S
        live = self.live()
        if heartbeats:  # each peer beats at its table's interval (1 s, stretched in big swarms)
            for p in live:
                if now >= p.next_beat - 1e-9:
                    p.beat(now)
                    p.next_beat = now + p.table.heartbeat_interval()
        self.rng.shuffle(live)
        for p in live:
            targets = choose_gossip_targets(p.table, self.rng, self.fanout)
            for s in p.seeds:  # bootstrap addresses (mDNS / --peer): dial them until they answer;
                # stopping once the table merely knows `fanout` others can leave an island that
                # nobody outside knows about when the first push to the seed is lost
                if s not in p.table and s not in targets and s != p.pid:
                    targets.append(s)
            for t in targets:
                # the object-level API the message helpers wrap (make_push/on_push/on_reply):
                # records travel as objects here, sizes are those of the real encoded frames
                self.msg_id += 1
                d, recs = p.table.push_contents()
                # the digest's bytes added to an empty push's (skipping the validation of a
                # message we would only measure)
                size = self.size(GossipPush(self.msg_id, {}, (), d.lo, d.hi), recs) - 1 + len(
                    msgpack.packb(dict(d.versions), use_bin_type=True))
                self.send(p, "push", t, (d, recs), size)
        events = self.queue.pop(self.round, [])
        i = 0
        while i < len(events):  # delay 0: replies land in this same round
            kind, src, dst, payload = events[i]
            i += 1
            peer = self.peers[dst]
            if not peer.alive:
                continue
            if kind == "push":
                d, recs = payload
                send, want, _ = peer.table.answer(d, recs, now)
                self.send(peer, "reply", src, (send, want), self.size(GossipReply(1, (), tuple(want)), send))
            elif kind == "reply":
                send, want = payload
                peer.table.merge(send, now)
                follow = peer.table.records_for(want)
                if follow:
                    self.send(peer, "records", src, (follow,), self.size(GossipRecords(0, ()), follow))
            else:
                peer.table.merge(payload[0], now)
            if self.delay == 0 and self.queue.get(self.round):
                events.extend(self.queue.pop(self.round))
        for p in self.live():
            ex = p.table.expire(now)
            for pid in ex.removed:
                if self.peers[pid].alive:
                    self.false_removals += 1
            for pid in ex.suspected:
                if self.peers[pid].alive:
                    self.false_suspicions += 1
        self.round += 1

    def agreed(self) -> bool:
        """Every live table lists exactly the live peers (versions keep moving: heartbeats)."""
        live = self.live()
        truth = {p.pid for p in live}
        return all(len(p.table) == len(truth) and all(q in p.table for q in truth) for p in live)

    def all_seen(self) -> bool:
        """Every live table has held every live peer's record at some point: dissemination done
        (at 1,000 peers heartbeat staleness makes exact agreement flap; see false removals)."""
        live = self.live()
        for p in live:
            p.seen_ever.update(r.peer_id for r in p.table.records())
        return all(len(p.seen_ever) >= len(live) for p in live)

    def bytes_this_round(self) -> float:
        live = self.live()
        total = sum(p.sent_bytes for p in live)
        for p in live:
            p.sent_bytes = 0
        return total / max(1, len(live))


def run(n: int, loss: float, seed: int, churn: float, delay: int, steady_rounds: int | None) -> dict:
    rng = random.Random(seed)
    sim = Sim(n, loss, delay, churn, rng)
    t0, c0 = time.perf_counter(), time.process_time()
    ids: list[str] = []
    for i in range(n):
        p = sim.add_peer([ids[rng.randrange(i)]] if i else [], 0.0)
        ids.append(p.pid)
    boot_bytes: list[float] = []
    rounds: int | None = None  # every table has seen every peer
    agreed: int | None = None  # every table lists exactly the live peers
    for _ in range(100):
        sim.step(heartbeats=True)
        boot_bytes.append(sim.bytes_this_round())
        if agreed is None and sim.agreed():
            agreed = sim.round
        if rounds is None and sim.all_seen():
            rounds = sim.round
        if rounds is not None and (agreed is not None or sim.round >= 2 * rounds):
            break
    boot_false = sim.false_removals
    # steady: heartbeats, one silent kill and one join at the start, optional churn
    now = sim.round * ROUND_S
    victims = {rng.choice(sim.live()).pid: sim.round}
    for v in victims:
        sim.peers[v].alive = False
    joins = {sim.add_peer([rng.choice(sim.live()).pid], now).pid: sim.round}
    steady_bytes: list[float] = []
    join_lat: dict[str, float] = {}
    gone_lat: dict[str, float] = {}
    # default length: until the kill and the join have been seen everywhere (plus one round),
    # at most twice the (scaled) removal timeout; the kill alone keeps it past one dead_timeout,
    # so every live peer has been through a full removal window
    dead = max(p.table.dead_timeout() for p in sim.live())
    max_rounds = steady_rounds if steady_rounds is not None else math.ceil(2 * dead / ROUND_S) + 20
    done_at: int | None = None
    for _ in range(max_rounds):
        if churn:
            k = sum(1 for _ in sim.live() if rng.random() < churn)
            for _ in range(k):
                v = rng.choice(sim.live())
                v.alive = False
                victims[v.pid] = sim.round
                joins[sim.add_peer([rng.choice(sim.live()).pid], sim.round * ROUND_S).pid] = sim.round
        sim.step(heartbeats=True)
        steady_bytes.append(sim.bytes_this_round())
        live = sim.live()
        for j, r0 in joins.items():
            if j not in join_lat and sim.peers[j].alive and all(j in p.table for p in live):
                join_lat[j] = (sim.round - r0) * ROUND_S
        for v, r0 in victims.items():
            if v not in gone_lat and all(v not in p.table for p in live):
                gone_lat[v] = (sim.round - r0) * ROUND_S
        if steady_rounds is None and not churn:
            if done_at is None and join_lat and gone_lat:
                done_at = sim.round
            if done_at is not None and sim.round >= done_at + 1:
                break
    hb = sorted(p.table.heartbeat_interval() for p in sim.live())
    return {
        "n": n,
        "loss": loss,
        "rounds": rounds,
        "agreed": agreed,
        "boot_bpr": sum(boot_bytes) / len(boot_bytes),
        "boot_bpr_max": max(boot_bytes),
        "steady_bpr": sum(steady_bytes) / max(1, len(steady_bytes)),
        "steady_rounds": len(steady_bytes),
        "hb_s": hb[len(hb) // 2],
        "dead_s": dead,
        "join_s": max(join_lat.values()) if join_lat else math.inf,
        "joins_seen": f"{len(join_lat)}/{len(joins)}",
        "gone_s": max(gone_lat.values()) if gone_lat else math.inf,
        "gone_seen": f"{len(gone_lat)}/{len(victims)}",
        "false_removals": sim.false_removals,
        "boot_false_removals": boot_false,
        "false_suspicions": sim.false_suspicions,
        "secs": time.perf_counter() - t0,
        "cpu": time.process_time() - c0,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, nargs="*", default=[10, 100, 1000], help="swarm sizes")
    ap.add_argument("--loss", type=float, default=0.05, help="fraction of messages dropped")
    ap.add_argument("--delay", type=int, default=0, help="rounds each message takes to arrive")
    ap.add_argument("--churn", type=float, default=0.0,
                    help="fraction of live peers killed (and as many joined) per steady round")
    ap.add_argument("--steady-rounds", type=int, default=None,
                    help="rounds of the steady phase (default: until the kill and the join are "
                         "seen everywhere, at most 2 x the scaled removal timeout)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    cfg = Sim(0, 0, 0, 0, random.Random()).config
    probe = GossipTable("", cfg)
    print(f"round {ROUND_S}s, fanout {cfg.fanout}, max {cfg.max_records_per_round} records and "
          f"{cfg.max_digest_entries} digest entries per message; capacity {probe.capacity():.0f} "
          f"records/s per peer: heartbeat {cfg.heartbeat_s}s, suspect {cfg.suspect_after}s, dead "
          f"{cfg.dead_after}s, each x max(1, n / {probe.capacity():.0f}); loss {a.loss:.0%}, "
          f"delay {a.delay} rounds, churn {a.churn:.1%}/round, seed {a.seed}")
    head = (f"{'peers':>6} {'seen':>5} {'agree':>5} {'log2N':>5} {'boot B/peer/rnd':>15} {'(max)':>8} "
            f"{'steady B/peer/rnd':>17} {'hb s':>5} {'dead s':>6} {'join seen':>10} {'kill gone':>10} "
            f"{'false susp':>10} {'false rm':>8} {'wall s':>6} {'cpu s':>6}")
    print(head)
    for n in a.peers:
        r = run(n, a.loss, a.seed, a.churn, a.delay, a.steady_rounds)
        rounds = r["rounds"] if r["rounds"] is not None else "never"
        agreed = r["agreed"] if r["agreed"] is not None else "flaps"
        print(f"{n:>6} {rounds:>5} {agreed:>5} {math.log2(n):>5.1f} {r['boot_bpr']:>15,.0f} {r['boot_bpr_max']:>8,.0f} "
              f"{r['steady_bpr']:>17,.0f} {r['hb_s']:>5.1f} {r['dead_s']:>6.1f} {r['join_s']:>8.1f}s {r['gone_s']:>8.1f}s "
              f"{r['false_suspicions']:>10} {r['false_removals']:>8} {r['secs']:>6.1f} {r['cpu']:>6.1f}", flush=True)
        if a.churn:
            print(f"{'':>6} joins seen by all: {r['joins_seen']}, kills gone from all: {r['gone_seen']}")


if __name__ == "__main__":
    main()
