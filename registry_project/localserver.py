"""The ASGI server as a child process: the command `make run` starts, and the servers tests and
benchmarks start on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent


def uvicorn_command(host: str, port: int | str, workers: int = 1, quiet: bool = False) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "registry_project.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--lifespan",
        "off",
        "--no-access-log",
        # uvicorn buffers a whole frame before the consumer sees it: refuse far larger ones (1009) at the
        # protocol level; up to twice the cap the consumer answers with an error that names the limit.
        "--ws-max-size",
        str(2 * int(os.environ.get("REGISTRY_MAX_WS_MESSAGE_BYTES") or 64 * 1024)),
        # No permessage-deflate: its zlib contexts were about 45 KiB of every idle socket's 81, and each
        # push was compressed once per socket; pushes are small JSON objects.
        "--ws-per-message-deflate",
        "false",
    ]
    if workers > 1:
        command += ["--workers", str(workers)]
    if quiet:
        command += ["--log-level", "warning"]
    return command


def start_server(port: int, env: dict[str, str], workers: int = 1, timeout: float = 30) -> subprocess.Popen[bytes]:
    """Start uvicorn on 127.0.0.1:``port`` and return once /healthz answers."""
    process = subprocess.Popen(uvicorn_command("127.0.0.1", port, workers, quiet=True), cwd=BASE, env=env)
    url = f"http://127.0.0.1:{port}/healthz"
    deadline = time.monotonic() + timeout
    while True:
        # urllib, not httpx: this module is imported by `make run`, which has only requirements.txt.
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return process
        except (urllib.error.URLError, OSError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the server on port {port} did not start")
        time.sleep(0.1)
