"""Websocket handshake checks: the API token (``?token=`` or the Authorization header), and the Origin.

Services are not browsers and send no Origin header: they are let in and authenticate by token. A
handshake that does carry an Origin (a browser) must name a host in ALLOWED_HOSTS, which stops
cross-site websocket hijacking without opening ALLOWED_HOSTS to '*'.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator
from django.conf import settings

from .auth import token_from_header
from .models import ApiToken, hash_token

UNAUTHENTICATED = 4401
FORBIDDEN = 4403
NOT_FOUND = 4404


@database_sync_to_async
def _lookup(key: str) -> ApiToken | None:
    return ApiToken.objects.filter(key_hash=hash_token(key), is_active=True).first()


def handshake_token(scope: dict[str, Any]) -> str | None:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0]
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return token_from_header(value.decode("latin-1"))
    return None


class TokenAuthMiddleware:
    """Puts the handshake's ApiToken (or None) in ``scope['token']``; consumers refuse None with 4401."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        key = handshake_token(scope)
        scope = {**scope, "token": await _lookup(key) if key else None}
        return await self.app(scope, receive, send)


class OriginCheck(OriginValidator):
    """Channels' AllowedHostsOriginValidator, except that a handshake without an Origin is allowed."""

    def __init__(self, application: Any) -> None:
        super().__init__(application, settings.ALLOWED_HOSTS)

    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)
