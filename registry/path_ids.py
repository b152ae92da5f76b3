"""Identifiers in URL paths: the check shared by the heartbeat's two front doors, and fallback routes for
API paths whose identifier segments are not identifiers.

The API's routes match identifiers exactly (the OpenAPI schema shows that pattern), so without these a
path such as ``/api/v1/services/bad%20id/`` would fall through to Django's HTML 404. Placed after the
real routes, each fallback matches any segment and answers a 400 naming the field, like a bad body.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.http import HttpRequest, JsonResponse
from django.urls import URLPattern, re_path
from django.views.decorators.csrf import csrf_exempt

from .validators import validate_identifier


def path_identifier_error(field: str, value: str) -> dict[str, list[str]] | None:
    """A 400 body naming ``field`` if a path segment is not an identifier, else None."""
    try:
        validate_identifier(value)
    except ValidationError as exc:
        return {field: exc.messages}
    return None


@csrf_exempt
def invalid_path_ids(request: HttpRequest, **segments: str) -> JsonResponse:
    errors: dict[str, list[str]] = {}
    for field, value in segments.items():
        errors |= path_identifier_error(field, value) or {}
    if not errors:  # the segments are fine: the path is wrong some other way
        return JsonResponse({"detail": "Not found."}, status=404)
    return JsonResponse(errors, status=400)


def fallback(route: str) -> URLPattern:
    """A route for ``route`` (``{field}`` marks a segment) that reports its bad identifiers."""
    regex = route
    for field in _fields(route):
        regex = regex.replace("{" + field + "}", f"(?P<{field}>[^/]+)")
    return re_path(f"^{regex}$", invalid_path_ids)


def _fields(route: str) -> list[str]:
    return [part[1:-1] for part in route.split("/") if part.startswith("{") and part.endswith("}")]
