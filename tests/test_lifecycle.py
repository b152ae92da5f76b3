"""The service lifecycle log and the admin's audit trail: a row per change of a service (kind, actor,
change), history kept after the service is gone and pruned by age, history rows read-only in the admin,
and a LogEntry for every admin action.

Leader jobs run under a real leadership term (a Redlock on the test's redis-server), so their rows name
the term that wrote them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from django.contrib.admin.models import ADDITION, CHANGE, DELETION, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from django.utils import timezone

from groups.models import GroupMember, RebalanceEvent, ServiceGroup
from registry import leases, lifecycle
from registry.history_admin import history_url
from registry.leadership import Leadership, guard_for
from registry.models import ApiToken, LeaderJobRun, LeaderTerm, Service, ServiceEvent
from registry.tasks import cleanup_once, prune_history_once
from registry_project.embedded_redis import RedisServer
from tests.conftest import client_for, service_body, wait_for

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 7, 1, 9, 0, 0, tzinfo=UTC)


def rows(service_id: str, kind: str | None = None) -> list[ServiceEvent]:
    qs = ServiceEvent.objects.filter(service_id=service_id).order_by("at", "id")
    return list(qs.filter(kind=kind) if kind else qs)


def only(service_id: str, kind: str) -> ServiceEvent:
    found = rows(service_id, kind)
    assert len(found) == 1, [(r.kind, r.actor) for r in rows(service_id)]
    return found[0]


@pytest.fixture
def leader(redis_server: RedisServer) -> Iterator[Leadership]:
    """This test's leader of the periodic jobs: a real term (the fencing token) on the test's Redis."""
    # A short TTL: a master refuses locks for one TTL after it starts (registry.leadership).
    leadership = Leadership("jobs", urls=[redis_server.url], ttl_ms=2000, holder="w1", node_timeout_ms=200)
    yield leadership
    leadership.step_down()
    leadership.close()


@pytest.fixture
def cleanup(leader: Leadership) -> Callable[[], list[str]]:
    """One run of the cleanup job (expiry and the lapse scan) fenced by the leader's term (renewed as needed)."""
    return lambda: cleanup_once(guard_for(wait_for(leader.ensure, 5), "cleanup"))


def register(api: Any, service_id: str = "svc-1", **overrides: Any) -> dict[str, Any]:
    response = api.post("/api/v1/services/", service_body(service_id, **overrides), format="json")
    assert response.status_code in (200, 201), response.content
    return response.json()


# --- one row per kind of change -----------------------------------------------------------


def test_a_registration_is_logged_with_its_token_its_fields_and_revision(api):
    with time_machine.travel(T0, tick=False):
        register(api, lease_duration=30)
    row = only("svc-1", "registered")
    assert (row.actor_kind, row.actor, row.service_name, row.at) == ("token", "owner", "kafka-source", T0)
    assert row.change["endpoint"] == [None, "10.0.0.1:50051"]
    assert row.change["labels"] == [None, {"env": "prod", "zone": "a"}]
    assert row.change["lease_expires_at"] == [None, "2026-07-01T09:00:30Z"]
    assert row.revision == Service.objects.get(pk="svc-1").revision * 2


def test_a_re_registration_logs_only_what_changed(api):
    register(api)
    register(api, endpoint="10.0.0.2:50051", labels={"env": "prod", "zone": "a"})
    row = only("svc-1", "re-registered")
    assert (row.actor_kind, row.actor) == ("token", "owner")
    assert set(row.change) == {"endpoint", "lease_expires_at"}
    assert row.change["endpoint"] == ["10.0.0.1:50051", "10.0.0.2:50051"]
    assert row.revision > only("svc-1", "registered").revision


def test_a_refused_re_registration_writes_no_history(api, make_token):
    register(api)
    _other, key = make_token("intruder")
    assert client_for(key).post("/api/v1/services/", service_body(), format="json").status_code == 403
    assert [r.kind for r in rows("svc-1")] == ["registered"]


def test_a_health_change_by_heartbeat_is_logged_and_a_plain_heartbeat_writes_nothing(api, owner, heartbeat):
    register(api)
    assert heartbeat("svc-1", owner[1], {"health": "healthy"})[0] == 200
    assert [r.kind for r in rows("svc-1")] == ["registered"]  # no change: the fast path wrote nothing
    assert heartbeat("svc-1", owner[1], {"health": "degraded"})[0] == 200
    row = only("svc-1", "health_changed")
    assert (row.actor_kind, row.actor, row.change) == ("token", "owner", {"health": ["healthy", "degraded"]})
    assert row.revision == Service.objects.get(pk="svc-1").revision * 2


