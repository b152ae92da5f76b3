"""The client's registration handle against live servers (real uvicorn processes, the suite's Redis and
database): heartbeats, health reported at once, a server restart, a lease lapse and its recovery, a 404 that
makes it register again, close racing heartbeats (never registered again after close), SIGTERM in a
subprocess, and a token the registry stops accepting. The sync and asyncio handles share one state machine;
the asyncio cases below run the same scenarios through the other driver."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conveyor import Forbidden, Registry, ServiceNotFound, Unauthorized, Unavailable
from conveyor import aio as conveyor_aio
from conveyor._registration_state import CLOSED, RegistrationState, Spec

from registry.models import ApiToken
from tests.client_support import new_token, rest
from tests.conftest import wait_for

pytest_plugins = ["tests.client_fixtures"]  # the live-server fixtures
pytestmark = pytest.mark.django_db(transaction=True)

BASE = Path(__file__).resolve().parent.parent


def names(url: str, token: str, name: str) -> list[str]:
    with rest(url, token) as client:
        return [s["service_id"] for s in client.get("/services/", params={"name": name}).json()["results"]]


def test_register_heartbeats_then_close_deregisters(server, key):
    reg = Registry(server.url, key)
    with reg.register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080", lease=3) as handle:
        first = reg.get_service("orders-1")
        assert (first.name, first.endpoint, first.health) == ("orders", "10.0.0.5:8080", "healthy")
        assert handle.heartbeat_interval == 1  # the registry's answer: lease / 3
        wait_for(lambda: handle.heartbeats >= 2, 10)
        assert reg.get_service("orders-1").lease_expires_at > first.lease_expires_at
    assert handle.state == CLOSED
    with pytest.raises(ServiceNotFound):
        reg.get_service("orders-1")


def test_set_health_is_visible_when_it_returns_and_later_heartbeats_keep_it(server, key):
    reg = Registry(server.url, key)
    with reg.register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080", lease=3) as handle:
        assert handle.set_health("degraded") is True
        assert reg.get_service("orders-1").health == "degraded"  # no waiting for the next tick
        beats = handle.heartbeats
        wait_for(lambda: handle.heartbeats >= beats + 2, 10)
        assert reg.get_service("orders-1").health == "degraded"  # a heartbeat without it would say healthy


def test_the_handle_rides_through_a_server_restart(server, key):
    reg = Registry(server.url, key, timeout=3)
    with reg.register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080", lease=30) as handle:
        server.stop()
        # Made while the registry is down: refused at once, kept, and sent once it is back.
        assert handle.set_health("degraded") is False
        assert isinstance(handle.last_error, Unavailable)
        server.start()
        wait_for(lambda: reg.get_service("orders-1").health == "degraded", 30)
        assert handle.registrations == 1  # the registry kept it: renewed, not registered again
        assert handle.state == "running"


def test_a_lapsed_lease_calls_on_lease_lost_then_on_lease_recovered(server, key):
    calls: list[str] = []
    reg = Registry(server.url, key, timeout=1)
    handle = reg.register(
        "orders-1",
        name="orders",
        type="source",
        endpoint="10.0.0.5:8080",
        lease=2,
        on_lease_lost=lambda h: calls.append(f"lost {h.service_id}"),
        on_lease_recovered=lambda h: calls.append(f"recovered {h.service_id}"),
    )
    try:
        server.stop()
        wait_for(lambda: calls, 20)
        assert calls == ["lost orders-1"] and handle.lease_lost
        server.start()
        wait_for(lambda: len(calls) == 2, 30)
        assert calls == ["lost orders-1", "recovered orders-1"] and not handle.lease_lost
        assert reg.get_service("orders-1").health == "healthy"
    finally:
        handle.close()


def test_a_service_deleted_by_another_call_is_registered_again(server, key):
    reg = Registry(server.url, key)
    labels = {"zone": "a"}
    with reg.register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080", labels=labels, lease=3) as h:
        with rest(server.url, key) as client:
            assert client.delete("/services/orders-1/").status_code == 204
        wait_for(lambda: h.registrations == 2, 10)
        again = reg.get_service("orders-1")
        assert (again.endpoint, dict(again.labels), again.health) == ("10.0.0.5:8080", labels, "healthy")


def test_close_racing_heartbeats_and_404s_never_registers_again(server, key):
    """Each handle is deleted from outside (its next heartbeat gets a 404 and wants to register again) and
    closed at a random moment around it; after close nothing may bring any of them back."""
    reg = Registry(server.url, key)
    rng = random.Random(11)

    def one(i: int) -> None:
        handle = reg.register(f"race-{i}", name="race", type="sink", endpoint="10.0.0.9:80", lease=1)
        time.sleep(rng.random())
        with rest(server.url, key) as client:
            client.delete(f"/services/race-{i}/")
        time.sleep(rng.random() * 0.05)
        handle.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Several heartbeat intervals: any re-registration would show up here.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert names(server.url, key, "race") == []
        time.sleep(0.1)


def test_a_404_answer_arriving_after_close_changes_nothing():
    """The rule the race above relies on, in the state machine itself."""
    state = RegistrationState(Spec("s", "n", "sink", "h:1", lease=3))
    answer = {"service_id": "s", "lease": {"duration": 3, "heartbeat_interval": 1}}
    state.succeeded(state.next_step(0.0), answer, 0.0, 0.0)
    heartbeat = state.next_step(5.0)
    assert not heartbeat.register
    state.close()
    state.failed(heartbeat, ServiceNotFound("gone", status=404), 5.1)
    assert not state.need_register
    assert type(state.next_step(5.2)).__name__ == "Exit"


SIGTERM_SCRIPT = """
import signal, sys, time
from conveyor import Registry
if sys.argv[1] == "app-handler":
    def app(signum, frame):
        print("app handler ran", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, app)
