"""The operators' console as a page: the services table's columns, order and search messages; the group
page's counts, skew, links and buttons; confirmation steps for every destructive action; read-only pages
without Save; titles; the favicon."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.contrib.admin.templatetags.admin_list import result_headers

from groups.models import GroupMember, RebalanceEvent, ServiceGroup, Topic
from registry import leases
from registry.admin_filters import search_selector
from registry.models import ApiToken, LeaderJobRun, LeaderTerm, LeaseStoreState, Service
from tests.conftest import asgi_request, service_body

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 7, 1, 9, 0, 0, tzinfo=UTC)
SERVICES = "/admin/registry/service/"


def register(token: ApiToken, service_id: str, now: datetime = T0, **overrides: object) -> Service:
    body = service_body(service_id, lease_duration=30, deregister_after=60, weight=100, health="healthy")
    body.update(overrides)
    return leases.register(body, token, now)[0]


def ids_on(client, query: str = "") -> list[str]:  # type: ignore[no-untyped-def]
    response = client.get(SERVICES + query)
    assert response.status_code == 200
    return [s.service_id for s in response.context["cl"].result_list]


def column(client, name: str) -> int:  # type: ignore[no-untyped-def]
    """The change list's sort index of the column ``name`` (its position in list_display, from 1)."""
    from registry.admin import ServiceAdmin

    return ServiceAdmin.list_display.index(name) + 1


# --- the services table -----------------------------------------------------------------------------


def test_services_list_has_compact_columns_with_full_values_on_hover(operator, owner):
    token, _key = owner
    long_endpoint = "ingest-gateway-primary.eu-west-1.internal.example.com:50051"
    labels = {"env": "prod", "team": "ingestion-platform", "zone": "eu-west-1a"}
    register(token, "svc-1", endpoint=long_endpoint, labels=labels, group_id="g-orders")

    response = operator.get(SERVICES)
    html = response.content.decode()

    headers = [str(h["text"]) for h in result_headers(response.context["cl"])][1:]  # after the checkbox
    assert headers == [
        "id", "name", "type", "health", "lease", "endpoint", "labels", "group", "weight", "registered"
    ]  # fmt: skip
    # cut in the middle, keeping both ends, the whole value in the title
    assert f'style="max-width:11em" title="{long_endpoint}">ingest-g…com:50051</span>' in html
    assert 'title="env=prod, team=ingestion-platform, zone=eu-west-1a"' in html
    assert 'title="g-orders">g-orders</span>' in html


def test_drained_badge_sits_beside_the_health_badge(operator, owner):
    register(owner[0], "svc-1")
    register(owner[0], "svc-2")
    leases.drain(["svc-2"])

    with time_machine.travel(T0 + timedelta(seconds=1), tick=False):
        html = operator.get(SERVICES).content.decode()

    cells = re.findall(r'<td class="field-health_badge">(.*?)</td>', html, re.S)
    assert len(cells) == 2
    assert ">healthy</span>" in cells[0] and "drained" not in cells[0]
    assert re.search(r">healthy</span><span class=\"conveyor-badge drained\"[^>]*>drained</span>", cells[1])


def test_lease_cells_carry_their_deadline_for_the_browser_countdown(operator, owner):
    register(owner[0], "svc-1")
    with time_machine.travel(T0 + timedelta(seconds=12), tick=False):
        html = operator.get(SERVICES).content.decode()
    assert (
        '<span data-deadline="2026-07-01T09:00:30Z" title="deadline 2026-07-01 09:00:30 UTC">18 s left</span>' in html
    )


def test_times_are_relative_with_the_exact_utc_time_on_hover_and_durations_have_units(operator, owner):
    register(owner[0], "svc-1")
    with time_machine.travel(T0 + timedelta(minutes=4), tick=False):
        listing = operator.get(SERVICES).content.decode()
        page = operator.get(f"{SERVICES}svc-1/change/").content.decode()
    exact = '<time datetime="2026-07-01T09:00:00Z" title="2026-07-01 09:00:00 UTC">4 min ago</time>'
    assert exact in listing  # registered
    assert exact in page
    assert "30 s (heartbeat every 10 s)" in page
    assert "1 min after the lease lapses" in page


def test_ids_sort_naturally_and_page_correctly(operator, owner):
    for n in range(1, 121):
        register(owner[0], f"svc-{n}")
    register(owner[0], "svc-a")

    first, second = ids_on(operator), ids_on(operator, "?p=2")

    assert first[:3] == ["svc-1", "svc-2", "svc-3"]
    assert first[-1] == "svc-100" and len(first) == 100  # the page boundary falls by value, not by text
    assert second == [f"svc-{n}" for n in range(101, 121)] + ["svc-a"]
    by_id_desc = ids_on(operator, f"?o=-{column(operator, 'id_cell')}")
    assert by_id_desc[:3] == ["svc-a", "svc-120", "svc-119"]


