"""How the operators' service list orders and searches: natural id order in SQL, effective-health and
lease-deadline order (lapsed first), and the admin search box's label selectors with the reason a
selector is refused."""

from __future__ import annotations

from collections.abc import Sequence

from django.core.exceptions import ValidationError
from django.db.models import Case, CharField, F, Func, IntegerField, QuerySet, Value, When
from django.db.models.functions import Concat, Length, LPad, Substr
from django.db.models.lookups import LessThan

from . import lease_store
from .id_sets import InIdSet
from .models import Health
from .redis_client import get_redis
from .validators import parse_selector

# Longest trailing number that still sorts by value (identifiers are at most 128 characters).
_DIGITS = 128


class _RTrimChars(Func):
    """``RTRIM(text, characters)``: the same two-argument form on SQLite and PostgreSQL."""

    function = "RTRIM"
    output_field = CharField()


def natural_id(field: str = "service_id") -> Case:
    """A sort key for ``field`` where a trailing number sorts by value: ``svc-2`` before ``svc-10``.

    The text is split, in SQL, into its prefix (the value with trailing digits trimmed) and the trailing
    digits, which are left-padded with zeros, so the database orders and pages it like any column."""
    prefix = _RTrimChars(F(field), Value("0123456789"))
    digits = Substr(F(field), Length(prefix) + 1)
    return Case(
        When(LessThan(Length(prefix), Length(F(field))), then=Concat(prefix, LPad(digits, _DIGITS, Value("0")))),
        default=F(field),
        output_field=CharField(),
    )


# Ascending: the services that need attention first.
HEALTH_RANK = {Health.UNHEALTHY: 0, Health.DEGRADED: 1, Health.UNKNOWN: 2, Health.HEALTHY: 3}


def health_rank(lapsed_ids: Sequence[str]) -> Case:
    """Effective health as a number (unhealthy 0 .. healthy 3): a lapsed lease counts as unhealthy. The
    lapsed ids are one SQL parameter (registry.id_sets), so a mass lapse sorts like any other moment."""
    whens = [When(InIdSet("pk", lapsed_ids), then=Value(0))] if lapsed_ids else []
    whens += [When(health=health, then=Value(rank)) for health, rank in HEALTH_RANK.items()]
    return Case(*whens, default=Value(len(HEALTH_RANK)), output_field=IntegerField())


def ids_by_deadline(queryset: QuerySet, descending: bool = False) -> list[str]:
    """The ids of ``queryset`` ordered by lease deadline, earliest first (lapsed longest ago, then the
    next to lapse); ties and ids the lease store does not know (read as their stored deadline) by id.

    The deadlines live in Redis, not in the database, so the order is made here: one query for the
    ids and stored deadlines, one Redis round trip for the live ones."""
    stored = {pk: lease_store.to_ms(at) for pk, at in queryset.order_by().values_list("pk", "lease_expires_at")}
    live = lease_store.deadlines(get_redis(), list(stored))
    ordered = sorted(stored, key=lambda pk: (live.get(pk, stored[pk]), pk))
    return ordered[::-1] if descending else ordered


def search_selector(term: str) -> tuple[dict[str, str] | None, str | None]:
    """Read an admin search term as a label selector.

    Returns ``(selector, None)`` for a valid ``k=v[,k2=v2]``; ``(None, reason)`` for a term that
    looks like a selector but is not a valid one (``env=``, ``env!=prod``); ``(None, None)`` for a
    plain search term."""
    term = term.strip()
    if "=" not in term:
        return None, None
    for part in (p.strip() for p in term.split(",")):
        if not part:
            continue
        key, _sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key.endswith("!"):
            return None, (
                f"{part!r}: negative selectors (!=) are not supported; selectors match labels exactly, "
                f"k=v (or k=v,k2=v2). Filter by a value instead, e.g. {key[:-1].strip() or 'env'}=staging."
            )
        if not key:
            return None, f"{part!r}: a selector needs a label key before '=' (k=v)."
        if not value:
            return None, (
                f"{part!r}: a selector needs a value after '=' (k=v, e.g. {key}=prod). "
                f"To find services that carry the label at all, search for {key!r} alone."
            )
    try:
        return parse_selector(term), None
    except ValidationError as exc:
        return None, f"{term!r} is not a valid label selector: {' '.join(exc.messages)}"