reg = Registry()
handle = reg.register("term-1", name="term", type="sink", endpoint="10.0.0.7:80", lease=30, handle_signals=True)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


AIO_SIGTERM_SCRIPT = """
import asyncio
from conveyor import aio

async def main():
    reg = aio.Registry()
    await reg.register("term-1", name="term", type="sink", endpoint="10.0.0.7:80", lease=30, handle_signals=True)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("script", "previous"),
    [(SIGTERM_SCRIPT, "default"), (SIGTERM_SCRIPT, "app-handler"), (AIO_SIGTERM_SCRIPT, "default")],
    ids=["sync-default-action", "sync-app-handler", "aio-default-action"],
)
def test_sigterm_deregisters_then_chains_the_previous_handler(server, key, script, previous):
    env = dict(os.environ, CONVEYOR_URL=server.url, CONVEYOR_TOKEN=key)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), previous],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert names(server.url, key, "term") == ["term-1"]
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
    finally:
        child.kill()
    assert names(server.url, key, "term") == []
    if previous == "default":
        assert child.returncode == -signal.SIGTERM  # the default action still ends the process
    else:
        assert (child.returncode, out.strip()) == (0, "app handler ran")


def test_signal_handling_outside_the_main_thread_is_refused_before_anything_is_registered(server, key):
    reg = Registry(server.url, key)
    refused: list[Exception] = []

    def start() -> None:
        try:
            reg.register("t-1", name="t", type="sink", endpoint="10.0.0.7:80", handle_signals=True)
        except RuntimeError as exc:
            refused.append(exc)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    assert "main thread" in str(refused[0])
    with pytest.raises(ServiceNotFound):
        reg.get_service("t-1")


def test_a_refused_token_stops_the_handle_with_its_error(server, key):
    reg = Registry(server.url, key)
    handle = reg.register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080", lease=3)
    try:
        token = ApiToken.objects.get(name="client")
        token.is_active = False
        token.save()  # its save signal drops it from the registry's token cache at once
        wait_for(lambda: handle.state == "stopped", 10)
        assert isinstance(handle.error, Unauthorized)
        beats = handle.heartbeats
        time.sleep(2)  # two heartbeat intervals: a stopped handle sends nothing more
        assert handle.heartbeats == beats and handle.state == "stopped"
    finally:
        handle.close()
    with pytest.raises(Unauthorized):
        Registry(server.url, "not-a-token").register("x", name="x", type="sink", endpoint="h:1")


def test_registering_another_tokens_service_is_forbidden(server, key):
    Registry(server.url, key).register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080")
    other = Registry(server.url, new_token("other"))
    with pytest.raises(Forbidden):
        other.register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080")


# --- asyncio ---------------------------------------------------------------------------------


def test_aio_register_set_health_and_close(server, key):
    async def scenario() -> None:
        reg = conveyor_aio.Registry(server.url, key)
        async with reg.register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080", lease=3) as h:
            assert (await reg.get_service("orders-1")).health == "healthy"
            assert await h.set_health("unhealthy") is True
            assert (await reg.get_service("orders-1")).health == "unhealthy"
            while h.heartbeats < 2:
                await asyncio.sleep(0.05)
        with pytest.raises(ServiceNotFound):
            await reg.get_service("orders-1")

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_aio_lease_lost_and_recovered_and_a_404_registers_again(server, key):
    calls: list[str] = []

    async def recovered(handle: conveyor_aio.Registration) -> None:  # coroutine callbacks are awaited
        calls.append("recovered")

    async def until(check, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            assert time.monotonic() < deadline, "not true in time"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        reg = conveyor_aio.Registry(server.url, key, timeout=1)
        handle = await reg.register(
            "orders-1",
            name="orders",
            type="source",
            endpoint="10.0.0.5:8080",
            lease=2,
            on_lease_lost=lambda h: calls.append("lost"),
            on_lease_recovered=recovered,
        )
        try:
            await asyncio.to_thread(server.stop)
            await until(lambda: calls, 20)
            await asyncio.to_thread(server.start)
            await until(lambda: len(calls) == 2, 30)
            assert calls == ["lost", "recovered"]
            with rest(server.url, key) as client:
                assert client.delete("/services/orders-1/").status_code == 204
            await until(lambda: handle.registrations == 2, 10)
            assert (await reg.get_service("orders-1")).health == "healthy"
        finally:
            await handle.close()

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_aio_close_racing_heartbeats_and_404s_never_registers_again(server, key):
    rng = random.Random(7)

    async def one(reg: conveyor_aio.Registry, i: int) -> None:
        handle = await reg.register(f"arace-{i}", name="arace", type="sink", endpoint="10.0.0.9:80", lease=1)
        await asyncio.sleep(rng.random())
        await asyncio.to_thread(lambda: rest(server.url, key).delete(f"/services/arace-{i}/"))
        await asyncio.sleep(rng.random() * 0.05)
        await handle.close()

    async def scenario() -> None:
        reg = conveyor_aio.Registry(server.url, key)
        await asyncio.gather(*(one(reg, i) for i in range(16)))

    asyncio.run(asyncio.wait_for(scenario(), 60))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert names(server.url, key, "arace") == []
        time.sleep(0.1)
