"""Group events for websocket subscribers: `group.assignment` to /ws/groups/{g}/, `member.assignment` (and
`member.removed`) to /ws/groups/{g}/members/{m}/. Built from a fresh read after the commit, so a message
never shows a state that was rolled back, and it always carries the generation it describes. Member
messages carry the ``member_epoch`` they are about: a socket of another incarnation closes on them."""

from __future__ import annotations

from typing import Any

from registry.push import after_commit, channel_group, send_now

from .assignments import member_views
from .models import ServiceGroup

FENCED = "fenced"  # member.removed reason: a later join of the same id fenced this incarnation


def group_stream(group_id: str) -> str:
    return channel_group("group", group_id)


def all_groups_stream() -> str:
    """Every group's ``group.assignment``, for the staff stream (``registry.admin_stream``)."""
    return channel_group("group", "*")  # "*" is no identifier, so no group's stream has this name


def member_stream(group_id: str, member_id: str) -> str:
    return channel_group("member", group_id, member_id)


def group_message(group: ServiceGroup) -> dict[str, Any]:
    views = member_views(group)
    return {
        "type": "group.assignment",
        "group_id": group.group_id,
        "generation": group.generation,
        "version": group.version,
        "state": group.state,
        "topics": group.topics,
        "members": [
            {k: v for k, v in views[m].as_dict().items() if k not in ("group_id", "generation", "version")}
            for m in sorted(views)
        ],
    }


def member_message(assignment: Any) -> dict[str, Any]:
    return {"type": "member.assignment", **assignment.as_dict()}


def publish_group(group_id: str) -> None:
    group = ServiceGroup.objects.prefetch_related("members").filter(pk=group_id).first()
    if group is None:
        return
    message = group_message(group)
    send_now(group_stream(group_id), message)
    send_now(all_groups_stream(), message)
    for member in message["members"]:
        send_now(
            member_stream(group_id, member["member_id"]),
            {
                "type": "member.assignment",
                "group_id": group_id,
                "generation": group.generation,
                "version": group.version,
                **member,
            },
        )


def group_changed(group_id: str) -> None:
    after_commit(lambda: publish_group(group_id))


def member_removed(
    group_id: str, member_id: str, generation: int, version: int, reason: str, member_epoch: int | None = None
) -> None:
    """Tell the member's sockets it is gone (they close). ``member_epoch``: the incarnation removed, so
    a later incarnation's sockets stay open; None for whichever is current."""
    payload = {
        "type": "member.removed",
        "group_id": group_id,
        "member_id": member_id,
        "generation": generation,
        "version": version,
        "reason": reason,
        "member_epoch": member_epoch,
    }
    after_commit(lambda: send_now(member_stream(group_id, member_id), payload))
