"""`make run`: the embedded Redis (when REDIS_URL is unset), the ASGI server, a Celery worker and beat.

All are started here and stopped together on Ctrl-C (or when any one of them dies).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("REGISTRY_VAR_DIR", BASE / "var"))
HOST = os.environ.get("REGISTRY_HOST", "127.0.0.1")
PORT = os.environ.get("REGISTRY_PORT", "8000")
PY = sys.executable

sys.path.insert(0, str(BASE))
from registry_project.embedded_redis import RedisServer  # noqa: E402
from registry_project.localserver import uvicorn_command  # noqa: E402


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
    server = RedisServer(unix_socket=sock, data_dir=VAR, persist=True, log=log, new_session=True)
    try:
        return server.start()
    except RuntimeError:
        sys.exit(f"The embedded Redis did not start; see {VAR / 'redis.log'}.")


def main() -> int:
    VAR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    embedded = None
    if not env.get("REDIS_URL"):
        embedded = start_embedded_redis()
        env["REDIS_URL"] = embedded.url
        print(f"Embedded Redis on {embedded.url} (data in {VAR})")

    commands = {
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
    children = {
        name: subprocess.Popen(cmd, cwd=BASE, env=env, start_new_session=True) for name, cmd in commands.items()
    }
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

    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    exit_code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                print(f"{name} exited with status {child.returncode}; stopping the rest.", file=sys.stderr)
                exit_code = 1
                stopping = True
        time.sleep(0.2)

    print("Stopping...", flush=True)
    for child in children.values():
        if child.poll() is None:
            child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
    if embedded:
        embedded.terminate()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