def test_a_health_change_names_the_token_that_reported_it(api, owner, make_token, heartbeat):
    register(api)
    _staff, key = make_token("ops-bot", staff=True)
    assert heartbeat("svc-1", key, {"health": "unhealthy"})[0] == 200
    assert only("svc-1", "health_changed").actor == "ops-bot"


def test_drain_and_undrain_in_the_admin_are_logged_as_the_operator(api, operator):
    register(api, weight=40)
    for action in ("drain", "undrain"):
        response = operator.post("/admin/registry/service/", {"action": action, "_selected_action": ["svc-1"]})
        assert response.status_code == 302
    drained, undrained = only("svc-1", "drained"), only("svc-1", "undrained")
    assert (drained.actor_kind, drained.actor) == ("operator", "operator")
    assert drained.change == {"drained": [False, True], "weight": [40, 0]}
    assert (undrained.actor_kind, undrained.actor) == ("operator", "operator")
    assert undrained.change == {"drained": [True, False], "weight": [0, 40]}
    assert undrained.revision > drained.revision


def test_a_drain_through_the_api_names_the_staff_token(api, make_token):
    register(api)
    _staff, key = make_token("oncall-bot", staff=True)
    assert client_for(key).post("/api/v1/services/svc-1/drain/").status_code == 200
    row = only("svc-1", "drained")
    assert (row.actor_kind, row.actor) == ("token", "oncall-bot")


def test_an_operator_weight_set_on_the_service_page_is_logged(api, operator):
    register(api)
    response = operator.post("/admin/registry/service/svc-1/change/", {"operator_weight": "7", "_save": "Save"})
    assert response.status_code == 302
    row = only("svc-1", "weight_changed")
    assert (row.actor_kind, row.actor) == ("operator", "operator")
    assert row.change == {"operator_weight": [None, 7], "weight": [100, 7]}
    entry = LogEntry.objects.get(object_id="svc-1")
    assert (entry.action_flag, entry.user.username) == (CHANGE, "operator")


def test_a_lapse_and_the_recovery_are_logged_by_the_lapse_scan(api, owner, cleanup, heartbeat):
    with time_machine.travel(T0, tick=False):
        register(api, lease_duration=10, deregister_after=600)
    with time_machine.travel(T0 + timedelta(seconds=12), tick=False):
        cleanup()
    lapsed = only("svc-1", "lapsed")
    assert (lapsed.actor_kind, lapsed.actor) == ("leader", "leader job cleanup term 1")
    assert lapsed.at == T0 + timedelta(seconds=10)  # the lease deadline, not when the scan saw it
    assert lapsed.change["effective_health"] == ["healthy", "unhealthy"]
    assert lapsed.revision % 2 == 1  # a lapsed state's revision is odd (registry.revisions)
    with time_machine.travel(T0 + timedelta(seconds=13), tick=False):
        assert heartbeat("svc-1", owner[1])[0] == 200
        assert not rows("svc-1", "recovered")  # the heartbeat itself wrote nothing
    with time_machine.travel(T0 + timedelta(seconds=14), tick=False):
        cleanup()
        cleanup()  # a second scan finds nothing new
    recovered = only("svc-1", "recovered")
    assert (recovered.actor_kind, recovered.actor) == ("token", "owner")
    assert recovered.change == {"effective_health": ["unhealthy", "healthy"]}
    assert recovered.revision == lapsed.revision + 1
    assert len(rows("svc-1", "lapsed")) == 1


def test_a_lapse_scan_rejected_by_the_fence_logs_nothing_and_the_next_leader_logs_it(api, owner, leader, cleanup):
    with time_machine.travel(T0, tick=False):
        register(api, lease_duration=10, deregister_after=600)
    stale = wait_for(leader.ensure, 5)
    LeaderTerm.objects.filter(name="jobs").update(term=stale.number + 1)  # a rival won a newer term
    with time_machine.travel(T0 + timedelta(seconds=12), tick=False):
        with pytest.raises(Exception, match="stale"):
            cleanup_once(guard_for(stale, "cleanup"))
        assert not rows("svc-1", "lapsed")
        leader.step_down()  # this holder takes the lock again: a term above the rival's
        cleanup()
    lapsed = only("svc-1", "lapsed")
    assert lapsed.actor == f"leader job cleanup term {stale.number + 2}"
    # and a recovery the rejected scan had taken off the queue is logged by the next one
    with time_machine.travel(T0 + timedelta(seconds=13), tick=False):
        assert leases.heartbeat("svc-1", owner[1], "healthy", timezone.now()).status == 200
        stale = wait_for(leader.ensure, 5)
        LeaderTerm.objects.filter(name="jobs").update(term=stale.number + 1)
        with pytest.raises(Exception, match="stale"):
            cleanup_once(guard_for(stale, "cleanup"))
        assert not rows("svc-1", "recovered")
        leader.step_down()
        cleanup()
    assert only("svc-1", "recovered").actor == "owner"


