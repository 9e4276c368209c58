"""Start real peers as processes on this machine and wait until each says it is ready.

Used by `swarm demo`, the benchmarks in tools/ and the tests: every peer is a separate
`python -m swarm.cli join` process; readiness is the `READY` line it prints once it serves,
never a fixed sleep. Only processes started here are ever killed, by their PID.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SwarmError


@dataclass
class PeerProcess:
    proc: subprocess.Popen
    args: list[str]
    addr: str = ""
    peer_id: str = ""
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT (a clean leave), then SIGKILL if it does not exit in time."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log_tail(self, n: int = 30) -> str:
        if self.log_path and self.log_path.exists():
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


SWARM_CLI = [sys.executable, "-m", "swarm.cli"]


def start_peer(args: list[str], env: dict[str, str] | None = None, log_dir: Path | None = None, name: str = "peer",
               launcher: list[str] | None = None) -> PeerProcess:
    """Start `swarm join ARGS` as a process; call `wait_ready` next. `launcher` replaces
    `python -m swarm.cli` (benchmarks run the same CLI under a wrapper)."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("PYTHONUNBUFFERED", "1")
    log_path = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}-{int(time.time() * 1000)}.log"
        stderr = open(log_path, "wb")
    else:
        stderr = subprocess.DEVNULL
    proc = subprocess.Popen(
        [*(launcher or SWARM_CLI), "join", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        env=e,
    )
    if log_dir is not None:
        stderr.close()
    return PeerProcess(proc, args, log_path=log_path)


def wait_ready(p: PeerProcess, timeout: float = 120.0) -> PeerProcess:
    """Block until the peer prints `READY <host:port> <peer id>`; raise with its log otherwise."""
    deadline = time.monotonic() + timeout
    assert p.proc.stdout is not None
    buf = b""
    while time.monotonic() < deadline:
        if not p.alive() and not buf:
            break
        r, _, _ = select.select([p.proc.stdout], [], [], 0.2)
        if not r:
            continue
        chunk = os.read(p.proc.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith("READY "):
                _, addr, peer_id = line.split()[:3]
                p.addr, p.peer_id = addr, peer_id
                return p
    p.kill()
    raise SwarmError(f"peer {' '.join(p.args)} did not become ready in {timeout:.0f}s\n{p.log_tail()}")


@dataclass
class LocalSwarm:
    """A set of peer processes started here; stops them all on exit."""

    peers: list[PeerProcess] = field(default_factory=list)
    log_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    launcher: list[str] | None = None  # instead of `python -m swarm.cli`

    def start(self, args: list[str], wait: bool = True, name: str = "peer") -> PeerProcess:
        p = start_peer(args, env=self.env, log_dir=self.log_dir, name=name, launcher=self.launcher)
        self.peers.append(p)
        return wait_ready(p) if wait else p

    def start_many(self, arg_lists: list[list[str]]) -> list[PeerProcess]:
        """Start several peers at once (they load in parallel), then wait for each."""
        ps = [start_peer(a, env=self.env, log_dir=self.log_dir, name=f"peer{i}", launcher=self.launcher) for i, a in enumerate(arg_lists)]
        self.peers.extend(ps)
        return [wait_ready(p) for p in ps]

    @property
    def addrs(self) -> list[str]:
        return [p.addr for p in self.peers if p.addr and p.alive()]

    def stop(self) -> None:
        for p in self.peers:
            if p.alive():
                p.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        for p in self.peers:
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(5)
            if p.proc.stdout:
                p.proc.stdout.close()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def thirds(num_blocks: int, n: int = 3) -> list[tuple[int, int]]:
    """[0, L) cut into n nearly equal contiguous spans."""
    cuts = [round(i * num_blocks / n) for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n)]
