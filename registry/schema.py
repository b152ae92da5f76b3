"""The OpenAPI schema's own rules: the bearer-token scheme, label and identifier types, and the error
responses every operation really gives (401 without a token, 404 for a page that does not exist,
413/415 for bodies, 429 when throttled, 503 when the lease store is down).

Views declare what is particular to them (their 400/403/404/409 and the meaning of each); the
schema class adds what follows from how they are built (authenticated, paginated, takes a body,
throttled), so no operation can forget one.
"""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerFieldExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from . import validators

BEARER = "bearerAuth"
BEARER_AUTH = [{BEARER: []}]

# JSON Schema (ECMA) form of validators.IDENTIFIER_RE: length is given separately, since an
# ECMA `$` never matches before a trailing newline and {1,128} would repeat minLength/maxLength.
IDENTIFIER = {"type": "string", "pattern": r"^[A-Za-z0-9._:-]+$", "minLength": 1, "maxLength": 128}
LABELS = {
    "type": "object",
    "additionalProperties": {"type": "string", "maxLength": validators.MAX_LABEL_VALUE},
    "maxProperties": validators.MAX_LABELS,
    "description": f"Labels: at most {validators.MAX_LABELS}, string keys of 1..{validators.MAX_LABEL_KEY} "
    f"characters to string values of at most {validators.MAX_LABEL_VALUE}.",
}
# DESIGN.md's endpoint: host:port, host a DNS name, IPv4 or [IPv6]; the port's 1..65535 range and
# the DNS label rules are checked by the server (400), not by this pattern.
ENDPOINT = {
    "type": "string",
    "pattern": r"^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$",
    "maxLength": 300,
    "description": "host:port; host a DNS name, an IPv4 address or [IPv6]; port 1..65535.",
}
# Path variables that are identifiers (DESIGN.md: 1..128 chars of [A-Za-z0-9._:-]).
IDENTIFIER_PATH_VARIABLES = {"service_id", "group_id", "member_id", "name"}


class ErrorSerializer(serializers.Serializer):
    """An error that is not about one field: ``{"detail": "..."}``."""

    detail = serializers.CharField()


def error(description: str) -> OpenApiResponse:
    return OpenApiResponse(ErrorSerializer, description=description)


def bad_request(description: str = "Bad input; the body names each field and the rule it broke.") -> OpenApiResponse:
    # DRF's field-error body: {field: [message, ...]} (nested for list items), or {"detail": ...}
    # when the body is not JSON at all.
    return OpenApiResponse(OpenApiTypes.OBJECT, description=description)


UNAUTHORIZED = error("Missing, malformed or unknown token.")
NO_ROUTE = error("Not found.")
BAD_PATH_ID = bad_request("A path identifier is not 1..128 characters of [A-Za-z0-9._:-]; the body names it.")
NOT_FOUND_PAGE = error("No such page (?page= below 1, past the last page, or not a number).")
TOO_LARGE = error("The request body is larger than the server accepts.")
UNSUPPORTED_MEDIA = error("The body is not application/json.")
THROTTLED = error(
    "More than REGISTRY_THROTTLE_RATE requests for this token (only when that is set); "
    "retry after the Retry-After header's seconds."
)
UNAVAILABLE = error("The lease store (Redis) is unreachable; nothing was changed. Retry shortly.")


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "registry.auth.BearerTokenAuthentication"
    name = BEARER

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from `manage.py create_token NAME [--staff]`: "
            "`Authorization: Bearer <key>` (`Token <key>` is accepted too).",
        }


class LabelsFieldType(OpenApiSerializerFieldExtension):
    target_class = "registry.serializers.LabelsField"

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        return dict(LABELS)


def _checked_by(field: Any, rule: Any) -> bool:
    """Whether ``field`` runs the Django validator ``rule`` (directly or adapted by registry.serializers)."""
    for check in getattr(field, "validators", ()):
        cells = getattr(check, "__closure__", None) or ()
        if check is rule or any(c.cell_contents is rule for c in cells):
            return True
    return False


class ConveyorAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema plus the project's identifiers and implied error responses."""

    def _map_serializer_field(self, field: Any, direction: str, bypass_extensions: bool = False) -> dict[str, Any]:
        schema = super()._map_serializer_field(field, direction, bypass_extensions)
        if _checked_by(field, validators.validate_identifier):
            schema.update(IDENTIFIER)
        elif _checked_by(field, validators.validate_endpoint):
            schema.update(ENDPOINT)
        return schema

    def get_override_parameters(self) -> list[Any]:
        parameters = list(super().get_override_parameters())
        declared = {p.name for p in parameters if isinstance(p, OpenApiParameter)}
        for variable in re.findall(r"{(\w+)}", self.path):
            if variable in IDENTIFIER_PATH_VARIABLES and variable not in declared:
                parameters.append(OpenApiParameter(variable, IDENTIFIER, OpenApiParameter.PATH))
        return parameters

    def _implied_errors(self) -> dict[str, OpenApiResponse]:
        implied: dict[str, OpenApiResponse] = {}
        if any(self.get_auth()):
            implied["401"] = UNAUTHORIZED
        if self.method == "GET" and self._is_list_view() and self._get_paginator() is not None:
            implied["404"] = NOT_FOUND_PAGE
        if IDENTIFIER_PATH_VARIABLES & set(re.findall(r"{(\w+)}", self.path)):
            implied["400"] = BAD_PATH_ID  # registry.path_ids: a 400 naming the field
            implied["404"] = NO_ROUTE
        if self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None:
            implied["400"] = bad_request()
            implied["413"] = TOO_LARGE
            if not getattr(self.view, "fast_path", False):
                implied["415"] = UNSUPPORTED_MEDIA
        # The heartbeat fast path (registry.fastpath) reads any body as JSON and is not throttled.
        if self.view.get_throttles() and not getattr(self.view, "fast_path", False):
            implied["429"] = THROTTLED
        if self.method not in getattr(self.view, "methods_without_lease_store", ()):
            implied["503"] = UNAVAILABLE
        return implied

    def _get_response_bodies(self, direction: str = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        if direction != "response" or not self.path.startswith("/api/v1/"):
            return responses
        for code, response in self._implied_errors().items():
            if code not in responses:
                responses[code] = self._get_response_for_code(response, code, direction=direction)
        return dict(sorted(responses.items()))


# Response facts the serializers do not state (their fields are typed loosely or filled outside
# them): (component, property) -> the property's schema; True marks it required.
_RESPONSE_FACTS: dict[tuple[str, str], tuple[dict[str, Any], bool]] = {
    ("Service", "health"): (
        {
            "allOf": [{"$ref": "#/components/schemas/HealthEnum"}],
            "description": "Effective health: unhealthy once the lease has lapsed.",
        },
        True,
    ),
    ("Service", "reported_health"): (
        {"allOf": [{"$ref": "#/components/schemas/HealthEnum"}], "description": "What the service last reported."},
        True,
    ),
    ("Service", "owner"): (
        {"type": "string", "nullable": True, "description": "Name of the token that registered it."},
        True,
    ),
    ("Group", "state"): ({"type": "string", "enum": ["empty", "reconciling", "stable"]}, True),
}


def postprocess(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: apply _RESPONSE_FACTS (and say so if a target is gone)."""
    from drf_spectacular.drainage import warn

    schemas = result.get("components", {}).get("schemas", {})
    for (component, prop), (schema, required) in _RESPONSE_FACTS.items():
        target = schemas.get(component)
        if target is None:
            warn(f"registry.schema: component {component!r} is gone; update _RESPONSE_FACTS")
            continue
        target.setdefault("properties", {})[prop] = schema
        if required and prop not in target.setdefault("required", []):
            target["required"] = sorted([*target["required"], prop])
    return result
