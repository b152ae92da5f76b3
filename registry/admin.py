"""Operators' admin: services with effective health and lease time left, deregister and drain; API tokens."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from . import leases
from .dashboard import LeaseFilter
from .models import ApiToken, Health, LeaderJobRun, LeaderTerm, LeaderTermHistory, LeaseStoreState, Service
from .validators import parse_selector

BADGE_COLOURS = {
    Health.HEALTHY: "#1e7e34",
    Health.DEGRADED: "#c77c02",
    Health.UNHEALTHY: "#c0392b",
    Health.UNKNOWN: "#6c757d",
}


def _seconds(delta_seconds: float) -> str:
    seconds = int(abs(delta_seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds}s"


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


class EffectiveHealthFilter(admin.SimpleListFilter):
    title = "health"
    parameter_name = "health"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(Health.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in Health.values:
            return queryset.with_effective_health(self.value(), leases.lapsed_ids(timezone.now()))
        return queryset


class LiveLeaseChangeList(ChangeList):
    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        # One Redis round trip for the page, so health and time left are current.
        self.result_list = leases.attach_live_leases(self.result_list)


@admin.register(Service)
class ServiceAdmin(admin.ModelAdmin):
    list_display = [
        "service_id",
        "service_name",
        "service_type",
        "health_badge",
        "lease_left",
        "endpoint",
        "group_id",
        "weight_display",
        "registered_at",
    ]
    list_filter = [
        "service_type",
        EffectiveHealthFilter,
        LeaseFilter,
        ("service_name", admin.AllValuesFieldListFilter),
        ("group_id", admin.AllValuesFieldListFilter),
    ]
    search_fields = ["service_id", "service_name", "endpoint", "label_rows__key", "label_rows__value"]
    search_help_text = "Search id, name, endpoint or label; k=v (or k=v,k2=v2) matches labels exactly."
    actions = ["deregister", "drain", "undrain", "clear_operator_weight"]
    list_per_page = 100
    fieldsets = [
        (None, {"fields": ["service_id", "service_name", "service_type", "endpoint", "group_id", "labels_display"]}),
        (
            "Health and lease",
            {
                "fields": [
                    "health_badge",
                    "health",
                    "lease_left",
                    "live_lease_expires_at",
                    "last_heartbeat_at",
                    "lease_duration",
                    "deregister_after",
                    "registered_at",
                ]
            },
        ),
        (
            "Balancing",
            {
                "fields": ["weight", "drained", "registered_weight", "operator_weight"],
                "description": "The weight in effect is 0 while drained (use the Drain / Undrain actions), else "
                "the operator weight if set, else the weight the service registered with. Drains and operator "
                "weights are kept when the service re-registers.",
            },
        ),
        ("Ownership", {"fields": ["owner"]}),
    ]
    # Everything on the service page but the operator weight is set by the service itself through the API.
    readonly_fields = [name for _title, options in fieldsets for name in options["fields"] if name != "operator_weight"]

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return LiveLeaseChangeList

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Service | None:
        service = super().get_object(request, object_id, from_field)
        if service is not None:
            leases.attach_live_leases([service])
        return service

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        if "=" in search_term:
            try:
                return queryset.matching(parse_selector(search_term)), False
            except Exception:  # noqa: BLE001 - not a selector: fall back to plain search
                pass
        return super().get_search_results(request, queryset, search_term)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # services register themselves through the API

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # "deregister" also clears the lease store
        return actions

    @admin.display(description="health")
    def health_badge(self, service: Service) -> str:
        health = service.effective_health(timezone.now())
        note = " (lease lapsed)" if health == Health.UNHEALTHY and service.health != Health.UNHEALTHY else ""
        return format_html(
            '<span style="white-space:nowrap"><span style="background:{};color:#fff;padding:2px 8px;'
            'border-radius:10px;font-weight:600">{}</span>{}</span>',
            BADGE_COLOURS[health],
            health,
            note,
        )

    @admin.display(description="lease")
    def lease_left(self, service: Service) -> str:
        now: datetime = timezone.now()
        left = (service.expires_at - now).total_seconds()
        if left > 0:
            text = f"{_seconds(left)} left"
        else:
            removal = left + service.deregister_after
            tail = f"removal in {_seconds(removal)}" if removal > 0 else "removal due"
            text = f"lapsed {_seconds(left)} ago, {tail}"
        return format_html('<span style="white-space:nowrap">{}</span>', text)

    @admin.display(description="lease expires at")
    def live_lease_expires_at(self, service: Service) -> str:
        return _when(service.expires_at)

    @admin.display(description="last heartbeat")
    def last_heartbeat_at(self, service: Service) -> str:
        return _when(service.last_heartbeat)

    @admin.display(description="labels")
    def labels_display(self, service: Service) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(service.labels.items())) or "-"

    @admin.action(description="Deregister selected services", permissions=["delete"])
    def deregister(self, request: HttpRequest, queryset: QuerySet) -> None:
        removed = 0
        for service_id in queryset.values_list("pk", flat=True):
            try:
                leases.deregister(service_id, None)
                removed += 1
            except leases.ServiceNotFound:
                pass
        self.message_user(request, f"Deregistered {removed} service(s).", messages.SUCCESS)

    @admin.display(description="weight", ordering="weight")
    def weight_display(self, service: Service) -> str:
        if service.drained:
            return format_html(
                '0 <span style="{}">drained</span>', "background:#555;color:#fff;padding:1px 6px;border-radius:8px"
            )
        return format_html("{}{}", service.weight, " (operator)" if service.operator_weight is not None else "")

    @admin.action(description="Drain selected services (never selected, kept across restarts)", permissions=["change"])
    def drain(self, request: HttpRequest, queryset: QuerySet) -> None:
        changed = leases.drain(list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"Drained {changed} service(s): weight 0 until undrained.", messages.SUCCESS)

    @admin.action(description="Undrain selected services (restore their weight)", permissions=["change"])
    def undrain(self, request: HttpRequest, queryset: QuerySet) -> None:
        changed = leases.undrain(list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"Undrained {changed} service(s): their previous weight is back.", messages.SUCCESS)

    @admin.action(description="Clear the operator weight of selected services", permissions=["change"])
    def clear_operator_weight(self, request: HttpRequest, queryset: QuerySet) -> None:
        changed = leases.set_operator_weight(list(queryset.values_list("pk", flat=True)), None)
        self.message_user(request, f"{changed} service(s) back to the weight they registered with.", messages.SUCCESS)

    def delete_model(self, request: HttpRequest, obj: Service) -> None:
        with contextlib.suppress(leases.ServiceNotFound):
            leases.deregister(obj.pk, None)

    def save_model(self, request: HttpRequest, obj: Service, form: Any, change: bool) -> None:
        # Only the operator weight is editable here; the domain recomputes the weight in effect.
        leases.set_operator_weight([obj.pk], obj.operator_weight)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "key_prefix", "is_staff", "is_active", "service_count", "created_at"]
    list_filter = ["is_staff", "is_active"]
    search_fields = ["name", "key_prefix"]
    readonly_fields = ["key_prefix", "created_at"]
    fields = ["name", "is_staff", "is_active", "key_prefix", "created_at"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(n_services=Count("services"))

    @admin.display(description="services", ordering="n_services")
    def service_count(self, token: ApiToken) -> int:
        return token.n_services

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        if not change:
            key = ApiToken.generate_key()
            obj.set_key(key)
            super().save_model(request, obj, form, change)
            self.message_user(
                request,
                f"Token {obj.name!r} created. Its key, shown only this once: {key}",
                messages.WARNING,
            )
            return
        super().save_model(request, obj, form, change)


@admin.register(LeaderTerm)
class LeaderTermAdmin(admin.ModelAdmin):
    """Who runs the periodic jobs now; its term is the fencing token every job write is checked against."""

    list_display = ["name", "holder", "term", "time_left", "updated_at"]
    fields = ["name", "holder", "term", "expires_at", "time_left", "terms_table", "runs_table"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # deleting the row would restart the fencing tokens

    @admin.display(description="lock")
    def time_left(self, row: LeaderTerm) -> str:
        if row.expires_at is None:
            return "-"
        left = (row.expires_at - timezone.now()).total_seconds()
        return f"{_seconds(left)} left" if left > 0 else f"lapsed {_seconds(left)} ago (no current leader)"

    @admin.display(description="terms (latest 50)")
    def terms_table(self, row: LeaderTerm) -> str:
        terms = LeaderTermHistory.objects.filter(name=row.name).order_by("-term")[:50]
        body = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", ((t.term, t.holder, _when(t.started_at)) for t in terms)
        )
        return format_html("<table><tr><th>term</th><th>holder</th><th>started</th></tr>{}</table>", body)

    @admin.display(description="job runs (latest 50 committed writes)")
    def runs_table(self, row: LeaderTerm) -> str:
        runs = LeaderJobRun.objects.filter(name=row.name).order_by("-id")[:50]
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((r.job, r.term, r.holder, r.items, _when(r.at)) for r in runs),
        )
        return format_html(
            "<table><tr><th>job</th><th>term</th><th>holder</th><th>items</th><th>at</th></tr>{}</table>", body
        )


@admin.register(LeaseStoreState)
class LeaseStoreStateAdmin(admin.ModelAdmin):
    """The leader's last continuity check of the Redis lease store (see registry/outage.py): read-only."""

    list_display = ["__str__", "run_id", "unreachable_at", "graced_at"]
    fields = ["run_id", "unreachable_at", "graced_at"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # forgetting the last run_id would hide the next restart
