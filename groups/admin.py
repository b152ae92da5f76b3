"""Operators' admin for consumer groups: generations and state, members with owned, revoking and pending
partitions, rebalance history, topics (grow only), the owner and granted tokens of groups and topics, and
the actions force rebalance and remove member."""

from __future__ import annotations

import contextlib
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from registry import lease_store
from registry.admin_display import countdown, duration, scroll, when
from registry.audit import AuditedActions, log_admin_action
from registry.dashboard import ReconcilingFilter
from registry.models import Service
from registry.redis_client import get_redis

from . import membership, previews, quotas, rebalance, topics
from .assignments import member_views
from .models import GroupMember, GroupState, RebalanceEvent, ServiceGroup, Topic

STATE_COLOURS = {GroupState.STABLE: "#1e7e34", GroupState.RECONCILING: "#c77c02", GroupState.EMPTY: "#6c757d"}


def _partitions(by_topic: dict[str, list[int]]) -> str:
    if not by_topic:
        return "-"
    return "; ".join(f"{topic}: {_ranges(numbers)}" for topic, numbers in sorted(by_topic.items()))


def _count(by_topic: dict[str, list[int]]) -> int:
    return sum(len(numbers) for numbers in by_topic.values())


def _views(group: ServiceGroup) -> dict[str, Any]:
    """The members' views, read once per page (the skew and the members table both show them)."""
    if not hasattr(group, "_member_views"):
        group._member_views = member_views(group)  # type: ignore[attr-defined]
    return group._member_views  # type: ignore[attr-defined]


def _counted(by_topic: dict[str, list[int]]) -> str:
    """How many partitions, then which: ``<b class="conveyor-count">6</b> orders: 6-11``."""
    count = _count(by_topic)
    if not count:
        return mark_safe('<b class="conveyor-count">0</b>')
    return format_html(
        '<b class="conveyor-count">{}</b> <span class="conveyor-nowrap">{}</span>', count, _partitions(by_topic)
    )


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'"""
    parts, start, prev = [], None, None
    for n in sorted(numbers):
        if start is None:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = n
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


class TopicForm(forms.ModelForm):
    class Meta:
        model = Topic
        fields = ["name", "partitions", "owner", "grants"]

    def clean_partitions(self) -> int:
        partitions = self.cleaned_data["partitions"]
        limit = quotas.max_partitions()
        if not 1 <= partitions <= limit:
            raise forms.ValidationError(f"between 1 and {limit} (REGISTRY_MAX_PARTITIONS_PER_TOPIC)")
        if self.instance.pk and partitions < self.instance.partitions:
            raise forms.ValidationError(
                f"topics can grow but never shrink (it has {self.instance.partitions} partitions)"
            )
        return partitions


@admin.register(Topic)
class TopicAdmin(AuditedActions, admin.ModelAdmin):
    form = TopicForm
    list_display = ["name", "partitions", "owner", "groups_reading", "updated_at"]
    list_filter = ["owner"]
    search_fields = ["name"]
    actions = ["delete_unread"]
    filter_horizontal = ["grants"]

    def get_readonly_fields(self, request: HttpRequest, obj: Topic | None = None) -> list[str]:
        return ["name"] if obj else []

    @admin.display(description="groups reading it")
    def groups_reading(self, topic: Topic) -> str:
        return ", ".join(topics.groups_reading(topic.name)) or "-"

    def save_model(self, request: HttpRequest, obj: Topic, form: Any, change: bool) -> None:
        # Through the domain function, so groups reading the topic rebalance onto new partitions. Then
        # the owner alone (the grants are saved with the form's many-to-many data).
        topics.put_topic(obj.name, obj.partitions, timezone.now())
        Topic.objects.filter(pk=obj.pk).update(owner=obj.owner)

    def has_delete_permission(self, request: HttpRequest, obj: Topic | None = None) -> bool:
        # A topic a group reads cannot be deleted: its partitions would vanish under their owners.
        if obj is not None and topics.groups_reading(obj.name):
            return False
        return super().has_delete_permission(request, obj)

    def delete_model(self, request: HttpRequest, obj: Topic) -> None:
        topics.delete_topic(obj.name)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # replaced by delete_unread, which goes through the domain
        return actions

    @admin.action(description="Delete selected topics that no group reads", permissions=["delete"])
    def delete_unread(self, request: HttpRequest, queryset: QuerySet) -> None:
        deleted = 0
        for name in queryset.values_list("name", flat=True):
            try:
                topics.delete_topic(name)
                deleted += 1
            except topics.TopicInUse as exc:
                self.message_user(request, f"Not deleted: {exc}", messages.ERROR)
        if deleted:
            self.message_user(request, f"Deleted {deleted} topic(s).", messages.SUCCESS)


