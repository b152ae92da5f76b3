"""Websocket routes (see DESIGN.md, Websockets).

Path segments are matched loosely and checked by the consumers, so a bad identifier is told which
field is wrong (close code 4400) and a path that names no stream at all is closed with 4404: the
URLRouter would otherwise raise, and the server answer the handshake with a bare 500.
"""

from channels.auth import AuthMiddlewareStack
from django.urls import re_path

from groups.consumers import GroupConsumer, MemberConsumer
from registry.admin_stream import AdminStreamConsumer
from registry.consumers import ServicesConsumer, UnknownPathConsumer

SEGMENT = r"[^/]+"

websocket_urlpatterns = [
    re_path(rf"^ws/groups/(?P<group_id>{SEGMENT})/$", GroupConsumer.as_asgi()),
    re_path(rf"^ws/groups/(?P<group_id>{SEGMENT})/members/(?P<member_id>{SEGMENT})/$", MemberConsumer.as_asgi()),
    re_path(r"^ws/services/$", ServicesConsumer.as_asgi()),
    # The admin's pages: the browser's session cookie, not an API token (staff users only).
    re_path(r"^ws/admin/$", AuthMiddlewareStack(AdminStreamConsumer.as_asgi())),
    re_path(r"", UnknownPathConsumer.as_asgi()),
]