def test_an_expiry_is_logged_by_the_leader_job_with_the_last_state(api, cleanup):
    with time_machine.travel(T0, tick=False):
        register(api, lease_duration=5, deregister_after=0)
    with time_machine.travel(T0 + timedelta(seconds=6), tick=False):
        assert cleanup() == ["svc-1"]
    row = only("svc-1", "expired")
    assert (row.actor_kind, row.actor) == ("leader", "leader job cleanup term 1")
    assert row.change["endpoint"] == ["10.0.0.1:50051", None]
    assert row.change["lapsed_at"] == ["2026-07-01T09:00:05Z", None]
    assert row.at == T0 + timedelta(seconds=6)
    assert not Service.objects.filter(pk="svc-1").exists()


def test_an_expiry_rejected_by_the_fence_writes_no_history(api, leader):
    with time_machine.travel(T0, tick=False):
        register(api, lease_duration=5, deregister_after=0)
    stale = wait_for(leader.ensure, 5)
    LeaderTerm.objects.filter(name="jobs").update(term=stale.number + 1)  # a rival won a newer term
    with time_machine.travel(T0 + timedelta(seconds=6), tick=False), pytest.raises(Exception, match="stale"):
        cleanup_once(guard_for(stale, "cleanup"))
    assert not rows("svc-1", "expired")
    assert Service.objects.filter(pk="svc-1").exists()


def test_a_deregistration_through_the_api_names_the_token(api):
    register(api)
    assert api.delete("/api/v1/services/svc-1/").status_code == 204
    row = only("svc-1", "deregistered")
    assert (row.actor_kind, row.actor) == ("token", "owner")
    assert row.change["service_type"] == ["source", None]


def test_a_deregistration_in_the_admin_names_the_operator_and_is_a_log_entry(api, operator):
    register(api)
    response = operator.post(
        "/admin/registry/service/", {"action": "deregister", "_selected_action": ["svc-1"], "post": "yes"}
    )
    assert response.status_code == 302
    row = only("svc-1", "deregistered")
    assert (row.actor_kind, row.actor) == ("operator", "operator")
    entry = LogEntry.objects.get(object_id="svc-1")
    assert entry.action_flag == DELETION
    assert entry.content_type == ContentType.objects.get_for_model(Service)
    assert "deregister" in entry.change_message and entry.user.username == "operator"


def test_every_lifecycle_kind_is_covered_here():
    names = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    words = {
        "registered": "registration",
        "re-registered": "re_registration",
        "health_changed": "health_change",
        "drained": "drain",
        "undrained": "undrain",
        "weight_changed": "weight",
        "lapsed": "lapse",
        "recovered": "recovery",
        "expired": "expiry",
        "deregistered": "deregistration",
    }
    assert set(words) == set(lifecycle.Kind.values)
    for kind, word in words.items():
        assert any(word in name for name in names), kind


# --- history after the service is gone ------------------------------------------------------


def test_an_expired_service_s_history_is_reachable_in_the_admin_after_the_row_is_gone(api, operator, cleanup):
    with time_machine.travel(T0, tick=False):
        register(api, lease_duration=5, deregister_after=0)
        register(api, "other-1")
    with time_machine.travel(T0 + timedelta(seconds=6), tick=False):
        assert "svc-1" in cleanup()
    assert not Service.objects.filter(pk="svc-1").exists()
    gone = operator.get("/admin/registry/service/svc-1/change/")  # an old link or bookmark
    assert (gone.status_code, gone["Location"]) == (302, history_url("svc-1"))
    never = operator.get("/admin/registry/service/never-was/change/")
    assert never.status_code == 302 and never["Location"] == "/admin/"  # Django's own "doesn't exist"
    page = operator.get(history_url("svc-1"))
    assert page.status_code == 200
    listed = list(page.context["cl"].result_list)
    assert {r.service_id for r in listed} == {"svc-1"}
    assert [r.kind for r in listed] == ["expired", "registered"]  # newest first
    html = page.content.decode()
    assert "leader job cleanup term 1" in html
    assert "Service &#x27;svc-1&#x27; is no longer registered. Its history:" in html
    detail = operator.get(f"/admin/registry/serviceevent/{listed[0].pk}/change/")
    assert detail.status_code == 200
    assert "10.0.0.1:50051" in detail.content.decode()


