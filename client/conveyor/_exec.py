"""``conveyor groups join GROUP --topics T --exec CMD``: one consumer-group member whose partitions a shell
command consumes. The command never runs with a partition the member does not hold:

- **assigned**: the command is (re)started with everything the member now holds. With ``--signal SIG``
  a running command is not restarted: the new assignment is written to ``$CONVEYOR_ASSIGNMENT_FILE``
  and the command gets SIG.
- **revoked**: before the member confirms the generation (which hands the partitions on), the command
  is stopped (SIGTERM, SIGKILL after ``--grace`` seconds) so it can commit, and started again with what
  the member still holds. With ``--signal SIG`` it gets SIG after the reduced assignment is written, and
  must write that file's ``serial`` to ``$CONVEYOR_ACK_FILE`` once it has stopped consuming and committed
  what it gave up; without that within ``--grace`` it is stopped as above.
- **lost** (removed, fenced, or the session could not be confirmed in time): SIGKILL at once, since it
  must not commit; it starts again when the member holds partitions again.

The command is split like a shell command line and run without a shell (``sh -c '...'`` for shell
syntax), in a process group of its own: SIGTERM and SIGKILL go to the whole group, the ``--signal`` to
the command itself. Its environment adds ``CONVEYOR_GROUP``, ``CONVEYOR_MEMBER_ID``,
``CONVEYOR_PARTITIONS`` (``orders:0 orders:1``) and ``CONVEYOR_ASSIGNMENT`` (``{"orders": [0, 1]}``) as of
its start, plus with ``--signal`` the two file paths (the assignment file, ``{"serial": N, "partitions":
{...}}``, is always current). No command runs while the member holds nothing. A command that exits by itself ends the
join: the member leaves and ``conveyor`` exits with the command's status. Ctrl-C or SIGTERM: the
command is stopped as for a revocation, the member leaves, exit 0.

``Supervisor`` is the process side and knows nothing of the registry; ``join_and_run`` wires it to a
``GroupMember`` (``conveyor.member``) as its rebalance listener.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._config import Config

Partition = tuple[str, int]


def signal_named(name: str) -> signal.Signals:
    """``HUP``, ``sighup`` or ``SIGHUP`` -> ``signal.SIGHUP`` (KeyError for no such signal)."""
    return signal.Signals["SIG" + name.upper().removeprefix("SIG")]


def as_mapping(held: Iterable[Partition]) -> dict[str, list[int]]:
    """``{("orders", 1), ("orders", 0)}`` -> ``{"orders": [0, 1]}``."""
    mapping: dict[str, list[int]] = {}
    for topic, number in sorted(held):
        mapping.setdefault(topic, []).append(number)
    return mapping


def partitions_env(held: Iterable[Partition]) -> str:
    return " ".join(f"{topic}:{number}" for topic, number in sorted(held))


class Supervisor:
    """Runs ``command`` (a shell command) for the partitions held, as the module docstring says. The
    listener methods block until the command is in the state the member may go on from."""

    def __init__(
        self,
        command: str,  # split like a shell would (shlex), run without one
        env: dict[str, str],
        *,
        grace: float = 10.0,
        signal_name: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.command = command
        self.env = env
        self.grace = grace
        self.signal = signal_named(signal_name) if signal_name else None
        self.held: frozenset[Partition] = frozenset()
        self.serial = 0
        self.exited = threading.Event()  # the command ended by itself
        self.exit_status: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._workdir = workdir or Path(tempfile.mkdtemp(prefix="conveyor-exec-"))
        self.assignment_file = self._workdir / "assignment.json"
        self.ack_file = self._workdir / "ack"

    # ---------------------------------------------------------------- listener side

    def on_partitions_assigned(self, partitions: Iterable[Partition]) -> None:
        with self._lock:
            self.held = self.held | {tuple(p) for p in partitions}  # type: ignore[misc]
            if self.signal is not None and self.running:
                self._write_assignment()
                self._send(self.signal)
            else:
                self._restart()

    def on_partitions_revoked(self, partitions: Iterable[Partition]) -> None:
        with self._lock:
            self.held = self.held - {tuple(p) for p in partitions}
            if self.running and not (self.signal is not None and self._signal_and_wait()):
                self.stop()
            if not self.running:
                self._start()

    def on_partitions_lost(self, partitions: Iterable[Partition]) -> None:
        with self._lock:
            self.held = self.held - {tuple(p) for p in partitions}
            self.kill()
            self._start()

    # ---------------------------------------------------------------- the command

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _restart(self) -> None:
        self.stop()
        self._start()

    def _start(self) -> None:
        if not self.held or self.exited.is_set():
            return
        self._write_assignment()
        env = {
            **self.env,
            "CONVEYOR_PARTITIONS": partitions_env(self.held),
            "CONVEYOR_ASSIGNMENT": json.dumps(as_mapping(self.held), sort_keys=True),
        }
        if self.signal is not None:
            env |= {"CONVEYOR_ASSIGNMENT_FILE": str(self.assignment_file), "CONVEYOR_ACK_FILE": str(self.ack_file)}
        # No shell: the command is the process that gets the signals (a shell in between would die of a
        # SIGHUP meant for it). Use `sh -c '...'` explicitly for shell syntax.
        proc = subprocess.Popen(shlex.split(self.command), env=env, start_new_session=True)
        self._proc = proc
        threading.Thread(target=self._watch, args=(proc,), name="conveyor-exec-wait", daemon=True).start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        status = proc.wait()
        with self._lock:
            if self._proc is proc:  # not stopped by us: it ended by itself
                self._proc = None
                self.exit_status = status if status >= 0 else 128 - status
                self.exited.set()

    def stop(self) -> None:
        """SIGTERM to the command's process group, SIGKILL after the grace period; waits for it."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        self._signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            self._signal_group(proc, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            self._signal_group(proc, signal.SIGKILL)
            proc.wait()

    def close(self) -> None:
        with self._lock:
            self.stop()

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def _send(self, sig: signal.Signals) -> None:
        """The change signal goes to the command itself; stopping signals go to its whole process group."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def _write_assignment(self) -> None:
        self.serial += 1
        body = {"serial": self.serial, "partitions": as_mapping(self.held)}
        tmp = self.assignment_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, sort_keys=True))
        tmp.replace(self.assignment_file)  # readers never see half a file

    def _signal_and_wait(self) -> bool:
        """Signal mode, revocation: write the reduced assignment, signal, wait for its serial in the ack
        file. True if the command acknowledged within the grace period."""
        self._write_assignment()
        self._send(self.signal)  # type: ignore[arg-type]
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and self.running:
            with contextlib.suppress(FileNotFoundError):
                if self.ack_file.read_text().strip() == str(self.serial):
                    return True
            time.sleep(0.05)
        return False


class _Listener:
    """The member's ConsumerRebalanceListener: hands each callback's partitions to the supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def on_partitions_revoked(self, partitions: list[Any]) -> None:
        self.supervisor.on_partitions_revoked(partitions)

    def on_partitions_assigned(self, partitions: list[Any]) -> None:
        self.supervisor.on_partitions_assigned(partitions)

    def on_partitions_lost(self, partitions: list[Any]) -> None:
        self.supervisor.on_partitions_lost(partitions)


