from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from project.health import healthz, readyz

urlpatterns = [
    path("admin/", include("ops.urls")),  # the saga dashboard, an admin page of the operations app
    path("admin/", admin.site.urls),
    path("api/", include("orders.urls")),
    path("api/", include("inventory.urls")),
    path("api/", include("reports.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
]

handler404 = "project.errors.not_found_view"
handler500 = "project.errors.server_error_view"