def test_the_lifecycle_list_filters_by_kind_actor_kind_and_date_and_searches_ids(api, operator):
    register(api, "svc-1")
    register(api, "svc-2")
    operator.post("/admin/registry/service/", {"action": "drain", "_selected_action": ["svc-2"]})

    def listed(query: str) -> list[tuple[str, str]]:
        response = operator.get(f"/admin/registry/serviceevent/?{query}")
        assert response.status_code == 200
        return sorted((r.service_id, r.kind) for r in response.context["cl"].result_list)

    assert listed("kind__exact=drained") == [("svc-2", "drained")]
    assert listed("actor_kind__exact=operator") == [("svc-2", "drained")]
    assert listed("q=svc-1") == [("svc-1", "registered")]
    assert listed("q=svc") == []  # exact: an id or a name
    assert len(listed("q=kafka-source")) == 3
    today = timezone.now()
    assert len(listed(f"at__year={today.year}&at__month={today.month}&at__day={today.day}")) == 3
    assert listed("at__year=2001") == []


# --- read-only history in the admin ---------------------------------------------------------


@pytest.fixture
def group(api) -> ServiceGroup:
    api.put("/api/v1/topics/orders/", {"partitions": 4}, format="json")
    for member in ("m1", "m2"):
        body = {"member_id": member, "service_name": "c", "topics": ["orders"]}
        api.post("/api/v1/groups/g1/members/", body, format="json")
    return ServiceGroup.objects.get(pk="g1")


def test_history_rows_cannot_be_added_edited_or_deleted_in_the_admin(api, operator, group):
    register(api)
    operator.post("/admin/registry/service/", {"action": "drain", "_selected_action": ["svc-1"]})
    pages = {
        "serviceevent": ("registry", ServiceEvent.objects.first().pk),
        "rebalanceevent": ("groups", RebalanceEvent.objects.first().pk),
        "logentry": ("admin", LogEntry.objects.first().pk),
        "leaderjobrun": ("registry", LeaderJobRun.objects.create(name="j", term=1, holder="h", job="c", at=T0).pk),
    }
    counts = (ServiceEvent.objects.count(), RebalanceEvent.objects.count(), LogEntry.objects.count())
    for model, (app, pk) in pages.items():
        base = f"/admin/{app}/{model}/"
        page = operator.get(f"{base}{pk}/change/")
        assert page.status_code == 200, model
        html = page.content.decode()
        assert 'name="_save"' not in html and 'name="_continue"' not in html, model
        assert "deletelink" not in html, model
        assert operator.post(f"{base}{pk}/change/", {"kind": "drained", "actor": "x"}).status_code == 403, model
        assert operator.post(f"{base}{pk}/delete/", {"post": "yes"}).status_code == 403, model
        assert operator.get(f"{base}add/").status_code == 403, model
        changelist = operator.get(base)
        assert changelist.status_code == 200, model
        assert "delete_selected" not in changelist.content.decode(), model
    assert (ServiceEvent.objects.count(), RebalanceEvent.objects.count(), LogEntry.objects.count()) == counts
    assert LeaderJobRun.objects.count() == 1


# --- pruning by age -------------------------------------------------------------------------


def make_rows(ages: list[timedelta], now: datetime) -> None:
    ServiceEvent.objects.bulk_create(
        ServiceEvent(service_id=f"s-{i}", service_name="n", kind="registered", at=now - age, actor_kind="token")
        for i, age in enumerate(ages)
    )


def test_the_prune_job_removes_only_rows_older_than_the_setting_in_batches(leader, settings):
    settings.REGISTRY_HISTORY_DAYS = 14
    settings.REGISTRY_HISTORY_PRUNE_BATCH = 2
    now = timezone.now()
    make_rows([timedelta(days=30)] * 5 + [timedelta(days=13, hours=23), timedelta(hours=1)], now)
    assert prune_history_once(guard_for(wait_for(leader.ensure, 5), "prune_history")) == 5
    assert sorted(ServiceEvent.objects.values_list("service_id", flat=True)) == ["s-5", "s-6"]
    runs = list(LeaderJobRun.objects.filter(job="prune_history").order_by("id").values_list("items", flat=True))
    assert runs == [2, 2, 1, 0]  # one fenced transaction per batch
    assert prune_history_once(guard_for(wait_for(leader.ensure, 5), "prune_history")) == 0


def test_the_prune_job_follows_the_setting(settings):
    settings.REGISTRY_HISTORY_DAYS = 1
    now = timezone.now()
    make_rows([timedelta(days=2), timedelta(hours=20)], now)
    assert prune_history_once(transaction.atomic) == 1
    assert list(ServiceEvent.objects.values_list("service_id", flat=True)) == ["s-1"]


