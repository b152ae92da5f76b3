"""Operator intent survives restarts: a drain or an operator's weight is kept when the service re-registers, and
only an operator reverses it (undrain restores the weight from before the drain)."""

from __future__ import annotations

import pytest

from registry import leases
from registry.models import Service
from tests.conftest import service_body

pytestmark = pytest.mark.django_db


def register(api, service_id: str, weight: int) -> dict:
    response = api.post("/api/v1/services/", service_body(service_id, weight=weight), format="json")
    assert response.status_code in (200, 201)
    return response.json()


def weights(*ids: str) -> dict[str, tuple[int, bool, int | None, int]]:
    rows = Service.objects.filter(pk__in=ids).values_list(
        "pk", "weight", "drained", "operator_weight", "registered_weight"
    )
    return {pk: (weight, drained, override, registered) for pk, weight, drained, override, registered in rows}


def selected(api, times: int = 12) -> set[str]:
    picks = set()
    for _ in range(times):
        response = api.get("/api/v1/balancer/select/?name=kafka-source")
        assert response.status_code == 200
        picks.add(response.json()["service_id"])
    return picks


def test_a_drain_is_kept_when_the_service_restarts_and_re_registers(api, operator):
    register(api, "a", 50)
    register(api, "b", 50)
    operator.post("/admin/registry/service/", {"action": "drain", "_selected_action": ["a"]})
    assert weights("a")["a"] == (0, True, None, 50)

    body = register(api, "a", 50)  # the restart
    assert body["weight"] == 0
    assert weights("a")["a"] == (0, True, None, 50)
    assert selected(api) == {"b"}

    response = operator.post("/admin/registry/service/", {"action": "undrain", "_selected_action": ["a"]}, follow=True)
    assert "Undrained 1 service(s)" in response.content.decode()
    assert weights("a")["a"] == (50, False, None, 50)
    assert selected(api) == {"a", "b"}


def test_undrain_restores_the_operator_weight_from_before_the_drain(api):
    register(api, "a", 50)
    assert leases.set_operator_weight(["a"], 20) == 1
    assert leases.drain(["a"]) == 1
    register(api, "a", 70)  # the service now asks for 70
    assert weights("a")["a"] == (0, True, 20, 70)
    assert leases.undrain(["a"]) == 1
    assert weights("a")["a"] == (20, False, 20, 70)
    assert leases.set_operator_weight(["a"], None) == 1
    assert weights("a")["a"] == (70, False, None, 70)


def test_an_operator_weight_outlives_re_registration_and_repeated_actions_change_nothing(api):
    register(api, "a", 50)
    leases.set_operator_weight(["a"], 5)
    register(api, "a", 50)
    assert weights("a")["a"] == (5, False, 5, 50)
    assert leases.set_operator_weight(["a"], 5) == 0
    assert leases.undrain(["a"]) == 0  # not drained: nothing to undo


def test_the_api_shows_the_drain_and_the_operator_weight(api):
    register(api, "a", 50)
    leases.set_operator_weight(["a"], 30)
    leases.drain(["a"])
    body = api.get("/api/v1/services/a/").json()
    assert (body["weight"], body["drained"], body["operator_weight"]) == (0, True, 30)


def test_staff_tokens_drain_and_undrain_over_the_api_and_others_may_not(api, make_token):
    from tests.conftest import client_for

    register(api, "a", 50)
    staff = client_for(make_token("ops", staff=True)[1])
    # the owner of the service is not an operator
    refused = api.post("/api/v1/services/a/drain/")
    assert refused.status_code == 403 and "staff" in refused.json()["detail"]
    assert weights("a")["a"] == (50, False, None, 50)

    drained = staff.post("/api/v1/services/a/drain/")
    assert drained.status_code == 200
    assert (drained.json()["service_id"], drained.json()["weight"], drained.json()["drained"]) == ("a", 0, True)
    assert staff.post("/api/v1/services/a/drain/").json()["drained"] is True  # again: nothing changes
    register(api, "a", 50)  # a restart keeps it drained
    assert weights("a")["a"] == (0, True, None, 50)

    undrained = staff.post("/api/v1/services/a/undrain/")
    assert (undrained.status_code, undrained.json()["weight"], undrained.json()["drained"]) == (200, 50, False)
    assert staff.post("/api/v1/services/nobody/drain/").status_code == 404
    bad = staff.post("/api/v1/services/bad%20id/undrain/")
    assert bad.status_code == 400 and "service_id" in bad.json()
