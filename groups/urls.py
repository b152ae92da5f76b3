"""Routes of the topics and groups API under /api/v1/."""

from django.urls import path, re_path
from rest_framework.routers import SimpleRouter

from registry.path_ids import fallback

from .views import (
    IDENTIFIER,
    GroupMemberHeartbeatView,
    GroupMembersView,
    GroupMemberView,
    GroupViewSet,
    TopicViewSet,
)

router = SimpleRouter()
router.register("topics", TopicViewSet, basename="topic")
router.register("groups", GroupViewSet, basename="group")

urlpatterns = [
    path("groups/<str:group_id>/members/", GroupMembersView.as_view(), name="group-members"),
    re_path(
        rf"^groups/(?P<group_id>{IDENTIFIER})/members/(?P<member_id>{IDENTIFIER})/$",
        GroupMemberView.as_view(),
        name="group-member",
    ),
    re_path(
        rf"^groups/(?P<group_id>{IDENTIFIER})/members/(?P<member_id>{IDENTIFIER})/heartbeat/$",
        GroupMemberHeartbeatView.as_view(),
        name="group-member-heartbeat",
    ),
    *router.urls,
    fallback("topics/{name}/"),
    fallback("groups/{group_id}/"),
    fallback("groups/{group_id}/members/{member_id}/"),
    fallback("groups/{group_id}/members/{member_id}/heartbeat/"),
]
