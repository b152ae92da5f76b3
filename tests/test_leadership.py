"""Leadership with real processes: three redis-server masters started here, killed, paused and restarted;
fencing tokens checked by the database. No mocks."""

from __future__ import annotations

import os
import random
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from registry import lease_store, leases
from registry.leadership import Leadership, Lock, NotLeader, StaleTerm, Term, fenced, guard_for
from registry.models import ApiToken, LeaderJobRun, LeaderTerm, LeaderTermHistory, Service
from registry.redis_client import get_redis
from registry_project.embedded_redis import RedisServer
from tests.conftest import service_body, wait_for

TTL_MS = 1000
pytestmark = pytest.mark.django_db(transaction=True)


def contender(masters: list[RedisServer], holder: str, ttl_ms: int = TTL_MS, node_timeout_ms: int = 50) -> Leadership:
    return Leadership(
        "jobs", urls=[m.url for m in masters], ttl_ms=ttl_ms, holder=holder, node_timeout_ms=node_timeout_ms
    )


def sleep_past(lock: Lock) -> None:
    time.sleep(max(lock.remaining(), 0) + 0.05)


def job_write(term: Term) -> None:
    with fenced(term, "test") as run:
        run.items = 1


def rejections() -> int:
    return lease_store.counters(get_redis(), ["fencing_rejections"])["fencing_rejections"]


def test_fresh_masters_vote_only_after_one_ttl(masters):
    leader = contender(masters, "w1")
    assert leader.ensure() is None  # every master just started: each stays out for one TTL
    term = wait_for(leader.ensure, 3)
    assert (term.number, term.holder) == (1, "w1")
    assert LeaderTerm.objects.get(name="jobs").holder == "w1"


def test_leadership_survives_one_master_and_steps_down_without_a_majority(masters):
    # A node timeout well above a loaded machine's stalls: with one master down, a renewal needs both of
    # the others, and this test is about majorities, not about timeouts.
    # A lease long enough that, past half of it, a loaded machine still has several renewal attempts left.
    leader = contender(masters, "w1", ttl_ms=4 * TTL_MS, node_timeout_ms=250)
    term = wait_for(leader.ensure, 4 * TTL_MS / 1000 + 3)  # a master just started votes after one TTL
    job_write(term)

    masters[0].kill()
    time.sleep(4 * TTL_MS / 1000 * 0.55)  # past half the TTL: ensure() must renew on the two left
    # (a busy machine can still make one renewal miss a node's timeout: ensure() tries again, and must
    # succeed while the lock is still valid)
    renewed = wait_for(
        lambda: (t := leader.ensure()) and t.lock.valid_until > term.lock.valid_until and t,
        max(term.lock.remaining(), 0.05),
    )
    assert renewed.number == term.number
    job_write(renewed)
    assert LeaderJobRun.objects.count() == 2

    masters[1].kill()  # one master of three left: no majority to renew on
    last = leader.ensure() or renewed
    sleep_past(last.lock)  # the lock's validity runs out...
    assert leader.ensure() is None  # ...and the holder no longer claims leadership
    with pytest.raises(NotLeader):
        job_write(last)
    assert LeaderJobRun.objects.count() == 2  # no job write without a majority

    masters[0].restart()
    masters[1].restart()
    rival = contender(masters, "w2")
    elected = wait_for(lambda: leader.ensure() or rival.ensure(), 5)
    assert elected.number == 2
    job_write(elected)
    assert list(LeaderJobRun.objects.order_by("id").values_list("term", flat=True)) == [1, 1, 2]


def test_a_frozen_leader_cannot_write_after_a_rival_took_over(masters, owner):
    token: ApiToken = owner[0]
    old = contender(masters, "old-leader")
    term_old = wait_for(old.ensure, 3)
    leases.register(service_body("lapsed", lease_duration=1, deregister_after=0), token, timezone.now())
    leases.register(service_body("alive", lease_duration=3600), token, timezone.now())

    resume = threading.Event()
    outcome: list[str] = []

    def frozen_worker() -> None:
        # decided to run the cleanup as leader, then froze (a GC pause, a stopped VM) before writing
        resume.wait()
        try:
            removed = leases.expire_lapsed(timezone.now() + timedelta(seconds=5), guard=guard_for(term_old, "cleanup"))
            outcome.append(f"written {removed}")
        except NotLeader as exc:
            outcome.append(type(exc).__name__)
        finally:
            connection.close()

    worker = threading.Thread(target=frozen_worker)
    worker.start()
    sleep_past(term_old.lock)

    rival = contender(masters, "new-leader")
    term_new = wait_for(rival.ensure, 3)
    assert term_new.number == term_old.number + 1
    removed = leases.expire_lapsed(timezone.now() + timedelta(seconds=5), guard=guard_for(term_new, "cleanup"))
    assert removed == ["lapsed"]

    leases.register(service_body("lapsed-1", lease_duration=1, deregister_after=0), token, timezone.now())
    resume.set()  # the old leader wakes up with work to do
    worker.join()
    assert outcome == ["NotLeader"]  # its own clock told it the lock had lapsed
    assert Service.objects.filter(pk="lapsed-1").exists()

    # a holder whose clock wrongly says it is still valid is stopped by the database
    skewed = Term(term_old.name, term_old.number, term_old.holder, Lock(term_old.lock.token, time.monotonic() + 60))
    leases.register(service_body("lapsed-2", lease_duration=1, deregister_after=0), token, timezone.now())
    with pytest.raises(StaleTerm):
        leases.expire_lapsed(timezone.now() + timedelta(seconds=5), guard=guard_for(skewed, "cleanup"))
    assert Service.objects.filter(pk="lapsed-2").exists()  # its change was rolled back
    assert lease_store.deadlines(get_redis(), ["lapsed-2"])  # nothing kept in Redis either
    assert rejections() == 2
    assert sorted(Service.objects.values_list("pk", flat=True)) == ["alive", "lapsed-1", "lapsed-2"]
    runs = list(LeaderJobRun.objects.values_list("holder", "term", "items"))
    assert runs == [("new-leader", term_new.number, 1)]


