"""Membership of a column in a set of ids sent as ONE query parameter, whatever the size of the set.

``pk__in=ids`` sends one SQL variable per id: a mass lapse of 40,000 leases fails on SQLite ("too many
SQL variables", its limit is 32,766) and costs a parse of every placeholder elsewhere. ``InIdSet`` sends
the ids as one array (PostgreSQL: ``col = ANY(%s)``, hashed by the planner) or one JSON text (SQLite:
``col IN (SELECT value FROM json_each(%s))``, an ephemeral index built once per query). It is a boolean
expression, so it filters (``filter(InIdSet(...))``, ``filter(~Q(InIdSet(...)))``), counts
(``Count("pk", filter=Q(InIdSet(...)))``) and sorts (``When(InIdSet(...), then=...)``) alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from django.db.models import BooleanField, Expression, F


class InIdSet(Expression):
    """``field IN ids`` with the ids as a single parameter; an empty set is a constant false."""

    output_field = BooleanField()
    conditional = True

    def __init__(self, field: str, ids: Sequence[str]) -> None:
        super().__init__(output_field=BooleanField())
        self.column = F(field)
        self.ids = list(ids)

    def get_source_expressions(self) -> list[Any]:
        return [self.column]

    def set_source_expressions(self, exprs: list[Any]) -> None:
        (self.column,) = exprs

    def resolve_expression(self, *args: Any, **kwargs: Any) -> InIdSet:
        resolved = self.copy()
        resolved.column = self.column.resolve_expression(*args, **kwargs)
        return resolved

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, list[Any]]:
        if not self.ids:
            return "1 = 0", []
        sql, params = compiler.compile(self.column)
        if connection.vendor == "postgresql":
            return f"{sql} = ANY(%s::text[])", [*params, self.ids]
        if connection.vendor == "sqlite":
            return f"{sql} IN (SELECT value FROM json_each(%s))", [*params, json.dumps(self.ids)]
        placeholders = ", ".join(["%s"] * len(self.ids))  # other backends: a plain IN list
        return f"{sql} IN ({placeholders})", [*params, *self.ids]

    def __repr__(self) -> str:
        return f"InIdSet({self.column!r}, <{len(self.ids)} ids>)"