def test_sort_by_effective_health_puts_lapsed_and_unhealthy_first(operator, owner):
    register(owner[0], "ok-1")
    register(owner[0], "degraded-1", health="degraded")
    register(owner[0], "short-1", lease_duration=5)  # reports healthy; its lease lapses first
    register(owner[0], "unknown-1", health="unknown")
    health = column(operator, "health_badge")

    with time_machine.travel(T0 + timedelta(seconds=10), tick=False):
        worst_first = ids_on(operator, f"?o={health}")
        best_first = ids_on(operator, f"?o=-{health}")

    assert worst_first == ["short-1", "degraded-1", "unknown-1", "ok-1"]
    assert best_first == worst_first[::-1]


def test_sort_by_lease_left_puts_lapsed_first_and_pages(operator, owner):
    # Deadlines live in Redis: svc-k heartbeats k seconds after T0, so it lapses k seconds later than svc-0.
    for n in range(105):
        register(owner[0], f"svc-{n}", now=T0 + timedelta(seconds=n), lease_duration=30)
    register(owner[0], "lapsed-1", lease_duration=1)
    lease = column(operator, "lease_left")

    with time_machine.travel(T0 + timedelta(seconds=20), tick=False):
        first = ids_on(operator, f"?o={lease}")
        second = ids_on(operator, f"?o={lease}&p=2")
        reverse = ids_on(operator, f"?o=-{lease}")

    assert first[:3] == ["lapsed-1", "svc-0", "svc-1"]
    assert len(first) == 100 and first[-1] == "svc-98"
    assert second == ["svc-99", "svc-100", "svc-101", "svc-102", "svc-103", "svc-104"]
    assert reverse[:2] == ["svc-104", "svc-103"]


def test_invalid_selector_searches_say_why(operator, owner):
    register(owner[0], "svc-1", labels={"env": "prod"})

    empty = operator.get(SERVICES, {"q": "env="})
    negative = operator.get(SERVICES, {"q": "env!=prod"})
    valid = operator.get(SERVICES, {"q": "env=prod"})

    assert "a selector needs a value after &#x27;=&#x27; (k=v, e.g. env=prod)" in empty.content.decode()
    assert "negative selectors (!=) are not supported" in negative.content.decode()
    assert [m.level_tag for m in empty.context["messages"]] == ["error"]
    assert [s.service_id for s in valid.context["cl"].result_list] == ["svc-1"]
    assert not list(valid.context["messages"])


@pytest.mark.parametrize(
    ("term", "reason"),
    [
        ("env=", "needs a value"),
        ("env!=prod", "negative selectors"),
        ("=prod", "needs a label key"),
        ("env=prod,,zone=", "needs a value"),
        ("env=a,env=b", "two different values"),
        ("k" * 64 + "=x", "not a valid label selector"),
    ],
)
def test_selector_reasons(term: str, reason: str):
    selector, problem = search_selector(term)
    assert selector is None and reason in (problem or "")


def test_plain_and_valid_selector_terms_are_not_refused():
    assert search_selector("10.0.0.1") == (None, None)
    assert search_selector("env=prod, zone=a") == ({"env": "prod", "zone": "a"}, None)


def test_read_only_tables_scroll_inside_a_wrapper(operator, group):
    page = operator.get("/admin/groups/servicegroup/g1/change/").content.decode()
    assert page.count('<div class="conveyor-scroll"><table') == 2  # members and history


# --- confirmations --------------------------------------------------------------------------------------


def test_deregister_confirmation_lists_services_and_groups_and_changes_nothing(operator, owner, api):
    register(owner[0], "svc-1", group_id="g1")
    register(owner[0], "svc-2")
    api.put("/api/v1/topics/orders/", {"partitions": 4}, format="json")
    api.post("/api/v1/groups/g1/members/", {"member_id": "svc-1", "service_name": "c", "topics": ["orders"]})

    page = operator.post(SERVICES, {"action": "deregister", "_selected_action": ["svc-1", "svc-2"]})

    html = page.content.decode()
    assert page.status_code == 200 and "Deregister 2 service(s)?" in html
    assert re.findall(r'<li><a href="/admin/registry/service/([^/]+)/change/">', html) == ["svc-1", "svc-2"]
    assert 'member <strong>svc-1</strong> of group <a href="/admin/groups/servicegroup/g1/change/">g1</a>' in html
    assert "Yes, deregister 2 services" in html
    assert set(Service.objects.values_list("pk", flat=True)) == {"svc-1", "svc-2"}  # nothing yet

    done = operator.post(
        SERVICES, {"action": "deregister", "_selected_action": ["svc-1", "svc-2"], "post": "yes"}, follow=True
    )
    assert "Deregistered 2 service(s)." in done.content.decode()
    assert not Service.objects.exists()