def join_and_run(config: Config, args: argparse.Namespace) -> int:
    """Join ``args.group_id`` as a member whose partitions ``args.exec_command`` consumes (see module)."""
    from .registry import Registry

    member_id = args.member_id or f"{socket.gethostname()}-{os.getpid()}"
    env = {**os.environ, "CONVEYOR_GROUP": args.group_id, "CONVEYOR_MEMBER_ID": member_id}
    supervisor = Supervisor(args.exec_command, env, grace=args.grace, signal_name=args.signal)
    options: dict[str, Any] = {"topics": args.topics, "listener": _Listener(supervisor), "member_id": member_id}
    if args.service_name:
        options["service_name"] = args.service_name
    if args.session_timeout:
        options["session_timeout"] = args.session_timeout
    if args.static:
        options["static"] = True
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    registry = Registry(config.url, config.token, timeout=config.timeout)
    member = None
    try:
        member = registry.group_member(args.group_id, **options)
        while not stop.is_set() and not supervisor.exited.is_set() and getattr(member, "error", None) is None:
            stop.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if member is not None:
            member.close()  # revokes (the command stops and may commit), then leaves
        supervisor.close()
        registry.close()
        signal.signal(signal.SIGTERM, previous)
    error = getattr(member, "error", None)
    if error is not None:
        raise error
    return (supervisor.exit_status or 0) if supervisor.exited.is_set() else 0
