"""The heartbeat fast path: an ASGI route in front of Django for POST /api/v1/services/{id}/heartbeat/.

Heartbeats are most of the traffic. Here one is a body parse and one Redis script call on
the event loop: no Django request cycle, no database. It runs the same ``heartbeat_flow``
and ``parse_heartbeat_body`` as the DRF view, so validation, auth and answers are the same;
only state changes (a new reported health, a missing lease entry, an uncached token) reach
the database, through a worker thread.

It also holds what every fast path (select, registrations, list pages) shares: the Host check, the
Bearer token's hash, the Accept check and the fresh database connection for work in the sync thread.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection
from django.http.request import split_domain_port, validate_host
from django.utils import timezone

from registry_project import limits

from . import lease_store, outage
from .auth import token_from_header
from .leases import Call, Eval, HeartbeatResult, heartbeat_flow
from .loop_batch import LoopBatcher
from .models import hash_token
from .path_ids import path_identifier_error
from .redis_client import get_async_redis
from .serializers import parse_heartbeat_body

log = logging.getLogger(__name__)

# fullmatch: with `$`, ".../heartbeat/\n" (a percent-encoded newline) would renew the lease of svc.
HEARTBEAT_PATH = re.compile(r"/api/v1/services/([^/]+)/heartbeat/")
MAX_BODY = 64 * 1024  # a heartbeat body is {"health": ...}: far below REGISTRY_MAX_BODY_BYTES


JSON_MEDIA = {"*/*", "application/*", "application/json"}


def authenticate(authorization: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """(the hash of the Bearer token, None), or (None, a 401 body) as DRF's BearerTokenAuthentication says it.
    Whether the token is active is for the caller to check, against the token cache."""
    if not authorization:
        return None, {"detail": "Authentication credentials were not provided."}
    key = token_from_header(authorization.decode("latin-1"))
    if key is None:
        return None, {"detail": "Malformed Authorization header; expected 'Bearer <token>'."}
    return hash_token(key), None


def json_accepted(accept: bytes) -> bool:
    """Every media range in the Accept header is one the view would answer with JSON."""
    for part in accept.decode("latin-1").split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media and media not in JSON_MEDIA:
            return False
    return True


def json_request_headers(scope: dict[str, Any]) -> tuple[bytes, bytes] | None:
    """(Host, Authorization) of a request a fast path may answer with JSON; None when its Accept header
    asks for something else (a browser's: the view's business)."""
    host = authorization = b""
    for name, value in scope["headers"]:
        if name == b"host":
            host = value
        elif name == b"authorization":
            authorization = value
        elif name == b"accept" and not json_accepted(value):
            return None
    return host, authorization


def with_fresh_connection(fn: Any, *args: Any) -> Any:
    # Outside Django's request cycle nobody closes stale connections for us. (Inside an
    # atomic block, as under a test's transaction, the connection is in use: leave it.)
    if not connection.in_atomic_block:
        close_old_connections()
    return fn(*args)


class HeartbeatBatcher(LoopBatcher[lease_store.Beat, list[str]]):
    """Sends the heartbeats that reach the lease store in the same event-loop turn as one HEARTBEAT_LUA
    call (``registry.loop_batch``). Each waiter gets its own entry of the reply; a heartbeat that failed
    in Redis fails alone (503 for it); a Redis error of the call reaches every waiter of it."""

    what = "heartbeats"

    async def call(self, items: list[lease_store.Beat]) -> list[list[str] | Exception]:
        return await lease_store.heartbeat_many_async(get_async_redis(), items)  # a ResponseError fails one


def batcher() -> HeartbeatBatcher:
    """The running event loop's heartbeat batcher."""
    return HeartbeatBatcher.of_loop()  # type: ignore[return-value]


async def run_flow_async(flow: Any) -> HeartbeatResult:
    """Drive a heartbeat flow on the event loop: lease-store steps through the loop's batcher, database
    steps in Django's sync thread."""
    try:
        step = next(flow)
        while True:
            if isinstance(step, Eval):
                reply = await batcher().run(step.beat)
            else:
                assert isinstance(step, Call)
                reply = await sync_to_async(with_fresh_connection, thread_sensitive=True)(step.fn, *step.args)
            step = flow.send(reply)
    except StopIteration as stop:
        return stop.value


class HeartbeatFastPath:
    """ASGI middleware: serves heartbeats itself and passes every other request to ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = HEARTBEAT_PATH.fullmatch(scope["path"])
            if match:
                await self.heartbeat(match.group(1), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def heartbeat(self, service_id: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        host = authorization = length = b""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
            elif name == b"authorization":
                authorization = value
            elif name == b"content-length":
                length = value
        if not host_allowed(host):
            await _respond(send, 400, {"detail": f"Invalid HTTP_HOST header: {host.decode('latin-1')!r}."})
            return
        if length and not (length.isdigit() and len(length) < 10 and int(length) <= MAX_BODY):
            # Refused before a byte of it is read (a malformed length too, which the server would refuse).
            await limits.refuse_too_large(send, MAX_BODY, "the heartbeat body limit")
            return
        id_error = path_identifier_error("service_id", service_id)
        if id_error is not None:
            await _respond(send, 400, id_error)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                await limits.refuse_too_large(send, MAX_BODY, "the heartbeat body limit")
                return
        health, error = parse_heartbeat_body(body)
        if error is not None:
            await _respond(send, 400, error)
            return
        token = token_from_header(authorization.decode("latin-1"))
        try:
            result = await run_flow_async(heartbeat_flow(service_id, token, health, timezone.now()))
        except redis.RedisError as exc:
            log.error("heartbeat for %s failed: Redis unavailable: %s", service_id, exc)
            await sync_to_async(outage.note_unreachable, thread_sensitive=True)()
            await _respond(send, 503, {"detail": "Lease store unavailable; retry shortly."})
            return
        await _respond(send, result.status, result.body)


@functools.lru_cache(maxsize=256)
def host_allowed(host: bytes) -> bool:
    """Django's ALLOWED_HOSTS check, remembered per Host header value."""
    domain, _port = split_domain_port(host.decode("latin-1"))
    return bool(domain) and validate_host(domain, settings.ALLOWED_HOSTS)


async def _respond(send: Any, status: int, body: dict[str, Any]) -> None:
    """The same answers as the DRF view: a 401 names the scheme, a 503 says when to retry."""
    headers = {401: [(b"www-authenticate", b'Bearer realm="api"')], 503: [(b"retry-after", b"1")]}.get(status, [])
    await limits.send_json(send, status, body, headers)
