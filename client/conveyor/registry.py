"""``Registry``: the entry point of the sync API. It holds the configuration and one HTTP transport, answers
queries, and hands out the long-lived objects, each built in its own module: registration handles
(``registration``), service watches (``watch``), group members (``member``) and balancers (``balancer``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _flows
from ._config import resolve
from ._http import Transport
from .records import Service

if TYPE_CHECKING:
    from .balancer import Balancer
    from .member import GroupMember
    from .registration import Registration
    from .watch import ServiceWatch


class Registry:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 10.0) -> None:
        self.config = resolve(url, token, timeout)
        self.transport = Transport(self.config)

    def register(self, service_id: str, **kwargs: Any) -> Registration:
        """Register ``service_id`` now and keep its lease with background heartbeats; see ``Registration``.

        Keyword arguments: ``name``, ``type`` (source, transform, sink), ``endpoint`` (``host:port``), and
        optionally ``labels``, ``lease`` (seconds, default 30), ``health``, ``weight``, ``group_id``,
        ``deregister_after``, ``on_lease_lost``, ``on_lease_recovered``, ``handle_signals``. The handle is a
        context manager that deregisters on exit.
        """
        from .registration import Registration

        return Registration(self, service_id, **kwargs).start()

    # --- queries ------------------------------------------------------------------------------

    def get_service(self, service_id: str) -> Service:
        """One service with its effective health; ``ServiceNotFound`` if it is not registered."""
        return _flows.run(_flows.get_service(service_id), self.transport)

    def get_services_by_name(self, name: str) -> list[Service]:
        """Every instance registered under ``name``, whatever its health."""
        return _flows.run(_flows.list_services(name=name), self.transport)

    def get_healthy_services_by_labels(self, labels: Mapping[str, str], name: str | None = None) -> list[Service]:
        """Every healthy instance (lease current, reported healthy) whose labels include all of ``labels``."""
        return _flows.run(_flows.list_services(name=name, health="healthy", selector=labels), self.transport)

    def list_services(
        self,
        *,
        name: str | None = None,
        type: str | None = None,
        health: str | None = None,
        group_id: str | None = None,
        selector: Mapping[str, str] | str | None = None,
    ) -> list[Service]:
        """Every service matching all the filters given (every page of the list)."""
        flow = _flows.list_services(name=name, type=type, health=health, group_id=group_id, selector=selector)
        return _flows.run(flow, self.transport)

    def watch_services(self, name: str | None = None) -> ServiceWatch:
        """An iterator of ``WatchEvent``s for services named ``name`` (every service if None), ordered and
        de-duplicated per service, that reconnects by itself; see ``conveyor.watch``."""
        from .watch import ServiceWatch

        return ServiceWatch(self, name)

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
