"""The pure core of a consumer-group member, shared by ``conveyor.member`` and ``conveyor.aio.member``:
what the application holds, what the server last said, when the session was last confirmed, and the
next callback to make. No I/O and no clock of its own: the drivers pass ``time.monotonic()`` in.

The rules it keeps (the server's, see the README's *Consumer groups*):

- Server assignments are snapshots ordered by ``(generation, version)``; one at or below the newest
  applied is a duplicate or stale and is dropped. A snapshot of another incarnation is ignored.
- The application holds ``assigned - revoking`` of the newest snapshot, and only while the session is
  confirmed: a member heartbeat answered 200 was *sent* less than ``session_timeout`` minus a safety
  margin ago (earlier if the answer's ``session_expires_at`` says so). The server's deadline runs from
  when it *received* that heartbeat, so the member stops first.
- Reconciling is level-triggered, one callback at a time, in this order: partitions that are gone
  (the snapshot no longer lists them, the session lapsed, or the incarnation ended) are *lost*; those
  the snapshot revokes are *revoked*; then the rest are *assigned*. Every step is computed afresh
  from the newest state, so a superseded snapshot never causes a callback.
- ``processed`` is the generation the member may confirm: it advances to a snapshot's generation once
  everything that snapshot takes away has gone through ``on_partitions_revoked`` or
  ``on_partitions_lost`` and that callback returned. Confirming it hands over nothing that is still
  being consumed; confirming merely the newest generation seen would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from .listener import TopicPartition, partitions_of

LOST, REVOKED, ASSIGNED = "lost", "revoked", "assigned"


@dataclass(frozen=True)
class Snapshot:
    """One answer of the server about this member: a join, a heartbeat or a ``member.assignment``."""

    generation: int
    version: int
    member_epoch: int
    assigned: frozenset[TopicPartition]
    revoking: frozenset[TopicPartition]
    pending: frozenset[TopicPartition]

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation, self.version)

    @classmethod
    def parse(cls, body: Any) -> Snapshot | None:
        """The snapshot in a PartitionAssignment body (with or without ``type``), or None."""
        if not isinstance(body, Mapping) or not isinstance(body.get("generation"), int):
            return None
        return cls(
            generation=body["generation"],
            version=int(body.get("version") or 0),
            member_epoch=int(body.get("member_epoch") or 0),
            assigned=partitions_of(body.get("assigned_partitions")),
            revoking=partitions_of(body.get("revoking")),
            pending=partitions_of(body.get("pending")),
        )


class Step(NamedTuple):
    """One callback to make: ``kind`` (lost, revoked, assigned), the partitions, sorted, and the
    generation of the snapshot it was computed from (0 after the incarnation ended)."""

    kind: str
    partitions: tuple[TopicPartition, ...]
    generation: int


def parse_time(value: Any) -> float | None:
    """An ISO 8601 time (``...Z`` or with an offset) as a POSIX timestamp, or None."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def session_deadline(sent: float, session_timeout: float, body: Any, received: float, received_wall: float) -> float:
    """The monotonic time until which a session confirmed by an answer to a request sent at ``sent``
    (monotonic) is known to hold: ``sent + session_timeout``, or earlier if the answer's
    ``session_expires_at`` (server clock), taken relative to the local wall clock when the answer
    arrived, says so. The earlier of the two is kept: each alone is a bound the server keeps."""
    deadline = sent + session_timeout
    expires = parse_time(body.get("session_expires_at")) if isinstance(body, Mapping) else None
    if expires is not None:
        deadline = min(deadline, received + (expires - received_wall))
    return deadline


