"""The admin's audit trail: every admin action an operator runs becomes a Django ``LogEntry`` per object.

Django logs the change form's saves and the delete views itself, but not changelist actions (drain,
deregister, force rebalance, remove member...). ``AuditedActions`` wraps each action of a ModelAdmin so
that, once the action has run, every object it was given gets a LogEntry naming the action. A view that
changes state outside an action (a button on a change page) calls ``log_admin_action`` itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse

SELF_LOGGING = {"delete_selected", "delete_tokens"}  # Django's delete and the token delete write their own entries


def log_admin_action(
    request: HttpRequest, objects: Iterable[Model], action: str, *, deletion: bool = False, detail: str = ""
) -> None:
    """One LogEntry per object for the operator of ``request``: "<action>" (plus ``detail``), as a change
    or, with ``deletion``, as a deletion (the objects may be gone already: their pk and str() are enough)."""
    objects = list(objects)
    if not objects or not getattr(request.user, "pk", None):
        return
    message = f"Admin action: {action}" + (f"; {detail}" if detail else "")
    LogEntry.objects.log_actions(request.user.pk, objects, DELETION if deletion else CHANGE, message)


def _audited(name: str, description: str, func: Callable[..., Any]) -> Callable[..., Any]:
    deletion = "delete" in getattr(func, "allowed_permissions", ())

    @functools.wraps(func)
    def action(modeladmin: Any, request: HttpRequest, queryset: QuerySet) -> Any:
        objects = list(queryset)  # before the action runs: a deregistration removes the rows
        response = func(modeladmin, request, queryset)
        # A template response is an intermediate page (a confirmation step): nothing was done yet.
        if not isinstance(response, TemplateResponse):
            log_admin_action(request, objects, f"{name} ({description})", deletion=deletion)
        return response

    return action


class AuditedActions:
    """ModelAdmin mixin (put it first among the bases): each action also writes a LogEntry per object."""

    def get_actions(self, request: HttpRequest) -> dict[str, tuple[Callable[..., Any], str, str]]:
        actions = super().get_actions(request)  # type: ignore[misc]
        return {
            name: (func if name in SELF_LOGGING else _audited(name, str(description), func), name, description)
            for name, (func, _name, description) in actions.items()
        }
