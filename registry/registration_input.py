"""The common registration body, validated without DRF's field machinery.

``RegisterSerializer`` decides what a registration body means. Its generic fields cost more than the rest
of the request's work on the event loop, so the registration fast path (registry.fast_register) first
tries ``common_registration``: a body whose every field is already of the type the serializer returns
(strings as JSON strings, numbers as JSON integers, labels as an object of strings) and passes the same
rules (registry.validators, the same bounds and choices) gets exactly the serializer's ``validated_data``,
the same keys in the same order with the same values and types. Anything else (a missing field, a null
where none is allowed, a number sent as a string, a value that breaks a rule) gets None, and the caller
asks the serializer, which gives the answer or the 400 naming the field. tests/test_registration_input.py
holds the two to the same output over every field's edge cases.
"""

from __future__ import annotations

import functools
from typing import Any

from django.core.exceptions import ValidationError

from . import validators
from .models import Health, ServiceType

_SERVICE_TYPES = frozenset(value for value, _label in ServiceType.choices)
_HEALTHS = frozenset(value for value, _label in Health.choices)
_INTEGERS = ("lease_duration", "deregister_after", "weight")


@functools.cache
def _form() -> tuple[tuple[str, ...], dict[str, tuple[int, int]]]:
    """RegisterSerializer's fields in their declared order (the order of its validated_data), and the bounds
    of its integer fields, read from the serializer itself."""
    from .serializers import RegisterSerializer

    fields = RegisterSerializer().fields
    order = tuple(name for name, field in fields.items() if not field.read_only)
    return order, {name: (fields[name].min_value, fields[name].max_value) for name in _INTEGERS}


def _identifier(value: Any) -> bool:
    return type(value) is str and validators.IDENTIFIER_RE.fullmatch(value) is not None


def _integer(name: str, value: Any) -> bool:
    low, high = _form()[1][name]
    return type(value) is int and low <= value <= high


def common_registration(data: dict[str, Any]) -> dict[str, Any] | None:
    """``RegisterSerializer().run_validation(data)`` for a body in the common form; None: ask the serializer."""
    if not (
        _identifier(data.get("service_id"))
        and _identifier(data.get("service_name"))
        and type(data.get("service_type")) is str
        and data["service_type"] in _SERVICE_TYPES
        and type(data.get("endpoint")) is str
    ):
        return None
    try:
        validators.validate_endpoint(data["endpoint"])
    except ValidationError:
        return None
    if "labels" in data:
        labels = data["labels"]
        if type(labels) is not dict:
            return None
        try:
            validators.validate_labels(labels)
        except ValidationError:
            return None
    if "group_id" in data and not (data["group_id"] is None or _identifier(data["group_id"])):
        return None
    for name in _INTEGERS:
        if name in data and not _integer(name, data[name]):
            return None
    if "health" in data and not (type(data["health"]) is str and data["health"] in _HEALTHS):
        return None
    out = {name: data[name] for name in _form()[0] if name in data}
    if "labels" in out:
        out["labels"] = dict(out["labels"])  # the serializer's LabelsField returns a copy
    return out
