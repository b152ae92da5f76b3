"""Admin of the history: the service lifecycle log (``ServiceEvent``), the leader jobs' runs and the audit
trail of operators' admin actions (Django's ``LogEntry``), all read-only. ``registry.admin`` imports it.

A service's history is the lifecycle changelist filtered by ``service_id``: it needs no service row, so it
stays reachable after the service expired or was deregistered (``history_url``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.models import LogEntry
from django.contrib.admin.utils import unquote
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from .models import LeaderJobRun, ServiceEvent


def history_url(service_id: str) -> str:
    """The lifecycle log of one service (its changelist filtered by id), whether or not it still exists."""
    return reverse("admin:registry_serviceevent_changelist") + "?" + urlencode({"service_id": service_id})


def history_link(service_id: str, text: str = "history") -> SafeString:
    return format_html('<a href="{}">{}</a>', history_url(service_id), text)


class RemovedServiceRedirect:
    """Service ModelAdmin mixin: the page of a service that is gone (expired, deregistered) leads to its
    history instead of Django's "doesn't exist. Perhaps it was deleted?" on the admin index."""

    def _get_obj_does_not_exist_redirect(self, request: HttpRequest, opts: Any, object_id: str) -> HttpResponseRedirect:
        service_id = unquote(object_id)
        if not ServiceEvent.objects.filter(service_id=service_id).exists():
            return super()._get_obj_does_not_exist_redirect(request, opts, object_id)  # type: ignore[misc]
        messages.warning(request, f"Service {service_id!r} is no longer registered. Its history:")
        return HttpResponseRedirect(history_url(service_id))


class ReadOnlyHistory(admin.ModelAdmin):
    """A record of what happened: viewable, never added, edited or deleted here (the change page shows no
    Save button; a POST to it or to the delete page is refused with 403)."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _change_table(change: dict[str, Any]) -> SafeString:
    if not change:
        return format_html("{}", "-")

    def show(value: Any) -> str:
        return "-" if value is None else json.dumps(value) if isinstance(value, dict | list) else str(value)

    rows = (
        (name, *(show(v) for v in (pair if isinstance(pair, list) and len(pair) == 2 else [None, pair])))
        for name, pair in sorted(change.items())
    )
    return format_html(
        '<table class="conveyor-change"><tbody>{}</tbody></table>',
        format_html_join("", "<tr><th>{}</th><td>{}</td><td>&rarr; {}</td></tr>", rows),
    )


@admin.register(ServiceEvent)
class ServiceEventAdmin(ReadOnlyHistory):
    """The service lifecycle log. ``?service_id=<id>`` (the service page's history link) lists one service's."""

    list_display = ["at", "service_id", "service_name", "kind", "actor_kind", "actor", "change_summary", "revision"]
    list_display_links = ["at"]
    list_filter = ["kind", "actor_kind"]
    date_hierarchy = "at"
    search_fields = ["service_id"]  # see get_search_results: exact matches, on the indexes
    search_help_text = "A service id or a service name (exact)."
    list_per_page = 100
    show_full_result_count = False  # no COUNT(*) over a long history on every page
    fields = ["service_id", "service_name", "kind", "at", "actor_kind", "actor", "revision", "change_table"]
    readonly_fields = fields

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        # Exact, not Django's icontains over every column: a long history would be scanned several times
        # per page (count, date hierarchy), where an operator pastes an id or a name.
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(service_id=term) | Q(service_name=term)), False

    @admin.display(description="change")
    def change_summary(self, row: ServiceEvent) -> str:
        parts = []
        for name, pair in sorted(row.change.items()):
            if isinstance(pair, list) and len(pair) == 2:
                parts.append(f"{name}: {pair[0]} → {pair[1]}")
            else:
                parts.append(f"{name}: {pair}")
        text = "; ".join(parts) or "-"
        short = text if len(text) <= 80 else text[:79] + "…"
        return format_html('<span title="{}">{}</span>', text, short)

    @admin.display(description="change")
    def change_table(self, row: ServiceEvent) -> SafeString:
        return _change_table(row.change)


@admin.register(LeaderJobRun)
class LeaderJobRunAdmin(ReadOnlyHistory):
    """The leader jobs' committed runs (each written in its job's fenced transaction): what a term did."""

    list_display = ["at", "job", "name", "term", "holder", "items"]
    list_filter = ["job", "name"]
    date_hierarchy = "at"
    search_fields = ["holder", "=term"]
    show_full_result_count = False
    fields = ["at", "job", "name", "term", "holder", "items"]
    readonly_fields = fields


@admin.register(LogEntry)
class LogEntryAdmin(ReadOnlyHistory):
    """The audit trail: every operator's change in the admin (Django's log; actions included, see
    registry.audit)."""

    list_display = ["action_time", "user", "content_type", "object_repr", "action_flag", "message"]
    list_filter = ["action_flag", "content_type", "user"]
    date_hierarchy = "action_time"
    search_fields = ["object_repr", "object_id", "change_message", "user__username"]
    list_select_related = ["user", "content_type"]
    show_full_result_count = False
    fields = ["action_time", "user", "content_type", "object_id", "object_repr", "action_flag", "message"]
    readonly_fields = fields

    @admin.display(description="change")
    def message(self, entry: LogEntry) -> str:
        return entry.get_change_message()
