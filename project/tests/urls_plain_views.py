"""project.urls plus two plain Django views (no DRF) under /api/ and beside it, for tests/test_responses.py:
what Django itself refuses while such a view reads the request (a body too large, a PermissionDenied)."""

from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from project.urls import handler400, handler403, handler404, handler500, urlpatterns  # noqa: F401


@csrf_exempt
def read_form(request):
    return HttpResponse(f"{len(request.POST)} fields")


def refuse(request):
    raise PermissionDenied


urlpatterns = [
    path("api/plain/form/", read_form),
    path("api/plain/refuse/", refuse),
    path("plain/form/", read_form),
    path("plain/refuse/", refuse),
    *urlpatterns,
]
