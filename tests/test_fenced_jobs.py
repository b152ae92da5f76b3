"""Leader jobs whose fence fails at the last moment lose nothing: their Redis changes wait for the commit.

Real processes: three redis-server masters for the lock (as in test_leadership.py) and the test's
redis-server for the lease store. The "last moment" is a real pause: the job has done its writes,
then its holder sleeps past the lock's validity before the commit, so ``fenced`` rejects it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from groups import expiry, membership
from groups.models import GroupMember, Partition
from groups.tasks import reconcile_sessions as reconcile_sessions_task
from groups.topics import put_topic
from registry import leadership, lease_store, leases
from registry.leadership import Leadership, NotLeader, Term, fenced
from registry.models import LeaderJobRun, Service
from registry.redis_client import get_redis
from registry_project.embedded_redis import RedisServer
from tests.conftest import service_body, wait_for

TTL_MS = 1000
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def leader(masters: list[RedisServer]) -> Iterator[Leadership]:
    leadership = Leadership("jobs", urls=[m.url for m in masters], ttl_ms=TTL_MS, holder="w1", node_timeout_ms=50)
    yield leadership
    leadership.close()


def failing_at_commit(term: Term, job: str) -> Callable[[], Any]:
    """A leader's guard whose holder pauses, after the job's writes and before the commit, until its
    lock's validity has run out (a GC pause, a stopped VM): the fence rejects the commit."""

    @contextmanager
    def guard() -> Iterator[LeaderJobRun]:
        with fenced(term, job) as run:
            yield run
            time.sleep(max(term.lock.remaining(), 0) + 0.05)

    return guard


def fresh_guard(leader: Leadership, job: str) -> Callable[[], Any]:
    term = wait_for(leader.ensure, 5)
    return lambda: fenced(term, job)


def lease_entry(service_id: str) -> tuple[bool, bool]:
    r = get_redis()
    k = lease_store.keys()
    return bool(lease_store.deadlines(r, [service_id])), bool(r.hexists(k.conf, service_id))


def test_a_cleanup_rejected_at_commit_leaves_rows_and_leases_and_the_next_run_expires_them(leader, owner):
    token = owner[0]
    now = timezone.now()
    leases.register(service_body("lapsed", lease_duration=1, deregister_after=0), token, now)
    leases.register(service_body("alive", lease_duration=3600), token, now)
    term = wait_for(leader.ensure, 5)

    with pytest.raises(NotLeader):
        leases.expire_lapsed(now + timedelta(seconds=5), guard=failing_at_commit(term, "cleanup"))

    assert Service.objects.filter(pk="lapsed").exists()  # the row delete was rolled back...
    assert lease_entry("lapsed") == (True, True)  # ...and its Redis entry is whole
    assert not LeaderJobRun.objects.exists()

    removed = leases.expire_lapsed(now + timedelta(seconds=5), guard=fresh_guard(leader, "cleanup"))
    assert removed == ["lapsed"]
    assert not Service.objects.filter(pk="lapsed").exists()
    assert lease_entry("lapsed") == (False, False)
    assert lease_entry("alive") == (True, True)


def test_a_cleanup_keeps_a_service_renewed_after_its_selection(leader, owner):
    token = owner[0]
    now = timezone.now()
    leases.register(service_body("renewed", lease_duration=1, deregister_after=0), token, now)
    term = wait_for(leader.ensure, 5)
    later = now + timedelta(seconds=5)

    @contextmanager
    def guard() -> Iterator[LeaderJobRun]:
        # the heartbeat lands after the candidates were selected, before the rows are locked
        assert leases.heartbeat("renewed", owner[1], "healthy", later + timedelta(seconds=1)).status == 200
        with fenced(term, "cleanup") as run:
            yield run

    assert leases.expire_lapsed(later, guard=guard) == []
    assert Service.objects.filter(pk="renewed").exists()
    assert lease_entry("renewed") == (True, True)


