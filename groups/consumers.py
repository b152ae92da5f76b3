"""Websocket streams of consumer groups: the whole group's assignment, and one member's (with acks)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.utils import timezone

from registry.consumers import PushConsumer
from registry.validators import shown
from registry.ws_auth import FORBIDDEN, NOT_FOUND

from . import events, incarnations, membership
from .assignments import assignment_of
from .models import ServiceGroup
from .serializers import MAX_GENERATION

FENCED = 4409  # another incarnation: a stale member_epoch, or fenced by a later join
REMOVED = 4410  # the member left, expired, or an operator removed it


class GroupConsumer(PushConsumer):
    """/ws/groups/{group_id}/: `group.assignment`, on connect and after every change."""

    missing = "no such group"

    def stream_name(self) -> str:
        return events.group_stream(self.scope["url_route"]["kwargs"]["group_id"])

    def current_state(self) -> dict[str, Any] | None:
        group = (
            ServiceGroup.objects.prefetch_related("members")
            .filter(pk=self.scope["url_route"]["kwargs"]["group_id"])
            .first()
        )
        return events.group_message(group) if group else None


class MemberConsumer(PushConsumer):
    """/ws/groups/{group_id}/members/{member_id}/?member_epoch=N (or a ``Member-Epoch`` header): one
    incarnation's stream of `member.assignment`; `{"type": "ack", "generation": N}` confirms a
    generation exactly like a member heartbeat of that incarnation.

    Another incarnation's epoch is refused at connect and on ack (an ``error`` with code
    ``fenced_member_epoch``, then close 4409). ``member.removed`` closes the socket: 4409 when a later
    join fenced this incarnation, 4410 for a leave, expiry or an operator's removal.
    """

    missing = "no such member in this group; join first"
    member_epoch = 0
    finished = False  # closed by the server: later pushes are dropped

    def stream_name(self) -> str:
        kwargs = self.scope["url_route"]["kwargs"]
        return events.member_stream(kwargs["group_id"], kwargs["member_id"])

    def input_problem(self) -> dict[str, Any] | None:
        problem = super().input_problem()
        if problem is not None:
            return problem
        raw = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get("member_epoch", [None])[0]
        for name, value in self.scope.get("headers", []):
            if raw is None and name == b"member-epoch":
                raw = value.decode("latin-1")
        if raw is None:
            detail = "member_epoch is required: the one your join answered, as ?member_epoch=N or a Member-Epoch header"
            return {"type": "error", "field": "member_epoch", "detail": detail}
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and 1 <= int(raw) <= MAX_GENERATION):
            detail = f"member_epoch: expected an integer 1..{MAX_GENERATION}, got {shown(raw)}"
            return {"type": "error", "field": "member_epoch", "detail": detail}
        self.member_epoch = int(raw)
        return None

    def current_state(self) -> dict[str, Any] | None:
        kwargs = self.scope["url_route"]["kwargs"]
        group = ServiceGroup.objects.filter(pk=kwargs["group_id"]).first()
        member = group.members.filter(member_id=kwargs["member_id"]).first() if group else None
        if member is None:
            return None
        if member.member_epoch != self.member_epoch:
            return incarnations.fenced_message(member, self.member_epoch)
        return events.member_message(assignment_of(group, member))

    async def forward(self, payload: dict[str, Any], text: str | None = None) -> None:
        if self.finished:
            return
        kind = payload.get("type")
        if kind == "error":  # the refusal of a fenced epoch at connect
            await self.finish(payload, FENCED)
        elif kind == "member.removed":
            removed = payload.get("member_epoch")
            if removed is not None and removed < self.member_epoch:
                return  # an earlier incarnation's removal
            await self.finish(payload, FENCED if payload.get("reason") == events.FENCED else REMOVED)
        elif kind == "member.assignment" and payload.get("member_epoch", 0) > self.member_epoch:
            # a later incarnation's assignment: this one was fenced (its removal message was lost)
            kw = self.scope["url_route"]["kwargs"]
            refusal = {
                "type": "error",
                "code": incarnations.FencedMemberEpoch.code,
                "detail": f"member {kw['member_id']!r} has a later incarnation; stop consuming and join again",
                "member_epoch": payload["member_epoch"],
            }
            await self.finish(refusal, FENCED)
        elif (
            kind == "member.assignment"
            and (payload.get("generation", 0), payload.get("version") or 0) <= self.last_order
        ):
            # Already sent (typically as the answer to this socket's own ack, which the broadcast of the
            # hand-over it caused repeats): one message per ack. Views of one (generation, version) differ
            # only in member_epoch, which a later incarnation's join changes without a version: that case
            # is handled above, and a socket of the later incarnation was opened after that join.
            return
        else:
            await super().forward(payload, text)

    async def finish(self, message: dict[str, Any], code: int) -> None:
        self.finished = True
        await self.send_json(message)
        await self.close(code=code)

    async def receive_json(self, content: dict[str, Any], **kwargs: Any) -> None:
        if content.get("type") != "ack":
            await super().receive_json(content)
            return
        generation = content.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool) or not 0 <= generation <= MAX_GENERATION:
            detail = f"ack needs an integer generation 0..{MAX_GENERATION}"
            await self.send_json({"type": "error", "field": "generation", "detail": detail})
            return
        if content.get("member_epoch", self.member_epoch) != self.member_epoch:
            detail = f"this socket belongs to member_epoch {self.member_epoch}; an ack may only confirm for it"
            await self.send_json({"type": "error", "field": "member_epoch", "detail": detail})
            return
        kw = self.scope["url_route"]["kwargs"]
        try:
            assignment = await database_sync_to_async(membership.heartbeat)(
                kw["group_id"], kw["member_id"], generation, self.member_epoch, self.scope["token"], timezone.now()
            )
        except membership.MemberNotFound as exc:
            await self.send_json({"type": "error", "detail": str(exc)})
            await self.close(code=NOT_FOUND)
            return
        except membership.NotOwner as exc:
            await self.send_json({"type": "error", "detail": str(exc)})
            await self.close(code=FORBIDDEN)
            return
        except incarnations.FencedMemberEpoch as exc:
            await self.finish({"type": "error", **exc.body()}, FENCED)
            return
        await self.answer(events.member_message(assignment))

    async def answer(self, message: dict[str, Any]) -> None:
        """The answer to an ack: always sent (exactly one per ack), read after the ack took effect, so it
        is at least as new as anything this socket was sent; a push of the same view is then dropped."""
        if self.finished:
            return
        self.last_order = max(self.last_order, (message.get("generation", 0), message.get("version") or 0))
        await self.send_json(message)
