"""HTTP views of the registry: parse, call ``registry.leases``, shape the response."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import connection
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.defaults import page_not_found
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import exceptions, mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from . import leases, listing, metrics, reregister
from .auth import token_from_header
from .leadership import LEADERSHIP
from .lifecycle import Actor
from .listing import ServiceListPagination
from .models import Health, LeaderTerm, Service
from .path_ids import path_identifier_error
from .redis_client import get_redis
from .schema import BEARER_AUTH, IDENTIFIER, UNAUTHORIZED, bad_request, error
from .serializers import (
    HeartbeatResponseSerializer,
    HeartbeatSerializer,
    LeaderSerializer,
    RegisteredServiceSerializer,
    RegisterSerializer,
    ServiceQuerySerializer,
    ServiceSerializer,
    parse_heartbeat_body,
    registered_body,
)

log = logging.getLogger(__name__)

_ERRORS = {
    400: bad_request(),
    401: UNAUTHORIZED,
    403: error("The token did not create this service and is not staff."),
    404: error("No such service."),
}
OPERATORS_ONLY = error("Only staff tokens (operators) may drain or undrain.")


@extend_schema_view(
    list=extend_schema(
        summary="List services",
        parameters=[
            OpenApiParameter("name", IDENTIFIER, description="service_name"),
            OpenApiParameter("type", str, enum=["source", "transform", "sink"]),
            OpenApiParameter(
                "health",
                str,
                enum=["healthy", "degraded", "unhealthy", "unknown"],
                description="effective health (a lapsed lease is unhealthy)",
            ),
            OpenApiParameter("group_id", IDENTIFIER),
            OpenApiParameter("selector", str, description="labels, k=v,k2=v2: all must match"),
        ],
        responses={200: ServiceSerializer(many=True), 400: _ERRORS[400], 401: _ERRORS[401]},
    ),
    retrieve=extend_schema(
        summary="One service", responses={200: ServiceSerializer, 401: _ERRORS[401], 404: _ERRORS[404]}
    ),
    destroy=extend_schema(
        summary="Deregister", responses={204: None, 401: _ERRORS[401], 403: _ERRORS[403], 404: _ERRORS[404]}
    ),
)
class ServiceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Service.objects.select_related("owner")
    serializer_class = ServiceSerializer
    pagination_class = ServiceListPagination
    lookup_value_regex = "[A-Za-z0-9._:-]{1,128}"

    def get_serializer_context(self):  # type: ignore[no-untyped-def]
        return {**super().get_serializer_context(), "now": self.now}

    def initial(self, request: Request, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.now = timezone.now()
        super().initial(request, *args, **kwargs)

    def get_queryset(self):  # type: ignore[no-untyped-def]
        if self.action != "list":
            return super().get_queryset()
        return self.list_queryset()()

    def list_queryset(self) -> Callable[[], QuerySet[Service]]:
        """Check the list's query parameters now (a 400 naming the field) and return what builds its
        queryset, called only when the database is read (a remembered page needs none)."""
        query = ServiceQuerySerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        self.paginator.ids = listing.ids_for(params)
        if "health" not in params:  # what the database holds for these filters may be remembered
            self.paginator.reading = listing.PAGES.entry(listing.filters_key(params))

        def build() -> QuerySet[Service]:
            qs = listing.filtered(params)
            if "health" in params:
                qs = qs.with_effective_health(params["health"], leases.lapsed_ids(self.now))
            return qs

        return build

    def list(self, request: Request, *args, **kwargs) -> Response:  # type: ignore[no-untyped-def]
        # A page of tuples written straight to JSON; for a selective selector the page query also counts;
        # pages and counts read are remembered until a service changes (registry.listing).
        rows = self.paginate_queryset(self.list_queryset())  # type: ignore[arg-type]
        return self.get_paginated_response(listing.representation(rows, self.now))

    @extend_schema(
        summary="Register or re-register",
        request=RegisterSerializer,
        responses={
            201: RegisteredServiceSerializer,
            200: RegisteredServiceSerializer,
            400: _ERRORS[400],
            403: error("service_id is registered by another token, and this one is not staff."),
        },
    )
    def create(self, request: Request) -> Response:
        incoming = RegisterSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        # The request it last registered with, unchanged since: renew the lease, write nothing.
        request_digest = reregister.digest(data)
        if not getattr(request._request, "scope", {}).get(reregister.CHECKED):  # else registry.fast_register did
            unchanged = leases.renew_unchanged(
                data["service_id"], request_digest, data.get("health") or Health.HEALTHY, request.user, self.now
            )
            if unchanged is not None:
                return Response(unchanged, status=status.HTTP_200_OK)
        service, created = leases.register(data, request.user, self.now)
        owner = request.user if service.owner_id == request.user.pk else service.owner
        body = registered_body(service, self.now, owner.name if owner is not None else None)
        leases.remember_registration(service, request_digest, body)
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    def destroy(self, request: Request, pk: str) -> Response:
        leases.deregister(pk, request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Drain (operator)",
        description="Takes the service out of selection (weight 0) until an operator undrains it, also across "
        "its re-registrations, as the admin's Drain action does. Staff tokens only. Draining a drained service "
        "changes nothing. Answers the service as it is now.",
        request=None,
        responses={200: ServiceSerializer, 401: _ERRORS[401], 403: OPERATORS_ONLY, 404: _ERRORS[404]},
    )
    @action(detail=True, methods=["post"])
    def drain(self, request: Request, pk: str) -> Response:
        return self._operator_change(request, leases.drain)

    @extend_schema(
        summary="Undrain (operator)",
        description="Puts a drained service back in selection with the weight it had before the drain (an "
        "operator's weight, else its own), as the admin's Undrain action does. Staff tokens only.",
        request=None,
        responses={200: ServiceSerializer, 401: _ERRORS[401], 403: OPERATORS_ONLY, 404: _ERRORS[404]},
    )
    @action(detail=True, methods=["post"])
    def undrain(self, request: Request, pk: str) -> Response:
        return self._operator_change(request, leases.undrain)

    def _operator_change(self, request: Request, change: Callable[..., int]) -> Response:
        if not request.user.is_staff:
            raise exceptions.PermissionDenied("Draining is an operator's decision: only staff tokens may do it.")
        pk = self.kwargs["pk"]
        if not Service.objects.filter(pk=pk).exists():
            raise exceptions.NotFound(f"no service is registered under the id {pk!r}")
        change([pk], by=Actor.token(request.user))
        service = Service.objects.select_related("owner").filter(pk=pk).first()
        if service is None:  # deregistered meanwhile
            raise exceptions.NotFound(f"no service is registered under the id {pk!r}")
        return Response(ServiceSerializer(service, context=self.get_serializer_context()).data)


class ServiceHeartbeatView(APIView):
    """POST /services/{id}/heartbeat/.

    Under the ASGI server this path is answered by ``registry.fastpath`` before Django is
    reached; both run ``leases.heartbeat_flow`` and ``parse_heartbeat_body``, so they answer
    alike. Authentication is part of the flow (against the Redis token cache), not DRF's.
    """

    authentication_classes: list = []
    permission_classes = [AllowAny]
    fast_path = True  # served by registry.fastpath: any content type is read as JSON, no throttle

    @extend_schema(
        summary="Renew a lease",
        description="Renews the lease; the optional body reports health (none means healthy). "
        "404 once the service is deregistered or expired: register it again.",
        request=HeartbeatSerializer,
        auth=BEARER_AUTH,
        responses={200: HeartbeatResponseSerializer, **_ERRORS},
    )
    def post(self, request: Request, service_id: str) -> Response:
        health, error = parse_heartbeat_body(request.body)
        error = path_identifier_error("service_id", service_id) or error
        if error is not None:
            return Response(error, status=400)
        result = leases.heartbeat(
            service_id, token_from_header(request.META.get("HTTP_AUTHORIZATION")), health, timezone.now()
        )
        headers = {"WWW-Authenticate": 'Bearer realm="api"'} if result.status == 401 else None
        return Response(result.body, status=result.status, headers=headers)


class LeaderView(APIView):
    """GET /leader/: who runs the periodic jobs now, and the fencing token of its term."""

    methods_without_lease_store = ("GET",)  # read from the database only: no 503

    @extend_schema(
        summary="Current leader",
        description="The holder of the periodic-jobs leadership, its term (the fencing token) and when its lock "
        "runs out unless renewed. An expires_at in the past means no process leads at the moment.",
        responses={200: LeaderSerializer, 401: _ERRORS[401], 404: error("No leader has been elected yet.")},
    )
    def get(self, request: Request) -> Response:
        row = LeaderTerm.objects.filter(name=LEADERSHIP).first()
        if row is None:
            raise exceptions.NotFound("No leader has been elected yet.")
        return Response(LeaderSerializer(row).data)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler404: JSON under /api/ (a path that matches no route, e.g. an invalid identifier), HTML elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return page_not_found(request, exception)


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    """Database and Redis reachable: 200, else 503 naming what is down in fixed words.

    The exception text (database host and user, socket paths) goes to the log, never the response:
    probes are often reachable by more people than the logs are.
    """
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        log.error("readyz: database unavailable: %s", exc)
        checks["database"] = "unavailable"
    try:
        get_redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        log.error("readyz: redis unavailable: %s", exc)
        checks["redis"] = "unavailable"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503)


@extend_schema(exclude=True)
def metrics_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(metrics.render(timezone.now()), content_type="text/plain; version=0.0.4; charset=utf-8")
