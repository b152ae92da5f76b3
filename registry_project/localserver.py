"""The ASGI server as a child process: the command `make run` starts, and the servers tests and
benchmarks start on free ports; and the HTTP protocol it runs (uvicorn's httptools protocol, with each
small response sent in one write)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BASE = Path(__file__).resolve().parent.parent

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without its [standard] extras: its default protocol serves
    HttpToolsProtocol = None


class _OneWriteTransport:
    """A connection's transport that holds a response head back until its body is written, so that a small
    response leaves in one write (one segment, one wakeup of the client) rather than two.

    uvicorn writes the status line and headers as soon as the application sends ``http.response.start``.
    A held head goes out with the next write, or at the latest on the event loop's next turn (a streamed
    response whose body comes later), or before the connection closes. Everything else passes through.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self.held is not None:
            data, self.held = self.held + data, None
        elif data.startswith(b"HTTP/1.") and data.endswith(b"\r\n\r\n"):
            self.held = data
            self.loop.call_soon(self.flush)
            return
        self.transport.write(data)

    def flush(self) -> None:
        if self.held is not None:
            data, self.held = self.held, None
            if not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.held = None
        self.transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


if HttpToolsProtocol is not None:

    class OneWriteHttpProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, writing each small response in one piece (see _OneWriteTransport)."""

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(_OneWriteTransport(transport, self.loop))  # type: ignore[arg-type]

        def handle_websocket_upgrade(self) -> None:
            # The websocket protocol takes the connection over with the plain transport.
            wrapped = self.transport
            if isinstance(wrapped, _OneWriteTransport):
                wrapped.flush()
                self.transport = wrapped.transport
            super().handle_websocket_upgrade()


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
        *(["--http", f"{__name__}:OneWriteHttpProtocol"] if HttpToolsProtocol is not None else []),
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
