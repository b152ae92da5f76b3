"""Websocket handshake checks: the API token, and the Origin.

The token is taken, in this order, from the Authorization header (``Bearer <key>``), from the
``Sec-WebSocket-Protocol`` offer (browsers cannot set headers on a websocket: they offer
``["conveyor.v1", "token.<key>"]`` and the server answers ``conveyor.v1``, never the key), or from
``?token=<key>``. Whichever is used, the key never reaches a log (registry_project.logscrub).

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


SUBPROTOCOL = "conveyor.v1"
TOKEN_SUBPROTOCOL_PREFIX = "token."


def handshake_token(scope: dict[str, Any]) -> str | None:
    """The key the handshake carries: Authorization header, then subprotocol offer, then ``?token=``."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            key = token_from_header(value.decode("latin-1"))
            if key:
                return key
    for offered in scope.get("subprotocols") or ():
        if offered.startswith(TOKEN_SUBPROTOCOL_PREFIX) and len(offered) > len(TOKEN_SUBPROTOCOL_PREFIX):
            return offered[len(TOKEN_SUBPROTOCOL_PREFIX) :]
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0]
    return None


def _answering_subprotocol(scope: dict[str, Any], send: Any) -> Any:
    """``send``, made to answer ``conveyor.v1`` on accept when the client offered it.

    A browser that offers subprotocols fails the connection unless the server picks one, and the
    pick must never be the ``token.<key>`` entry (the answer is a response header proxies log).
    """
    if SUBPROTOCOL not in (scope.get("subprotocols") or ()):
        return send

    async def send_with_subprotocol(message: dict[str, Any]) -> None:
        if message.get("type") == "websocket.accept" and not message.get("subprotocol"):
            message = {**message, "subprotocol": SUBPROTOCOL}
        await send(message)

    send_with_subprotocol.__wrapped__ = send  # type: ignore[attr-defined]  # websocket.send passes unchanged
    return send_with_subprotocol


class TokenAuthMiddleware:
    """Puts the handshake's ApiToken (or None) in ``scope['token']``; consumers refuse None with 4401."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        key = handshake_token(scope)
        scope = {**scope, "token": await _lookup(key) if key else None}
        return await self.app(scope, receive, _answering_subprotocol(scope, send))


class OriginCheck(OriginValidator):
    """Channels' AllowedHostsOriginValidator, except that a handshake without an Origin is allowed."""

    def __init__(self, application: Any) -> None:
        super().__init__(application, settings.ALLOWED_HOSTS)

    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)