def test_a_restarted_master_without_persistence_does_not_grant_a_second_holder(masters):
    first, second = contender(masters, "first"), contender(masters, "second")
    wait_for(first.ensure, 3)  # past the masters' start-up quarantine
    first.step_down()

    masters[2].pause()  # the third master is unreachable while "first" locks
    lock1 = first.redlock.acquire()
    assert lock1 is not None  # granted by masters 0 and 1
    masters[2].resume()
    masters[1].restart()  # master 1 restarts empty: it has forgotten first's lock
    assert masters[1].client().get(first.redlock.key) is None

    assert second.redlock.acquire() is None  # 0 refuses (taken), 1 stays out for a TTL, 2 alone is no majority
    assert lock1.remaining() > 0  # while first still holds a valid lock
    sleep_past(lock1)
    assert wait_for(second.redlock.acquire, 3)  # once first's lock has expired everywhere


def test_randomised_faults_never_let_a_stale_term_write(masters):
    """Jobs under kills, restarts and pauses of masters and pauses of holders; then a checker over the
    recorded history. LEADERSHIP_CHAOS_SECONDS long (25 in the suite; `make nemesis` runs 180)."""
    stop_at = time.monotonic() + float(os.environ.get("LEADERSHIP_CHAOS_SECONDS", "25"))
    attempts: list[tuple[str, int, str]] = []
    errors: list[BaseException] = []

    def worker(name: str, seed: int) -> None:
        rng = random.Random(seed)
        leadership = contender(masters, name)
        try:
            while time.monotonic() < stop_at:
                term = leadership.ensure()
                if term is not None:
                    if rng.random() < 0.15:
                        time.sleep(rng.uniform(0.5, 2.0) * TTL_MS / 1000)  # a pause between deciding and writing
                    try:
                        job_write(term)
                        attempts.append((name, term.number, "committed"))
                    except NotLeader:
                        attempts.append((name, term.number, "rejected"))
                time.sleep(rng.uniform(0.02, 0.15))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            leadership.close()
            connection.close()

    def chaos() -> None:
        rng = random.Random(99)
        while time.monotonic() < stop_at - 3:
            server = rng.choice(masters)
            action = rng.choice(["kill", "restart", "pause"])
            if action == "kill" and sum(1 for m in masters if m.process.poll() is None) > 1:
                server.kill()
            elif action == "restart":
                server.restart()
            elif action == "pause" and server.process.poll() is None:
                server.pause()
                time.sleep(rng.uniform(0.3, 1.5))
                server.resume()
            time.sleep(rng.uniform(0.5, 2.0))
        for server in masters:
            if server.process.poll() is not None:
                server.start()

    threads = [threading.Thread(target=worker, args=(f"w{i}", i)) for i in range(3)]
    threads.append(threading.Thread(target=chaos))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []

    runs = list(LeaderJobRun.objects.order_by("id").values_list("term", "holder"))
    history = dict(LeaderTermHistory.objects.filter(name="jobs").values_list("term", "holder"))
    terms = [term for term, _ in runs]
    assert terms == sorted(terms)  # accepted terms never decrease
    for term, holder in runs:
        assert history[term] == holder  # each term has one holder, the one that won it
    assert len(history) == len(set(history)) and sorted(history) == list(range(1, max(history) + 1))
    committed = [(n, t) for n, t, outcome in attempts if outcome == "committed"]
    assert len(committed) == len(runs)  # every write reported committed is in the database, and only those
    assert len(set(terms)) >= 3  # leadership really changed hands under the faults
    assert any(outcome == "rejected" for *_x, outcome in attempts)  # stale writes were really tried
