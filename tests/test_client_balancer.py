"""The client's balancer against a live server: over HTTP (the select endpoint, its answers as typed errors)
and local (following /ws/services/ and choosing with conveyor.strategies in-process): adds, an operator's
drain and undrain through the admin, a lapsed lease that no event announces, removals, and a registry that
goes away while the local balancer keeps choosing."""

from __future__ import annotations

import asyncio
import time

import pytest
from conveyor import (
    InvalidRequest,
    NoInstanceAvailable,
    Registry,
    ServiceNotFound,
    Unauthorized,
    Unavailable,
)
from conveyor import aio as conveyor_aio

from tests.client_support import register_raw, rest
from tests.conftest import wait_for

pytest_plugins = ["tests.client_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


def picks(balancer, n: int = 8, key: str | None = None) -> set[str]:
    return {balancer.select(key).id for _ in range(n)}


def test_http_select_rotates_and_maps_every_refusal_to_a_typed_error(server, key):
    for i in (1, 2, 3):
        register_raw(server.url, key, f"pay-{i}", "pay", endpoint=f"10.0.0.{i}:80", lease_duration=3600)
    register_raw(server.url, key, "off-1", "off", weight=0)
    reg = Registry(server.url, key)
    rotation = [reg.balancer("pay").select().id for _ in range(6)]
    assert sorted(rotation[:3]) == ["pay-1", "pay-2", "pay-3"] and rotation[3:] == rotation[:3]
    hashed = reg.balancer("pay", strategy="hash")
    assert len({hashed.select("customer-42").id for _ in range(5)}) == 1
    chosen = reg.balancer("pay", strategy="weighted").select()
    assert chosen.endpoint == f"10.0.0.{chosen.id[-1]}:80" and chosen.health == "healthy"
    with pytest.raises(InvalidRequest) as no_key:
        hashed.select()
    assert "key" in no_key.value.fields
    with pytest.raises(ServiceNotFound):
        reg.balancer("nobody").select()
    with pytest.raises(NoInstanceAvailable) as none:
        reg.balancer("off").select()
    assert none.value.status == 503 and none.value.body["name"] == "off"
    with pytest.raises(Unauthorized):
        Registry(server.url, "not-a-token").balancer("pay").select()
    with pytest.raises(InvalidRequest):
        reg.balancer("pay", strategy="fastest")


def test_local_balancer_follows_adds_drains_lapses_and_removals(server, key, operator_at):
    reg = Registry(server.url, key)
    a = reg.register("a", name="pay", type="sink", endpoint="10.0.0.1:80", lease=2)
    started = time.monotonic()
    with reg.balancer("pay", local=True) as balancer:
        assert balancer.select().id == "a"
        b = reg.register("b", name="pay", type="sink", endpoint="10.0.0.2:80", lease=2)
        wait_for(lambda: picks(balancer) == {"a", "b"}, 10)

        operator = operator_at(server.url)
        assert operator.act("drain", "b").startswith("Drained 1 service")
        wait_for(lambda: picks(balancer) == {"a"}, 10)
        assert operator.act("undrain", "b").startswith("Undrained 1 service")
        wait_for(lambda: picks(balancer) == {"a", "b"}, 10)

        # c never heartbeats; nothing announces its lapse here (no leader job runs against this server)
        register_raw(server.url, key, "c", "pay", lease_duration=1)
        wait_for(lambda: "c" in picks(balancer, 12), 10)
        wait_for(lambda: rest(server.url, key).get("/services/c/").json()["health"] == "unhealthy", 10)
        assert "c" not in picks(balancer, 12)
        assert [s.health for s in balancer.instances() if s.id == "c"] == ["healthy"]  # as its last event said

        # a and b heartbeat: several of their leases later they are still chosen (deadlines are refreshed)
        time.sleep(max(0.0, started + 3 * 2 - time.monotonic()))
        assert picks(balancer, 12) == {"a", "b"}

        b.close()
        wait_for(lambda: picks(balancer) == {"a"}, 10)
        a.close()
        with rest(server.url, key) as client:
            client.delete("/services/c/").raise_for_status()

        def gone() -> bool:
            try:
                balancer.select()
            except ServiceNotFound:
                return True
            except NoInstanceAvailable:
                return False  # a and c removed, c's removal not seen yet: c is there, lapsed
            return False

        wait_for(gone, 10)
        register_raw(server.url, key, "d", "pay", weight=0)
        wait_for(lambda: "d" in {s.id for s in balancer.instances()}, 10)
        with pytest.raises(NoInstanceAvailable):
            balancer.select()


def test_local_balancer_chooses_without_a_request_while_the_registry_is_down(server, key):
    reg = Registry(server.url, key, timeout=2)
    for sid in ("a", "b"):
        reg.register(sid, name="pay", type="sink", endpoint="10.0.0.1:80", lease=30)
    over_http = reg.balancer("pay")
    with reg.balancer("pay", local=True, strategy="weighted") as local:
        assert picks(local) == {"a", "b"}
        server.stop()
        with pytest.raises(Unavailable):
            over_http.select()
        assert picks(local, 1000) == {"a", "b"}


def test_local_balancer_errors_match_the_endpoints(server, key):
    register_raw(server.url, key, "pay-1", "pay", lease_duration=3600)
    reg = Registry(server.url, key)
    with reg.balancer("nobody", local=True) as nobody, pytest.raises(ServiceNotFound):
        nobody.select()
    with reg.balancer("pay", local=True, strategy="hash") as hashed:
        with pytest.raises(InvalidRequest):
            hashed.select()
        assert hashed.select("k").id == "pay-1"
    with Registry(server.url, "not-a-token").balancer("pay", local=True) as refused, pytest.raises(Unauthorized):
        refused.select()


def test_aio_balancers_local_and_over_http(server, key):
    for i in (1, 2):
        register_raw(server.url, key, f"pay-{i}", "pay", lease_duration=3600)

    async def scenario() -> None:
        reg = conveyor_aio.Registry(server.url, key)
        assert {(await reg.balancer("pay").select()).id for _ in range(4)} == {"pay-1", "pay-2"}
        with pytest.raises(ServiceNotFound):
            await reg.balancer("nobody").select()
        async with reg.balancer("pay", local=True) as local:
            assert {(await local.select()).id for _ in range(4)} == {"pay-1", "pay-2"}
            await asyncio.to_thread(lambda: rest(server.url, key).delete("/services/pay-2/").raise_for_status())
            deadline = time.monotonic() + 10
            while {(await local.select()).id for _ in range(4)} != {"pay-1"}:
                assert time.monotonic() < deadline, "the removal did not reach the local balancer"
                await asyncio.sleep(0.05)
        async with reg.balancer("off", local=True) as off:
            with pytest.raises(ServiceNotFound):
                await off.select()

    asyncio.run(asyncio.wait_for(scenario(), 60))
