"""Bearer-token authentication, shared by the DRF views and the heartbeat fast path."""

from __future__ import annotations

from rest_framework import authentication, exceptions

from .models import ApiToken, hash_token

KEYWORDS = ("bearer", "token")


def token_from_header(header: str | None) -> str | None:
    """The key in ``Authorization: Bearer <key>`` (or ``Token <key>``); None if absent or malformed."""
    if not header:
        return None
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() not in KEYWORDS:
        return None
    return parts[1]


class BearerTokenAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):  # type: ignore[no-untyped-def]
        header = request.META.get("HTTP_AUTHORIZATION")
        if not header:
            return None
        key = token_from_header(header)
        if key is None:
            raise exceptions.AuthenticationFailed("Malformed Authorization header; expected 'Bearer <token>'.")
        token = ApiToken.objects.filter(key_hash=hash_token(key), is_active=True).first()
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        return token, token

    def authenticate_header(self, request) -> str:  # type: ignore[no-untyped-def]
        return 'Bearer realm="api"'
