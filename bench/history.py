"""A Jepsen-style history check of consumer groups: real member processes (bench/history_member.py)
consume what the server assigns them while a nemesis kills, freezes, duplicates and evicts them and
freezes Redis; then a checker reads every process's history and fails on:

- **overlap**: one partition consumed by two incarnations (member_id:member_epoch) in overlapping
  intervals;
- **unowned**: a partition consumed by nobody for longer than session_timeout + one cleanup period
  + slack while live members exist. "Live" excludes the windows in which the nemesis made every
  member unable to consume: Redis paused (SIGSTOP to SIGCONT); the nemesis faults one process at a
  time, so outside those windows there are always live members. The time before every partition
  was first consumed and after the shutdown began is not checked;
- **generation**: a generation that goes backwards for one incarnation (in the order its socket
  delivered them).

The stack is real: embedded redis-server, SQLite (or DATABASE_URL), uvicorn with 2 workers, and the
leader jobs (``groups.tasks.expire_members`` and ``reconcile_sessions``, with their leadership and
fences) run by a loop process every ``--cleanup`` seconds instead of Celery beat's 5 s.

    .venv/bin/python bench/history.py --seconds 180          # the long run (make history)
    .venv/bin/python bench/history.py --takeover 5           # takeover after a leave and a kill -9
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE))

from bench.common import Stack  # noqa: E402
from scripts.runstack import Api  # noqa: E402

GROUP = "history"
TOPICS = ["h0", "h1"]
PARTITIONS = 24
FAULTS = ["kill", "freeze", "duplicate", "leave", "redis"]
ALL_PARTITIONS = [f"{t}:{n}" for t in TOPICS for n in range(PARTITIONS)]

LEADER_LOOP = """
import os, time, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "registry_project.settings")
django.setup()
from groups import tasks
period = float(os.environ["HISTORY_CLEANUP"])
while True:
    started = time.monotonic()
    for job in (tasks.expire_members, tasks.reconcile_sessions):
        try:
            job()
        except Exception as exc:  # Redis paused or lost: the next period tries again
            print("leader job failed:", type(exc).__name__, exc, flush=True)
    time.sleep(max(0.0, period - (time.monotonic() - started)))