@pytest.fixture
def group(api):
    api.put("/api/v1/topics/orders/", {"partitions": 12}, format="json")
    for member in ("m1", "m2"):
        api.post("/api/v1/groups/g1/members/", {"member_id": member, "service_name": "c", "topics": ["orders"]})
    return ServiceGroup.objects.get(pk="g1")


def test_group_page_shows_counts_skew_links_and_buttons(operator, owner, group):
    register(owner[0], "m1")  # a service under the member's id: the member links to it

    html = operator.get("/admin/groups/servicegroup/g1/change/").content.decode()

    rows = dict(re.findall(r'<tr data-member="([^"]+)">(.*?)</tr>', html, re.S))
    m1 = re.findall(r"<td[^>]*>(.*?)</td>", rows["m1"], re.S)
    m2 = re.findall(r"<td[^>]*>(.*?)</td>", rows["m2"], re.S)
    # member, service, session, confirmed, owns, revoking, pending, remove: each count beside its ranges
    assert m1[0] == '<a href="/admin/registry/service/m1/change/" title="its service">m1</a>'
    assert m2[0] == "m2"  # no service of that id

    def counted(cell: str) -> str:
        return re.sub(r"<[^>]+>", "", cell)

    assert [counted(c) for c in m1[4:7]] == ["12 orders: 0-11", "6 orders: 6-11", "0"]
    assert [counted(c) for c in m2[4:7]] == ["0", "0", "6 orders: 6-11"]
    assert 'href="/admin/groups/servicegroup/g1/members/m2/remove/">remove…</a>' in m2[7]
    assert "12 (owned: 0 to 12)" in html  # skew
    assert 'href="/admin/groups/servicegroup/g1/rebalance/" class="conveyor-rebalance">Force rebalance…' in html


def test_force_rebalance_confirms_what_moves_then_names_the_new_generation(operator, group):
    GroupMember.objects.filter(member_id="m1").update(acked_generation=2)
    confirm = operator.get("/admin/groups/servicegroup/g1/rebalance/")

    html = confirm.content.decode()
    assert "from generation 2 to\n  <strong>generation 3</strong>" in html
    assert "No partition changes owner" in html  # m1 -> m2 of 6-11 is already the target
    assert ServiceGroup.objects.get(pk="g1").generation == 2  # nothing yet

    done = operator.post("/admin/groups/servicegroup/g1/rebalance/", {"post": "yes"}, follow=True)

    assert done.redirect_chain[-1][0] == "/admin/groups/servicegroup/g1/change/"
    assert "Group g1 rebalanced: now at generation 3 (0 partition(s) moved)." in done.content.decode()
    assert ServiceGroup.objects.get(pk="g1").generation == 3


def test_remove_member_from_the_group_page_confirms_what_is_revoked(operator, group):
    confirm = operator.get("/admin/groups/servicegroup/g1/members/m1/remove/")

    html = confirm.content.decode()
    assert "Revoked from m1 (12 partitions)" in html
    assert '<p id="revoked">orders: 0-11</p>' in html
    assert "<td>m1</td><td>m2</td><td>orders: 0, 1, 2, 3, 4, 5</td>" in html  # where m1's targets go
    assert "<strong>generation 3</strong>" in html
    assert GroupMember.objects.filter(member_id="m1").exists()  # nothing yet

    done = operator.post("/admin/groups/servicegroup/g1/members/m1/remove/", {"post": "yes"}, follow=True)

    assert "Removed m1 from g1: the group is now at generation 3." in done.content.decode()
    assert list(GroupMember.objects.values_list("member_id", flat=True)) == ["m2"]


def test_removing_an_unknown_member_says_so(operator, group):
    response = operator.get("/admin/groups/servicegroup/g1/members/nobody/remove/", follow=True)
    assert "Group g1 has no member &#x27;nobody&#x27; (any more)." in response.content.decode()


def test_remove_member_action_and_delete_view_confirm_first(operator, group):
    pk = GroupMember.objects.get(member_id="m2").pk

    page = operator.post("/admin/groups/groupmember/", {"action": "remove_member", "_selected_action": [pk]})
    redirect = operator.get(f"/admin/groups/groupmember/{pk}/delete/")

    html = page.content.decode()
    assert '<td><a href="/admin/groups/servicegroup/g1/change/">g1</a></td><td>m2</td><td>3</td><td>-</td>' in html
    assert GroupMember.objects.count() == 2  # nothing yet
    assert redirect.status_code == 302 and redirect["Location"] == "/admin/groups/servicegroup/g1/members/m2/remove/"


