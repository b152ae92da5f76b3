"""Property tests of the pure assignor: coverage, balance, stickiness, determinism."""

from __future__ import annotations

import random
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from groups.assignor import all_partitions, assign, counts, moves

TOPICS = ["t1", "t2", "t3"]


def check_covers_exactly_once(members, topics, target):
    subscribed = {t for ts in members.values() for t in ts}
    expected = set(all_partitions(topics, subscribed))
    assert set(target) == expected
    for (topic, _p), owner in target.items():
        assert topic in members[owner]


def no_chain_to_lighter(members, target):
    """No member could hand a partition down a chain of eligible members to one holding 2+ fewer."""
    load = counts(target, members)
    held_topics = {m: {t for (t, _p), o in target.items() if o == m} for m in members}
    for giver in members:
        seen = {giver}
        queue = deque([giver])
        while queue:
            m = queue.popleft()
            for other in members:
                if other not in seen and held_topics[m] & set(members[other]):
                    if load[other] <= load[giver] - 2:
                        return False
                    seen.add(other)
                    queue.append(other)
    return True


uniform_case = st.tuples(
    st.integers(min_value=1, max_value=30),  # members
    st.dictionaries(st.sampled_from(TOPICS), st.integers(min_value=1, max_value=40), min_size=1),
)


@given(uniform_case)
def test_uniform_subscriptions_cover_every_partition_and_differ_by_at_most_one(case):
    n, topics = case
    members = {f"m{i}": list(topics) for i in range(n)}
    target = assign(members, topics, {})
    check_covers_exactly_once(members, topics, target)
    load = counts(target, members).values()
    assert max(load) - min(load) <= 1


@given(uniform_case, st.randoms(use_true_random=False))
def test_single_join_moves_the_minimum(case, rnd):
    n, topics = case
    members = {f"m{i}": list(topics) for i in range(n)}
    before = assign(members, topics, {})
    members["joiner"] = list(topics)
    after = assign(members, topics, before)
    check_covers_exactly_once(members, topics, after)
    total = len(before)
    # the joiner must end with floor(P/(n+1)) at least; nothing else need move
    minimum = total // (n + 1)
    assert moves(before, after) == minimum
    assert counts(after, members)["joiner"] == minimum
    load = counts(after, members).values()
    assert max(load) - min(load) <= 1


@given(uniform_case, st.data())
def test_single_leave_moves_only_the_leavers_partitions(case, data):
    n, topics = case
    members = {f"m{i}": list(topics) for i in range(n + 1)}
    before = assign(members, topics, {})
    leaver = data.draw(st.sampled_from(sorted(members)))
    del members[leaver]
    after = assign(members, topics, before)
    check_covers_exactly_once(members, topics, after)
    for partition, owner in before.items():
        if owner != leaver:
            assert after[partition] == owner  # nothing else moved
    load = counts(after, members).values()
    assert max(load) - min(load) <= 1


subscriptions = st.dictionaries(
    st.sampled_from([f"m{i}" for i in range(12)]),
    st.lists(st.sampled_from(TOPICS), min_size=1, max_size=3, unique=True),
    min_size=1,
)
topic_sizes = st.fixed_dictionaries({t: st.integers(min_value=1, max_value=25) for t in TOPICS})


@settings(max_examples=200)
@given(subscriptions, topic_sizes)
def test_heterogeneous_subscriptions_are_as_balanced_as_they_allow(members, topics):
    target = assign(members, topics, {})
    check_covers_exactly_once(members, topics, target)
    assert no_chain_to_lighter(members, target)
    by_subs: dict[frozenset, list[int]] = {}
    load = counts(target, members)
    for m, ts in members.items():
        by_subs.setdefault(frozenset(ts), []).append(load[m])
    for same in by_subs.values():
        assert max(same) - min(same) <= 1


@settings(max_examples=200)
@given(subscriptions, topic_sizes, st.randoms(use_true_random=False))
def test_same_input_same_output_whatever_the_order(members, topics, rnd):
    current = assign(members, topics, {})
    # perturb: drop a member, then compare two orderings of the same input
    shuffled_members = dict(rnd.sample(sorted(members.items()), len(members)))
    shuffled_current = dict(rnd.sample(sorted(current.items()), len(current)))
    assert assign(members, topics, current) == assign(shuffled_members, topics, shuffled_current)


@given(subscriptions, topic_sizes)
def test_a_balanced_assignment_is_kept_as_it_is(members, topics):
    target = assign(members, topics, {})
    assert assign(members, topics, target) == target


def test_design_example_x_on_t1_y_on_both_z_on_t2_gives_4_4_4():
    members = {"x": ["t1"], "y": ["t1", "t2"], "z": ["t2"]}
    target = assign(members, {"t1": 6, "t2": 6}, {})
    assert counts(target, members) == {"x": 4, "y": 4, "z": 4}


def test_a_chain_of_moves_evens_out_what_no_single_move_can():
    members = {"a": ["t1"], "b": ["t1", "t2"], "c": ["t2"]}
    topics = {"t1": 9, "t2": 6}
    # a holds 6 of t1; b holds 3 of t1 and 2 of t2; c holds 4 of t2: 6/5/4, no single move helps
    current = {("t1", p): ("a" if p < 6 else "b") for p in range(9)} | {
        ("t2", p): ("b" if p < 2 else "c") for p in range(6)
    }
    target = assign(members, topics, current)
    assert counts(target, members) == {"a": 5, "b": 5, "c": 5}
    assert moves(current, target) == 2  # one t1 partition a -> b, one t2 partition b -> c


def test_members_subscribed_to_unknown_topics_get_nothing():
    target = assign({"m1": ["t1"], "m2": ["nope"]}, {"t1": 3}, {})
    assert set(target.values()) == {"m1"}


def test_twelve_partitions_three_members_sequential_joins():
    topics = {"orders": 12}
    a = assign({"m1": ["orders"]}, topics, {})
    b = assign({"m1": ["orders"], "m2": ["orders"]}, topics, a)
    c = assign({"m1": ["orders"], "m2": ["orders"], "m3": ["orders"]}, topics, b)
    assert counts(b, ["m1", "m2"]) == {"m1": 6, "m2": 6}
    assert counts(c, ["m1", "m2", "m3"]) == {"m1": 4, "m2": 4, "m3": 4}
    assert moves(a, b) == 6 and moves(b, c) == 4


def test_large_group_from_random_current_state_is_balanced():
    rng = random.Random(7)
    members = {f"m{i}": ["t1"] for i in range(100)}
    current = {("t1", p): f"m{rng.randrange(150)}" for p in range(1000)}
    target = assign(members, {"t1": 1000}, current)
    assert set(counts(target, members).values()) == {10}