class MemberState:
    """One member's state across its incarnations. Changed only by its driver's event loop; the
    read-only queries (``is_owned``, ``assignment``) may come from any thread."""

    def __init__(self, session_timeout: float, safety_margin: float) -> None:
        self.session_timeout = session_timeout
        self.safety_margin = safety_margin
        self.epoch = 0  # the live incarnation's member_epoch; 0 while there is none
        self.latest: Snapshot | None = None
        self.owned: frozenset[TopicPartition] = frozenset()  # what the application was told it holds
        self.processed = 0  # the generation this incarnation may confirm
        self.confirmed_until = 0.0  # monotonic: the session is known to hold until then
        self.closing = False
        self.in_callback: Step | None = None  # the step whose callback is running

    # ------------------------------------------------------------ inputs

    def begin(self, epoch: int, snapshot: Snapshot | None, confirmed_until: float) -> None:
        """A join answered: incarnation ``epoch`` starts from its join's snapshot."""
        if self.owned:
            raise RuntimeError("a new incarnation began before the previous one's partitions were lost")
        self.epoch, self.latest, self.processed, self.confirmed_until = epoch, None, 0, confirmed_until
        if snapshot is not None:
            self.offer(snapshot)

    def end(self) -> None:
        """The incarnation is over (removed, fenced, left): nothing is held from now on; what the
        application still holds is lost at the next step."""
        self.epoch, self.latest, self.confirmed_until = 0, None, 0.0

    def offer(self, snapshot: Snapshot | None) -> bool:
        """Apply ``snapshot`` if it is this incarnation's and newer than the newest applied."""
        if snapshot is None or not self.epoch:
            return False
        if snapshot.member_epoch and snapshot.member_epoch != self.epoch:
            return False
        if self.latest is not None and snapshot.key <= self.latest.key:
            return False
        self.latest = snapshot
        return True

    def confirm(self, deadline: float) -> None:
        """A heartbeat of this incarnation was answered 200: the session holds until ``deadline``."""
        if self.epoch:
            self.confirmed_until = deadline

    # ------------------------------------------------------------ queries

    @property
    def lapse_at(self) -> float:
        """When the application stops holding anything unless the session is confirmed again."""
        return self.confirmed_until - self.safety_margin

    def session_ok(self, now: float) -> bool:
        return bool(self.epoch) and now < self.lapse_at

    def assignment(self, now: float) -> frozenset[TopicPartition]:
        return self.owned if self.session_ok(now) else frozenset()

    def is_owned(self, tp: TopicPartition, now: float) -> bool:
        return tp in self.owned and self.session_ok(now)

    def settled(self, now: float) -> bool:
        """Holding all of the target assignment: nothing pending, nothing being revoked, no callback due."""
        s = self.latest
        return (
            s is not None
            and not self.closing
            and self.in_callback is None
            and self.session_ok(now)
            and not s.pending
            and not s.revoking
            and self.owned == s.assigned
        )

    # ------------------------------------------------------------ steps

    def next_step(self, now: float) -> Step | None:
        """The next callback to make, or None once the application holds what it should (then
        ``processed`` has reached the newest snapshot's generation)."""
        s = self.latest
        if not self.epoch or s is None:
            return self._step(LOST, self.owned, 0)
        if not self.session_ok(now):
            if self.owned:
                return self._step(LOST, self.owned, s.generation)
            self.processed = max(self.processed, s.generation)
            return None
        gone = self.owned - s.assigned
        if gone:
            return self._step(LOST, gone, s.generation)
        desired = frozenset() if self.closing else s.assigned - s.revoking
        if self.owned - desired:
            return self._step(REVOKED, self.owned - desired, s.generation)
        if desired - self.owned:
            return self._step(ASSIGNED, desired - self.owned, s.generation)
        self.processed = max(self.processed, s.generation)
        return None

    @staticmethod
    def _step(kind: str, partitions: frozenset[TopicPartition], generation: int) -> Step | None:
        return Step(kind, tuple(sorted(partitions)), generation) if partitions else None

    def before(self, step: Step) -> None:
        """Called just before the step's callback: lost partitions stop counting as owned before the
        application hears of it, assigned ones start counting before it does."""
        self.in_callback = step
        if step.kind == LOST:
            self.owned = self.owned - set(step.partitions)
        elif step.kind == ASSIGNED:
            self.owned = self.owned | set(step.partitions)

    def after(self, step: Step) -> None:
        """Called once the step's callback returned. Revoked partitions count as owned until then
        (the application commits for them in the callback). A revoke step is computed only when
        nothing is gone, from a snapshot all of whose revoking partitions the application held: now
        it holds none of them, so that snapshot's generation is processed. (After a lost step
        something may still await its revoke: ``next_step`` advances ``processed`` then.)"""
        self.in_callback = None
        if step.kind == REVOKED:
            self.owned = self.owned - set(step.partitions)
            if self.epoch:
                self.processed = max(self.processed, step.generation)

    def ack_due(self) -> bool:
        """Whether the server waits for this member to confirm: it lists partitions as revoking."""
        return self.latest is not None and bool(self.latest.revoking)
