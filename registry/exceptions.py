"""API error responses beyond DRF's own: an unreachable lease store is a 503 the client may retry."""

from __future__ import annotations

import logging
from typing import Any

import redis
from rest_framework.response import Response
from rest_framework.views import exception_handler

log = logging.getLogger(__name__)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, redis.RedisError):
        # The transaction that needed Redis was rolled back: nothing was half-written.
        log.error("Redis unavailable during %s: %s", context.get("view").__class__.__name__, exc)
        return Response({"detail": "Lease store unavailable; retry shortly."}, status=503, headers={"Retry-After": "1"})
    return exception_handler(exc, context)
