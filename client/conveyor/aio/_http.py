"""The asyncio twin of ``conveyor._http``: same paths, same typed errors."""

from __future__ import annotations

from typing import Any

import httpx

from .. import errors
from .._config import Config
from .._http import raise_for


class AsyncTransport:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._client = httpx.AsyncClient(
            base_url=config.api, headers=config.headers(), timeout=config.timeout, follow_redirects=False
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        resource: str = "",
        timeout: float | None = None,
    ) -> Any:
        try:
            response = await self._client.request(
                method,
                "/" + path.lstrip("/"),
                json=json,
                params=params,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise errors.Unavailable(f"{self.config.url} unreachable: {exc}") from exc
        return raise_for(response, resource)

    async def aclose(self) -> None:
        await self._client.aclose()
