"""Operators' admin for consumer groups: generations and state, members with owned, revoking and pending
partitions, rebalance history, topics (grow only), the owner and granted tokens of groups and topics, and
the actions force rebalance and remove member."""

from __future__ import annotations

import contextlib
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from registry import lease_store
from registry.dashboard import ReconcilingFilter
from registry.redis_client import get_redis

from . import membership, quotas, rebalance, topics
from .assignments import member_views
from .models import GroupMember, GroupState, RebalanceEvent, ServiceGroup, Topic

STATE_COLOURS = {GroupState.STABLE: "#1e7e34", GroupState.RECONCILING: "#c77c02", GroupState.EMPTY: "#6c757d"}


def _partitions(by_topic: dict[str, list[int]]) -> str:
    if not by_topic:
        return "-"
    return "; ".join(f"{topic}: {_ranges(numbers)}" for topic, numbers in sorted(by_topic.items()))


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


def _session_left(group_id: str, member_id: str, deadlines: dict[tuple[str, str], int]) -> str:
    deadline = deadlines.get((group_id, member_id))
    if deadline is None:
        return "no session"
    left = (deadline - lease_store.to_ms(timezone.now())) / 1000
    return f"{left:.0f}s left" if left > 0 else f"expired {-left:.0f}s ago"


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
class TopicAdmin(admin.ModelAdmin):
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
class ServiceGroupAdmin(admin.ModelAdmin):
    list_display = ["group_id", "generation", "state_badge", "member_count", "topic_list", "owner", "updated_at"]
    list_filter = ["state", ReconcilingFilter, "owner"]
    search_fields = ["group_id", "members__member_id"]
    actions = ["force_rebalance"]
    readonly_fields = ["group_id", "generation", "state_badge", "topic_list", "members_table", "history_table"]
    # Who may join: the owner (the token whose join created the group), the granted tokens, and staff.
    fields = [*readonly_fields[:4], "owner", "grants", *readonly_fields[4:]]
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

    @admin.display(description="members and their partitions")
    def members_table(self, group: ServiceGroup) -> str:
        views = member_views(group)
        members = list(group.members.all())
        deadlines = lease_store.session_deadlines(get_redis(), [(group.group_id, m.member_id) for m in members])
        if not members:
            return "no members"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    m.member_id,
                    m.service_name,
                    _session_left(group.group_id, m.member_id, deadlines),
                    m.acked_generation,
                    _partitions(views[m.member_id].assigned_partitions),
                    _partitions(views[m.member_id].revoking),
                    _partitions(views[m.member_id].pending),
                )
                for m in members
            ),
        )
        return format_html(
            "<table><thead><tr><th>member</th><th>service</th><th>session</th><th>confirmed generation</th>"
            "<th>owns</th><th>revoking (still owns)</th><th>pending (will own)</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="rebalance history (latest 50)")
    def history_table(self, group: ServiceGroup) -> str:
        events = list(group.history.order_by("-generation")[:50])
        if not events:
            return "none yet"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td></tr>",
            (
                (
                    e.generation,
                    e.get_reason_display(),
                    e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    ", ".join(e.members_before) or "-",
                    ", ".join(e.members_after) or "-",
                    e.partitions_moved,
                    f"{e.duration_ms:.1f}",
                )
                for e in events
            ),
        )
        return format_html(
            "<table><thead><tr><th>generation</th><th>reason</th><th>at (UTC)</th><th>members before</th>"
            "<th>members after</th><th>partitions moved</th><th>took</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.action(description="Force a rebalance (new generation)", permissions=["change"])
    def force_rebalance(self, request: HttpRequest, queryset: QuerySet) -> None:
        now = timezone.now()
        done = [
            rebalance.force_rebalance(group_id, now).generation for group_id in queryset.values_list("pk", flat=True)
        ]
        self.message_user(request, f"Rebalanced {len(done)} group(s).", messages.SUCCESS)


@admin.register(GroupMember)
class GroupMemberAdmin(admin.ModelAdmin):
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

    @admin.action(description="Remove selected members from their groups (rebalances)", permissions=["delete"])
    def remove_member(self, request: HttpRequest, queryset: QuerySet) -> None:
        now = timezone.now()
        removed = 0
        for group_id, member_id in queryset.values_list("group_id", "member_id"):
            try:
                membership.leave(group_id, member_id, None, now)
                removed += 1
            except membership.MemberNotFound:
                pass
        self.message_user(request, f"Removed {removed} member(s).", messages.SUCCESS)

    def delete_model(self, request: HttpRequest, obj: GroupMember) -> None:
        with contextlib.suppress(membership.MemberNotFound):
            membership.leave(obj.group_id, obj.member_id, None, timezone.now())


@admin.register(RebalanceEvent)
class RebalanceEventAdmin(admin.ModelAdmin):
    list_display = ["group", "generation", "reason", "partitions_moved", "duration_ms", "created_at"]
    list_filter = ["reason", "group"]
    search_fields = ["group__group_id"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # history is a record: read only
