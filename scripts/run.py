"""`make run`: the embedded Redis (when REDIS_URL is unset), the ASGI server, a Celery worker and beat.

This process supervises them. If the embedded Redis dies it is restarted on the same socket with the
same data folder (its append-only file brings the data back) while the others carry on and reconnect;
if it cannot be restarted, or any other child dies, everything stops with a message saying why.
Ctrl-C (SIGINT) or SIGTERM stops everything.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("REGISTRY_VAR_DIR", BASE / "var"))
HOST = os.environ.get("REGISTRY_HOST", "127.0.0.1")
PORT = os.environ.get("REGISTRY_PORT", "8000")
PY = sys.executable

# A Redis that dies again this soon after a restart counts as a failed restart (a crash loop).
REDIS_STABLE_AFTER = 10.0
REDIS_RESTART_ATTEMPTS = 3
REDIS_RESTART_PAUSES = (0.0, 1.0, 2.0)  # before attempt 1, 2, 3
REDIS_START_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0

sys.path.insert(0, str(BASE))
from registry_project.embedded_redis import RedisServer  # noqa: E402
from registry_project.localserver import uvicorn_command  # noqa: E402


def say(message: str) -> None:
    print(f"[make run] {message}", file=sys.stderr, flush=True)


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM if this supervisor dies without stopping it (Linux only).

    Covers a supervisor killed with SIGKILL, which runs no cleanup of its own.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def start_embedded_redis() -> RedisServer:
    import redis

    sock = VAR / "redis.sock"
    if sock.exists():
        try:
            redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=0.5).ping()
            sys.exit(f"A Redis server already answers on {sock}: is another `make run` still running? Stop it first.")
        except redis.ConnectionError:
            sock.unlink()
    log = open(VAR / "redis.log", "ab")  # noqa: SIM115 - lives as long as the server
    # Its own session, so Ctrl-C reaches it only through us, after the worker has let go of it.
    server = RedisServer(
        unix_socket=sock, data_dir=VAR, persist=True, log=log, new_session=True, preexec=die_with_parent
    )
    try:
        return server.start(timeout=REDIS_START_TIMEOUT)
    except RuntimeError:
        server.kill()
        sys.exit(f"The embedded Redis did not start; see {VAR / 'redis.log'}.")


class RedisKeeper:
    """Restarts the embedded Redis when it dies; gives up after a few failed attempts in a row."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.started_at = time.monotonic()
        self.failures = 0

    def check(self, stopping: Callable[[], bool]) -> str | None:
        """None while Redis runs (restarting it if it died); the reason to stop everything otherwise."""
        code = self.server.exited()
        if code is None:
            return None
        if time.monotonic() - self.started_at >= REDIS_STABLE_AFTER:
            self.failures = 0
        else:
            self.failures += 1  # it did not stay up after the last restart
        say(
            f"the embedded Redis (pid {self.server.pid}) {describe_exit(code)}; restarting it on "
            f"{self.server.unix_socket} with its data in {self.server.dir}"
        )
        while self.failures < REDIS_RESTART_ATTEMPTS:
            time.sleep(REDIS_RESTART_PAUSES[min(self.failures, len(REDIS_RESTART_PAUSES) - 1)])
            if stopping():
                return None
            try:
                self.server.start(timeout=REDIS_START_TIMEOUT)
            except RuntimeError:
                self.server.kill()
                self.failures += 1
                say(f"restart attempt {self.failures} of {REDIS_RESTART_ATTEMPTS} failed")
                continue
            self.started_at = time.monotonic()
            say(f"the embedded Redis is back (pid {self.server.pid}); the server, worker and beat reconnect to it")
            return None
        return (
            f"the embedded Redis could not be restarted ({REDIS_RESTART_ATTEMPTS} attempts in a row failed or "
            f"died within {REDIS_STABLE_AFTER:.0f} s); see {self.server.dir / 'redis.log'}"
        )


class StopRequest:
    """Set by SIGINT/SIGTERM (or a fatal child exit); the main loop stops everything once it is set."""

    requested = False

    def request(self, signum: int, frame: object) -> None:
        self.requested = True


def child_commands() -> dict[str, list[str]]:
    return {
        "server": uvicorn_command(HOST, PORT),
        "worker": [
            PY,
            "-m",
            "celery",
            "-A",
            "registry_project",
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            "2",
            "--without-gossip",
            "--without-mingle",
        ],
        "beat": [
            PY,
            "-m",
            "celery",
            "-A",
            "registry_project",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(VAR / "celerybeat-schedule"),
            "--pidfile=",
        ],
    }


def stop_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM each child (a graceful stop), then SIGKILL whatever is left of its process group."""
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for name, child in children.items():
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop within {STOP_TIMEOUT:.0f} s; killing it")
        # Each child leads its own process group: this also reaps the worker's pool processes.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def main() -> int:
    VAR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    embedded = None
    if not env.get("REDIS_URL"):
        embedded = start_embedded_redis()
        env["REDIS_URL"] = embedded.url
        print(f"Embedded Redis on {embedded.url} (data in {VAR})")

    stop = StopRequest()
    # Before the children start, so a signal from now on still stops them all.
    signal.signal(signal.SIGINT, stop.request)
    signal.signal(signal.SIGTERM, stop.request)

    children = {
        name: subprocess.Popen(cmd, cwd=BASE, env=env, start_new_session=True, preexec_fn=die_with_parent)
        for name, cmd in child_commands().items()
    }
    keeper = RedisKeeper(embedded) if embedded else None
    base = f"http://{HOST}:{PORT}"
    print(
        f"""
conveyor-registry is running (Ctrl-C stops everything).
  API        {base}/api/v1/services/
  API docs   {base}/api/docs/
  admin      {base}/admin/
  metrics    {base}/metrics   probes {base}/healthz {base}/readyz

Create an admin user:   .venv/bin/python manage.py createsuperuser
Create an API token:    .venv/bin/python manage.py create_token my-service [--staff]
""",
        flush=True,
    )

    exit_code = 0
    while not stop.requested:
        for name, child in children.items():
            if child.poll() is not None:
                say(f"the {name} (pid {child.pid}) {describe_exit(child.returncode)}; stopping everything")
                exit_code, stop.requested = 1, True
                break
        if keeper and not stop.requested:
            why = keeper.check(lambda: stop.requested)
            if why:
                say(f"{why}; stopping everything")
                exit_code, stop.requested = 1, True
        time.sleep(0.2)

    say("stopping the server, the worker and beat" + (" and then the embedded Redis" if embedded else ""))
    stop_children(children)
    if embedded:
        embedded.terminate()  # last, so it saves what the others wrote
    say("stopped")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