def test_a_cleanup_removes_the_entries_of_rows_an_earlier_run_deleted(owner):
    """Redis failed after an earlier run's commit: the next run finishes the removal."""
    token = owner[0]
    now = timezone.now()
    leases.register(service_body("half-gone", lease_duration=1, deregister_after=0), token, now)
    Service.objects.filter(pk="half-gone").delete()  # the row went; the Redis removal did not happen

    assert leases.expire_lapsed(now + timedelta(seconds=5)) == []
    assert lease_entry("half-gone") == (False, False)


def group_with_a_revoking_dead_member(owner) -> None:
    """'dead' owns 4 partitions, 2 of them targeted at 'live' (revoking); 'dead' stops heartbeating."""
    token = owner[0]
    now = timezone.now()
    put_topic("events", 4, now)
    membership.join("g", "dead", "svc", ["events"], token, now, session_timeout=1)
    membership.join("g", "live", "svc", ["events"], token, now, session_timeout=3600)
    revoking = Partition.objects.filter(group_id="g", owner__member_id="dead", target__member_id="live").count()
    assert revoking == 2


def partitions_of(group_id: str) -> list[tuple[str | None, str | None]]:
    return list(
        Partition.objects.filter(group_id=group_id)
        .order_by("number")
        .values_list("owner__member_id", "target__member_id")
    )


def test_member_expiry_rejected_at_commit_keeps_the_session_and_the_next_run_hands_over(leader, owner):
    group_with_a_revoking_dead_member(owner)
    later = timezone.now() + timedelta(seconds=5)
    term = wait_for(leader.ensure, 5)

    with pytest.raises(NotLeader):
        expiry.expire_members(later, guard=failing_at_commit(term, "member-expiry"))

    assert GroupMember.objects.filter(group_id="g", member_id="dead").exists()
    assert lease_store.session_deadlines(get_redis(), [("g", "dead")])  # its session is still there
    assert ("dead", "live") in partitions_of("g")  # unchanged, not half-done

    assert expiry.expire_members(later, guard=fresh_guard(leader, "member-expiry")) == [("g", "dead")]
    assert partitions_of("g") == [("live", "live")] * 4  # nothing left revoking
    assert not lease_store.session_deadlines(get_redis(), [("g", "dead")])


def committing_after(during: Callable[[], None]) -> Callable[[], Any]:
    """A guard that runs ``during`` inside the job's transaction, after its writes, before its commit."""

    @contextmanager
    def guard() -> Iterator[None]:
        with transaction.atomic():
            yield None
            during()

    return guard


class HeartbeatDuring:
    """A member heartbeat sent from another thread while the expiry job's transaction is open: it gets
    half a second to answer before the job goes on (an answer then is the race this guards against)."""

    def __init__(self, member_epoch: int, token: Any, now: Any) -> None:
        self.args = ("g", "dead", 0, member_epoch, token, now)
        self.answer: Any = None
        self.error: Exception | None = None
        self.answered_before_commit = False
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        try:
            self.answer = membership.heartbeat(*self.args)
        except Exception as exc:  # noqa: BLE001  (kept for the assertions)
            self.error = exc
        finally:
            connection.close()

    def __call__(self) -> None:
        self.thread.start()
        self.thread.join(0.5)
        self.answered_before_commit = not self.thread.is_alive()


def test_a_heartbeat_during_member_expiry_is_not_told_its_session_is_kept(owner):
    """The race a history run found: the job read the session as lapsed, a heartbeat renewed it in Redis
    and answered 200 with the member's partitions while the job handed them on. The job claims the
    session first, so the heartbeat waits for the commit and finds the member gone."""
    group_with_a_revoking_dead_member(owner)
    epoch = GroupMember.objects.get(group_id="g", member_id="dead").member_epoch
    later = timezone.now() + timedelta(seconds=5)
    beat = HeartbeatDuring(epoch, owner[0], later)

    assert expiry.expire_members(later, guard=committing_after(beat)) == [("g", "dead")]
    beat.thread.join(30)

    assert not beat.answered_before_commit
    assert isinstance(beat.error, membership.MemberNotFound), beat.answer
    assert partitions_of("g") == [("live", "live")] * 4
    assert not lease_store.session_deadlines(get_redis(), [("g", "dead")])  # no orphan session left


