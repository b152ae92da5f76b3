"""The select fast path: an ASGI route in front of Django for GET /api/v1/balancer/select/.

A select here is one Redis script call on the event loop: no Django request cycle, and no database unless the
name's instance list changed (``balancer.selection``). What a query string reads as (Django's business, a
400, or the validated parameters) is remembered by its exact bytes, so a repeated query is not parsed again.
It runs the same ``select_flow`` as the DRF view and validates with the same ``SelectQuerySerializer``, so
answers are the same. Whatever it is not sure to answer as the view would (a browser's Accept header,
``?format=``, a configured request rate, a query Django would refuse to parse) goes on to Django.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django import db
from django.conf import settings
from django.core.exceptions import SuspiciousOperation
from django.http import QueryDict
from django.utils import timezone

from registry import outage
from registry.fastpath import authenticate, host_allowed, json_request_headers, with_fresh_connection
from registry.redis_client import get_async_redis
from registry_project import limits

from . import selection
from .selection import SELECT, Blocking, Deadline, Outcome, Script, Store

log = logging.getLogger(__name__)

SELECT_PATH = "/api/v1/balancer/select/"
MAX_KEY = 1024  # SelectQuerySerializer's key: max_length
_MAX_VALIDATED = 4096
_validated: dict[tuple[Any, ...], tuple[str, str, dict[str, str] | None] | dict[str, Any]] = {}
# What a query string reads as: DJANGO (Django parses it its own way, or ?format=), INVALID (the view answers
# its 400, after authenticating) or the validated (name, strategy, selector, key). Remembered by the exact
# bytes of the query (a select repeats its query string, but for a hash key that changes), short ones only.
DJANGO = "django"
INVALID = "invalid"
Query = tuple[str, str, dict[str, str] | None, str | None]
_MAX_QUERY = 1200
_MAX_QUERIES = 4096
_queries: dict[bytes, Query | str] = {}


def _key_is_plain(key: str) -> bool:
    """The key passes CharField(max_length=1024, trim_whitespace=False) without a second look."""
    return len(key) <= MAX_KEY and "\x00" not in key and not any("\ud800" <= ch <= "\udfff" for ch in key)


def validate(params: QueryDict) -> tuple[str, str, dict[str, str] | None, str | None] | dict[str, Any]:
    """(name, strategy, selector, key) as SelectQuerySerializer validates them, or its 400 body. The verdict on
    name, strategy and selector is remembered; a key (new on most hash selects) is checked on its own."""
    from .views import SelectQuerySerializer

    key = params.get("key") or None  # DRF reads an empty optional field as absent
    plain = key is None or _key_is_plain(key)
    memo = (tuple(params.getlist("name")), tuple(params.getlist("strategy")), tuple(params.getlist("selector")))
    found = _validated.get((*memo, key is None)) if plain else None
    if found is None:
        data = params.copy()
        if key is not None and plain:
            data.setlist("key", ["k"])  # any plain key validates alike
        query = SelectQuerySerializer(data=data if plain else params)
        if query.is_valid():
            v = query.validated_data
            found = (v["name"], v["strategy"], v.get("selector"))
        else:
            found = {field: [str(e) for e in errors] for field, errors in query.errors.items()}
        if plain:
            if len(_validated) >= _MAX_VALIDATED:
                _validated.clear()
            _validated[(*memo, key is None)] = found
    if isinstance(found, dict):
        return found
    return (*found, key)


def read_query(query_string: bytes) -> Query | str:
    """DJANGO, INVALID or (name, strategy, selector, key): the same verdict every time for the same bytes."""
    found = _queries.get(query_string)
    if found is None:
        try:
            params = QueryDict(query_string.decode())
        except (UnicodeDecodeError, SuspiciousOperation):  # Django has its own answers to these
            return DJANGO
        if "format" in params:
            found = DJANGO  # DRF's renderer override (?format=api): the view's business
        else:
            checked = validate(params)
            found = INVALID if isinstance(checked, dict) else checked
        if len(query_string) <= _MAX_QUERY:
            if len(_queries) >= _MAX_QUERIES:
                _queries.clear()
            _queries[query_string] = found
    return found


async def run_flow_async(flow: Any, r: Any) -> Outcome:
    """Drive a select flow on the event loop; database steps run in Django's sync thread."""
    try:
        step = next(flow)
        while True:
            if isinstance(step, Script):
                reply = await SELECT.run_async(r, step.keys, *step.args)
            elif isinstance(step, Deadline):
                reply = await r.zscore(selection.lease_store.keys().deadline, step.service_id)
            elif isinstance(step, Store):
                reply = await selection.store_pipeline(r.pipeline(transaction=True), step).execute()
            else:
                assert isinstance(step, Blocking)
                reply = await sync_to_async(with_fresh_connection, thread_sensitive=True)(step.fn, *step.args)
            step = flow.send(reply)
    except StopIteration as stop:
        return stop.value


class SelectFastPath:
    """ASGI middleware: serves selects itself and passes every other request to ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"] == SELECT_PATH
            and settings.REGISTRY_THROTTLE_RATE is None
        ):
            answered = await self.select(scope, send)
            if answered:
                return
        await self.app(scope, receive, send)

    async def select(self, scope: dict[str, Any], send: Any) -> bool:
        """Answer the select; False to leave it to Django."""
        headers = json_request_headers(scope)
        if headers is None:
            return False
        host, authorization = headers
        query = read_query(scope["query_string"])
        if query == DJANGO:
            return False
        if not host_allowed(host):
            await _respond(send, 400, {"detail": f"Invalid HTTP_HOST header: {host.decode('latin-1')!r}."})
            return True
        token_hash, refused = authenticate(authorization)
        if refused is not None:
            await _respond(send, 401, refused)
            return True
        if isinstance(query, str):
            return False  # INVALID: the view answers a 400 after authenticating, as it does every request
        name, strategy, selector, key = query
        flow = selection.select_flow(name, strategy, timezone.now(), selector, key, token_hash)
        try:
            outcome = await run_flow_async(flow, get_async_redis())
        except redis.RedisError as exc:
            log.error("select of %s failed: Redis unavailable: %s", name, exc)
            await sync_to_async(outage.note_unreachable, thread_sensitive=True)()
            await _respond(send, 503, {"detail": "Lease store unavailable; retry shortly."}, retry=True)
            return True
        except (db.OperationalError, db.InterfaceError) as exc:
            log.error("select of %s failed: database unavailable: %s", name, exc)
            await _respond(send, 503, {"detail": "Database unavailable; retry shortly."}, retry=True)
            return True
        await _respond(send, outcome.status, outcome.body)
        return True


async def _respond(send: Any, status: int, body: dict[str, Any], retry: bool = False) -> None:
    """The same answers as the DRF view: a 401 names the scheme, an outage's 503 says when to retry."""
    headers = [(b"www-authenticate", b'Bearer realm="api"')] if status == 401 else []
    if retry:
        headers.append((b"retry-after", b"1"))
    await limits.send_json(send, status, body, headers)
