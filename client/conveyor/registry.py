"""``Registry``: the entry point of the sync API. It holds the configuration and one HTTP transport, answers
queries, and hands out the long-lived objects, each built in its own module: registration handles
(``registration``), service watches (``watch``), group members (``member``) and balancers (``balancer``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import resolve
from ._http import Transport

if TYPE_CHECKING:
    from .balancer import Balancer
    from .member import GroupMember
    from .registration import Registration


class Registry:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 10.0) -> None:
        self.config = resolve(url, token, timeout)
        self.transport = Transport(self.config)

    def register(self, service_id: str, **kwargs: Any) -> Registration:
        """Register ``service_id`` and keep its lease with background heartbeats; see ``Registration``."""
        from .registration import Registration

        return Registration(self, service_id, **kwargs)

    def group_member(self, group: str, **kwargs: Any) -> GroupMember:
        """Join consumer group ``group`` and follow its assignment; see ``GroupMember``."""
        from .member import GroupMember

        return GroupMember(self, group, **kwargs)

    def balancer(self, name: str, **kwargs: Any) -> Balancer:
        """Select instances of service ``name``, over HTTP or (``local=True``) in-process; see ``Balancer``."""
        from .balancer import Balancer

        return Balancer(self, name, **kwargs)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
