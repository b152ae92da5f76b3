"""Growing a topic that groups read: every new partition is assigned exactly once and each group ends balanced."""

from __future__ import annotations

from collections import Counter

import pytest
from django.db.models import F
from django.utils import timezone

from groups import membership
from groups.models import GroupState, Partition, RebalanceEvent, ServiceGroup
from groups.topics import put_topic

pytestmark = pytest.mark.django_db(transaction=True)


def test_growing_a_topic_to_10000_partitions_assigns_each_once_and_balances_every_reader(owner):
    token = owner[0]
    now = timezone.now()
    put_topic("big", 12, now)
    put_topic("other", 3, now)
    for g in ("r1", "r2"):
        for m in range(5):
            membership.join(g, f"m{m}", "svc", ["big"], token, now, session_timeout=600)
    membership.join("mixed", "a", "svc", ["big", "other"], token, now, session_timeout=600)
    membership.join("mixed", "b", "svc", ["other"], token, now, session_timeout=600)
    for g in ("r1", "r2", "mixed"):  # every member confirms the last generation: nothing is revoking
        generation = ServiceGroup.objects.get(pk=g).generation
        for member_id in ServiceGroup.objects.get(pk=g).members.values_list("member_id", flat=True):
            membership.acknowledge(g, member_id, generation)
    assert not Partition.objects.exclude(owner=F("target")).exists()
    before = {
        g: dict(Partition.objects.filter(group_id=g, topic="big").values_list("number", "owner__member_id"))
        for g in ("r1", "r2")
    }

    put_topic("big", 10_000, timezone.now())

    for g in ("r1", "r2"):
        rows = list(Partition.objects.filter(group_id=g).values_list("topic", "number", "owner_id", "target_id"))
        assert sorted((t, n) for t, n, _o, _t in rows) == [("big", n) for n in range(10_000)]  # each once
        assert all(owner is not None and owner == target for _t, _n, owner, target in rows)  # none revoking
        counts = Counter(Partition.objects.filter(group_id=g).values_list("owner__member_id", flat=True))
        assert sorted(counts.values()) == [2000] * 5  # balanced
        kept = dict(Partition.objects.filter(group_id=g, number__lt=12).values_list("number", "owner__member_id"))
        assert kept == before[g]  # sticky: no partition that had an owner moved
        group = ServiceGroup.objects.get(pk=g)
        assert group.state == GroupState.STABLE
        event = RebalanceEvent.objects.filter(group_id=g).order_by("-generation").first()
        assert (event.reason, event.partitions_moved) == ("topic_change", 0)

    mixed = Counter(Partition.objects.filter(group_id="mixed").values_list("topic", "owner__member_id"))
    # 'b' reads only 'other' (3 partitions): 'a' takes every partition of 'big' and none of 'other' is lost
    assert mixed[("big", "a")] == 10_000
    assert mixed[("other", "a")] + mixed[("other", "b")] == 3
    assert Partition.objects.filter(group_id="mixed").count() == 10_003
