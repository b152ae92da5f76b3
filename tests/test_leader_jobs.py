"""The periodic tasks run only on the leader; GET /leader/ and the admin show who leads."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import time_machine
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from registry import leadership
from registry.models import LeaderJobRun, Service
from registry.tasks import cleanup_expired_leases
from tests.conftest import service_body

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fresh_process_leadership(settings):
    settings.REGISTRY_LEADER_TTL_MS = 1000
    leadership._process_leadership = None
    yield
    if leadership._process_leadership is not None:
        leadership._process_leadership.step_down()
        leadership._process_leadership.close()
    leadership._process_leadership = None


def test_cleanup_task_runs_only_once_this_process_leads(api, fresh_process_leadership):
    api.post("/api/v1/services/", service_body("gone", lease_duration=1, deregister_after=0), format="json")
    later = timezone.now() + timedelta(seconds=5)
    with time_machine.travel(later, tick=True):
        assert cleanup_expired_leases() is None  # the master just started: no leader for one TTL
        assert Service.objects.filter(pk="gone").exists()
    time.sleep(1.1)
    with time_machine.travel(later + timedelta(seconds=2), tick=True):
        assert cleanup_expired_leases() == 1
    assert not Service.objects.exists()
    run = LeaderJobRun.objects.get()
    assert (run.job, run.term, run.items) == ("cleanup", 1, 1)

    body = api.get("/api/v1/leader/").json()
    assert body["name"] == "periodic-jobs" and body["fencing_token"] == 1
    assert body["holder"] == leadership.process_leadership().holder
    assert body["expires_at"] is not None

    operator = Client()
    operator.force_login(User.objects.create_superuser("op", "op@example.com", "pw-for-tests-only"))
    page = operator.get("/admin/registry/leaderterm/periodic-jobs/change/").content.decode()
    assert "s left" in page and "<td>cleanup</td><td>1</td>" in page


def test_leader_endpoint_before_any_election(api):
    assert api.get("/api/v1/leader/").status_code == 404


def test_job_runs_older_than_a_day_are_pruned(db):
    from django.db import transaction

    from registry.leadership import prune_job_runs

    now = timezone.now()
    for age in (timedelta(days=2), timedelta(hours=23)):
        LeaderJobRun.objects.create(name="periodic-jobs", term=1, holder="h", job="cleanup", at=now - age)
    assert prune_job_runs(now, transaction.atomic) == 1
    assert list(LeaderJobRun.objects.values_list("at", flat=True)) == [now - timedelta(hours=23)]
