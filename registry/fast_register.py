"""The unchanged re-registration fast path: an ASGI route in front of Django for POST /api/v1/services/.

A fleet that restarts re-registers mostly what it registered before. Here such a request is a body parse,
a digest and one Redis script call on the event loop (registry.reregister), as a heartbeat is: no Django
request cycle, no database. It answers only when it is sure the registration would change nothing and
would be answered 200 with the remembered body; every other request (a new or changed registration, one
it cannot authenticate from the Redis token cache, another content type or Accept, a query string, a
throttled deployment, Redis trouble) goes on to Django untouched, its body replayed, where the view
runs the same check again before registering.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from registry_project import limits

from . import lease_store, reregister
from .auth import token_from_header
from .fastpath import _host_allowed, _with_fresh_connection
from .leases import cache_token
from .models import Health, hash_token
from .path_ids import path_identifier_error
from .redis_client import get_async_redis

log = logging.getLogger(__name__)

REGISTER_PATH = "/api/v1/services/"
MAX_BODY = 64 * 1024  # a registration with 64 labels of the longest keys and values is about 21 KiB
JSON_TYPES = (b"application/json", b"application/json; charset=utf-8")
ACCEPT_JSON = (b"", b"*/*", b"application/json")


class UnchangedRegistrationFastPath:
    """ASGI middleware: answers unchanged re-registrations itself and passes everything else to ``app``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == REGISTER_PATH
            and not scope.get("query_string")
            and settings.REGISTRY_THROTTLE_RATE is None
        ):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        length = headers.get(b"content-length", b"")
        if (
            headers.get(b"content-type", b"").lower() not in JSON_TYPES
            or headers.get(b"accept", b"") not in ACCEPT_JSON
            or not (length.isdigit() and len(length) < 10 and int(length) <= _max_body())
            or not _host_allowed(headers.get(b"host", b""))
        ):
            await self.app(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        if complete:
            answer = await _try_unchanged(body, headers.get(b"authorization", b""))
            if answer is not None:
                await limits.send_json(send, 200, answer)
                return
            scope = {**scope, reregister.CHECKED: True}  # the view need not ask Redis again
        await self.app(scope, _replay(body, complete, receive), send)


def _max_body() -> int:
    """Never more than the server's own body cap, which BodyLimit enforces on whatever this passes on."""
    return min(MAX_BODY, limits.max_body_bytes())


def _headers(scope: dict[str, Any]) -> dict[bytes, bytes]:
    wanted = (b"host", b"authorization", b"content-length", b"content-type", b"accept")
    return {name: value for name, value in scope["headers"] if name in wanted}


async def _read_body(receive: Any) -> tuple[bytes, bool]:
    """The body, up to MAX_BODY; complete False if the client disconnected or sent more (Django decides)."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body, False
        body += message.get("body", b"")
        if len(body) > _max_body():
            return body, False
        if not message.get("more_body", False):
            return body, True


def _replay(body: bytes, complete: bool, receive: Any) -> Any:
    """A ``receive`` that hands Django the body already read, then (if any) the rest from the client."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replayed


async def _try_unchanged(body: bytes, authorization: bytes) -> dict[str, Any] | None:
    """The answer to an unchanged re-registration, or None (let Django register it)."""
    key = token_from_header(authorization.decode("latin-1"))
    if not key:
        return None
    try:
        data = limits.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("service_id"), str):
        return None
    if path_identifier_error("service_id", data["service_id"]) is not None:
        return None  # never registered: Django names the field
    health = data.get("health", Health.HEALTHY)
    if health not in Health.values:
        return None
    try:
        request_digest = reregister.digest(data)
    except (TypeError, ValueError):
        return None
    key_hash = hash_token(key)
    now_ms = lease_store.to_ms(timezone.now())
    r = get_async_redis()
    keys = reregister.renew_keys(key_hash)
    args = reregister.renew_args(data["service_id"], request_digest, now_ms, health)
    try:
        for _attempt in range(2):
            try:
                reply = await r.evalsha(reregister.RENEW_UNCHANGED_SHA, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                reply = await r.eval(reregister.RENEW_UNCHANGED_LUA, len(keys), *keys, *args)
            code = reply[0].decode()
            if code == "OK":
                return reregister.unchanged_body(reply[2], int(reply[1]))
            if code != "TOKEN_MISS":
                return None
            if not await sync_to_async(_with_fresh_connection, thread_sensitive=True)(cache_token, key_hash):
                return None  # not a token: Django answers 401
    except redis.RedisError as exc:
        log.warning("unchanged re-registration check skipped: Redis unavailable: %s", exc)
    return None
