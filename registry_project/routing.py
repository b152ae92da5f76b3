"""Websocket routes (see DESIGN.md, Websockets)."""

from django.urls import re_path

from groups.consumers import GroupConsumer, MemberConsumer
from registry.consumers import ServicesConsumer

ID = r"[A-Za-z0-9._:-]{1,128}"

websocket_urlpatterns = [
    re_path(rf"^ws/groups/(?P<group_id>{ID})/$", GroupConsumer.as_asgi()),
    re_path(rf"^ws/groups/(?P<group_id>{ID})/members/(?P<member_id>{ID})/$", MemberConsumer.as_asgi()),
    re_path(r"^ws/services/$", ServicesConsumer.as_asgi()),
]
