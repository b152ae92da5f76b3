"""Routes of the services API under /api/v1/."""

from django.urls import path
from rest_framework.routers import SimpleRouter

from .path_ids import fallback
from .views import LeaderView, ServiceHeartbeatView, ServiceViewSet

router = SimpleRouter()
router.register("services", ServiceViewSet, basename="service")

urlpatterns = [
    path("services/<str:service_id>/heartbeat/", ServiceHeartbeatView.as_view(), name="service-heartbeat"),
    path("leader/", LeaderView.as_view(), name="leader"),
    *router.urls,
    fallback("services/{service_id}/"),
    fallback("services/{service_id}/drain/"),
    fallback("services/{service_id}/undrain/"),
]
