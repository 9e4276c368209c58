"""`swarm status`: a snapshot of the swarm (one JSON shape, shared with the API's /v1/swarm) and
its rendering as a table with a per-block coverage line."""

from __future__ import annotations

import time
from typing import Any

from . import links
from .directory import Directory
from .gossip import PeerRecord
from .routing import coverage, gaps


def snapshot(peers: list[PeerRecord], now_ms: float | None = None) -> dict[str, Any]:
    """The JSON shape of the swarm: peers and, per model, how many peers cover each block."""
    now_ms = now_ms if now_ms is not None else time.time() * 1000
    models: dict[str, dict[str, Any]] = {}
    rows = []
    ids = [p.peer_id for p in peers]
    for p in sorted(peers, key=lambda p: (p.model_hash, p.start, p.peer_id)):
        r = p.to_wire()
        n_blocks = int(r.get("num_blocks", 0)) or p.end
        m = models.setdefault(p.model_hash, {"name": r.get("model", "?"), "model_hash": p.model_hash, "num_blocks": n_blocks, "coverage": []})
        m["num_blocks"] = max(m["num_blocks"], n_blocks, p.end)
        rows.append(
            {
                "peer_id": p.peer_id,
                "addrs": list(p.addrs),
                "model": r.get("model", "?"),
                "model_hash": p.model_hash,
                "start": p.start,
                "end": p.end,
                "dtype": p.dtype,
                "quant": p.quant,
                "throughput": round(float(r.get("throughput", 0.0)), 2),
                "ms_per_block": round(p.ms_per_block, 3),
                "sessions": p.sessions,
                "free_cache": p.free_cache,
                "age_s": round(max(0.0, now_ms - float(r.get("version", now_ms))) / 1000, 1),
                "links_ms": links.parse(r.get(links.FIELD), ids),  # its RTTs to peers that could follow it
            }
        )
    for m in models.values():
        cov = coverage(((p.start, p.end) for p in peers if p.model_hash == m["model_hash"]), m["num_blocks"])
        m["coverage"] = cov
        m["uncovered"] = [b for b, c in enumerate(cov) if c == 0]
    return {"peers": rows, "models": list(models.values())}


async def collect(bootstrap: tuple[str, ...], timeout: float = 3.0, mdns: bool = True, mdns_interfaces: list[str] | None = None, swarm_key: Any = None) -> dict[str, Any]:
    d = Directory("", bootstrap, mdns=mdns, mdns_interfaces=mdns_interfaces, swarm_key=swarm_key)
    await d.start()
    try:
        await d.settle(timeout)
    finally:
        await d.stop()
    return snapshot(d.all_peers())


def render(snap: dict[str, Any]) -> str:
    if not snap["peers"]:
        return "no peers found (pass --peer HOST:PORT, or start one with `swarm join`)"
    lines = []
    hdr = f"{'peer':<12} {'address':<22} {'model':<14} {'blocks':>9} {'dtype':<9} {'tok/s':>7} {'sessions':>8} {'free cache':>10} {'age':>6}"
    lines.append(hdr)
    for r in snap["peers"]:
        lines.append(
            f"{r['peer_id'][:10]:<12} {r['addrs'][0] if r['addrs'] else '-':<22} {r['model'][:14]:<14} "
            f"{str(r['start']) + ':' + str(r['end']):>9} {r['dtype'] + ('/' + r['quant'] if r['quant'] != 'none' else ''):<9} "
            f"{r['throughput']:>7.1f} {r['sessions']:>8} {r['free_cache']:>10} {r['age_s']:>5.1f}s"
        )
    for m in snap["models"]:
        cov = m["coverage"]
        bar = "".join("." if c == 0 else str(min(c, 9)) for c in cov)
        lines.append("")
        lines.append(f"coverage of {m['name']} ({m['model_hash'][:12]}), {len(cov)} blocks, replicas per block:")
        lines.append(f"  [{bar}]")
        if m["uncovered"]:
            lines.append(f"  GAP: blocks {_ranges(m['uncovered'])} are served by no peer")
        else:
            lines.append("  every block is covered")
    return "\n".join(lines)


def _ranges(blocks: list[int]) -> str:
    """Block numbers as compact ranges: [2, 3, 7] -> "2:4, 7"."""
    cov = [0 if b in set(blocks) else 1 for b in range(max(blocks) + 1)]
    return ", ".join(f"{s}" if e - s == 1 else f"{s}:{e}" for s, e in gaps(cov))
