"""The groups admin: group list and page with members and history, topics grow only, both actions."""

from __future__ import annotations

import pytest

from groups.models import GroupMember, ServiceGroup, Topic

pytestmark = pytest.mark.django_db


@pytest.fixture
def group(api):
    api.put("/api/v1/topics/orders/", {"partitions": 12}, format="json")
    for member in ("m1", "m2"):
        api.post(
            "/api/v1/groups/g1/members/",
            {"member_id": member, "service_name": "c", "topics": ["orders"]},
            format="json",
        )
    return ServiceGroup.objects.get(pk="g1")


def test_group_list_and_page_show_generation_state_members_and_history(operator, group):
    html = operator.get("/admin/groups/servicegroup/").content.decode()
    assert ">reconciling</span>" in html  # m1 still owns what goes to m2
    page = operator.get("/admin/groups/servicegroup/g1/change/").content.decode()
    assert "orders: 0-11" in page  # m1 owns all twelve
    assert "orders: 6-11" in page  # revoking from m1 and pending for m2
    assert "s left" in page  # session time left
    assert page.count("<td>join</td>") == 2


def test_force_rebalance_action_bumps_the_generation(operator, group):
    response = operator.post(
        "/admin/groups/servicegroup/", {"action": "force_rebalance", "_selected_action": ["g1"]}, follow=True
    )
    assert "Rebalanced 1 group(s): g1 to generation 3." in response.content.decode()
    assert ServiceGroup.objects.get(pk="g1").generation == 3
    assert ServiceGroup.objects.get(pk="g1").history.first().reason == "manual"


def test_remove_member_action_rebalances(operator, group):
    pk = GroupMember.objects.get(member_id="m2").pk
    response = operator.post(
        "/admin/groups/groupmember/", {"action": "remove_member", "_selected_action": [pk], "post": "yes"}, follow=True
    )
    assert "Removed 1 member(s). Now g1 at generation 3." in response.content.decode()
    g = ServiceGroup.objects.get(pk="g1")
    assert (g.generation, g.state, list(g.members.values_list("member_id", flat=True))) == (3, "stable", ["m1"])


def test_topics_grow_in_the_admin_and_never_shrink(operator, group):
    shrink = operator.post("/admin/groups/topic/orders/change/", {"partitions": "4"})
    assert shrink.status_code == 200
    assert "never shrink" in shrink.content.decode()
    grow = operator.post("/admin/groups/topic/orders/change/", {"partitions": "16"})
    assert grow.status_code == 302
    assert Topic.objects.get(pk="orders").partitions == 16
    assert ServiceGroup.objects.get(pk="g1").partitions.count() == 16


def test_a_topic_a_group_reads_cannot_be_deleted_and_an_unread_one_can(operator, group, api):
    api.put("/api/v1/topics/unread/", {"partitions": 3}, format="json")
    page = operator.get("/admin/groups/topic/orders/change/").content.decode()
    assert "/admin/groups/topic/orders/delete/" not in page  # no Delete link
    assert operator.post("/admin/groups/topic/orders/delete/", {"post": "yes"}).status_code == 403
    response = operator.post(
        "/admin/groups/topic/", {"action": "delete_unread", "_selected_action": ["orders", "unread"]}, follow=True
    )
    html = response.content.decode()
    assert "Not deleted: topic &#x27;orders&#x27; is read by group(s) g1" in html
    assert "Deleted 1 topic(s)." in html
    assert list(Topic.objects.values_list("name", flat=True)) == ["orders"]
    assert ServiceGroup.objects.get(pk="g1").partitions.count() == 12


def test_re_creating_a_topic_that_members_subscribe_to_rebalances_them_onto_it(api):
    from django.utils import timezone

    from groups import rebalance

    api.post("/api/v1/groups/g1/members/", {"member_id": "m1", "service_name": "c", "topics": ["late"]}, format="json")
    group = ServiceGroup.objects.get(pk="g1")
    assert group.partitions.count() == 12  # created with the default partition count on join
    # Simulate a topic row that went missing under a reading group (as an old admin delete did).
    Topic.objects.filter(pk="late").delete()
    rebalance.force_rebalance("g1", timezone.now())
    assert ServiceGroup.objects.get(pk="g1").partitions.count() == 0
    assert api.put("/api/v1/topics/late/", {"partitions": 4}, format="json").status_code == 201
    group = ServiceGroup.objects.get(pk="g1")
    assert sorted(group.partitions.values_list("number", flat=True)) == [0, 1, 2, 3]
    assert api.get("/api/v1/groups/g1/members/m1/").json()["assigned_partitions"] == {"late": [0, 1, 2, 3]}
