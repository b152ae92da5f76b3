"""The one place requests are made (sync): base URL, token, timeouts, JSON, and every non-2xx answer
turned into a typed error (``conveyor.errors``). ``conveyor.aio._http`` is its asyncio twin."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from . import errors
from ._config import Config


def _decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


def raise_for(response: httpx.Response, resource: str = "") -> Any:
    """The JSON body of a 2xx answer, or the typed error for any other."""
    body = _decode(response)
    if response.is_success:
        return body
    error = errors.from_response(response.status_code, body, resource=resource)
    if isinstance(error, errors.RateLimited):
        with contextlib.suppress(ValueError):
            error.retry_after = float(response.headers.get("Retry-After", ""))
    raise error


class Transport:
    """A pooled HTTP client for one registry and token; safe to share between threads."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._client = httpx.Client(
            base_url=config.api, headers=config.headers(), timeout=config.timeout, follow_redirects=False
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        resource: str = "",
        timeout: float | None = None,
    ) -> Any:
        """``path`` is relative to ``/api/v1/`` (``"services/x/"``). Raises ``Unavailable`` when no answer came."""
        try:
            response = self._client.request(
                method,
                "/" + path.lstrip("/"),
                json=json,
                params=params,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise errors.Unavailable(f"{self.config.url} unreachable: {exc}") from exc
        return raise_for(response, resource)

    def close(self) -> None:
        self._client.close()
