"""Redis recovery under `make run`: time from SIGKILL of the embedded redis-server to the first
successful heartbeat through HTTP, with scripts/run.py supervising (median over a few rounds).

It starts scripts/run.py as `make run` does (embedded Redis, uvicorn, Celery worker and beat) on a
free port with its own var folder and SQLite, registers one service, then per round kills the
redis-server and sends heartbeats back to back until one answers 200. It also prints when the
restarted Redis first answered PING on its socket. Rounds are spaced more than the supervisor's
crash-loop window (scripts/run.py REDIS_STABLE_AFTER), or it would rightly give up.

    .venv/bin/python bench/redis_recovery.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

BASE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE))

from registry_project.embedded_redis import free_port  # noqa: E402
from scripts.run import REDIS_STABLE_AFTER  # noqa: E402
from scripts.runstack import Api, clean_env, command_line, create_token, kill_tree, process_tree, wait_for  # noqa: E402


def redis_pid(run: subprocess.Popen[bytes]) -> int:
    pids = [pid for pid in process_tree(run.pid) if "redis-server" in command_line(pid)]
    if len(pids) != 1:
        raise RuntimeError(f"expected one redis-server under scripts/run.py, found {pids}")
    return pids[0]


def one_round(run: subprocess.Popen[bytes], api: Api, sock: Path) -> tuple[float, float, int]:
    """(seconds to a PING on the socket, seconds to a 200 heartbeat, heartbeats refused meanwhile)."""
    victim = redis_pid(run)
    # No client-side retries: a PING that waited out the outage would hold back the heartbeats.
    client = redis.Redis(
        unix_socket_path=str(sock), socket_connect_timeout=0.2, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    ping_at = heartbeat_at = None
    refused = 0
    while heartbeat_at is None or ping_at is None:
        if run.poll() is not None:
            raise RuntimeError(f"scripts/run.py exited with {run.returncode}")
        if ping_at is None:
            try:
                client.ping()
                ping_at = time.monotonic() - t0
            except redis.RedisError:
                pass
        if heartbeat_at is None:
            status, _ = api.call("POST", "/api/v1/services/bench-1/heartbeat/", {}, timeout=5)
            if status == 200:
                heartbeat_at = time.monotonic() - t0
            else:
                refused += 1
        time.sleep(0.005)
        if time.monotonic() - t0 > 60:
            raise RuntimeError("no successful heartbeat within 60 s of the kill")
    client.close()
    return ping_at, heartbeat_at, refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    var = Path(tempfile.mkdtemp(prefix="registry-recovery-"))
    port = free_port()
    env = clean_env({"REGISTRY_VAR_DIR": str(var), "REGISTRY_PORT": str(port), "LOG_LEVEL": "CRITICAL"})
    # A var folder of its own has no secret_key file (`make run` writes one in var/): a key for this stack.
    env.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"], cwd=BASE, env=env, check=True, capture_output=True
    )
    log = open(var / "run.log", "wb")  # noqa: SIM115 - as long as the stack runs
    run = subprocess.Popen(
        [sys.executable, "scripts/run.py"],
        cwd=BASE,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = Api(f"http://127.0.0.1:{port}")
    started: dict[int, str] = {}
    try:
        wait_for("/readyz", api.ready, 60)
        started = process_tree(run.pid)
        api.token = create_token(sys.executable, BASE, env, "bench")
        body = {
            "service_id": "bench-1",
            "service_name": "bench",
            "service_type": "source",
            "endpoint": "127.0.0.1:9000",
            "lease_duration": 300,
        }
        api.expect("POST", "/api/v1/services/", (201,), body)
        api.expect("POST", "/api/v1/services/bench-1/heartbeat/", (200,), {})
        pings, heartbeats = [], []
        for n in range(1, args.rounds + 1):
            ping, heartbeat, refused = one_round(run, api, var / "redis.sock")
            pings.append(ping)
            heartbeats.append(heartbeat)
            print(
                f"round {n}: Redis answers PING after {ping * 1000:.0f} ms, first 200 heartbeat after "
                f"{heartbeat * 1000:.0f} ms ({refused} refused before it)",
                flush=True,
            )
            if n < args.rounds:
                time.sleep(REDIS_STABLE_AFTER + 1)
        print(
            f"\nredis-server SIGKILL -> first successful heartbeat over HTTP, {args.rounds} rounds: "
            f"median {statistics.median(heartbeats) * 1000:.0f} ms (min {min(heartbeats) * 1000:.0f}, "
            f"max {max(heartbeats) * 1000:.0f}); Redis back on its socket: median "
            f"{statistics.median(pings) * 1000:.0f} ms"
        )
    finally:
        started |= process_tree(run.pid)
        run.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.wait(timeout=40)
        kill_tree(started)
        log.close()


if __name__ == "__main__":
    main()
