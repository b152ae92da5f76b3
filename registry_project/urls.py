"""Top-level routes: the v1 API, probes, metrics, OpenAPI schema and docs, and the admin."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from registry.views import healthz, metrics_view, readyz

# A path under /api/ that matches no route answers JSON like every other API error.
handler404 = "registry.views.not_found"

admin.site.site_header = "conveyor-registry"
admin.site.site_title = "conveyor-registry admin"
admin.site.index_title = "Operations"

urlpatterns = [
    path("api/v1/", include("registry.urls")),
    path("api/v1/", include("groups.urls")),
    path("api/v1/", include("balancer.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
]
