"""Limits on what a client may send, applied before any work is done on it: the size of a request body
(an ASGI middleware, before Django reads it), the nesting depth of JSON (one parser for the REST API, the
heartbeat fast path and websocket messages) and the size of a websocket message."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import orjson
import redis
from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.throttling import BaseThrottle

from registry.redis_client import get_redis

log = logging.getLogger(__name__)

# Every document the API takes is at most three levels deep (a body, its labels, a list of topics); a
# bound far below the interpreter's recursion limit keeps every later step (validation, error messages
# that echo the input) away from it too.
MAX_JSON_DEPTH = 32


class JSONTooDeep(ValueError):
    """A JSON document nested deeper than MAX_JSON_DEPTH."""

    def __init__(self) -> None:
        super().__init__(f"nested deeper than {MAX_JSON_DEPTH} levels")


def _too_deep(document: Any) -> bool:
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def loads(raw: str | bytes) -> Any:
    """``json.loads`` that refuses NaN/Infinity and documents nested deeper than MAX_JSON_DEPTH.

    Raises ValueError (JSONTooDeep for depth) for anything it refuses, never RecursionError.
    """
    try:
        document = json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        # The C decoder hit the interpreter's recursion limit: far deeper than the bound.
        raise JSONTooDeep() from None
    if isinstance(document, dict | list) and _too_deep(document):
        raise JSONTooDeep()
    return document


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser with the depth bound of ``loads`` (a 400 instead of a RecursionError's 500)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            return loads(stream.read().decode(encoding))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ParseError(f"JSON parse error - {exc}") from None


def max_body_bytes() -> int:
    return settings.REGISTRY_MAX_BODY_BYTES


def max_ws_message_bytes() -> int:
    return settings.REGISTRY_MAX_WS_MESSAGE_BYTES


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the limit; BodyLimit answers 413."""


def too_large_body(limit: int, setting: str) -> dict[str, Any]:
    return {"detail": f"Request body is larger than {limit} bytes ({setting}).", "limit": limit}


async def send_json(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer with ``body`` as JSON (orjson: this answers every heartbeat, where json.dumps cost 5 us)."""
    try:
        payload = orjson.dumps(body)
    except orjson.JSONEncodeError:
        # A lone surrogate echoed from the input (JSON's "\udc80"), which orjson refuses: json escapes it.
        payload = json.dumps(body, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length a request declares (None if absent or not a plain number)."""
    for name, value in headers:
        if name == b"content-length" and value.isdigit():
            return int(value) if len(value) < 19 else 2**63  # int() of thousands of digits is an error
    return None


async def refuse_too_large(send: Any, limit: int, setting: str) -> None:
    # Connection: close, so the server drops the connection instead of reading the rest of the body.
    await send_json(send, 413, too_large_body(limit, setting), [(b"connection", b"close")])


class BodyLimit:
    """ASGI middleware: a request body larger than REGISTRY_MAX_BODY_BYTES is answered 413 before it is read.

    A declared Content-Length over the limit is refused at once; a body without one (chunked) is counted
    chunk by chunk as the application reads it, and the request is cut off at the chunk that passes the
    limit. Nothing downstream sees a byte past the limit, so nothing is spooled to disk.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = max_body_bytes()
        length = declared_length(scope["headers"])
        if length is not None and length > limit:
            await refuse_too_large(send, limit, "REGISTRY_MAX_BODY_BYTES")
            return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await refuse_too_large(send, limit, "REGISTRY_MAX_BODY_BYTES")


class TokenRateThrottle(BaseThrottle):
    """REGISTRY_THROTTLE_RATE requests per window for each token (each peer address for the few views that
    take no token), counted in Redis so that every server process shares the count; off when the setting is unset.

    A fixed window (one INCR per request) rather than DRF's sliding log, which keeps a list of timestamps
    per client in the cache and rewrites it on every request.
    """

    def allow_request(self, request: Any, view: Any) -> bool:
        rate = settings.REGISTRY_THROTTLE_RATE
        if rate is None:
            return True
        count, period = rate
        now = time.time()
        window = int(now // period)
        # The peer address, not DRF's get_ident(): that trusts any X-Forwarded-For a client makes up.
        token = getattr(request.auth, "pk", None)
        who = f"token:{token}" if token else f"addr:{request.META.get('REMOTE_ADDR', '')}"
        key = f"{settings.REGISTRY_REDIS_PREFIX}throttle:{who}:{period}:{window}"
        try:
            pipe = get_redis().pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, period + 1)
            used = pipe.execute()[0]
        except redis.RedisError as exc:
            # A throttle must not take the API down with Redis: let the request through.
            log.warning("throttle not applied: Redis unavailable: %s", exc)
            return True
        self.retry_after = (window + 1) * period - now
        return used <= count

    def wait(self) -> float | None:
        return max(1.0, math.ceil(self.retry_after))
