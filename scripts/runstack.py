"""Driving a live `make run` from outside, with the standard library only: a small JSON-over-HTTP client,
bounded waits, and the list of processes a supervisor started, so a caller can prove they are all gone.

The newcomer smoke test and the README check run before any virtualenv exists, and the supervision
test and the Redis recovery benchmark use the same helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Variables that would point a fresh stack at someone else's database or Redis.
FOREIGN_SETTINGS = ("DATABASE_URL", "REDIS_URL", "REDLOCK_URLS", "CELERY_BROKER_URL", "REGISTRY_VAR_DIR")


class CheckFailed(Exception):
    """A check of the live stack did not hold; the message says which and what was seen."""


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without settings that would reach another stack, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_SETTINGS and k != "VIRTUAL_ENV"}
    env.update(extra or {})
    return env


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Call ``probe`` until it returns something other than None; CheckFailed after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value is not None:
                return value
        except (OSError, CheckFailed) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


class Api:
    """JSON over HTTP against one base URL, with a bearer token once ``token`` is set."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
        """(status, parsed JSON body or text); HTTP errors are answers too, never exceptions."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def expect(self, method: str, path: str, statuses: tuple[int, ...], body: Any = None) -> Any:
        status, answer = self.call(method, path, body)
        if status not in statuses:
            raise CheckFailed(f"{method} {path} answered {status}, expected {statuses}: {answer}")
        return answer

    def ready(self) -> bool | None:
        """True once /readyz answers 200 (None while it does not, so wait_for keeps trying)."""
        try:
            return True if self.call("GET", "/readyz", timeout=2)[0] == 200 else None
        except OSError:
            return None


def create_token(python: str, cwd: Path, env: Mapping[str, str], name: str, staff: bool = True) -> str:
    """A new API token key, made with the project's own management command."""
    command = [python, "manage.py", "create_token", name] + (["--staff"] if staff else [])
    result = subprocess.run(command, cwd=cwd, env=dict(env), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CheckFailed(f"create_token failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().splitlines()[-1]


def django_shell(python: str, cwd: Path, env: Mapping[str, str], code: str) -> str:
    """Run ``code`` in `manage.py shell` and return what it printed (its last line)."""
    result = subprocess.run(
        [python, "manage.py", "shell", "--no-imports", "-c", code],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise CheckFailed(f"manage.py shell failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


CLEANUP_RUNS_CODE = (
    "from registry.models import LeaderJobRun; "
    "print(LeaderJobRun.objects.filter(job='cleanup', items__gte=1).order_by('-id').values_list('id', flat=True)"
    ".first() or 0)"
)


def last_cleanup_run(python: str, cwd: Path, env: Mapping[str, str]) -> int:
    """Id of the newest committed cleanup job run that removed something (0 if none).

    A leader job records a LeaderJobRun in the same fenced transaction as its writes
    (registry/leadership.py), so a row proves a leader's job really committed.
    """
    return int(django_shell(python, cwd, env, CLEANUP_RUNS_CODE) or 0)


# --- processes ---------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a live process, from /proc; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), fields[0], fields[19]


def process_tree(root: int) -> dict[int, str]:
    """``root`` and every process below it (whatever session it moved to), as pid -> start time."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat:
                parents.setdefault(stat[0], []).append(int(entry.name))
                starts[int(entry.name)] = stat[2]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree[pid] = starts[pid]
            todo.extend(parents.get(pid, []))
    return tree


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def still_running(processes: Mapping[int, str]) -> dict[int, str]:
    """Those of ``processes`` (pid -> start time) that still run (zombies count as gone), with their commands."""
    left = {}
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat and stat[2] == started and stat[1] not in ("Z", "X"):
            left[pid] = command_line(pid)
    return left


def interrupt(process: subprocess.Popen[Any]) -> None:
    """Ctrl-C as a terminal sends it: SIGINT to the process's whole process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgid(process.pid), signal.SIGINT)


def kill_tree(processes: Mapping[int, str]) -> None:
    """Last resort after a failed check: SIGKILL whatever of ``processes`` still runs."""
    for pid in still_running(processes):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
