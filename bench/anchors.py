"""Anchors the benchmarks compare against: a throwaway etcd server (Debian's etcd-server) on free ports."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx

from bench.common import free_port


class Etcd:
    """One etcd member on 127.0.0.1 with its client and peer URLs on free ports and a temporary data dir.

    Its v3 API is served over HTTP by etcd's gRPC gateway (``/v3/...``, JSON bodies).
    """

    def __init__(self) -> None:
        binary = shutil.which("etcd")
        if not binary:
            raise RuntimeError("etcd is not installed: apt-get install etcd-server")
        self.binary = binary
        self.tmp = Path(tempfile.mkdtemp(prefix="registry-bench-etcd-"))
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int:
        assert self.process, "etcd is not running"
        return self.process.pid

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].split(":", 1)[-1].strip() if out else "?"

    def __enter__(self) -> Etcd:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.log = open(self.tmp / "etcd.log", "wb")  # closed in __exit__
        self.process = subprocess.Popen(
            [
                self.binary,
                "--name",
                "bench",
                "--data-dir",
                str(self.tmp / "data"),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"bench={peer}",
                "--log-level",
                "error",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"etcd did not start; see {self.tmp / 'etcd.log'}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.process:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
            self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def grant_leases(self, n: int, ttl: int = 3600, concurrency: int = 32) -> list[str]:
        """Grant ``n`` leases of ``ttl`` seconds; their ids as decimal strings (int64: beyond a Lua number)."""

        async def grant_all() -> list[str]:
            ids: list[str] = []
            remaining = iter(range(n))
            async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:

                async def worker() -> None:
                    for _ in remaining:
                        response = await client.post("/v3/lease/grant", json={"TTL": ttl})
                        response.raise_for_status()
                        ids.append(str(response.json()["ID"]))

                await asyncio.gather(*(worker() for _ in range(concurrency)))
            return ids

        return asyncio.run(grant_all())

    def keepalive(self, lease_id: str) -> int:
        """One keepalive through the HTTP gateway; the TTL it answers (0: no such lease)."""
        response = httpx.post(f"{self.url}/v3/lease/keepalive", content=f'{{"ID": {lease_id}}}', timeout=10)
        response.raise_for_status()
        return int(response.json()["result"].get("TTL", 0))