@admin.register(ServiceGroup)
class ServiceGroupAdmin(AuditedActions, admin.ModelAdmin):
    list_display = ["group_id", "generation", "state_badge", "member_count", "topic_list", "owner", "updated_at"]
    list_filter = ["state", ReconcilingFilter, "owner"]
    search_fields = ["group_id", "members__member_id"]
    list_select_related = ["owner"]  # nullable: the admin would not join it by itself (one query per row)
    actions = ["force_rebalance"]
    readonly_fields = ["group_id", "generation", "state_badge", "topic_list", "skew", "members_table", "history_table"]
    # Who may join: the owner (the token whose join created the group), the granted tokens, and staff.
    fields = [*readonly_fields[:5], "owner", "grants", *readonly_fields[5:]]
    filter_horizontal = ["grants"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(n_members=Count("members", distinct=True))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # groups come into being when a member joins

    def save_model(self, request: HttpRequest, obj: ServiceGroup, form: Any, change: bool) -> None:
        # The owner alone: the rest of the row (generation, state...) changes under the group lock only,
        # and the copy this form loaded may be stale by now. Grants are saved with the form's M2M data.
        obj.save(update_fields=["owner"])

    def has_delete_permission(self, request: HttpRequest, obj: ServiceGroup | None = None) -> bool:
        # Only an empty group: members leave through "remove member", which rebalances.
        return super().has_delete_permission(request, obj) and (obj is None or not obj.members.exists())

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # would drop groups with members without a rebalance
        return actions

    @admin.display(description="members", ordering="n_members")
    def member_count(self, group: ServiceGroup) -> int:
        return group.n_members

    @admin.display(description="state")
    def state_badge(self, group: ServiceGroup) -> str:
        return format_html(
            '<span style="background:{};color:#fff;padding:2px 8px;border-radius:10px;font-weight:600">{}</span>',
            STATE_COLOURS[group.state],
            group.state,
        )

    @admin.display(description="topics")
    def topic_list(self, group: ServiceGroup) -> str:
        return ", ".join(group.topics) or "-"

    @admin.display(description="skew")
    def skew(self, group: ServiceGroup) -> str:
        owned = [_count(view.assigned_partitions) for view in _views(group).values()]
        if not owned:
            return "-"
        spread = max(owned) - min(owned)
        return format_html(
            '<span class="{}" title="most minus fewest partitions owned by one member">{} (owned: {} to {})</span>',
            "conveyor-skew-warn" if spread > 1 else "",
            spread,
            min(owned),
            max(owned),
        )

    @admin.display(description="members and their partitions")
    def members_table(self, group: ServiceGroup) -> str:
        views = _views(group)
        # the members of the views' snapshot: one that joined since is shown by the next refresh
        members = [m for m in group.members.all() if m.member_id in views]
        if not members:
            return "no members"
        deadlines = lease_store.session_deadlines(get_redis(), [(group.group_id, m.member_id) for m in members])
        services = set(Service.objects.filter(pk__in=[m.member_id for m in members]).values_list("pk", flat=True))
        now = timezone.now()

        def member_cell(member: GroupMember) -> str:
            if member.member_id in services:
                url = reverse("admin:registry_service_change", args=[quote(member.member_id)])
                return format_html('<a href="{}" title="its service">{}</a>', url, member.member_id)
            return member.member_id

        def session_cell(member: GroupMember) -> str:
            deadline = deadlines.get((group.group_id, member.member_id))
            return countdown(lease_store.from_ms(deadline), now) if deadline is not None else "no session"

        def remove_cell(member: GroupMember) -> str:
            url = reverse("admin:groups_servicegroup_remove_member", args=[quote(group.pk), member.member_id])
            return format_html('<a class="button conveyor-remove" href="{}">remove…</a>', url)

        rows = format_html_join(
            "",
            '<tr data-member="{}"><td>{}</td><td>{}</td><td>{}</td><td class="n">{}</td><td>{}</td><td>{}</td>'
            "<td>{}</td><td>{}</td></tr>",
            (
                (
                    m.member_id,
                    member_cell(m),
                    m.service_name,
                    session_cell(m),
                    m.acked_generation,
                    _counted(views[m.member_id].assigned_partitions),
                    _counted(views[m.member_id].revoking),
                    _counted(views[m.member_id].pending),
                    remove_cell(m),
                )
                for m in members
            ),
        )
        return scroll(
            format_html(
                '<table class="conveyor-members"><thead><tr><th>member</th><th>service</th><th>session</th>'
                '<th title="the latest generation the member confirmed">confirmed</th><th>owns</th>'
                '<th title="still owned; handed over once the member confirms">revoking</th>'
                '<th title="will own once the previous owner lets go">pending</th><th></th></tr></thead>'
                "<tbody>{}</tbody></table>",
                rows,
            )
        )

    @admin.display(description="rebalance history (latest 50)")
    def history_table(self, group: ServiceGroup) -> str:
        events = list(group.history.order_by("-generation")[:50])
        if not events:
            return "none yet"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    e.generation,
                    e.detail or e.get_reason_display(),
                    when(e.created_at),
                    ", ".join(e.members_before) or "-",
                    ", ".join(e.members_after) or "-",
                    e.partitions_moved,
                    f"{e.duration_ms:.1f} ms" if e.duration_ms < 1000 else duration(e.duration_ms / 1000),
                )
                for e in events
            ),
        )
        return scroll(
            format_html(
                "<table><thead><tr><th>generation</th><th>reason</th><th>at</th><th>members before</th>"
                "<th>members after</th><th>partitions moved</th><th>took</th></tr></thead><tbody>{}</tbody></table>",
                rows,
            )
        )

    def get_urls(self) -> list[Any]:
        wrap = self.admin_site.admin_view
        return [
            path("<path:object_id>/rebalance/", wrap(self.rebalance_view), name="groups_servicegroup_rebalance"),
            path(
                "<path:object_id>/members/<str:member_id>/remove/",
                wrap(self.remove_member_view),
                name="groups_servicegroup_remove_member",
            ),
            *super().get_urls(),
        ]

    def _group_or_redirect(self, request: HttpRequest, object_id: str) -> ServiceGroup | HttpResponse:
        group = self.get_object(request, unquote(object_id))
        if group is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        return group

    def _confirmation(
        self, request: HttpRequest, group: ServiceGroup, template: str, **context: Any
    ) -> TemplateResponse:
        return TemplateResponse(
            request,
            template,
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "group": group,
                "group_url": reverse("admin:groups_servicegroup_change", args=[quote(group.pk)]),
                **context,
            },
        )

    def rebalance_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Force a rebalance from the group page: first what will move, then the new generation."""
        group = self._group_or_redirect(request, object_id)
        if not isinstance(group, ServiceGroup):
            return group
        if not self.has_change_permission(request, group):
            raise PermissionDenied
        group_url = reverse("admin:groups_servicegroup_change", args=[quote(group.pk)])
        if request.method == "POST" and request.POST.get("post") == "yes":
            try:
                event = rebalance.force_rebalance(group.pk, timezone.now())
                log_admin_action(request, [group], "force rebalance", detail=f"generation {event.generation}")
            except rebalance.GroupNotFound:
                self.message_user(request, f"Group {group.pk!r} no longer exists.", messages.ERROR)
                return redirect("admin:groups_servicegroup_changelist")
            self.message_user(
                request,
                f"Group {group.pk} rebalanced: now at generation {event.generation} "
                f"({event.partitions_moved} partition(s) moved).",
                messages.SUCCESS,
            )
            return redirect(group_url)
        preview = previews.plan(group)
        return self._confirmation(
            request,
            group,
            "admin/groups/servicegroup/rebalance_confirmation.html",
            title=f"Force a rebalance of {group.pk}?",
            plan=preview,
            pairs=preview.moves_by_pair(),
        )

    def remove_member_view(self, request: HttpRequest, object_id: str, member_id: str) -> HttpResponse:
        """Remove one member from the group page: first what is revoked and where it goes, then the new
        generation."""
        group = self._group_or_redirect(request, object_id)
        if not isinstance(group, ServiceGroup):
            return group
        if not request.user.has_perm("groups.delete_groupmember"):
            raise PermissionDenied
        group_url = reverse("admin:groups_servicegroup_change", args=[quote(group.pk)])
        member = group.members.filter(member_id=member_id).first()
        if member is None:
            self.message_user(request, f"Group {group.pk} has no member {member_id!r} (any more).", messages.WARNING)
            return redirect(group_url)
        if request.method == "POST" and request.POST.get("post") == "yes":
            try:
                membership.remove_by_operator(group.pk, member_id, request.user.get_username(), timezone.now())
                log_admin_action(request, [member], "remove member", deletion=True)
            except membership.MemberNotFound:
                self.message_user(request, f"Member {member_id} had already left {group.pk}.", messages.WARNING)
                return redirect(group_url)
            generation = ServiceGroup.objects.filter(pk=group.pk).values_list("generation", flat=True).first()
            self.message_user(
                request,
                f"Removed {member_id} from {group.pk}: the group is now at generation {generation}.",
                messages.SUCCESS,
            )
            return redirect(group_url)
        preview = previews.plan(group, without=member_id)
        return self._confirmation(
            request,
            group,
            "admin/groups/servicegroup/remove_member_confirmation.html",
            title=f"Remove {member_id} from {group.pk}?",
            member=member,
            plan=preview,
            pairs=preview.moves_by_pair(),
            revoked=_partitions(preview.revoked),
            revoked_count=_count(preview.revoked),
        )

    @admin.action(description="Force a rebalance (new generation)", permissions=["change"])
    def force_rebalance(self, request: HttpRequest, queryset: QuerySet) -> None:
        now = timezone.now()
        done = [
            f"{group_id} to generation {rebalance.force_rebalance(group_id, now).generation}"
            for group_id in queryset.values_list("pk", flat=True)
        ]
        self.message_user(request, f"Rebalanced {len(done)} group(s): {', '.join(done)}.", messages.SUCCESS)


@admin.register(GroupMember)
class GroupMemberAdmin(AuditedActions, admin.ModelAdmin):
    list_display = [
        "member_id",
        "group",
        "service_name",
        "topic_list",
        "session_timeout",
        "acked_generation",
        "member_epoch",
        "static",
        "joined_at",
    ]
    list_filter = ["group"]
    search_fields = ["member_id", "service_name", "group__group_id"]
    actions = ["remove_member"]
    readonly_fields = [
        "group",
        "member_id",
        "service_name",
        "topics",
        "session_timeout",
        "joined_at",
        "acked_generation",
        "member_epoch",
        "static",
        "owner",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # "remove member" also rebalances
        return actions

    @admin.display(description="topics")
    def topic_list(self, member: GroupMember) -> str:
        return ", ".join(member.topics)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a member's record is the member's own: read only (remove it with "remove member")

    @admin.action(description="Remove selected members from their groups (rebalances)", permissions=["delete"])
    def remove_member(self, request: HttpRequest, queryset: QuerySet) -> TemplateResponse | None:
        pairs = list(queryset.order_by("group_id", "member_id").values_list("group_id", "member_id"))
        if request.POST.get("post") != "yes":
            views = {}
            for group in ServiceGroup.objects.filter(pk__in={g for g, _m in pairs}):
                views[group.pk] = (group.generation, member_views(group))
            affected = []
            next_generation = {group_id: generation for group_id, (generation, _v) in views.items()}
            for group_id, member_id in pairs:
                if group_id in views and member_id in views[group_id][1]:
                    next_generation[group_id] += 1  # one rebalance per member removed
                    owned = _partitions(views[group_id][1][member_id].assigned_partitions)
                    affected.append((group_id, member_id, next_generation[group_id], owned))
            context = {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": f"Remove {len(pairs)} member(s)?",
                "affected": affected,
                "groups": sorted(views),
                "selected": list(queryset.values_list("pk", flat=True)),
                "select_across": request.POST.get("select_across", "0"),
                "action": "remove_member",
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/groups/groupmember/remove_confirmation.html", context)
        now = timezone.now()
        removed = []
        for group_id, member_id in pairs:
            try:
                membership.remove_by_operator(group_id, member_id, request.user.get_username(), now)
            except membership.MemberNotFound:
                continue
            removed.append(group_id)
        generations = dict(ServiceGroup.objects.filter(pk__in=removed).values_list("pk", "generation"))
        now_at = ", ".join(f"{g} at generation {n}" for g, n in sorted(generations.items()))
        self.message_user(
            request, f"Removed {len(removed)} member(s)." + (f" Now {now_at}." if now_at else ""), messages.SUCCESS
        )
        return None

    def delete_view(self, request: HttpRequest, object_id: str, extra_context: Any = None) -> HttpResponse:
        # One removal, through the group's confirmation step (what is revoked, the new generation).
        member = self.get_object(request, unquote(object_id))
        if member is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        return redirect("admin:groups_servicegroup_remove_member", quote(member.group_id), member.member_id)

    def delete_model(self, request: HttpRequest, obj: GroupMember) -> None:
        with contextlib.suppress(membership.MemberNotFound):
            membership.remove_by_operator(obj.group_id, obj.member_id, request.user.get_username(), timezone.now())


@admin.register(RebalanceEvent)
class RebalanceEventAdmin(admin.ModelAdmin):
    list_display = ["group", "generation", "reason", "partitions_moved", "duration_ms", "created_at"]
    list_filter = ["reason", "group"]
    search_fields = ["group__group_id"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # history is a record: read only

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
