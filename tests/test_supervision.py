"""`make run`'s supervision (scripts/run.py), end to end with real processes: a killed embedded Redis is
restarted on the same socket and data while the server, worker and beat carry on; a Redis that cannot
be restarted, or any other child's exit, stops everything with the reason; SIGINT leaves nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from registry_project.embedded_redis import free_port
from scripts.runstack import (
    Api,
    clean_env,
    command_line,
    create_token,
    kill_tree,
    last_cleanup_run,
    process_tree,
    still_running,
    wait_for,
)

BASE = Path(__file__).resolve().parent.parent
PY = sys.executable
# The first election waits one leadership TTL (10 s) after Redis starts; cleanup runs every 5 s.
JOB_TIMEOUT = 45


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file, copied into each test's var folder (migrating takes seconds)."""
    var = tmp_path_factory.mktemp("template-var")
    subprocess.run(
        [PY, "manage.py", "migrate", "--noinput"],
        cwd=BASE,
        env=clean_env({"REGISTRY_VAR_DIR": str(var)}),
        check=True,
        capture_output=True,
    )
    return var / "registry.sqlite3"


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    var: Path
    env: dict[str, str]
    api: Api
    log: Path

    def children(self) -> dict[str, int]:
        """The supervisor's own children by role: redis, server, worker, beat."""
        marks = {"redis": "redis-server", "server": " uvicorn ", "worker": " worker ", "beat": " beat "}
        roles = {}
        for pid in process_tree(self.process.pid):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) != self.process.pid:
                continue
            cmd = f" {command_line(pid)} "
            roles.update({role: pid for role, mark in marks.items() if mark in cmd})
        return roles

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def register(self, service_id: str, lease: int, deregister_after: int = 60) -> None:
        body = {
            "service_id": service_id,
            "service_name": "supervised",
            "service_type": "source",
            "endpoint": "127.0.0.1:9000",
            "lease_duration": lease,
            "deregister_after": deregister_after,
        }
        self.api.expect("POST", "/api/v1/services/", (201,), body)

    def cleanup_commits(self, service_id: str, after: int) -> int:
        """Register a 1 s lease, wait until a leader's cleanup job removed it; the job run's id."""
        self.register(service_id, lease=1, deregister_after=0)
        wait_for(
            f"a cleanup job to remove {service_id}",
            lambda: True if self.api.call("GET", f"/api/v1/services/{service_id}/")[0] == 404 else None,
            JOB_TIMEOUT,
            interval=0.5,
        )
        run = last_cleanup_run(PY, BASE, self.env)
        assert run > after, f"{service_id} is gone but no new cleanup job run was committed"
        return run


@pytest.fixture
def stack(tmp_path: Path, migrated_db: Path) -> Iterator[Stack]:
    var = tmp_path / "var"
    var.mkdir()
    shutil.copy(migrated_db, var / "registry.sqlite3")
    port = free_port()
    env = clean_env({"REGISTRY_VAR_DIR": str(var), "REGISTRY_PORT": str(port), "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [PY, "scripts/run.py"], cwd=BASE, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    api = Api(f"http://127.0.0.1:{port}")
    started: dict[int, str] = {}
    try:
        wait_for("/readyz", lambda: api.ready() if process.poll() is None else False, 60)
        assert process.poll() is None, f"scripts/run.py exited:\n{log.read_text()}"
        api.token = create_token(PY, BASE, env, "supervision")
        yield Stack(process, var, env, api, log)
    finally:
        started = process_tree(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=40)
        kill_tree(started)


def stop_and_check_nothing_is_left(stack: Stack) -> int:
    started = process_tree(stack.process.pid)
    stack.process.send_signal(signal.SIGINT)
    code = stack.process.wait(timeout=40)
    wait_for("every process to be gone", lambda: None if still_running(started) else True, 20)
    assert still_running(started) == {}
    assert stack.api.ready() is None, "something still answers on the server's port"
    return code


def test_a_killed_embedded_redis_is_restarted_and_the_server_worker_and_beat_recover(stack: Stack) -> None:
    # given: a registered service, a key written straight to Redis, and a cleanup job committed by a leader
    stack.register("kept", lease=60)
    socket_path = stack.var / "redis.sock"
    redis.Redis(unix_socket_path=str(socket_path)).set("supervision:marker", "before the kill")
    first_run = stack.cleanup_commits("lapses-before", after=0)
    before = stack.children()
    assert set(before) == {"redis", "server", "worker", "beat"}, before

    # when: the embedded Redis is killed
    os.kill(before["redis"], signal.SIGKILL)

    # then: a new redis-server serves the same socket with the same data (append-only file) ...
    def restarted() -> int | None:
        pid = stack.children().get("redis")
        return pid if pid not in (None, before["redis"]) else None

    wait_for("the embedded Redis to be restarted", restarted, 20)
    assert redis.Redis(unix_socket_path=str(socket_path)).get("supervision:marker") == b"before the kill"
    # ... a heartbeat succeeds again through the same server process ...
    wait_for(
        "a heartbeat to succeed again",
        lambda: True if stack.api.call("POST", "/api/v1/services/kept/heartbeat/", {})[0] == 200 else None,
        20,
    )
    # ... beat sends, the worker (reconnected to the broker) runs, and a leader's cleanup job commits again
    stack.cleanup_commits("lapses-after", after=first_run)
    after = stack.children()
    assert {role: after[role] for role in ("server", "worker", "beat")} == {
        role: before[role] for role in ("server", "worker", "beat")
    }, "the server, worker and beat were not to be restarted"
    assert "the embedded Redis" in stack.output() and "was killed by SIGKILL; restarting it" in stack.output()

    # and: Ctrl-C stops everything, Redis included
    assert stop_and_check_nothing_is_left(stack) == 0


def test_a_redis_that_cannot_be_restarted_stops_everything_with_the_reason(stack: Stack) -> None:
    # given: an append-only file Redis cannot load any more
    aof = stack.var / "appendonly.aof"
    wait_for("the append-only file", lambda: True if aof.exists() else None, 10)
    started = process_tree(stack.process.pid)
    aof.write_bytes(b"this is not an append-only file\n")

    # when: Redis dies
    os.kill(stack.children()["redis"], signal.SIGKILL)

    # then: after a few failed restarts everything stops, saying why
    code = stack.process.wait(timeout=60)
    assert code == 1
    output = stack.output()
    assert "restart attempt 3 of 3 failed" in output
    assert "the embedded Redis could not be restarted" in output and "stopping everything" in output
    wait_for("every process to be gone", lambda: None if still_running(started) else True, 20)


def test_any_other_child_exiting_stops_everything_and_names_it(stack: Stack) -> None:
    # given
    children = stack.children()
    started = process_tree(stack.process.pid)

    # when: beat dies
    os.kill(children["beat"], signal.SIGKILL)

    # then
    assert stack.process.wait(timeout=40) == 1
    assert f"the beat (pid {children['beat']}) was killed by SIGKILL; stopping everything" in stack.output()
    wait_for("every process to be gone", lambda: None if still_running(started) else True, 20)
