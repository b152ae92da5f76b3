"""The newcomer smoke test: what someone with a fresh clone gets from `make run`, and that Ctrl-C stops it all.

It clones the repository's committed HEAD into a temporary folder, runs `make run` there (which makes
.venv from requirements.txt alone: a module missing from it fails here), waits for /readyz, checks
that every import in the server's code resolves in that .venv (scripts/import_check.py), then
checks through HTTP a registration, a heartbeat, a group join, a balancer selection, a websocket
handshake, an elected leader and a committed cleanup job (so the worker and beat really run). With
``--readme`` it also runs the README's examples against the same server (scripts/readme_check.py).
Then it sends SIGINT to `make run` as a terminal's Ctrl-C would and checks that every process it
started (server, worker and its pool, beat, embedded Redis) is gone.

Standard library only: it runs before any virtualenv exists. `make smoke` runs it; so does .ci/run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE))

from scripts.runstack import (  # noqa: E402
    Api,
    CheckFailed,
    clean_env,
    command_line,
    create_token,
    interrupt,
    kill_tree,
    last_cleanup_run,
    process_tree,
    still_running,
    wait_for,
)

INSTALL_TIMEOUT = 900  # a fresh .venv: pip install of requirements.txt, then migrate and start
# The first election waits one leadership TTL after Redis starts (registry/leadership.py), then the
# next cleanup run (every 5 s) removes the lapsed service: well under a minute.
JOB_TIMEOUT = 90
STOP_TIMEOUT = 60


def step(message: str) -> None:
    print(f"smoke: {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def websocket_handshake(port: int, path: str, token: str) -> str:
    """The status line the server answers to a websocket upgrade (101 once accepted)."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request.encode())
        return conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")


