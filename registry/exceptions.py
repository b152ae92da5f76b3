"""API error responses beyond DRF's own: domain NotFound/Forbidden/Conflict/InvalidInput errors of every app
become 404/403/409/400 with their message (a 409 also with its machine-readable ``code``, a 400 names its
field like DRF's), and an unreachable lease store or database is a 503 the client may retry."""

from __future__ import annotations

import logging
from typing import Any

import redis
from django import db
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler

from . import outage
from .errors import Conflict, Forbidden, InvalidInput, NotFound

log = logging.getLogger(__name__)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, redis.RedisError):
        # The transaction that needed Redis was rolled back: nothing was half-written.
        log.error("Redis unavailable during %s: %s", context.get("view").__class__.__name__, exc)
        outage.note_unreachable()
        return Response({"detail": "Lease store unavailable; retry shortly."}, status=503, headers={"Retry-After": "1"})
    if isinstance(exc, db.OperationalError | db.InterfaceError):
        # Not reachable, or (SQLite) locked for longer than its timeout: the transaction was rolled back.
        log.error("database unavailable during %s: %s", context.get("view").__class__.__name__, exc)
        return Response({"detail": "Database unavailable; retry shortly."}, status=503, headers={"Retry-After": "1"})
    if isinstance(exc, Conflict):
        return Response(exc.body(), status=409)
    if isinstance(exc, NotFound):
        exc = exceptions.NotFound(str(exc))
    elif isinstance(exc, Forbidden):
        exc = exceptions.PermissionDenied(str(exc))
    elif isinstance(exc, InvalidInput):
        exc = exceptions.ValidationError({exc.field: [str(exc)]})
    return exception_handler(exc, context)
