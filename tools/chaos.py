"""The chaos killer: SIGKILL a random peer every N seconds, for a bounded time.

It only ever signals the PIDs it is given (`--pid`, or `*.pid` files in `--pidfile-dir`, which is
re-read each round so restarted peers join the pool). A PID is remembered with its process start
time the first time it is seen; if that start time changes, the PID was reused by some other
process and is dropped, never killed. PIDs 0 and 1, this process and its parent are refused.

    python tools/chaos.py --pidfile-dir /tmp/swarm-run --every 5 --duration 60 --spare 1

Each kill is printed as one line, `KILL t=<seconds since start> pid=<pid> from=<source>`, and the
run ends with `DONE kills=<n>`; a benchmark reads those lines to line up failures with tokens.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Target:
    """A process we were allowed to kill, pinned to its start time so a reused PID is not it."""

    pid: int
    source: str  # "--pid" or the pidfile it came from
    start_time: int | None  # /proc/<pid>/stat field 22, None where /proc is unavailable


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None when unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] here is field 3
    except (IndexError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, not ours: it will be refused by the start-time pin or kill itself
    # A zombie (killed, not yet reaped by its parent) is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def read_pidfiles(directory: Path) -> dict[int, str]:
    """PIDs from `*.pid` files (one integer each); unreadable or malformed files are skipped."""
    found: dict[int, str] = {}
    for path in sorted(directory.glob("*.pid")):
        try:
            found[int(path.read_text().strip())] = str(path)
        except (OSError, ValueError):
            continue
    return found


def refused(pid: int) -> bool:
    return pid <= 1 or pid in (os.getpid(), os.getppid())


class Pool:
    """The PIDs we may kill, pinned at first sight; forgets any whose identity changes."""

    def __init__(self) -> None:
        self._targets: dict[int, Target] = {}
        self._refused: set[int] = set()  # reported once, then ignored

    def offer(self, pids: Mapping[int, str]) -> None:
        for pid, source in pids.items():
            if refused(pid):
                if pid not in self._refused:
                    self._refused.add(pid)
                    print(f"SKIP pid={pid} (refused: init, ourselves or our parent)", flush=True)
                continue
            if pid not in self._targets and is_alive(pid):
                self._targets[pid] = Target(pid, source, process_start_time(pid))

    def alive(self) -> list[Target]:
        """Targets that still run as the same process (PID reuse is detected and dropped)."""
        live: list[Target] = []
        for pid, target in list(self._targets.items()):
            if not is_alive(pid) or process_start_time(pid) != target.start_time:
                del self._targets[pid]
                continue
            live.append(target)
        return sorted(live, key=lambda t: t.pid)


def pick(alive: Iterable[Target], rng: random.Random, spare: int) -> Target | None:
    """A random victim, or None when killing one would leave fewer than `spare` alive."""
    pool = list(alive)
    if len(pool) <= spare:
        return None
    return rng.choice(pool)


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    pool = Pool()
    given = {pid: "--pid" for pid in args.pid}
    t0 = time.monotonic()
    kills = 0
    next_at = t0 + args.every
    while True:
        now = time.monotonic()
        if now - t0 >= args.duration or (args.max_kills is not None and kills >= args.max_kills):
            break
        if now < next_at:
            time.sleep(min(next_at - now, t0 + args.duration - now))
            continue
        next_at += args.every
        pool.offer(given)
        if args.pidfile_dir is not None:
            pool.offer(read_pidfiles(args.pidfile_dir))
        victim = pick(pool.alive(), rng, args.spare)
        t = time.monotonic() - t0
        if victim is None:
            print(f"IDLE t={t:.3f} (nothing to kill beyond --spare {args.spare})", flush=True)
            continue
        if args.dry_run:
            print(f"WOULD-KILL t={t:.3f} pid={victim.pid} from={victim.source}", flush=True)
            continue
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except OSError as err:
            print(f"FAILED t={t:.3f} pid={victim.pid}: {err}", flush=True)
            continue
        kills += 1
        print(f"KILL t={t:.3f} pid={victim.pid} from={victim.source}", flush=True)
    print(f"DONE kills={kills}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SIGKILL a random given peer every N seconds.")
    parser.add_argument(
        "--pid", type=int, action="append", default=[], help="a PID that may be killed (repeatable)"
    )
    parser.add_argument(
        "--pidfile-dir", type=Path, help="folder of *.pid files, re-read each round"
    )
    parser.add_argument("--every", type=float, default=5.0, help="seconds between kills")
    parser.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    parser.add_argument("--max-kills", type=int, default=None, help="stop after this many kills")
    parser.add_argument(
        "--spare", type=int, default=0, help="never leave fewer than this many alive"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for a reproducible order")
    parser.add_argument("--dry-run", action="store_true", help="print victims, kill nothing")
    args = parser.parse_args(argv)
    if not args.pid and args.pidfile_dir is None:
        parser.error("give --pid and/or --pidfile-dir: chaos kills only what it is given")
    if args.every <= 0 or args.duration <= 0:
        parser.error("--every and --duration must be > 0")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
