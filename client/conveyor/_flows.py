"""Requests written once for both APIs: a *flow* is a generator that yields ``Request``s and receives their
decoded answers (or has the typed error thrown into it), may yield a ``Pause`` between them, and returns a
result. ``run`` drives one with the sync transport, ``arun`` with the async one. The queries of ``Registry``,
the HTTP balancer and a registration handle's deregistration are flows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import httpx

from . import errors
from ._config import Config
from .records import Service

if TYPE_CHECKING:
    from ._http import Transport
    from .aio._http import AsyncTransport

T = TypeVar("T")


class RegistryLike(Protocol):
    """What the long-lived objects need of ``conveyor.Registry`` or ``conveyor.aio.Registry``."""

    config: Config
    transport: Any


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # relative to /api/v1/
    params: Mapping[str, Any] | None = None
    json: Any = None
    resource: str = ""
    timeout: float | None = None


@dataclass(frozen=True)
class Pause:
    """Step: wait this long (``time.sleep`` or ``asyncio.sleep``), then go on."""

    seconds: float


Flow = Generator[Request | Pause, Any, T]


def _options(request: Request) -> dict[str, Any]:
    params = dict(request.params) if request.params else None
    return {"json": request.json, "params": params, "resource": request.resource, "timeout": request.timeout}


def send(transport: Transport, request: Request) -> Any:
    return transport.request(request.method, request.path, **_options(request))


async def asend(transport: AsyncTransport, request: Request) -> Any:
    return await transport.request(request.method, request.path, **_options(request))


def run(flow: Flow[T], transport: Transport) -> T:
    try:
        step = next(flow)
        while True:
            if isinstance(step, Pause):
                time.sleep(step.seconds)
                step = flow.send(None)
                continue
            try:
                answer = send(transport, step)
            except errors.ConveyorError as exc:
                step = flow.throw(exc)
            else:
                step = flow.send(answer)
    except StopIteration as stop:
        return cast(T, stop.value)


async def arun(flow: Flow[T], transport: AsyncTransport) -> T:
    try:
        step = next(flow)
        while True:
            if isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
                step = flow.send(None)
                continue
            try:
                answer = await asend(transport, step)
            except errors.ConveyorError as exc:
                step = flow.throw(exc)
            else:
                step = flow.send(answer)
    except StopIteration as stop:
        return cast(T, stop.value)


# --- queries ---------------------------------------------------------------------------------


def selector_text(selector: Mapping[str, str] | str | None) -> str | None:
    """A label selector as the API takes it (``k=v,k2=v2``) from a dict or a string."""
    if selector is None or isinstance(selector, str):
        return selector or None
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or None


def get_service(service_id: str) -> Flow[Service]:
    body = yield Request("GET", f"services/{service_id}/", resource="service")
    return Service.from_json(body)


def list_services(
    *,
    name: str | None = None,
    type: str | None = None,
    health: str | None = None,
    group_id: str | None = None,
    selector: Mapping[str, str] | str | None = None,
    page_size: int = 1000,
) -> Flow[list[Service]]:
    """Every service matching the filters, all pages followed."""
    params: dict[str, Any] = {"page_size": page_size}
    for key, value in (
        ("name", name),
        ("type", type),
        ("health", health),
        ("group_id", group_id),
        ("selector", selector_text(selector)),
    ):
        if value is not None:
            params[key] = value
    found: list[Service] = []
    while True:
        body = yield Request("GET", "services/", params=params)
        found.extend(Service.from_json(item) for item in body["results"])
        if not body.get("next"):
            return found
        params = dict(httpx.URL(body["next"]).params)


def select(
    name: str, strategy: str, selector: Mapping[str, str] | str | None = None, key: str | None = None
) -> Flow[Service]:
    """GET /balancer/select/: 404 is ``ServiceNotFound``, a 503 that names the service ``NoInstanceAvailable``
    (a 503 without a name is the registry's own trouble: ``Unavailable``)."""
    params: dict[str, Any] = {"name": name, "strategy": strategy}
    if selector_text(selector):
        params["selector"] = selector_text(selector)
    if key is not None:
        params["key"] = key
    try:
        body = yield Request("GET", "balancer/select/", params=params, resource="service")
    except errors.Unavailable as exc:
        if exc.status == 503 and isinstance(exc.body, dict) and exc.body.get("name"):
            raise errors.NoInstanceAvailable(exc.detail, status=503, code=exc.code, body=exc.body) from None
        raise
    return Service.from_json(body)
