"""GET /api/v1/balancer/select/: one instance of a service, chosen by a strategy."""

from __future__ import annotations

from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.schema import IDENTIFIER, bad_request, error
from registry.serializers import SelectorField, ServiceSerializer, identifier_field

from . import selection
from .strategies import STRATEGIES


class SelectQuerySerializer(serializers.Serializer):
    name = identifier_field()
    strategy = serializers.ChoiceField(choices=STRATEGIES, default="round_robin")
    selector = SelectorField(required=False)
    key = serializers.CharField(required=False, max_length=1024, trim_whitespace=False)

    def validate(self, attrs: dict) -> dict:
        if attrs["strategy"] == "hash" and not attrs.get("key"):
            raise serializers.ValidationError({"key": ["the hash strategy needs a key"]})
        return attrs


class SelectView(APIView):
    @extend_schema(
        summary="Choose one instance",
        description="Healthy instances first, degraded ones only when none is healthy; weight 0 never. "
        "Round-robin and weighted rotations are shared by every server process.",
        parameters=[
            OpenApiParameter("name", IDENTIFIER, required=True, description="service_name"),
            OpenApiParameter("strategy", str, enum=list(STRATEGIES), default="round_robin"),
            OpenApiParameter("selector", str, description="labels, k=v,k2=v2: all must match"),
            OpenApiParameter("key", str, description="required with strategy=hash"),
        ],
        responses={
            200: ServiceSerializer,
            400: bad_request("Unknown strategy, missing key with hash, bad name or selector."),
            404: error("No service registered under this name."),
            503: error(
                "Instances exist but none is eligible (the body says why, with the name), "
                "or the lease store (Redis) is unreachable."
            ),
        },
    )
    def get(self, request: Request) -> Response:
        # Most selects never reach this view: balancer.fastpath answers them with the same selection core.
        query = SelectQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        p = query.validated_data
        outcome = selection.select(p["name"], p["strategy"], timezone.now(), p.get("selector"), p.get("key"))
        return Response(outcome.body, status=outcome.status)
