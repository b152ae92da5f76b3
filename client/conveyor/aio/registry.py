"""``Registry`` for asyncio: configuration and one async transport; hands out the long-lived objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import _flows
from .._config import resolve
from ..records import Service
from ._http import AsyncTransport

if TYPE_CHECKING:
    from .balancer import Balancer
    from .member import GroupMember
    from .registration import Registration
    from .watch import ServiceWatch


class Registry:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 10.0) -> None:
        self.config = resolve(url, token, timeout)
        self.transport = AsyncTransport(self.config)

    def register(self, service_id: str, **kwargs: Any) -> Registration:
        """An (unstarted) registration handle: ``async with reg.register(...)``, ``await reg.register(...)`` or
        ``await handle.start()``. The keyword arguments are those of the sync ``Registry.register``."""
        from .registration import Registration

        return Registration(self, service_id, **kwargs)

    # --- queries ------------------------------------------------------------------------------

    async def get_service(self, service_id: str) -> Service:
        return await _flows.arun(_flows.get_service(service_id), self.transport)

    async def get_services_by_name(self, name: str) -> list[Service]:
        return await _flows.arun(_flows.list_services(name=name), self.transport)

    async def get_healthy_services_by_labels(self, labels: Mapping[str, str], name: str | None = None) -> list[Service]:
        return await _flows.arun(_flows.list_services(name=name, health="healthy", selector=labels), self.transport)

    async def list_services(
        self,
        *,
        name: str | None = None,
        type: str | None = None,
        health: str | None = None,
        group_id: str | None = None,
        selector: Mapping[str, str] | str | None = None,
    ) -> list[Service]:
        flow = _flows.list_services(name=name, type=type, health=health, group_id=group_id, selector=selector)
        return await _flows.arun(flow, self.transport)

    def watch_services(self, name: str | None = None) -> ServiceWatch:
        """An async iterator of ``WatchEvent``s (``async for``; ``async with`` closes it)."""
        from .watch import ServiceWatch

        return ServiceWatch(self, name)

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