def test_a_heartbeat_during_a_rejected_member_expiry_keeps_the_member(leader, owner):
    group_with_a_revoking_dead_member(owner)
    epoch = GroupMember.objects.get(group_id="g", member_id="dead").member_epoch
    later = timezone.now() + timedelta(seconds=5)
    term = wait_for(leader.ensure, 5)
    beat = HeartbeatDuring(epoch, owner[0], later)

    def rejected() -> Callable[[], Any]:
        @contextmanager
        def guard() -> Iterator[LeaderJobRun]:
            with failing_at_commit(term, "member-expiry")() as run:
                yield run
                beat()

        return guard

    with pytest.raises(NotLeader):
        expiry.expire_members(later, guard=rejected())
    beat.thread.join(30)

    assert not beat.answered_before_commit
    assert beat.error is None and beat.answer is not None  # the row stayed: the session is written again
    assert lease_store.session_deadlines(get_redis(), [("g", "dead")])[("g", "dead")] > lease_store.to_ms(later)
    assert expiry.expire_members(later, guard=fresh_guard(leader, "member-expiry")) == []
    # and its claim is gone: Redis renews it again without the database
    assert lease_store.renew_session(get_redis(), "g", "dead", lease_store.to_ms(later), epoch)


def test_a_claimed_session_is_renewed_by_no_heartbeat_until_the_claim_is_released(owner):
    group_with_a_revoking_dead_member(owner)
    r = get_redis()
    epoch = GroupMember.objects.get(group_id="g", member_id="dead").member_epoch
    later_ms = lease_store.to_ms(timezone.now() + timedelta(seconds=5))
    assert lease_store.claim_expired_sessions(r, [("g", "dead"), ("g", "live")], later_ms) == [("g", "dead")]

    assert lease_store.renew_session(r, "g", "dead", later_ms, epoch) is None  # the database must decide
    live_epoch = GroupMember.objects.get(group_id="g", member_id="live").member_epoch
    assert lease_store.renew_session(r, "g", "live", later_ms, live_epoch) is not None

    lease_store.release_claims(r, [("g", "dead")])
    assert lease_store.renew_session(r, "g", "dead", later_ms, epoch) is not None


def test_a_heartbeat_delayed_behind_a_later_one_never_moves_the_session_deadline_back(owner):
    """A member whose heartbeat timed out on its side (Redis paused) sends the next one; the server
    runs the two in either order. The member was told the later one's deadline: the earlier one
    arriving last must not shorten it, or the expiry job takes the session before that deadline."""
    token = owner[0]
    now = timezone.now()
    put_topic("events", 4, now)
    joined, _ = membership.join("g", "m", "svc", ["events"], token, now, session_timeout=3)
    epoch = joined.member_epoch
    early, late = now + timedelta(seconds=1), now + timedelta(seconds=2)
    told = membership.heartbeat("g", "m", joined.generation, epoch, token, late).session_expires_at
    assert told == lease_store.from_ms(lease_store.to_ms(late) + 3000)
    # the delayed one: answered with the deadline the session keeps, not its own
    assert membership.heartbeat("g", "m", joined.generation, epoch, token, early).session_expires_at == told

    assert expiry.expire_members(told - timedelta(milliseconds=1)) == []
    assert GroupMember.objects.filter(group_id="g", member_id="m").exists()
    assert expiry.expire_members(told + timedelta(milliseconds=1)) == [("g", "m")]


