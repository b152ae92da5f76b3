"""Validation rules for identifiers, endpoints, labels and label selectors, shared by the API and the admin."""

from __future__ import annotations

import ipaddress
import re

from django.core.exceptions import ValidationError

IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256


def validate_identifier(value: str) -> None:
    if not isinstance(value, str) or not IDENTIFIER_RE.match(value):
        raise ValidationError(
            f"expected 1..128 characters of [A-Za-z0-9._:-], got {value!r}", code="invalid_identifier"
        )


def _valid_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    if len(host) > 253:
        return False
    return all(_DNS_LABEL_RE.match(part) for part in host.removesuffix(".").split("."))


def validate_endpoint(value: str) -> None:
    message = f"expected host:port with port 1..65535, got {value!r}"
    if not isinstance(value, str) or ":" not in value:
        raise ValidationError(message, code="invalid_endpoint")
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
        raise ValidationError(message, code="invalid_endpoint")
    if not _valid_host(host):
        raise ValidationError(
            f"expected a DNS name, an IPv4 address or [IPv6] before the port, got {host!r}",
            code="invalid_endpoint",
        )


def validate_labels(value: object) -> None:
    if not isinstance(value, dict):
        raise ValidationError("expected an object of string keys to string values", code="invalid_labels")
    if len(value) > MAX_LABELS:
        raise ValidationError(f"at most {MAX_LABELS} labels, got {len(value)}", code="too_many_labels")
    for key, item in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_LABEL_KEY:
            raise ValidationError(
                f"label keys must be 1..{MAX_LABEL_KEY} characters, got {key!r}", code="invalid_label"
            )
        if not isinstance(item, str) or len(item) > MAX_LABEL_VALUE:
            raise ValidationError(
                f"label {key!r}: values must be strings of at most {MAX_LABEL_VALUE} characters",
                code="invalid_label",
            )


def parse_selector(value: str) -> dict[str, str]:
    """Parse ``k=v,k2=v2`` into a dict; every pair must match for a service to be selected."""
    pairs: dict[str, str] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        key, sep, item = part.partition("=")
        key, item = key.strip(), item.strip()
        if not sep or not key:
            raise ValidationError(f"expected k=v pairs separated by commas, got {part!r}", code="invalid_selector")
        if key in pairs and pairs[key] != item:
            raise ValidationError(f"label {key!r} is given two different values", code="invalid_selector")
        pairs[key] = item
    if not pairs:
        raise ValidationError("expected at least one k=v pair", code="invalid_selector")
    validate_labels(pairs)
    return pairs