"""


# ---------------------------------------------------------------- the checker


@dataclass
class Interval:
    partition: str
    inc: str
    start: float
    end: float


@dataclass
class History:
    intervals: list[Interval] = field(default_factory=list)
    generations: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    leaves: list[dict[str, Any]] = field(default_factory=list)


def read_histories(files: Iterable[Path], killed_at: dict[str, float], end: float) -> History:
    """Every process's history. An interval a process never closed (it was killed -9) ends at its kill
    time, or at ``end``: a bound on its last tick."""
    history = History()
    for path in files:
        open_: dict[tuple[str, str], float] = {}
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut by kill -9
            kind, inc = event["ev"], event["inc"]
            if kind == "start":
                open_[(event["p"], inc)] = event["t"]
            elif kind == "stop":
                start = open_.pop((event["p"], inc))
                history.intervals.append(Interval(event["p"], inc, start, event["t"]))
            elif kind == "gen":
                history.generations[inc].append(event["g"])
            elif kind == "leave":
                history.leaves.append(event)
        until = killed_at.get(path.name, end)
        for (p, inc), start in open_.items():
            history.intervals.append(Interval(p, inc, start, until))
    return history


def check(
    history: History, bound: float, window: tuple[float, float], excluded: list[tuple[float, float]]
) -> dict[str, list[str]]:
    """Violations by kind (overlap, unowned, generation), each a readable line."""
    violations: dict[str, list[str]] = {"overlap": [], "unowned": [], "generation": []}
    by_partition: dict[str, list[Interval]] = defaultdict(list)
    for interval in history.intervals:
        by_partition[interval.partition].append(interval)
    for p in ALL_PARTITIONS:
        intervals = sorted(by_partition.get(p, []), key=lambda i: i.start)
        for i, a in enumerate(intervals):
            for b in intervals[i + 1 :]:
                if b.start > a.end:
                    break
                if b.inc != a.inc:
                    violations["overlap"].append(
                        f"{p}: {a.inc} [{a.start:.3f}, {a.end:.3f}] and {b.inc} [{b.start:.3f}, {b.end:.3f}]"
                        f" overlap by {min(a.end, b.end) - b.start:.3f} s"
                    )
        # gaps in the union of the intervals, within the checked window
        covered_until = window[0]
        for interval in [*intervals, Interval(p, "", window[1], window[1])]:
            gap_start, gap_end = covered_until, min(interval.start, window[1])
            if gap_end > gap_start:
                excused = sum(max(0.0, min(gap_end, e) - max(gap_start, s)) for s, e in excluded)
                if gap_end - gap_start - excused > bound:
                    violations["unowned"].append(
                        f"{p}: consumed by nobody for {gap_end - gap_start:.3f} s "
                        f"({excused:.3f} s of it with Redis paused) from {gap_start:.3f}"
                    )
            covered_until = max(covered_until, interval.end)
    for inc, generations in history.generations.items():
        for before, after in itertools.pairwise(generations):
            if after < before:
                violations["generation"].append(f"{inc}: generation {before} then {after}")
    return violations


def all_covered_at(history: History) -> float | None:
    """The first moment by which every partition had been consumed at least once."""
    firsts: dict[str, float] = {}
    for interval in history.intervals:
        firsts[interval.partition] = min(firsts.get(interval.partition, interval.start), interval.start)
    return max(firsts.values()) if len(firsts) == len(ALL_PARTITIONS) else None


def takeover(history: History, inc: str, held: Iterable[str], since: float) -> float | None:
    """Time from ``since`` until every partition in ``held`` was consumed by another incarnation
    (None if one never was, or if ``held`` is empty: nothing to take over)."""
    held = list(held)
    if not held:
        return None
    last = since
    for p in held:
        starts = [i.start for i in history.intervals if i.partition == p and i.inc != inc and i.start >= since]
        if not starts:
            return None
        last = max(last, min(starts))
    return last - since


# ---------------------------------------------------------------- the run


class Run:
    """The stack, the leader loop, the member processes and the nemesis's record."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.stack = Stack(workers=2)
        self.stack.env.setdefault("SECRET_KEY", secrets.token_urlsafe(50))  # a throwaway stack's own
        # its own SQLite and settings, whatever the caller's environment (a test run's) points at
        self.stack.env["DATABASE_URL"] = args.database_url or f"sqlite:///{self.stack.tmp / 'history.sqlite3'}"
        for name in ("DJANGO_SETTINGS_MODULE", "REDLOCK_URLS", "CELERY_BROKER_URL"):
            self.stack.env.pop(name, None)
        self.leader: subprocess.Popen[bytes] | None = None
        self.slots: dict[str, subprocess.Popen[bytes]] = {}
        self.files: dict[int, str] = {}  # pid -> history file name
        self.killed_at: dict[str, float] = {}
        self.excluded: list[tuple[float, float]] = []
        self.kills: list[tuple[str, float, list[str]]] = []  # (file, time, partitions it was consuming)
        self.seq = 0
        self.log = (out / "nemesis.log").open("w", buffering=1)

    def note(self, text: str) -> None:
        self.log.write(f"{time.monotonic():.3f} {text}\n")
        if self.args.verbose:
            print(f"{time.monotonic():.3f} {text}", flush=True)

    def __enter__(self) -> Run:
        self.stack.__enter__()
        api = Api(self.stack.url, self.stack.token)
        for topic in TOPICS:
            api.expect("PUT", f"/api/v1/topics/{topic}/", (200, 201), {"partitions": PARTITIONS})
        env = dict(self.stack.env, HISTORY_CLEANUP=str(self.args.cleanup))
        self.leader = subprocess.Popen(
            [sys.executable, "-c", LEADER_LOOP],
            cwd=BASE,
            env=env,
            stdout=(self.out / "leader.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.slots.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        if self.leader:
            self.leader.kill()
            self.leader.wait()
        if self.stack.redis.pid:
            os.kill(self.stack.redis.pid, signal.SIGCONT)  # never leave it frozen
        self.stack.__exit__(*exc)

    def start(self, member_id: str, static: bool, broken: bool = False) -> subprocess.Popen[bytes]:
        self.seq += 1
        name = f"{member_id}-{self.seq}.jsonl"
        script = "history_client_member.py" if self.args.client else "history_member.py"
        command = [
            sys.executable,
            str(BASE / "bench" / script),
            "--url",
            self.stack.url,
            "--token",
            self.stack.token,
            "--group",
            GROUP,
            "--member-id",
            member_id,
            "--topics",
            *TOPICS,
            "--session-timeout",
            str(self.args.session_timeout),
            "--out",
            str(self.out / name),
        ]
        command += ["--static"] if static else []
        command += ["--broken"] if broken else []
        process = subprocess.Popen(command, cwd=BASE, stderr=(self.out / f"{name}.err").open("w"))
        self.files[process.pid] = name
        self.slots[member_id] = process
        self.note(f"start {member_id} pid {process.pid} static={static} broken={broken} -> {name}")
        return process

    def history(self, end: float | None = None) -> History:
        return read_histories(sorted(self.out.glob("*.jsonl")), self.killed_at, end or time.monotonic())

    def wait_covered(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            covered = self.history().intervals
            now_consumed = {i.partition for i in covered if i.end >= time.monotonic() - 0.5}
            open_ = self.open_partitions()
            if len(now_consumed | open_) == len(ALL_PARTITIONS):
                return time.monotonic()
            time.sleep(0.2)
        raise RuntimeError(f"not every partition was being consumed after {timeout:.0f} s")

    def open_partitions(self, name: str | None = None) -> set[str]:
        """Partitions with an open interval (in one history file, or in all)."""
        found: set[str] = set()
        # a killed process's unclosed intervals ended with it
        paths = [self.out / name] if name else [p for p in self.out.glob("*.jsonl") if p.name not in self.killed_at]
        for path in paths:
            open_: set[tuple[str, str]] = set()
            lines = path.read_text().splitlines() if path.exists() else []  # not started far enough to write
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event["ev"] == "start":
                    open_.add((event["p"], event["inc"]))
                elif event["ev"] == "stop":
                    open_.discard((event["p"], event["inc"]))
            found |= {p for p, _inc in open_}
        return found

    # ------------------------------------------------------------ faults, one at a time

    def kill(self, member_id: str, static: bool) -> None:
        process = self.slots[member_id]
        name = self.files[process.pid]
        held = self.open_partitions(name)
        process.send_signal(signal.SIGKILL)
        t = time.monotonic()
        process.wait()
        self.killed_at[name] = t
        self.kills.append((name, t, sorted(held)))
        self.note(f"kill -9 {member_id} pid {process.pid} holding {len(held)}")
        time.sleep(random.uniform(0.5, 1.5))
        self.start(member_id, static)

    def freeze(self, member_id: str) -> None:
        process = self.slots[member_id]
        pause = self.args.session_timeout + self.args.cleanup + random.uniform(0.5, 2)
        self.note(f"SIGSTOP {member_id} pid {process.pid} for {pause:.1f} s")
        process.send_signal(signal.SIGSTOP)
        time.sleep(pause)
        process.send_signal(signal.SIGCONT)
        self.note(f"SIGCONT {member_id}")

    def duplicate(self, member_id: str) -> None:
        """A second process joins static with the same id: it fences the first, which exits."""
        old = self.slots[member_id]
        self.note(f"duplicate {member_id} (old pid {old.pid})")
        self.start(member_id, static=True)
        try:
            old.wait(timeout=self.args.session_timeout * 3)
        except subprocess.TimeoutExpired:
            self.note(f"old {member_id} pid {old.pid} did not exit after being fenced: killed")
            old.kill()
            old.wait()
            self.killed_at[self.files[old.pid]] = time.monotonic()

    def leave(self, member_id: str, static: bool) -> None:
        """A clean leave, then a join: by the same process (SIGUSR1) or by a new one (SIGTERM, restart)."""
        process = self.slots[member_id]
        if random.random() < 0.5:
            self.note(f"leave and rejoin {member_id} pid {process.pid}")
            process.send_signal(signal.SIGUSR1)
            return
        self.note(f"leave {member_id} pid {process.pid}")
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.note(f"{member_id} pid {process.pid} did not leave within 30 s: killed")
            process.kill()
            process.wait()
            self.killed_at[self.files[process.pid]] = time.monotonic()
        time.sleep(random.uniform(0.5, 1.5))
        self.start(member_id, static)

    def pause_redis(self) -> None:
        pause = self.args.session_timeout + random.uniform(1, 2)
        start = time.monotonic()
        self.stack.redis.pause()
        self.note(f"SIGSTOP redis for {pause:.1f} s")
        time.sleep(pause)
        self.stack.redis.resume()
        self.excluded.append((start, time.monotonic()))
        self.note("SIGCONT redis")


def member_ids(count: int) -> list[tuple[str, bool]]:
    """(member_id, static): the first half static (duplicates target them), the rest dynamic."""
    return [(f"m{i}", i < count // 2) for i in range(count)]


def run_history(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One bounded run: members, the nemesis for ``args.seconds``, the checker. Returns the figures."""
    random.seed(args.seed)
    began = time.monotonic()
    with Run(args, out) as run:
        members = member_ids(args.members)
        # broken members first, alone until they consume everything: the others' joins must revoke from them
        ordered = sorted(members, key=lambda m: m[0] not in args.broken)
        for member_id, static in ordered:
            run.start(member_id, static, broken=member_id in args.broken)
            if member_id in args.broken and len(args.broken) == ordered.index((member_id, static)) + 1:
                run.wait_covered(60)
        window_start = run.wait_covered(60)
        faults = args.faults
        counts: dict[str, int] = defaultdict(int)
        nemesis_end = time.monotonic() + args.seconds
        step = 0
        # a short run goes on until each fault of the repertoire happened at least once
        while (time.monotonic() < nemesis_end or (0 < args.seconds < 60 and len(counts) < len(faults))) and step < 1000:
            step += 1
            fault = faults[step % len(faults)] if args.seconds < 60 else random.choice(faults)
            member_id, static = random.choice([m for m in members if fault != "duplicate" or m[1]])
            getattr(run, {"kill": "kill", "freeze": "freeze", "redis": "pause_redis"}.get(fault, fault))(
                *{"kill": (member_id, static), "leave": (member_id, static), "redis": ()}.get(fault, (member_id,))
            )
            counts[fault] += 1
            time.sleep(random.uniform(1, 2))
        run.note("nemesis over")
        time.sleep(args.session_timeout + args.cleanup + 2)  # settle: takeovers after the last fault complete
        window_end = time.monotonic()
        for process in run.slots.values():
            process.send_signal(signal.SIGTERM)
        for process in run.slots.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        history = run.history(window_end)
        bound = args.session_timeout + args.cleanup + args.slack
        violations = check(history, bound, (window_start, window_end), run.excluded)
        kills = [(_inc_of(history, out / f, t), held, t) for f, t, held in run.kills if held]
        kill_takeovers = [takeover(history, inc, held, t) for inc, held, t in kills]
        leaves = [e for e in history.leaves if e["t"] < window_end and e["held"]]
        leave_takeovers = [takeover(history, e["inc"], e["held"], e["t"]) for e in leaves]
    return {
        "runtime_s": round(time.monotonic() - began, 1),
        "checked_s": round(window_end - window_start, 1),
        "processes": run.seq,
        "incarnations": len({i.inc for i in history.intervals}),
        "intervals": len(history.intervals),
        "partitions": len({i.partition for i in history.intervals}),
        "faults": dict(counts),
        "unowned_bound_s": bound,
        "violations": {kind: len(lines) for kind, lines in violations.items()},
        "violation_lines": violations,
        "takeover_kill_s": [round(x, 3) if x is not None else None for x in kill_takeovers],
        "takeover_leave_s": [round(x, 3) if x is not None else None for x in leave_takeovers],
    }


def _inc_of(history: History, path: Path, before: float) -> str:
    """The incarnation a killed process was in (its last join before ``before``)."""
    inc = ""
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event["ev"] == "join" and event["t"] <= before:
            inc = event["inc"]
    return inc


def run_takeover(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Rounds of a clean leave and of a kill -9, each from a settled group."""
    began = time.monotonic()
    with Run(args, out) as run:
        members = member_ids(args.members)
        for member_id, static in members:
            run.start(member_id, static)
        run.wait_covered(60)
        for round_ in range(args.takeover):
            member_id, static = members[round_ % len(members)]
            time.sleep(1)
            run.leave(member_id, static)
            run.wait_covered(60)
            time.sleep(1)
            run.kill(members[(round_ + 3) % len(members)][0], members[(round_ + 3) % len(members)][1])
            run.wait_covered(60)
        time.sleep(1)
        history = run.history()
        kills = [takeover(history, _inc_of(history, out / f, t), held, t) for f, t, held in run.kills if held]
        leaves = [takeover(history, e["inc"], e["held"], e["t"]) for e in history.leaves if e["held"]]
    return {
        "runtime_s": round(time.monotonic() - began, 1),
        "session_timeout_s": args.session_timeout,
        "cleanup_s": args.cleanup,
        "takeover_leave_s": summary(leaves),
        "takeover_kill_s": summary(kills),
    }


def summary(values: list[float | None]) -> dict[str, Any]:
    done = [v for v in values if v is not None]
    return {
        "rounds": len(values),
        "median": round(statistics.median(done), 3) if done else None,
        "max": round(max(done), 3) if done else None,
        "all": [round(v, 3) if v is not None else None for v in values],
        "not_taken_over": len(values) - len(done),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=180, help="how long the nemesis runs")
    p.add_argument("--members", type=int, default=6)
    p.add_argument("--session-timeout", type=int, default=3)
    p.add_argument("--cleanup", type=float, default=1.0, help="the leader jobs' period (s)")
    p.add_argument("--slack", type=float, default=2.0, help="added to the unowned bound (s)")
    p.add_argument("--faults", nargs="+", default=FAULTS, choices=FAULTS, help="the nemesis's repertoire")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--broken", nargs="*", default=[], help="member ids run with --broken")
    p.add_argument("--takeover", type=int, default=0, help="rounds of takeover figures instead of a history run")
    p.add_argument("--client", action="store_true", help="members built on the client (history_client_member.py)")
    p.add_argument("--database-url", default=None, help="default: a new SQLite file")
    p.add_argument("--out", type=Path, default=None, help="keep the histories here")
    p.add_argument("--verbose", action="store_true")
    return p


def main() -> int:
    args = parser().parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    out = args.out or Path(tempfile.mkdtemp(prefix="registry-history-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"histories in {out}, seed {args.seed}", flush=True)
    if args.takeover:
        print(json.dumps(run_takeover(args, out), indent=2))
        return 0
    figures = run_history(args, out)
    lines = figures.pop("violation_lines")
    print(json.dumps(figures, indent=2))
    for kind, found in lines.items():
        for line in found[:20]:
            print(f"VIOLATION {kind}: {line}")
    return 1 if any(figures["violations"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