def test_a_service_heartbeat_delayed_behind_a_later_one_never_moves_the_lease_back(owner):
    token, key = owner
    now = timezone.now()
    leases.register(service_body("s1", lease_duration=10), token, now)
    late = leases.heartbeat("s1", key, "healthy", now + timedelta(seconds=2))
    early = leases.heartbeat("s1", key, "healthy", now + timedelta(seconds=1))
    assert late.status == early.status == 200
    assert early.body["lease"]["expires_at"] == late.body["lease"]["expires_at"]
    deadline = lease_store.deadlines(get_redis(), ["s1"])["s1"]
    assert deadline == lease_store.to_ms(now + timedelta(seconds=12))


@pytest.fixture
def process_leader(settings) -> Iterator[None]:
    settings.REGISTRY_LEADER_TTL_MS = TTL_MS
    leadership._process_leadership = None
    yield
    if leadership._process_leadership is not None:
        leadership._process_leadership.step_down()
        leadership._process_leadership.close()
    leadership._process_leadership = None


@pytest.mark.django_db
def test_session_reconcile_is_scheduled_like_the_lease_reconcile(beat_schedule):
    task = PeriodicTask.objects.get(task="groups.reconcile_sessions")
    assert task.enabled and task.interval.every == 30 and task.expire_seconds == 30


def test_a_lost_session_comes_back_on_schedule_and_its_partitions_do_not_stay_revoking(owner, process_leader):
    group_with_a_revoking_dead_member(owner)
    lease_store.remove_session(get_redis(), "g", "dead")  # lost (a failed job, a Redis mishap)
    later = timezone.now() + timedelta(seconds=5)
    assert expiry.expire_members(later) == []  # no session: nothing expires it...

    # ...until the scheduled reconcile, run by the leader, restores it
    assert wait_for(reconcile_sessions_task, 5) == 1
    assert lease_store.session_deadlines(get_redis(), [("g", "dead")])

    assert expiry.expire_members(later) == [("g", "dead")]
    assert partitions_of("g") == [("live", "live")] * 4


def test_session_reconcile_rejected_at_commit_drops_no_session(leader, owner):
    token = owner[0]
    now = timezone.now()
    membership.join("g", "m1", "svc", ["events"], token, now)
    lease_store.put_session(get_redis(), "g", "orphan", timeout_seconds=30, deadline_ms=lease_store.to_ms(now))
    term = wait_for(leader.ensure, 5)

    with pytest.raises(NotLeader):
        expiry.reconcile_sessions(now, guard=failing_at_commit(term, "session-reconcile"))
    assert lease_store.session_deadlines(get_redis(), [("g", "orphan")])

    assert expiry.reconcile_sessions(now, guard=fresh_guard(leader, "session-reconcile")) == 1
    assert not lease_store.session_deadlines(get_redis(), [("g", "orphan")])
    assert lease_store.session_deadlines(get_redis(), [("g", "m1")])


def test_lease_reconcile_rejected_at_commit_drops_no_entry(leader, owner):
    r = get_redis()
    now = timezone.now()
    lease_store.put(
        r,
        "orphan",
        deadline_ms=lease_store.to_ms(now),
        lease_seconds=10,
        deregister_after=60,
        owner_id=None,
        health="healthy",
    )
    term = wait_for(leader.ensure, 5)

    with pytest.raises(NotLeader):
        leases.reconcile(now, guard=failing_at_commit(term, "reconcile"))
    assert lease_entry("orphan") == (True, True)

    assert leases.reconcile(now, guard=fresh_guard(leader, "reconcile"))["dropped"] == 1
    assert lease_entry("orphan") == (False, False)


def test_a_job_does_not_start_with_less_than_the_set_share_of_validity(masters, leader, settings):
    settings.REGISTRY_LEADER_MIN_VALIDITY_PERCENT = 50
    term = wait_for(leader.ensure_for_job, 5)
    assert term.lock.remaining() >= TTL_MS / 1000 / 2

    masters[0].kill()
    masters[1].kill()  # no majority to renew on: the lock only runs down
    time.sleep(max(term.lock.remaining() - TTL_MS / 1000 * 0.3, 0))  # 30% of its validity left
    assert term.valid() and leader.ensure() is not None  # still leader...
    assert leader.ensure_for_job() is None  # ...but too little is left to start a job
