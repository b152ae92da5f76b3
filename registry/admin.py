"""Operators' admin: services with effective health and lease time left, deregister and drain; API tokens."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.views.main import ChangeList
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from groups.models import GroupMember

from . import leases
from .admin_display import badge, countdown, duration, scroll, truncated, when
from .admin_filters import health_rank, ids_by_deadline, natural_id, search_selector
from .audit import AuditedActions
from .dashboard import LeaseFilter
from .history_admin import RemovedServiceRedirect  # also registers the lifecycle log and the audit trail
from .models import ApiToken, Health, LeaderJobRun, LeaderTerm, LeaderTermHistory, LeaseStoreState, Service

BADGE_COLOURS = {
    Health.HEALTHY: "#1e7e34",
    Health.DEGRADED: "#c77c02",
    Health.UNHEALTHY: "#c0392b",
    Health.UNKNOWN: "#6c757d",
}
DRAINED_COLOUR = "#4a4a8a"


class EffectiveHealthFilter(admin.SimpleListFilter):
    title = "health"
    parameter_name = "health"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(Health.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() in Health.values:
            return queryset.with_effective_health(self.value(), leases.lapsed_ids(timezone.now()))
        return queryset


# The lease column's sort key: a stand-in the change list replaces with the live deadlines in Redis.
LEASE_ORDER = "lease_expires_at"


class LiveLeaseChangeList(ChangeList):
    lease_sort: str | None = None  # "asc" (lapsed first) or "desc" when the lease column leads the order

    def get_ordering(self, request: HttpRequest, queryset: QuerySet) -> list[Any]:
        ordering = super().get_ordering(request, queryset)
        first = ordering[0] if ordering else None
        if isinstance(first, str) and first.lstrip("-") == LEASE_ORDER:
            self.lease_sort = "desc" if first.startswith("-") else "asc"
        return ordering

    def get_results(self, request: HttpRequest) -> None:
        super().get_results(request)
        if self.lease_sort:
            # Deadlines live in Redis: order the filtered ids by them, then read this page's rows.
            ids = ids_by_deadline(self.queryset, descending=self.lease_sort == "desc")
            if self.multi_page and not (self.show_all and self.can_show_all):
                ids = ids[(self.page_num - 1) * self.list_per_page : self.page_num * self.list_per_page]
            rows = self.root_queryset.order_by().in_bulk(ids)
            self.result_list = [rows[pk] for pk in ids if pk in rows]
        # One Redis round trip for the page, so health and time left are current.
        self.result_list = leases.attach_live_leases(self.result_list)


def _group_memberships(services: list[Service]) -> list[tuple[str, str, bool]]:
    """(group id, member id, removed with the service) for every group member sharing a service's id:
    a service's removal takes the members its own token joined with it (groups.receivers)."""
    owners = {s.service_id: s.owner_id for s in services}
    rows = GroupMember.objects.filter(member_id__in=list(owners)).order_by("group_id", "member_id")
    return [
        (group_id, member_id, owner_id is not None and owner_id == owners[member_id])
        for group_id, member_id, owner_id in rows.values_list("group_id", "member_id", "owner_id")
    ]


