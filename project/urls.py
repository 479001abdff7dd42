from django.contrib import admin
from django.urls import URLResolver, include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from project.http.api import ApiRootApi, TokenObtainApi
from project.http.health import healthz, readyz
from project.http.views import landing


def without_trailing_slash(patterns: list, prefix: str = "") -> list:
    """Each URL of `patterns` (and of what they include) again without its trailing slash, same view.

    Else Django's APPEND_SLASH answers `POST /api/orders` with an empty 301 to
    `/api/orders/`, and clients follow it with a GET and no body. The schema
    names each endpoint once, with its slash (project.http.schema.one_path_per_endpoint).
    """
    aliases = []
    for pattern in patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            aliases += without_trailing_slash(pattern.url_patterns, route)
        elif route.endswith("/"):
            aliases.append(path(route.removesuffix("/"), pattern.callback, pattern.default_args))
    return aliases


api = [
    path("", ApiRootApi.as_view(), name="api-root"),
    path("auth/token/", TokenObtainApi.as_view(), name="token-obtain"),
    path("", include("orders.urls")),
    path("", include("inventory.urls")),
    path("", include("reports.urls")),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
]

urlpatterns = [
    path("", landing, name="landing"),
    path("admin/", include("ops.urls")),  # the saga dashboard, an admin page of the operations app
    path("admin/", admin.site.urls),
    path("api/", include(api)),
    *without_trailing_slash([path("api/", include(api))]),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
]

# Under /api/ every error has the API's JSON shape, Django's own included (a bad Host header, too many
# query parameters, a body too large); other paths keep Django's pages.
handler400 = "project.http.errors.bad_request_view"
handler403 = "project.http.errors.permission_denied_view"
handler404 = "project.http.errors.not_found_view"
handler500 = "project.http.errors.server_error_view"
