"""Response headers every API answer carries: it is never stored by a cache."""

from django.utils.cache import add_never_cache_headers

# Public and the same for everyone (the OpenAPI document and Swagger UI): caches may keep them.
CACHEABLE = frozenset({"/api/schema/", "/api/schema", "/api/docs/", "/api/docs"})


def is_api_path(path: str) -> bool:
    """Whether `path` (request.path) is the API's: `/api` itself (it answers without its slash) or under `/api/`."""
    return path == "/api" or path.startswith("/api/")


class ApiNoStoreMiddleware:
    """`Cache-Control: max-age=0, no-cache, no-store, must-revalidate, private` (and `Expires`) on the API.

    API answers carry a user's data (their orders, a token), so no shared or
    browser cache may keep them (RFC 9111 §5.2.2.5 no-store, §5.2.2.7
    private); Django's add_never_cache_headers, as its never_cache decorator.
    Errors too, Django's own 400s included, so this sits first in MIDDLEWARE:
    a refusal raised by a later middleware (a bad Host in CommonMiddleware)
    is already a response when it gets here. The schema and the docs
    (CACHEABLE) are left as they are.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if is_api_path(request.path) and request.path not in CACHEABLE:
            add_never_cache_headers(response)
        return response
