from django.contrib import admin
from django.urls import include, path

from project.health import healthz

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("orders.urls")),
    path("api/", include("inventory.urls")),
    path("api/", include("reports.urls")),
    path("healthz", healthz, name="healthz"),
]

handler404 = "project.errors.not_found_view"
handler500 = "project.errors.server_error_view"