def test_token_delete_confirmation_lists_what_it_owns(operator, owner, group):
    token, _key = owner
    register(token, "svc-1")
    other, _ = ApiToken.objects.get_or_create(name="spare", defaults={"key_hash": "x" * 64, "key_prefix": "cr_x"})

    single = operator.get(f"/admin/registry/apitoken/{token.pk}/delete/").content.decode()
    bulk = operator.post("/admin/registry/apitoken/", {"action": "delete_tokens", "_selected_action": [token.pk]})
    spare = operator.get(f"/admin/registry/apitoken/{other.pk}/delete/").content.decode()

    for html in (single, bulk.content.decode()):
        assert '<ul id="token-services"><li>svc-1</li></ul>' in html
        assert '<ul id="token-groups"><li>g1</li></ul>' in html
        assert '<ul id="token-topics"><li>orders</li></ul>' in html
        assert '<ul id="token-members"><li>g1/m1</li><li>g1/m2</li></ul>' in html
    assert 'id="token-owns-nothing"' in spare
    assert ApiToken.objects.filter(pk=token.pk).exists()  # nothing yet

    done = operator.post(
        "/admin/registry/apitoken/", {"action": "delete_tokens", "_selected_action": [token.pk], "post": "yes"}
    )
    assert done.status_code == 302
    assert not ApiToken.objects.filter(pk=token.pk).exists()
    assert Service.objects.get(pk="svc-1").owner is None
    assert Topic.objects.get(pk="orders").owner is None


# --- read-only pages, titles, favicon ----------------------------------------------------------------


def test_read_only_pages_show_no_save_button(operator, group):
    LeaderTerm.objects.create(name="jobs", term=3, holder="host-a:1")
    LeaseStoreState.objects.create(run_id="abc")
    member = GroupMember.objects.get(member_id="m1")
    event = RebalanceEvent.objects.filter(group_id="g1").first()
    pages = [
        "/admin/registry/leaderterm/jobs/change/",
        "/admin/registry/leasestorestate/1/change/",
        f"/admin/groups/groupmember/{member.pk}/change/",
        f"/admin/groups/rebalanceevent/{event.pk}/change/",
    ]
    for url in pages:
        html = operator.get(url).content.decode()
        assert 'name="_save"' not in html, url
        assert 'name="_continue"' not in html, url
    assert 'name="_save"' in operator.get("/admin/groups/servicegroup/g1/change/").content.decode()  # owner edits


def test_every_object_has_a_readable_title(operator, group):
    LeaderTerm.objects.create(name="jobs", term=3, holder="host-a:1")
    run = LeaderJobRun.objects.create(name="jobs", term=3, holder="h", job="expire", items=2, at=T0)
    event = RebalanceEvent.objects.filter(group_id="g1").order_by("generation").last()
    assert str(run) == "expire (term 3, 2 item(s))"
    assert str(event) == "g1 generation 2 (join)"
    html = operator.get(f"/admin/groups/rebalanceevent/{event.pk}/change/").content.decode()
    assert "<title>g1 generation 2 (join) | View rebalance event" in html
    html = operator.get("/admin/registry/leaderterm/jobs/change/").content.decode()
    assert "<title>jobs: term 3 (host-a:1) | View leader" in html


def test_favicon_is_linked_and_served(operator):
    html = operator.get("/admin/").content.decode()
    href = re.search(r'<link rel="icon" type="image/svg\+xml" href="([^"]+)">', html).group(1)
    response = asgi_request("GET", href)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg")
    assert b"<svg" in response.content


def test_service_delete_page_lists_the_group_members_removed_with_it(
    operator, owner, api, django_capture_on_commit_callbacks
):
    register(owner[0], "svc-1")
    api.put("/api/v1/topics/orders/", {"partitions": 4}, format="json")
    api.post("/api/v1/groups/g1/members/", {"member_id": "svc-1", "service_name": "c", "topics": ["orders"]})

    html = operator.get(f"{SERVICES}svc-1/delete/").content.decode()

    assert "Deleting deregisters <strong>svc-1</strong> now" in html
    assert 'member <strong>svc-1</strong> of group <a href="/admin/groups/servicegroup/g1/change/">g1</a>' in html
    assert Service.objects.filter(pk="svc-1").exists()
    with django_capture_on_commit_callbacks(execute=True):
        operator.post(f"{SERVICES}svc-1/delete/", {"post": "yes"})
    assert not Service.objects.exists()
    assert not GroupMember.objects.exists()  # the same token joined it: removed with the service
