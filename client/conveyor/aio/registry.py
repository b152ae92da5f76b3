"""``Registry`` for asyncio: configuration and one async transport; hands out the long-lived objects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._config import resolve
from ._http import AsyncTransport

if TYPE_CHECKING:
    from .balancer import Balancer
    from .member import GroupMember
    from .registration import Registration


class Registry:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 10.0) -> None:
        self.config = resolve(url, token, timeout)
        self.transport = AsyncTransport(self.config)

    def register(self, service_id: str, **kwargs: Any) -> Registration:
        """An (unstarted) registration handle: ``async with reg.register(...)`` or ``await handle.start()``."""
        from .registration import Registration

        return Registration(self, service_id, **kwargs)

    def group_member(self, group: str, **kwargs: Any) -> GroupMember:
        from .member import GroupMember

        return GroupMember(self, group, **kwargs)

    def balancer(self, name: str, **kwargs: Any) -> Balancer:
        from .balancer import Balancer

        return Balancer(self, name, **kwargs)

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
