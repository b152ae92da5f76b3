"""Leadership benchmark: failover time and the steady-state cost of leadership on a cleanup run.

Failover: worker processes run the lease cleanup under leadership every --interval seconds over three
redis-server masters; the leader is killed (SIGKILL, no release) right after a run, and the time to the
next cleanup committed by another worker is measured. Overhead: one process times cleanup runs without
and with leadership (Redlock check + fenced transaction + job record).

    .venv/bin/python bench/leadership.py [--ttl-ms 10000] [--interval 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE))
from registry_project.embedded_redis import RedisServer  # noqa: E402


def worker(interval: float) -> None:
    import django

    django.setup()
    from registry.leadership import guard_for, run_as_leader
    from registry.tasks import cleanup_once

    name = os.environ["WORKER_NAME"]
    while True:
        done = run_as_leader("cleanup", lambda term: (len(cleanup_once(guard_for(term, "cleanup"))), term.number)[1])
        if done is not None:
            print(f"RUN {name} {done} {time.time():.6f}", flush=True)
        time.sleep(interval)


def failover(env: dict[str, str], args: argparse.Namespace) -> list[float]:
    def spawn(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, __file__, "--worker", "--interval", str(args.interval)],
            cwd=BASE,
            env={**env, "WORKER_NAME": name},
            stdout=subprocess.PIPE,
            text=True,
        )

    runs: list[tuple[str, int, float]] = []
    lock = threading.Condition()
    procs: dict[str, subprocess.Popen[str]] = {}

    def read(name: str, proc: subprocess.Popen[str]) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("RUN "):
                _, who, term, at = line.split()
                with lock:
                    runs.append((who, int(term), float(at)))
                    lock.notify_all()

    def start(name: str) -> None:
        procs[name] = spawn(name)
        threading.Thread(target=read, args=(name, procs[name]), daemon=True).start()

    for i in range(args.workers):
        start(f"w{i}")
    samples = []
    try:
        for round_no in range(args.rounds):
            with lock:
                lock.wait_for(lambda: runs, timeout=120)
                seen = len(runs)
                lock.wait_for(lambda seen=seen: len(runs) > seen, timeout=120)  # a fresh run by the current leader
                leader, term, _ = runs[-1]
            killed_at = time.time()
            procs[leader].send_signal(signal.SIGKILL)
            procs[leader].wait()
            with lock:
                lock.wait_for(lambda leader=leader: runs[-1][0] != leader, timeout=120)
                new_leader, new_term, at = runs[-1]
            samples.append(at - killed_at)
            print(
                f"  round {round_no + 1}: {leader} (term {term}) killed; {new_leader} ran the cleanup as term "
                f"{new_term} after {at - killed_at:.2f} s",
                flush=True,
            )
            start(leader)
    finally:
        for proc in procs.values():
            proc.kill()
    return samples


def overhead(runs: int) -> dict[str, float]:
    import django

    django.setup()
    from datetime import timedelta

    from django.core.management import call_command
    from django.utils import timezone

    call_command("migrate", verbosity=0)
    from registry import leases
    from registry.leadership import Leadership, guard_for
    from registry.models import ApiToken
    from registry.tasks import cleanup_once

    token = ApiToken(name=f"bench-{os.getpid()}", is_staff=True)
    token.set_key(ApiToken.generate_key())
    token.save()
    leadership = Leadership(holder="bench")
    while leadership.ensure() is None:
        time.sleep(0.1)

    def lapsed(n: int) -> None:
        past = timezone.now() - timedelta(seconds=10)
        for i in range(n):
            body = {
                "service_id": f"x{i}",
                "service_name": "x",
                "service_type": "sink",
                "endpoint": "h:1",
                "lease_duration": 1,
                "deregister_after": 0,
            }
            leases.register(body, token, past)

    def timed(fn, expiring: int) -> float:  # type: ignore[no-untyped-def]
        times = []
        for _ in range(runs):
            lapsed(expiring)
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    def led() -> None:
        term = leadership.ensure()
        assert term is not None
        cleanup_once(guard_for(term, "cleanup"))

    result = {}
    for expiring in (0, 20):
        result[f"plain-{expiring}"] = timed(cleanup_once, expiring)
        result[f"led-{expiring}"] = timed(led, expiring)
    lock = leadership.term.lock  # type: ignore[union-attr]
    extends = []
    for _ in range(50):
        start = time.perf_counter()
        lock = leadership.redlock.extend(lock) or lock
        extends.append((time.perf_counter() - start) * 1000)
    result["extend"] = statistics.median(extends)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ttl-ms", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between cleanup runs per worker")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "registry_project.settings")
    if args.worker:
        worker(args.interval)
        return

    tmp = Path(tempfile.mkdtemp(prefix="leader-bench-"))
    masters = [RedisServer().start() for _ in range(3)]
    env = dict(
        os.environ,
        REDIS_URL=masters[0].url,
        REDLOCK_URLS=",".join(m.url for m in masters),
        REGISTRY_LEADER_TTL_MS=str(args.ttl_ms),
        REGISTRY_VAR_DIR=str(tmp),
        LOG_LEVEL="ERROR",
    )
    env.setdefault("DATABASE_URL", f"sqlite:///{tmp / 'bench.sqlite3'}")
    os.environ.update(env)
    try:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"], cwd=BASE, env=env, check=True, capture_output=True
        )
        print(f"failover: {args.workers} workers, TTL {args.ttl_ms} ms, a cleanup every {args.interval} s per worker")
        samples = failover(env, args)
        print(
            f"  leader killed -> next cleanup by a new leader: median {statistics.median(samples):.2f} s, "
            f"max {max(samples):.2f} s over {len(samples)} rounds"
        )
        r = overhead(100)
        print("steady state, one cleanup run (median of 100):")
        for n in (0, 20):
            plain, led = r[f"plain-{n}"], r[f"led-{n}"]
            print(
                f"  expiring {n:2d} services: without leadership {plain:.3f} ms, with {led:.3f} ms "
                f"(+{led - plain:.3f} ms)"
            )
        print(f"  lock renewal on 3 masters (once per TTL/2): {r['extend']:.3f} ms")
    finally:
        for m in masters:
            m.stop()


if __name__ == "__main__":
    main()
