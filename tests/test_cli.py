"""The ``conveyor`` command line against a live server (uvicorn processes on the suite's Redis and database):
each command's output, ``--json`` parsed, and the exit codes that say what happened. Also the process
side of ``groups join --exec`` (``conveyor._exec.Supervisor``) with real child processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conveyor import _exec, cli
from django.utils import timezone

from registry.models import LeaderTerm
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class Conveyor:
    """Runs ``python -m conveyor`` as a user would, with CONVEYOR_URL and CONVEYOR_TOKEN set."""

    def __init__(self, url: str, token: str | None) -> None:
        self.env = {**os.environ, "CONVEYOR_URL": url}
        self.env.pop("CONVEYOR_TOKEN", None)
        if token:
            self.env["CONVEYOR_TOKEN"] = token

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "conveyor", *args], env=self.env, capture_output=True, text=True, timeout=60
        )

    def json(self, *args: str) -> Any:
        done = self(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def start(self, *args: str) -> Stream:
        return Stream(
            subprocess.Popen(
                [sys.executable, "-m", "conveyor", *args],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )


class Stream:
    """A running command whose stdout lines are read as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next_json(self, timeout: float = 15) -> dict[str, Any]:
        return json.loads(self.lines.get(timeout=timeout))

    def finish(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server(servers: list[str]) -> str:
    return servers[0]


@pytest.fixture
def conveyor(server: str, make_token: Any) -> Conveyor:
    return Conveyor(server, make_token("cli")[1])


@pytest.fixture
def staff(server: str, make_token: Any) -> Conveyor:
    return Conveyor(server, make_token("ops", staff=True)[1])


def register(
    conveyor: Conveyor, service_id: str, *extra: str, name: str = "api", endpoint: str = "10.0.0.1:80"
) -> subprocess.CompletedProcess[str]:
    return conveyor(
        "services", "register", service_id, "--name", name, "--type", "source", "--endpoint", endpoint, *extra
    )


def test_services_register_list_get_deregister(conveyor):
    done = register(conveyor, "api-1", "--label", "env=prod", "--label", "zone=a", "--lease", "60")
    assert done.returncode == 0 and "registered api-1" in done.stdout
    registered = conveyor.json(
        "services", "register", "api-2", "--name", "api", "--type", "sink", "--endpoint", "10.0.0.2:80", "--weight", "5"
    )
    assert (registered["service_id"], registered["weight"], registered["lease"]["duration"]) == ("api-2", 5, 30)

    listed = conveyor.json("services", "list", "--name", "api")
    assert [(s["service_id"], s["labels"]) for s in listed] == [("api-1", {"env": "prod", "zone": "a"}), ("api-2", {})]
    assert [s["service_id"] for s in conveyor.json("services", "list", "--selector", "env=prod")] == ["api-1"]
    table = conveyor("services", "list").stdout.splitlines()
    assert table[0].split() == ["SERVICE_ID", "NAME", "TYPE", "ENDPOINT", "HEALTH", "WEIGHT", "LEASE", "LABELS"]
    assert table[1].split()[:5] == ["api-1", "api", "source", "10.0.0.1:80", "healthy"]
    assert table[1].split()[-1] == "env=prod,zone=a"

    one = conveyor.json("services", "get", "api-1")
    assert (one["service_id"], one["health"], one["lease_duration"]) == ("api-1", "healthy", 60)
    shown = conveyor("services", "get", "api-1")
    assert shown.returncode == 0 and "endpoint:" in shown.stdout and "10.0.0.1:80" in shown.stdout

    assert conveyor("services", "deregister", "api-1").returncode == 0
    gone = conveyor("services", "get", "api-1")
    assert gone.returncode == cli.EXIT_NOT_FOUND and "api-1" in gone.stderr
    assert conveyor("services", "deregister", "api-1").returncode == cli.EXIT_NOT_FOUND
    assert conveyor.json("services", "list", "--name", "nobody") == []


def test_exit_codes_for_bad_input_tokens_and_an_unreachable_registry(conveyor, server, make_token):
    # the server refuses the input: 2, with the field and its rule
    bad = conveyor("services", "register", "x", "--name", "api", "--type", "source", "--endpoint", "10.0.0.1")
    assert bad.returncode == cli.EXIT_USAGE and "endpoint:" in bad.stderr and "host:port" in bad.stderr
    # a usage error: 2 before anything is sent
    assert conveyor("services", "register", "x", "--type", "source", "--endpoint", "h:1").returncode == cli.EXIT_USAGE
    assert conveyor("services", "frobnicate").returncode == cli.EXIT_USAGE
    # no token, an unknown one: 4
    assert Conveyor(server, None)("services", "list").returncode == cli.EXIT_DENIED
    assert Conveyor(server, "cr_unknown")("groups", "list").returncode == cli.EXIT_DENIED
    # --url and --token override the environment
    assert conveyor("--token", "cr_unknown", "topics", "list").returncode == cli.EXIT_DENIED
    # another token's service: 4
    register(conveyor, "mine")
    other = Conveyor(server, make_token("other")[1])
    assert other("services", "deregister", "mine").returncode == cli.EXIT_DENIED
    # nothing listens: 5
    nowhere = conveyor("--url", "http://127.0.0.1:9", "services", "list")
    assert nowhere.returncode == cli.EXIT_UNAVAILABLE and "unreachable" in nowhere.stderr


def test_drain_undrain_and_select(conveyor, staff):
    register(conveyor, "api-1")
    register(conveyor, "api-2", endpoint="10.0.0.2:80")
    # draining is an operator's: the owner's token is refused
    assert conveyor("services", "drain", "api-1").returncode == cli.EXIT_DENIED
    drained = staff.json("services", "drain", "api-1")
    assert [(s["service_id"], s["weight"], s["drained"]) for s in drained] == [("api-1", 0, True)]

    assert {conveyor("select", "api", "--endpoint").stdout.strip() for _ in range(3)} == {"10.0.0.2:80"}
    assert {conveyor.json("select", "api")["service_id"] for _ in range(3)} == {"api-2"}
    table = conveyor("select", "api").stdout.splitlines()
    assert table[0].split()[0] == "SERVICE_ID" and table[1].split()[:4] == ["api-2", "api", "source", "10.0.0.2:80"]
    keyed = {conveyor.json("select", "api", "--strategy", "hash", "--key", "k1")["service_id"] for _ in range(3)}
    assert keyed == {"api-2"}

    # every instance drained: no instance available, 6; a name nobody registered: 3
    assert staff("services", "drain", "api-2").returncode == 0
    refused = conveyor("select", "api")
    assert refused.returncode == cli.EXIT_NO_INSTANCE and "api" in refused.stderr
    assert conveyor("select", "nobody").returncode == cli.EXIT_NOT_FOUND
    assert conveyor("select", "api", "--strategy", "fastest").returncode == cli.EXIT_USAGE
    assert conveyor("select", "api", "--strategy", "hash").returncode == cli.EXIT_USAGE  # the server wants a key

    # undrain several at once; an unknown one among them is reported and sets the exit code
    mixed = staff("--json", "services", "undrain", "api-1", "nobody", "api-2")
    assert mixed.returncode == cli.EXIT_NOT_FOUND and "nobody" in mixed.stderr
    assert [s["drained"] for s in json.loads(mixed.stdout)] == [False, False]
    assert conveyor("select", "api").returncode == 0


def join(server: str, key: str, member: str, topics: list[str], group: str = "billing") -> dict[str, Any]:
    response = httpx.post(
        f"{server}/api/v1/groups/{group}/members/",
        json={"member_id": member, "service_name": "billing", "topics": topics},
        headers={"Authorization": f"Bearer {key}"},
    )
    response.raise_for_status()
    return response.json()


def test_topics_and_groups_list_and_describe(server, make_token):
    key = make_token("groups")[1]
    conveyor = Conveyor(server, key)
    created = conveyor("topics", "put", "orders", "--partitions", "12")
    assert created.returncode == 0 and "orders: 12 partitions" in created.stdout
    assert conveyor.json("topics", "put", "refunds", "--partitions", "4")["partitions"] == 4
    shrink = conveyor("topics", "put", "orders", "--partitions", "3")
    assert shrink.returncode == cli.EXIT_USAGE and "partitions:" in shrink.stderr
    assert [(t["name"], t["partitions"]) for t in conveyor.json("topics", "list")] == [("orders", 12), ("refunds", 4)]

    join(server, key, "m1", ["orders", "refunds"])
    join(server, key, "m2", ["orders"])
    groups = conveyor.json("groups", "list")
    assert [(g["group_id"], g["generation"], len(g["members"])) for g in groups] == [("billing", 2, 2)]
    assert conveyor("groups", "list").stdout.split("\n")[1].split() == [
        "billing",
        "2",
        "reconciling",
        "2",
        "orders,refunds",
    ]

    described = conveyor.json("groups", "describe", "billing")
    assert (described["generation"], described["state"]) == (2, "reconciling")
    m1, m2 = described["members"]
    lines = conveyor("groups", "describe", "billing").stdout.splitlines()
    assert lines[0].split() == ["GROUP", "GENERATION", "VERSION", "STATE", "TOPICS"]
    assert lines[1].split() == ["billing", "2", str(described["version"]), "reconciling", "orders,refunds"]
    header = lines[3].split()
    assert header[:6] == ["MEMBER", "EPOCH", "SERVICE", "#OWNED", "#REVOKING", "#PENDING"]
    row = dict(zip(header, lines[4].split(), strict=False))
    # m1 owns all 16 until it confirms; 8 of orders are moving to m2 (8 each), which waits for them
    assert (row["MEMBER"], row["#OWNED"], row["#REVOKING"], row["#PENDING"]) == ("m1", "16", "8", "0")
    assert row["OWNED"] == "orders:0-11" and lines[4].split()[7] == "refunds:0-3"
    revoking = cli.partitions_text(m1["revoking"])
    assert revoking in lines[4] and revoking == cli.partitions_text(m2["pending"])
    row2 = lines[5].split()
    assert row2[:6] == ["m2", str(m2["member_epoch"]), "billing", "0", "0", "8"]

    rows = conveyor("groups", "describe", "billing", "--partitions").stdout.split("\n\n")[2].splitlines()
    assert rows[0].split() == ["TOPIC", "PARTITION", "OWNER", "STATE", "NEXT_OWNER"]
    states = {(r.split()[0], int(r.split()[1])): r.split()[2:] for r in rows[1:]}
    assert len(states) == 16
    moving = [(t, n) for t, numbers in m2["pending"].items() for n in numbers]
    for tp, (owner, state, next_owner) in states.items():
        assert (owner, state, next_owner) == (("m1", "revoking", "m2") if tp in moving else ("m1", "owned", "-"))

    assert conveyor("groups", "describe", "nobody").returncode == cli.EXIT_NOT_FOUND


def test_leader(conveyor):
    none = conveyor("leader")
    assert none.returncode == cli.EXIT_NOT_FOUND and "No leader" in none.stderr
    LeaderTerm.objects.create(
        name="periodic-jobs", term=7, holder="host:42", expires_at=timezone.now() + timedelta(seconds=60)
    )
    assert conveyor.json("leader") == {
        "name": "periodic-jobs",
        "holder": "host:42",
        "fencing_token": 7,
        "expires_at": LeaderTerm.objects.get().expires_at.isoformat().replace("+00:00", "Z"),
    }
    assert conveyor("leader").stdout.splitlines()[1].split()[:3] == ["periodic-jobs", "host:42", "7"]


def test_services_watch_prints_each_state_once_and_stops_after_count(conveyor, server):
    register(conveyor, "api-1")
    watch = conveyor.start("services", "watch", "--name", "api", "--count", "4", "--json")
    first = watch.next_json()  # the current services first: the watch is on
    assert (first["type"], first["service_id"], first["health"]) == ("service.registered", "api-1", "healthy")
    register(conveyor, "other", name="other")  # another name: not shown
    register(conveyor, "api-2")
    conveyor("services", "deregister", "api-1")
    httpx.post(
        f"{server}/api/v1/services/api-2/heartbeat/",
        json={"health": "degraded"},
        headers={"Authorization": f"Bearer {conveyor.env['CONVEYOR_TOKEN']}"},
    )
    rest = [watch.next_json() for _ in range(3)]
    assert [(m["type"], m["service_id"]) for m in rest] == [
        ("service.registered", "api-2"),
        ("service.deregistered", "api-1"),
        ("service.health", "api-2"),
    ]
    assert rest[1]["revision"] > first["revision"] and rest[2]["revision"] > rest[0]["revision"]
    assert watch.finish() == 0  # --count 4 reached


def test_groups_watch_and_refused_watches(conveyor, server):
    key = conveyor.env["CONVEYOR_TOKEN"]
    join(server, key, "m1", ["orders"], group="g1")
    watch = conveyor.start("groups", "watch", "g1", "--count", "2", "--json")
    first = watch.next_json()
    assert (first["type"], first["generation"], [m["member_id"] for m in first["members"]]) == (
        "group.assignment",
        1,
        ["m1"],
    )
    join(server, key, "m2", ["orders"], group="g1")
    second = watch.next_json()
    assert (second["generation"], [m["member_id"] for m in second["members"]]) == (2, ["m1", "m2"])
    assert watch.finish() == 0

    human = conveyor("groups", "watch", "g1", "--count", "1")
    assert human.returncode == 0
    assert human.stdout.splitlines()[0].startswith("generation 2")
    assert "m2" in human.stdout
    assert conveyor("groups", "watch", "nobody").returncode == cli.EXIT_NOT_FOUND
    assert Conveyor(server, "cr_unknown")("groups", "watch", "g1").returncode == cli.EXIT_DENIED
    assert conveyor("services", "watch", "--name", "bad name").returncode == cli.EXIT_USAGE


# --- groups join --exec: the process side ---------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, pathlib, signal, sys, time

    log = pathlib.Path(sys.argv[1])
    mode = sys.argv[2]

    def write(event):
        with log.open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), "event": event, "partitions": os.environ["CONVEYOR_PARTITIONS"],
                                "assignment": json.loads(os.environ["CONVEYOR_ASSIGNMENT"])}) + "\\n")

    def term(*_):
        write("stop")
        sys.exit(0)

    def hup(*_):
        body = json.loads(pathlib.Path(os.environ["CONVEYOR_ASSIGNMENT_FILE"]).read_text())
        write("hup " + json.dumps(body["partitions"], sort_keys=True))
        if mode != "no-ack":
            pathlib.Path(os.environ["CONVEYOR_ACK_FILE"]).write_text(str(body["serial"]))

    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else term)
    signal.signal(signal.SIGHUP, hup)
    write("start")
    if mode == "exit":
        sys.exit(7)
    while True:
        time.sleep(0.05)
    """
)


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Any]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = tmp_path / "events.log"
    supervisors: list[_exec.Supervisor] = []

    def make(mode: str = "run", **options: Any) -> _exec.Supervisor:
        command = f"{sys.executable} {script} {log} {mode}"
        supervisor = _exec.Supervisor(command, {**os.environ, "CONVEYOR_GROUP": "g"}, workdir=tmp_path, **options)
        supervisors.append(supervisor)
        return supervisor

    def events() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    make.events = events  # type: ignore[attr-defined]
    yield make
    for supervisor in supervisors:
        supervisor.kill()


def started(child: Any, n: int) -> list[dict[str, Any]]:
    """Wait until the n-th command has written its start; every event so far."""
    return wait_for(lambda: [e for e in child.events() if e["event"] == "start"][n - 1 :] and child.events(), 15)


def test_a_restarted_command_holds_exactly_the_member_partitions_and_stops_before_a_revocation_returns(child):
    supervisor = child()
    supervisor.on_partitions_assigned([("orders", 0), ("orders", 1), ("refunds", 2)])
    first = started(child, 1)[-1]
    assert first["partitions"] == "orders:0 orders:1 refunds:2"
    assert first["assignment"] == {"orders": [0, 1], "refunds": [2]}

    supervisor.on_partitions_revoked([("orders", 1)])
    # when the callback returns (and the member may hand orders:1 on), the old command has stopped
    events = child.events()
    assert [e["event"] for e in events] == ["start", "stop"] and events[1]["pid"] == first["pid"]
    second = started(child, 2)[-1]
    assert second["partitions"] == "orders:0 refunds:2" and second["pid"] != first["pid"]

    supervisor.on_partitions_lost([("orders", 0), ("refunds", 2)])
    # lost: killed at once, no chance to commit ("stop" never written), and nothing held: not restarted
    assert [e["event"] for e in child.events()] == ["start", "stop", "start"]
    assert not supervisor.running

    supervisor.on_partitions_assigned([("orders", 5)])
    assert started(child, 3)[-1]["partitions"] == "orders:5"
    supervisor.close()
    assert child.events()[-1]["event"] == "stop" and not supervisor.exited.is_set()


def test_a_command_that_ignores_sigterm_is_killed_after_the_grace(child):
    supervisor = child("stubborn", grace=0.5)
    supervisor.on_partitions_assigned([("orders", 0), ("orders", 1)])
    started(child, 1)
    supervisor.on_partitions_revoked([("orders", 0), ("orders", 1)])
    assert not supervisor.running and [e["event"] for e in child.events()] == ["start"]


def test_signal_mode_keeps_the_command_and_waits_for_its_acknowledgement(child):
    supervisor = child(signal_name="HUP")
    supervisor.on_partitions_assigned([("orders", 0), ("orders", 1)])
    first = started(child, 1)[-1]
    supervisor.on_partitions_assigned([("orders", 2)])
    wait_for(lambda: any(e["event"].startswith("hup") for e in child.events()))
    supervisor.on_partitions_revoked([("orders", 0)])
    # the same process, told by the file; the callback returned only after its acknowledgement
    hups = [e["event"] for e in child.events() if e["event"].startswith("hup")]
    assert hups == ['hup {"orders": [0, 1, 2]}', 'hup {"orders": [1, 2]}']
    assert {e["pid"] for e in child.events()} == {first["pid"]} and supervisor.running


def test_signal_mode_restarts_a_command_that_does_not_acknowledge(child):
    supervisor = child("no-ack", signal_name="HUP", grace=0.5)
    supervisor.on_partitions_assigned([("orders", 0), ("orders", 1)])
    first = started(child, 1)[-1]
    supervisor.on_partitions_revoked([("orders", 0)])
    events = child.events()
    assert [e["event"] for e in events][:3] == ["start", 'hup {"orders": [1]}', "stop"]
    assert all(e["pid"] == first["pid"] for e in events[:3])
    assert started(child, 2)[-1]["partitions"] == "orders:1"


def test_a_command_that_exits_by_itself_ends_the_join_with_its_status(child):
    supervisor = child("exit")
    supervisor.on_partitions_assigned([("orders", 0)])
    wait_for(supervisor.exited.is_set, 15)
    assert supervisor.exit_status == 7
    supervisor.on_partitions_assigned([("orders", 1)])  # nothing starts once it has ended
    assert len([e for e in child.events() if e["event"] == "start"]) == 1


def test_groups_join_exec_follows_the_assignment_end_to_end(server, make_token, tmp_path):
    pytest.importorskip("conveyor.member", reason="needs the client's group member (conveyor.member)")
    key = make_token("exec")[1]
    conveyor = Conveyor(server, key)
    conveyor("topics", "put", "orders", "--partitions", "4")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = tmp_path / "events.log"
    joined = conveyor.start(
        "groups", "join", "g1", "--topics", "orders", "--member-id", "cli-1", "--session-timeout", "6",
        "--exec", f"{sys.executable} {script} {log} run",
    )  # fmt: skip

    def events() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    wait_for(
        lambda: any(
            e["event"] == "start" and e["partitions"] == "orders:0 orders:1 orders:2 orders:3" for e in events()
        ),
        30,
    )
    # a second member: half the partitions move; the command is stopped first, then runs with the rest
    other = join(server, key, "m2", ["orders"], group="g1")
    assert other["pending"] == {"orders": [2, 3]}
    wait_for(lambda: events()[-1]["event"] == "start" and events()[-1]["partitions"] == "orders:0 orders:1", 30)
    assert [e["event"] for e in events()][-3:] == ["start", "stop", "start"]
    # SIGINT: the command stops, the member leaves, exit 0
    joined.proc.send_signal(signal.SIGINT)
    assert joined.finish() == 0
    assert events()[-1]["event"] == "stop"
    members = conveyor.json("groups", "describe", "g1")["members"]
    assert [m["member_id"] for m in members] == ["m2"]
