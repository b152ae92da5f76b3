"""Typed errors for every answer the registry can give that is not a success.

Every error carries the HTTP ``status`` (0 when no answer came), the server's machine ``code`` where it
sent one (``fenced_member_epoch``, ``member_id_in_use``, ``topic_in_use``, ...), its ``detail`` text and
the whole ``body``. Applications catch the narrow classes; scripts can catch ``ConveyorError``.
"""

from __future__ import annotations

from typing import Any


class ConveyorError(Exception):
    """Base of every error this library raises."""

    def __init__(self, detail: str, *, status: int = 0, code: str = "", body: Any = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.body = body


class Unavailable(ConveyorError):
    """The registry could not be reached, timed out, or answered 503 (its Redis or database is down).
    Retrying later is right."""


class InvalidRequest(ConveyorError):
    """400: the request was refused as written. ``fields`` maps each field to its messages."""

    @property
    def fields(self) -> dict[str, list[str]]:
        if isinstance(self.body, dict):
            return {k: v if isinstance(v, list) else [str(v)] for k, v in self.body.items() if k != "detail"}
        return {}


class Unauthorized(ConveyorError):
    """401: no token, or a token the registry does not know (revoked?)."""


class Forbidden(ConveyorError):
    """403: this token may not do that (another token owns the service, group or topic)."""


class NotFound(ConveyorError):
    """404: nothing by that id or name."""


class ServiceNotFound(NotFound):
    """404 for a service: not registered, deregistered, or removed after its lease lapsed."""


class NoInstanceAvailable(ConveyorError):
    """No instance can be selected: none is healthy (or degraded) with a weight above 0."""


class Conflict(ConveyorError):
    """409: the request conflicts with the current state; ``code`` says how."""


class Fenced(Conflict):
    """409 ``fenced_member_epoch`` (or a websocket closed with 4409/4410): this member incarnation is no longer
    the live one. Whatever it owned must be treated as lost; it must not commit."""


class RateLimited(ConveyorError):
    """429: too many requests; ``retry_after`` seconds when the server said."""

    retry_after: float | None = None


def from_response(status: int, body: Any, *, resource: str = "") -> ConveyorError:
    """The error for a non-2xx answer. ``resource`` ("service", "group", ...) picks a narrower 404 class."""
    detail, code = "", ""
    if isinstance(body, dict):
        detail = str(body.get("detail", "") or "")
        code = str(body.get("code", "") or "")
        if not detail:
            detail = "; ".join(f"{k}: {v}" for k, v in body.items())
    elif body:
        detail = str(body)[:500]
    detail = detail or f"HTTP {status}"
    kwargs: dict[str, Any] = {"status": status, "code": code, "body": body}
    if status == 400:
        return InvalidRequest(detail, **kwargs)
    if status == 401:
        return Unauthorized(detail, **kwargs)
    if status == 403:
        return Forbidden(detail, **kwargs)
    if status == 404:
        return ServiceNotFound(detail, **kwargs) if resource == "service" else NotFound(detail, **kwargs)
    if status == 409:
        return Fenced(detail, **kwargs) if code.startswith("fenced") else Conflict(detail, **kwargs)
    if status == 429:
        return RateLimited(detail, **kwargs)
    if status in (502, 503, 504):
        return Unavailable(detail, **kwargs)
    return ConveyorError(detail, **kwargs)
