"""Helpers for benchmarks: a throwaway server stack (embedded Redis, SQLite or DATABASE_URL, uvicorn)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE))

from registry_project.embedded_redis import RedisServer, free_port  # noqa: E402
from registry_project.localserver import start_server  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes ``pids`` (all their threads) have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    return [pid] + [d for c in children for d in descendants(c)]


class Stack:
    """Redis + database + `workers` uvicorn processes serving registry_project.asgi on a free port."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self.tmp = Path(tempfile.mkdtemp(prefix="registry-bench-"))
        self.redis = RedisServer()
        self.port = free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.env = dict(os.environ)
        self.env.setdefault("SECRET_KEY", secrets.token_urlsafe(50))  # a throwaway stack's own key

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def manage(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=BASE, env=self.env, check=True, capture_output=True, text=True
        ).stdout

    def __enter__(self) -> Stack:
        self.redis.start()
        self.env.update(REDIS_URL=self.redis.url, REGISTRY_VAR_DIR=str(self.tmp), LOG_LEVEL="WARNING")
        self.env.setdefault("DATABASE_URL", f"sqlite:///{self.tmp / 'bench.sqlite3'}")
        self.manage("migrate", "--noinput")
        self.token = self.manage("create_token", f"bench-{os.getpid()}", "--staff").strip().splitlines()[-1]
        self.server = start_server(self.port, self.env, workers=self.workers)
        return self

    def register_services(self, n: int, prefix: str = "bench-", batch: int = 500) -> None:
        """Register services ``prefix0`` .. ``prefix{n-1}`` (owned by the stack's token, lease 3600 s) in a
        child process through ``registry.leases.register``, ``batch`` to a transaction: the same rows, Redis
        entries and events as over HTTP, without waiting for the server's registration rate."""
        code = REGISTER_CODE.format(n=n, prefix=prefix, batch=batch, token=self.token)
        self.manage("shell", "-c", code)

    def server_pids(self) -> list[int]:
        assert self.server
        return descendants(self.server.pid)

    def redis_pid(self) -> int:
        assert self.redis.process, "Redis is not running"
        return self.redis.process.pid

    def __exit__(self, *exc: object) -> None:
        if self.server:
            self.server.terminate()
            self.server.wait(timeout=20)
        self.redis.stop()


REGISTER_CODE = """
from django.db import transaction
from django.utils import timezone
from registry import leases
from registry.models import ApiToken, hash_token
token = ApiToken.objects.get(key_hash=hash_token("{token}"))
for start in range(0, {n}, {batch}):
    with transaction.atomic():
        for i in range(start, min({n}, start + {batch})):
            leases.register(
                {{
                    "service_id": f"{prefix}{{i}}",
                    "service_name": f"{prefix}{{i % 100}}",
                    "service_type": "source",
                    "endpoint": f"10.0.{{i // 250 % 250}}.{{i % 250 + 1}}:9000",
                    "labels": {{"shard": str(i % 16)}},
                    "lease_duration": 3600,
                }},
                token,
                timezone.now(),
            )
"""


WRK_DONE = """
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), errors))
end
"""


def run_wrk(url: str, script: str, seconds: int, connections: int, threads: int = 1) -> dict[str, float]:
    """Run wrk with ``script`` (a Lua request function) and return rps, p50/p99 in ms, errors, requests."""
    import re

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script + WRK_DONE)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", f.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"RESULT requests=(\d+) duration_us=(\d+) p50_us=(\d+) p99_us=(\d+) errors=(\d+)", out)
    if not match:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests, duration, p50, p99, errors = map(int, match.groups())
    return {
        "rps": requests / (duration / 1e6),
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "errors": errors,
        "requests": requests,
    }
