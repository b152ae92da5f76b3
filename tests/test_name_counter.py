"""A name's change counter (registry.events) is bumped again after commit, and a bump after commit that
fails because Redis could not be reached is retried until it lands, so a select cache filled between the
two bumps (balancer.selection) does not outlive Redis's return."""

from __future__ import annotations

import socket
import time

import pytest
import redis
from django.db import transaction

from balancer import selection
from registry import events
from registry.models import ApiToken
from registry.redis_client import get_redis
from tests.conftest import service_body


def unreachable_redis() -> redis.Redis:
    with socket.socket() as s:  # a port nothing listens on: every call fails to connect
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return redis.Redis(port=port, socket_connect_timeout=0.2)


def counter(name: str) -> int:
    return int(get_redis().get(events.name_version_key(name)) or 0)


def membership() -> int:
    return int(get_redis().get(events.services_membership_key()) or 0)


def test_retries_outlast_every_cached_list() -> None:
    assert events.RETRY_FOR_SECONDS >= selection.MAX_AGE_SECONDS


@pytest.mark.django_db(transaction=True)
def test_a_bump_after_commit_that_fails_is_retried_until_redis_answers(monkeypatch) -> None:
    monkeypatch.setattr(events, "RETRY_INTERVAL_SECONDS", 0.05)
    with transaction.atomic():
        events.name_changed("sink")  # the bump inside the transaction reaches Redis
        inside = counter("sink")
        monkeypatch.setattr(events, "get_redis", unreachable_redis)  # ... the one after commit does not
    time.sleep(0.3)
    assert counter("sink") == inside  # not bumped while Redis is unreachable
    monkeypatch.setattr(events, "get_redis", get_redis)
    deadline = time.monotonic() + 10
    while counter("sink") == inside and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counter("sink") == inside + 1
    time.sleep(0.3)
    assert counter("sink") == inside + 1  # bumped once, and the retry stopped
    assert not events._retry_names


@pytest.mark.django_db(transaction=True)
def test_a_membership_bump_after_commit_that_fails_is_retried_too(monkeypatch) -> None:
    monkeypatch.setattr(events, "RETRY_INTERVAL_SECONDS", 0.05)
    with transaction.atomic():
        events.names_changed(["sink"], membership=True)
        inside = membership()
        monkeypatch.setattr(events, "get_redis", unreachable_redis)
    with transaction.atomic():
        monkeypatch.setattr(events, "get_redis", get_redis)
        events.names_changed(["other"])  # a change of health, say: no membership bump of its own
        monkeypatch.setattr(events, "get_redis", unreachable_redis)
    time.sleep(0.3)
    assert membership() == inside
    monkeypatch.setattr(events, "get_redis", get_redis)
    deadline = time.monotonic() + 10
    while membership() == inside and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert membership() == inside + 1 and not events._retry_names and events._retry_membership == 0


@pytest.mark.django_db(transaction=True)
def test_a_renamed_token_is_the_owner_the_next_select_shows(owner, api) -> None:
    token = owner[0]
    response = api.post("/api/v1/services/", service_body("sink-1", service_name="sink"), format="json")
    assert response.status_code == 201, response.content
    assert api.get("/api/v1/balancer/select/?name=sink").json()["owner"] == token.name  # now cached
    row = ApiToken.objects.get(pk=token.pk)
    row.name = "renamed-owner"
    row.save()
    assert api.get("/api/v1/balancer/select/?name=sink").json()["owner"] == "renamed-owner"
