"""Helpers for benchmarks: a throwaway server stack (embedded Redis, SQLite or DATABASE_URL, uvicorn)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BASE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE))

from registry_project.embedded_redis import RedisServer, free_port  # noqa: E402


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
        self.server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "registry_project.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                "--lifespan",
                "off",
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            cwd=BASE,
            env=self.env,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        return self

    def server_pids(self) -> list[int]:
        assert self.server
        return descendants(self.server.pid)

    def __exit__(self, *exc: object) -> None:
        if self.server:
            self.server.terminate()
            self.server.wait(timeout=20)
        self.redis.stop()