@admin.register(Service)
class ServiceAdmin(AuditedActions, RemovedServiceRedirect, admin.ModelAdmin):
    list_display = [
        "id_cell",
        "name_cell",
        "type_cell",
        "health_badge",
        "lease_left",
        "endpoint_cell",
        "labels_cell",
        "group_cell",
        "weight_display",
        "registered",
    ]
    list_display_links = ["id_cell"]
    list_filter = [
        "service_type",
        EffectiveHealthFilter,
        LeaseFilter,
        ("service_name", admin.AllValuesFieldListFilter),
        ("group_id", admin.AllValuesFieldListFilter),
        "drained",
    ]
    search_fields = ["service_id", "service_name", "endpoint", "label_rows__key", "label_rows__value"]
    search_help_text = "Search id, name, endpoint or label; k=v (or k=v,k2=v2) matches labels exactly."
    actions = ["deregister", "drain", "undrain", "clear_operator_weight"]
    list_per_page = 100
    # Ids in natural order (svc-2 before svc-10), sorted and paged by the database.
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
                    "lease_duration_display",
                    "deregister_after_display",
                    "registered",
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

    def get_ordering(self, request: HttpRequest) -> list[str]:
        # Not the ``ordering`` attribute: the admin's checks accept only model fields there, and natural_id is
        # an annotation (get_queryset).
        return ["service_name", "natural_id"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # Annotated before ordering (ModelAdmin.get_queryset orders first), so both sort keys can be ordered by.
        queryset = self.model._default_manager.get_queryset().annotate(
            natural_id=natural_id("service_id"),
            health_rank=health_rank(leases.lapsed_ids(timezone.now())),
        )
        return queryset.order_by(*self.get_ordering(request))

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return LiveLeaseChangeList

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> Any:
        # The table gets the width of the app list on the left (the breadcrumbs still lead everywhere),
        # so every column fits a 1440px screen.
        return super().changelist_view(request, {"is_nav_sidebar_enabled": False, **(extra_context or {})})

    def get_object(self, request: HttpRequest, object_id: str, from_field: str | None = None) -> Service | None:
        service = super().get_object(request, object_id, from_field)
        if service is not None:
            leases.attach_live_leases([service])
        return service

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        selector, problem = search_selector(search_term)
        if problem:
            messages.error(request, f"No search done: {problem}")
            return queryset.none(), False
        if selector is not None:
            return queryset.matching(selector), False
        return super().get_search_results(request, queryset, search_term)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # services register themselves through the API

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # "deregister" also clears the lease store
        return actions

    @admin.display(description="id", ordering="natural_id")
    def id_cell(self, service: Service) -> str:
        return truncated(service.service_id, "12em", keep_ends=20)

    @admin.display(description="name", ordering="service_name")
    def name_cell(self, service: Service) -> str:
        return truncated(service.service_name, "8em", keep_ends=12)

    @admin.display(description="type", ordering="service_type")
    def type_cell(self, service: Service) -> str:
        return service.service_type

    @admin.display(description="endpoint", ordering="endpoint")
    def endpoint_cell(self, service: Service) -> str:
        return truncated(service.endpoint, "11em", keep_ends=18)

    @admin.display(description="labels")
    def labels_cell(self, service: Service) -> str:
        return truncated(", ".join(f"{k}={v}" for k, v in sorted(service.labels.items())), "6.5em")

    @admin.display(description="group", ordering="group_id")
    def group_cell(self, service: Service) -> str:
        return truncated(service.group_id or "", "7em", keep_ends=11)

    @admin.display(description="health", ordering="health_rank")
    def health_badge(self, service: Service) -> str:
        health = service.effective_health(timezone.now())
        lapsed = health == Health.UNHEALTHY and service.health != Health.UNHEALTHY
        return format_html(
            '<span class="conveyor-nowrap">{}{}</span>',
            badge(
                health,
                BADGE_COLOURS[health],
                "lapsed" if lapsed else "",
                f"lease lapsed (it last reported {service.health})" if lapsed else f"reported {service.health}",
            ),
            badge("drained", DRAINED_COLOUR, "drained", "drained by an operator: never selected")
            if service.drained
            else "",
        )

    @admin.display(description="lease", ordering=LEASE_ORDER)
    def lease_left(self, service: Service) -> str:
        now: datetime = timezone.now()
        left = (service.expires_at - now).total_seconds()
        if left > 0:
            return countdown(service.expires_at, now)
        removal = left + service.deregister_after
        tail = f"removal in {duration(removal)}" if removal > 0 else "removal due"
        return countdown(
            service.expires_at, now, format_html('<span class="conveyor-muted conveyor-tail">{}</span>', tail)
        )

    @admin.display(description="lease expires at")
    def live_lease_expires_at(self, service: Service) -> str:
        return when(service.expires_at)

    @admin.display(description="last heartbeat")
    def last_heartbeat_at(self, service: Service) -> str:
        return when(service.last_heartbeat)

    @admin.display(description="registered", ordering="registered_at")
    def registered(self, service: Service) -> str:
        return when(service.registered_at)

    @admin.display(description="lease duration")
    def lease_duration_display(self, service: Service) -> str:
        return f"{duration(service.lease_duration)} (heartbeat every {duration(service.lease_duration / 3)})"

    @admin.display(description="deregister after")
    def deregister_after_display(self, service: Service) -> str:
        return f"{duration(service.deregister_after)} after the lease lapses"

    @admin.display(description="labels")
    def labels_display(self, service: Service) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(service.labels.items())) or "-"

    @admin.action(description="Deregister selected services", permissions=["delete"])
    def deregister(self, request: HttpRequest, queryset: QuerySet) -> TemplateResponse | None:
        if request.POST.get("post") != "yes":
            return self._confirm_deregister(request, queryset)
        removed = 0
        for service_id in queryset.values_list("pk", flat=True):
            try:
                leases.deregister(service_id, None)
                removed += 1
            except leases.ServiceNotFound:
                pass
        self.message_user(request, f"Deregistered {removed} service(s).", messages.SUCCESS)
        return None

    def _confirm_deregister(self, request: HttpRequest, queryset: QuerySet) -> TemplateResponse:
        """What a deregistration will do, like Django's delete confirmation; nothing changes until confirmed."""
        services = list(queryset.order_by("service_name", "natural_id")[: self.CONFIRM_SHOWN + 1])
        count = queryset.count()
        memberships = _group_memberships(services[: self.CONFIRM_SHOWN])
        context = {
            **self.admin_site.each_context(request),
            "title": f"Deregister {count} service(s)?",
            "opts": self.model._meta,
            "services": services[: self.CONFIRM_SHOWN],
            "more": max(0, count - self.CONFIRM_SHOWN),
            "count": count,
            "removed_members": [(g, m) for g, m, removed in memberships if removed],
            "kept_members": [(g, m) for g, m, removed in memberships if not removed],
            "groups": sorted({s.group_id for s in services[: self.CONFIRM_SHOWN] if s.group_id}),
            "selected": list(queryset.values_list("pk", flat=True)),
            "select_across": request.POST.get("select_across", "0"),
            "action": "deregister",
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/registry/service/deregister_confirmation.html", context)

    CONFIRM_SHOWN = 200  # services listed by name on a confirmation page; the rest are counted

    @admin.display(description="weight", ordering="weight")
    def weight_display(self, service: Service) -> str:
        if service.drained:
            return mark_safe('<span title="drained: see the badge beside health">0</span>')
        return format_html(
            "{}{}",
            service.weight,
            mark_safe(' <span class="conveyor-muted" title="set by an operator">(op)</span>')
            if service.operator_weight is not None
            else "",
        )

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

    def render_delete_form(self, request: HttpRequest, context: dict[str, Any]) -> Any:
        memberships = _group_memberships([context["object"]])
        context["removed_members"] = [(g, m) for g, m, removed in memberships if removed]
        return super().render_delete_form(request, context)

    def delete_model(self, request: HttpRequest, obj: Service) -> None:
        with contextlib.suppress(leases.ServiceNotFound):
            leases.deregister(obj.pk, None)

    def save_model(self, request: HttpRequest, obj: Service, form: Any, change: bool) -> None:
        # Only the operator weight is editable here; the domain recomputes the weight in effect.
        leases.set_operator_weight([obj.pk], obj.operator_weight)


def token_effects(tokens: list[ApiToken], shown: int = 50) -> dict[str, Any]:
    """What deleting ``tokens`` leaves behind: the services, groups, topics and group members they own
    (kept, ownerless: only staff tokens and grants may change them after) and the grants they lose."""
    from groups.models import ServiceGroup, Topic

    ids = [t.pk for t in tokens]
    services = Service.objects.filter(owner_id__in=ids).order_by("service_name", "service_id")
    members = GroupMember.objects.filter(owner_id__in=ids).order_by("group_id", "member_id")
    return {
        "owned_services": list(services.values_list("service_id", flat=True)[:shown]),
        "owned_services_count": services.count(),
        "owned_groups": list(ServiceGroup.objects.filter(owner_id__in=ids).values_list("group_id", flat=True)),
        "owned_topics": list(Topic.objects.filter(owner_id__in=ids).values_list("name", flat=True)),
        "joined_members": [f"{g}/{m}" for g, m in members.values_list("group_id", "member_id")[:shown]],
        "joined_members_count": members.count(),
        "granted_groups": list(
            ServiceGroup.objects.filter(grants__in=ids).distinct().values_list("group_id", flat=True)
        ),
    }


@admin.register(ApiToken)
class ApiTokenAdmin(AuditedActions, admin.ModelAdmin):
    list_display = ["name", "key_prefix", "is_staff", "is_active", "service_count", "created_at"]
    list_filter = ["is_staff", "is_active"]
    search_fields = ["name", "key_prefix"]
    readonly_fields = ["key_prefix", "created_at"]
    fields = ["name", "is_staff", "is_active", "key_prefix", "created_at"]

    actions = ["delete_tokens"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(n_services=Count("services"))

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # replaced by delete_tokens, which lists what each token owns
        return actions

    def render_delete_form(self, request: HttpRequest, context: dict[str, Any]) -> Any:
        context.update(token_effects([context["object"]]), tokens=[context["object"]])
        return super().render_delete_form(request, context)

    @admin.action(description="Delete selected API tokens", permissions=["delete"])
    def delete_tokens(self, request: HttpRequest, queryset: QuerySet) -> TemplateResponse | None:
        tokens = list(queryset.order_by("name"))
        if request.POST.get("post") != "yes":
            context = {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": f"Delete {len(tokens)} API token(s)?",
                "tokens": tokens,
                **token_effects(tokens),
                "selected": [t.pk for t in tokens],
                "select_across": request.POST.get("select_across", "0"),
                "action": "delete_tokens",
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/registry/apitoken/delete_tokens_confirmation.html", context)
        self.log_deletions(request, tokens)
        for token in tokens:
            token.delete()
        self.message_user(request, f"Deleted {len(tokens)} API token(s): {', '.join(t.name for t in tokens)}.")
        return None

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

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # written by the leader election only: read only

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # deleting the row would restart the fencing tokens

    @admin.display(description="lock")
    def time_left(self, row: LeaderTerm) -> str:
        if row.expires_at is None:
            return "-"
        now = timezone.now()
        tail = "" if row.expires_at > now else mark_safe('<span class="conveyor-muted"> (no current leader)</span>')
        return countdown(row.expires_at, now, tail)

    @admin.display(description="terms (latest 50)")
    def terms_table(self, row: LeaderTerm) -> str:
        terms = LeaderTermHistory.objects.filter(name=row.name).order_by("-term")[:50]
        body = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", ((t.term, t.holder, when(t.started_at)) for t in terms)
        )
        return scroll(format_html("<table><tr><th>term</th><th>holder</th><th>started</th></tr>{}</table>", body))

    @admin.display(description="job runs (latest 50 committed writes)")
    def runs_table(self, row: LeaderTerm) -> str:
        runs = LeaderJobRun.objects.filter(name=row.name).order_by("-id")[:50]
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((r.job, r.term, r.holder, r.items, when(r.at)) for r in runs),
        )
        return scroll(
            format_html(
                "<table><tr><th>job</th><th>term</th><th>holder</th><th>items</th><th>at</th></tr>{}</table>", body
            )
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