def test_the_prune_job_is_scheduled_with_an_expiry(beat_schedule):
    from django_celery_beat.models import PeriodicTask

    from registry_project.celery import app

    task = PeriodicTask.objects.get(task="registry.prune_history")
    assert task.enabled and task.expire_seconds and task.interval.every == 3600
    assert "registry.prune_history" in app.tasks


# --- the audit trail: a LogEntry for every admin action -------------------------------------


def entries(model: type, object_id: str) -> list[LogEntry]:
    ct = ContentType.objects.get_for_model(model)
    return list(LogEntry.objects.filter(content_type=ct, object_id=object_id).order_by("id"))


@pytest.mark.parametrize("action", ["drain", "undrain", "clear_operator_weight", "deregister"])
def test_each_service_action_is_a_log_entry_naming_it(api, operator, action):
    register(api, "svc-1")
    register(api, "svc-2")
    body = {"action": action, "_selected_action": ["svc-1", "svc-2"], "post": "yes"}  # past any confirmation
    response = operator.post("/admin/registry/service/", body)
    assert response.status_code == 302
    for sid in ("svc-1", "svc-2"):
        (entry,) = entries(Service, sid)
        assert entry.user.username == "operator"
        assert entry.change_message.startswith(f"Admin action: {action} (")
        assert entry.action_flag == (DELETION if action == "deregister" else CHANGE)


def test_force_rebalance_is_a_log_entry_and_names_the_operator_in_the_rebalance_history(operator, group):
    operator.post("/admin/groups/servicegroup/", {"action": "force_rebalance", "_selected_action": ["g1"]})
    (entry,) = entries(ServiceGroup, "g1")
    assert "force_rebalance" in entry.change_message and entry.action_flag == CHANGE
    event = ServiceGroup.objects.get(pk="g1").history.first()
    assert (event.reason, event.detail) == ("manual", "forced by operator operator")


def test_a_member_removed_by_an_operator_is_recorded_as_such_not_as_its_own_leave(api, operator, group):
    member = GroupMember.objects.get(member_id="m2")
    operator.post(
        "/admin/groups/groupmember/", {"action": "remove_member", "_selected_action": [member.pk], "post": "yes"}
    )
    event = ServiceGroup.objects.get(pk="g1").history.first()
    assert (event.reason, event.detail) == ("removed", "removed by operator operator")
    (entry,) = entries(GroupMember, str(member.pk))
    assert entry.action_flag == DELETION and "remove_member" in entry.change_message
    page = operator.get("/admin/groups/servicegroup/g1/change/").content.decode()
    assert "removed by operator operator" in page
    # the member's own leave stays a leave
    epoch = GroupMember.objects.get(member_id="m1").member_epoch
    assert api.delete(f"/api/v1/groups/g1/members/m1/?member_epoch={epoch}").status_code == 204
    own = ServiceGroup.objects.get(pk="g1").history.first()
    assert (own.reason, own.detail) == ("leave", "")


def test_token_actions_are_log_entries(operator):
    response = operator.post("/admin/registry/apitoken/add/", {"name": "ci", "is_active": "on"})
    assert response.status_code == 302
    token = ApiToken.objects.get(name="ci")
    operator.post(f"/admin/registry/apitoken/{token.pk}/change/", {"name": "ci", "is_staff": "on", "is_active": "on"})
    operator.post("/admin/registry/apitoken/", {"action": "delete_tokens", "_selected_action": [token.pk]})
    operator.post(
        "/admin/registry/apitoken/", {"action": "delete_tokens", "_selected_action": [token.pk], "post": "yes"}
    )
    assert not ApiToken.objects.filter(pk=token.pk).exists()
    flags = [e.action_flag for e in entries(ApiToken, str(token.pk))]
    assert flags == [ADDITION, CHANGE, DELETION]  # the confirmation page logged nothing


def test_the_audit_trail_is_listed_in_the_admin(api, operator):
    register(api)
    operator.post("/admin/registry/service/", {"action": "drain", "_selected_action": ["svc-1"]})
    page = operator.get("/admin/admin/logentry/")
    assert page.status_code == 200
    assert "Admin action: drain" in page.content.decode()


def test_domain_calls_outside_a_request_need_an_actor_or_say_unknown(api):
    register(api)
    leases.drain(["svc-1"])
    assert only("svc-1", "drained").actor == "unknown operator"
    with lifecycle.acting_as(lifecycle.Actor.operator("alice")):
        leases.undrain(["svc-1"])
    assert only("svc-1", "undrained").actor == "alice"