def check_stack(api: Api, clone: Path, env: dict[str, str], port: int) -> None:
    python = str(clone / ".venv" / "bin" / "python")
    api.token = create_token(python, clone, env, "smoke", staff=True)
    step("token created with manage.py create_token")

    service = {
        "service_id": "smoke-1",
        "service_name": "smoke",
        "service_type": "source",
        "endpoint": "127.0.0.1:9999",
        "labels": {"env": "smoke"},
        "lease_duration": 60,
    }
    registered = api.expect("POST", "/api/v1/services/", (201,), service)
    if registered.get("service_id") != "smoke-1" or "lease" not in registered:
        raise CheckFailed(f"registration answered {registered}")
    step("registration: 201")

    beat = api.expect("POST", "/api/v1/services/smoke-1/heartbeat/", (200,), {"health": "healthy"})
    step(f"heartbeat: 200 {beat}")

    # static: a rerun fences the previous run's incarnation instead of being refused while it is live
    join = {"member_id": "smoke-1", "service_name": "smoke", "topics": ["smoke-topic"], "static": True}
    member = api.expect("POST", "/api/v1/groups/smoke-group/members/", (200, 201), join)
    owned = member.get("assigned_partitions", {}).get("smoke-topic", []) + member.get("pending", {}).get(
        "smoke-topic", []
    )
    if not owned:
        raise CheckFailed(f"the only member of smoke-group was given no partition: {member}")
    step(f"group join: generation {member.get('generation')}, {len(owned)} partitions")

    chosen = api.expect("GET", "/api/v1/balancer/select/?name=smoke", (200,))
    if chosen.get("service_id") != "smoke-1":
        raise CheckFailed(f"balancer/select chose {chosen}, expected smoke-1")
    step("balancer/select: smoke-1")

    # Pages that load more of the installed packages: the schema generator, the bundled Swagger UI, the admin.
    for path in ("/api/schema/", "/api/docs/", "/metrics", "/admin/login/"):
        api.expect("GET", path, (200,))
    step("schema, API docs, metrics and admin login: 200")

    status = websocket_handshake(port, "/ws/services/?name=smoke", api.token)
    if " 101 " not in status + " ":
        raise CheckFailed(f"websocket handshake answered {status!r}")
    step(f"websocket handshake: {status}")

    # A lease of 1 s removed at once after it lapses: only a leader's cleanup job can remove it.
    before = last_cleanup_run(python, clone, env)
    expiring = dict(service, service_id="smoke-expiring", lease_duration=1, deregister_after=0)
    api.expect("POST", "/api/v1/services/", (201,), expiring)
    wait_for(
        "a cleanup job to remove smoke-expiring",
        lambda: True if api.call("GET", "/api/v1/services/smoke-expiring/")[0] == 404 else None,
        JOB_TIMEOUT,
        interval=1,
    )
    leader = api.expect("GET", "/api/v1/leader/", (200,))
    if not isinstance(leader.get("fencing_token"), int) or leader["fencing_token"] < 1:
        raise CheckFailed(f"GET /api/v1/leader/ answered {leader}")
    step(f"leader elected: {leader.get('holder')}, term {leader['fencing_token']}")
    run = last_cleanup_run(python, clone, env)
    if run <= before:
        raise CheckFailed("smoke-expiring is gone but no cleanup job run was committed")
    step(f"cleanup job committed (LeaderJobRun {run})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="REGISTRY_PORT for `make run` (default: a free port)")
    parser.add_argument("--source", default=str(BASE), help="repository to clone (default: this one)")
    parser.add_argument("--readme", action="store_true", help="also run the README's examples against the server")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone and its log")
    args = parser.parse_args()

    port = args.port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-smoke-"))
    clone = workdir / "conveyor-registry"
    log_path = workdir / "make-run.log"
    ok = False
    make = None
    started: dict[int, str] = {}
    try:
        step(f"cloning {args.source} into {clone}")
        subprocess.run(["git", "clone", "--quiet", args.source, str(clone)], check=True)
        env = clean_env({"REGISTRY_PORT": str(port), "PYTHONUNBUFFERED": "1"})
        step(f"make run on port {port} (output in {log_path})")
        with open(log_path, "wb") as log:
            make = subprocess.Popen(
                ["make", "run"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        api = Api(f"http://127.0.0.1:{port}")

        def ready() -> bool | None:
            if make.poll() is not None:
                raise SystemExit(f"smoke: FAILED: `make run` exited with {make.returncode} before it was ready")
            return api.ready()

        t0 = time.monotonic()
        wait_for("/readyz to answer 200", ready, INSTALL_TIMEOUT, interval=1)
        step(f"/readyz: 200 after {time.monotonic() - t0:.0f} s (fresh .venv included)")

        imports = subprocess.run(
            [str(clone / ".venv" / "bin" / "python"), "scripts/import_check.py"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if imports.returncode != 0:
            raise CheckFailed(
                f"requirements.txt does not cover the server's imports:\n{imports.stdout}{imports.stderr}"
            )
        step("every import of the server's code resolves in the fresh .venv (scripts/import_check.py)")

        check_stack(api, clone, env, port)
        if args.readme:
            step("running the README's examples against the same server")
            result = subprocess.run(
                [sys.executable, str(clone / "scripts" / "readme_check.py"), "--url", api.base],
                cwd=clone,
                env=env,
                check=False,
            )
            if result.returncode != 0:
                raise CheckFailed("the README check failed (see above)")

        started = process_tree(make.pid)
        commands = [command_line(pid) for pid in started]
        names = sorted({cmd.split()[0].rsplit("/", 1)[-1] for cmd in commands if cmd != "?"})
        step(f"SIGINT to `make run` ({len(started)} processes: {', '.join(names)})")
        for part in ("redis-server", "uvicorn", "celery -A registry_project worker", "celery -A registry_project beat"):
            if not any(part in cmd for cmd in commands):
                raise CheckFailed(f"no {part!r} among the processes `make run` started: {commands}")
        interrupt(make)
        try:
            make.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"`make run` did not stop within {STOP_TIMEOUT} s of SIGINT") from None
        wait_for("every process to be gone", lambda: None if still_running(started) else True, 20)
        if "[make run] stopped" not in log_path.read_text(errors="replace"):
            raise CheckFailed("`make run` did not report a clean stop")
        if api.ready() is not None:
            raise CheckFailed(f"something still answers on port {port}")
        step(f"all {len(started)} processes are gone")
        ok = True
    except (CheckFailed, subprocess.CalledProcessError) as exc:
        print(f"smoke: FAILED: {exc}", file=sys.stderr)
        left = still_running(started)
        if left:
            print("smoke: still running:\n  " + "\n  ".join(f"{p} {c}" for p, c in left.items()), file=sys.stderr)
    finally:
        if make is not None and make.poll() is None:
            started = started or process_tree(make.pid)
            interrupt(make)
            with contextlib.suppress(subprocess.TimeoutExpired):
                make.wait(timeout=STOP_TIMEOUT)
        kill_tree(started)
        if not ok and log_path.exists():
            print("smoke: last lines of the `make run` output:", file=sys.stderr)
            print("\n".join(log_path.read_text(errors="replace").splitlines()[-60:]), file=sys.stderr)
        if args.keep or not ok:
            print(f"smoke: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("smoke: OK" if ok else "smoke: FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
