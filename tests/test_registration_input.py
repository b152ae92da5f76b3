"""The registration fast path's validation without DRF (registry.registration_input) gives exactly what
RegisterSerializer gives: for every body it takes, the serializer takes it too, with the same validated
data (keys, order, values and types) and the same request digest; every body in the common form that the
serializer takes, it takes too; everything else it leaves to the serializer. Bodies: each field's edge
cases one at a time on a valid body, and thousands of random mixes of them."""

from __future__ import annotations

import random
from typing import Any

import pytest

from registry import reregister
from registry.registration_input import common_registration
from registry.serializers import RegisterSerializer

BASE: dict[str, Any] = {
    "service_id": "svc-1",
    "service_name": "orders",
    "service_type": "source",
    "endpoint": "10.0.0.1:9000",
    "labels": {"shard": "3", "zone": "z1"},
    "lease_duration": 3600,
}

FULL: dict[str, Any] = {**BASE, "group_id": "g-1", "deregister_after": 60, "weight": 7, "health": "degraded"}

IDENTIFIERS = [
    "a",
    "A.b_c:d-1",
    "123",
    "a" * 128,
    "a" * 129,
    "",
    " a",
    "a ",
    "a\n",
    "a/b",
    "a b",
    "é",
    "a\x00",
    "a\ud800",
    "a\x7f",
    5,
    5.0,
    True,
    None,
    [],
    {},
    ["a"],
]
STRING_INTS = ["5", "5.0", " 5", "", "0x10", "1e3", "٣"]


def _ints(low: int, high: int) -> list[Any]:
    return [low - 1, low, low + 1, high - 1, high, high + 1, -1, 0, 10**30, 5.0, 5.5, True, False, None, [], {}]


EDGES: dict[str, list[Any]] = {
    "service_id": IDENTIFIERS,
    "service_name": IDENTIFIERS,
    "service_type": ["source", "transform", "sink", "Source", "SOURCE", "", " source", None, 1, True, ["source"]],
    "endpoint": [
        "10.0.0.1:9000",
        "host:1",
        "host:65535",
        "host:0",
        "host:65536",
        "host:",
        ":80",
        "host",
        "[::1]:80",
        "[::1]80",
        "[zz]:80",
        "::1:80",
        "a-b.example.com:443",
        "example.com.:443",
        "-a.com:80",
        "a..b:80",
        "256.1.1.1:80",
        "1.2.3:80",
        "1.2.3.4:080",
        "h:00080",
        "h:" + "9" * 6,
        "h" * 253 + ":80",
        "h" * 254 + ":80",
        ("a" * 63 + ".") * 4 + "a:80",
        "x" * 297 + ":80",
        "x" * 298 + ":80",
        "h:8\n0",
        "h:80\n",
        "h:٣",
        "h:80\x00",
        "h\ud800:80",
        "é.com:80",
        " h:80",
        "h:80 ",
        "",
        9000,
        90.5,
        None,
        True,
        [],
        {"host": "h"},
    ],
    "labels": [
        {},
        {"a": "b"},
        {f"k{i}": "v" for i in range(64)},
        {f"k{i}": "v" for i in range(65)},
        {"k" * 63: "v"},
        {"k" * 64: "v"},
        {"k": "v" * 256},
        {"k": "v" * 257},
        {"a,b": "v"},
        {"a=b": "v"},
        {"k": "a,b"},
        {"k": "a=b"},
        {" k": "v"},
        {"k ": "v"},
        {"k": " v"},
        {"k": "v\t"},
        {"k": ""},
        {"": "v"},
        {"k": 1},
        {"k": None},
        {"k": True},
        {"k": ["v"]},
        {"k": {"a": "b"}},
        {"k\n": "v"},
        {"k": "v\x7f"},
        {"k": "v\x00"},
        {"k": "\ud800"},
        {"k": "ü", "e": "x y"},
        None,
        [],
        [["a", "b"]],
        "a=b",
        "",
        1,
        True,
    ],
    "group_id": IDENTIFIERS,
    "lease_duration": _ints(1, 3600) + STRING_INTS,
    "deregister_after": _ints(0, 86400) + STRING_INTS,
    "weight": _ints(0, 1000) + STRING_INTS,
    "health": ["healthy", "degraded", "unhealthy", "unknown", "", "HEALTHY", " healthy", None, 1, True, ["healthy"]],
}
ABSENT = object()
INTEGER_FIELDS = ("lease_duration", "deregister_after", "weight")


