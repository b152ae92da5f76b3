"""Validation rules for identifiers, endpoints, labels and label selectors, shared by the API and the admin.

Every rule matches the whole value (``fullmatch``/``\\Z``): ``$`` also matches before a trailing
newline, which once let ``"svc\\n"`` in as an identifier that no URL could ever name again.
"""

from __future__ import annotations

import ipaddress
import re

from django.core.exceptions import ValidationError

IDENTIFIER_PATTERN = r"[A-Za-z0-9._:-]{1,128}"
IDENTIFIER_RE = re.compile(rf"\A{IDENTIFIER_PATTERN}\Z")
_DNS_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_IPV4_RE = re.compile(r"[0-9.]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also takes '²' and '٣'
MAX_ENDPOINT = 300  # Service.endpoint's column width
MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
# C0 and C1 control characters (NUL among them) and UTF-16 surrogates, which cannot be stored as text.
_UNSTORABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut short: an error message echoes what was sent, not 5,000 characters of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def is_identifier(value: object) -> bool:
    return isinstance(value, str) and IDENTIFIER_RE.fullmatch(value) is not None


def validate_identifier(value: str) -> None:
    if not is_identifier(value):
        raise ValidationError(
            f"expected 1..128 characters of [A-Za-z0-9._:-], got {shown(value)}", code="invalid_identifier"
        )


def _valid_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    if _IPV4_RE.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    if len(host) > 253:
        return False
    return all(_DNS_LABEL_RE.fullmatch(part) for part in host.removesuffix(".").split("."))


def validate_endpoint(value: str) -> None:
    message = f"expected host:port with port 1..65535, got {shown(value)}"
    if not isinstance(value, str) or ":" not in value or len(value) > MAX_ENDPOINT:
        raise ValidationError(message, code="invalid_endpoint")
    problem = text_problem(value)
    if problem:
        raise ValidationError(f"{message}: it {problem}", code="invalid_endpoint")
    host, _, port = value.rpartition(":")
    # Checked as text before int(): int() takes non-ASCII digits and refuses 5,000 of them with an error.
    if not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535 or not host:
        raise ValidationError(message, code="invalid_endpoint")
    if not _valid_host(host):
        raise ValidationError(
            f"expected a DNS name, an IPv4 address or [IPv6] before the port, got {shown(host)}",
            code="invalid_endpoint",
        )


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None.

    A lone surrogate is not Unicode (UTF-8 cannot encode it, so the database refuses it), PostgreSQL
    text cannot hold NUL, and other control characters are never part of a name or a value.
    """
    bad = _UNSTORABLE_RE.search(value)
    if bad is None:
        return None
    code = ord(bad.group())
    if 0xD800 <= code <= 0xDFFF:
        return f"contains a lone surrogate U+{code:04X}, which is not valid Unicode"
    return f"contains the control character U+{code:04X}"


def _label_problem(text: str, syntax: str) -> str | None:
    problem = text_problem(text)
    if problem:
        return problem
    for char in syntax:
        if char in text:
            return f"contains {char!r}, which no selector (k=v,k2=v2) could ever match"
    if text != text.strip():
        return "starts or ends with whitespace, which no selector could ever match (it trims k and v)"
    return None


def validate_labels(value: object) -> None:
    if not isinstance(value, dict):
        raise ValidationError("expected an object of string keys to string values", code="invalid_labels")
    if len(value) > MAX_LABELS:
        raise ValidationError(f"at most {MAX_LABELS} labels, got {len(value)}", code="too_many_labels")
    for key, item in value.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_LABEL_KEY:
            raise ValidationError(
                f"label keys must be 1..{MAX_LABEL_KEY} characters, got {shown(key)}", code="invalid_label"
            )
        # A selector splits on ',' and then on the first '=': a key holding either, or a value holding
        # ',', could be stored but never selected.
        problem = _label_problem(key, ",=")
        if problem:
            raise ValidationError(f"label key {shown(key)} {problem}", code="invalid_label")
        if not isinstance(item, str) or len(item) > MAX_LABEL_VALUE:
            raise ValidationError(
                f"label {key!r}: values must be strings of at most {MAX_LABEL_VALUE} characters",
                code="invalid_label",
            )
        problem = _label_problem(item, ",")
        if problem:
            raise ValidationError(f"label {shown(key)}: the value {problem}", code="invalid_label")


def parse_selector(value: str) -> dict[str, str]:
    """Parse ``k=v,k2=v2`` into a dict; every pair must match for a service to be selected."""
    problem = text_problem(value)
    if problem:
        raise ValidationError(f"the selector {problem}", code="invalid_selector")
    pairs: dict[str, str] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        key, sep, item = part.partition("=")
        key, item = key.strip(), item.strip()
        if not sep or not key:
            raise ValidationError(f"expected k=v pairs separated by commas, got {shown(part)}", code="invalid_selector")
        if key in pairs and pairs[key] != item:
            raise ValidationError(f"label {shown(key)} is given two different values", code="invalid_selector")
        pairs[key] = item
    if not pairs:
        raise ValidationError("expected at least one k=v pair", code="invalid_selector")
    validate_labels(pairs)
    return pairs