def _drf(data: dict[str, Any]) -> dict[str, Any] | None:
    serializer = RegisterSerializer(data=data)
    return dict(serializer.validated_data) if serializer.is_valid() else None


def _typed(value: Any) -> Any:
    """``value`` with the type of every part, so that 5 and 5.0 or 1 and True never compare equal."""
    if isinstance(value, dict):
        return [(type(value), [(_typed(k), _typed(v)) for k, v in value.items()])]
    return (type(value), value)


def _common_form(data: dict[str, Any]) -> bool:
    """Every registration field present already of the type the serializer returns (the form the fast
    path is for)."""
    for name, value in data.items():
        if name in INTEGER_FIELDS:
            ok = type(value) is int
        elif name == "labels":
            ok = type(value) is dict and all(type(v) is str for v in value.values())
        elif name == "group_id":
            ok = value is None or type(value) is str
        elif name in EDGES:
            ok = type(value) is str
        else:
            ok = True  # a field the serializer ignores
        if not ok:
            return False
    return True


def _check(data: dict[str, Any]) -> bool:
    """Assert the fast validation agrees with the serializer on ``data``; whether it took the body."""
    fast = common_registration(data)
    slow = _drf(data)
    if fast is not None:
        assert slow is not None, data
        assert _typed(fast) == _typed(slow), data
        assert list(fast) == list(slow), data
        assert reregister.digest(fast) == reregister.digest(slow) == reregister.digest(data), data
        assert fast.get("labels") is not data.get("labels") or "labels" not in data  # a copy, as the serializer's
    elif slow is not None:
        assert not _common_form(data), data  # the serializer took a body in the common form: so must it
    return fast is not None


def _with(base: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    body = dict(base)
    if value is ABSENT:
        body.pop(name, None)
    else:
        body[name] = value
    return body


@pytest.mark.parametrize("name", list(EDGES))
def test_each_fields_edge_cases_validate_as_the_serializer_validates_them(name: str) -> None:
    taken = 0
    for value in [*EDGES[name], ABSENT]:
        taken += _check(_with(BASE, name, value))
        taken += _check(_with(FULL, name, value))
    assert taken > 0


def test_the_common_bodies_take_the_fast_validation() -> None:
    full = {**BASE, "group_id": "g-1", "deregister_after": 0, "weight": 1000, "health": "unknown"}
    for body in (BASE, full, {**BASE, "group_id": None}, {**BASE, "labels": {}}, {**BASE, "extra": [1]}):
        assert _check(body), body
    minimal = {k: BASE[k] for k in ("service_id", "service_name", "service_type", "endpoint")}
    assert _check(minimal)
    assert common_registration(full) == _drf(full)


def test_random_mixes_of_edge_cases_validate_as_the_serializer_validates_them() -> None:
    rng = random.Random(20261128)
    taken = refused = 0
    for _ in range(4000):
        body: dict[str, Any] = {}
        for name, values in EDGES.items():
            roll = rng.random()
            if roll < 0.05:
                continue  # absent
            # Mostly valid values, so that bodies with one or two bad fields are common.
            value = FULL[name] if roll < 0.85 else rng.choice(values)
            body[name] = value
        if rng.random() < 0.1:
            body["unknown"] = rng.choice([1, "x", None, {"a": 1}])
        if _check(body):
            taken += 1
        else:
            refused += 1
    assert taken > 100 and refused > 100  # both sides of the comparison were exercised
