"""The web pages outside the admin and the API: the landing page at `/`."""

from django.conf import settings
from django.shortcuts import render
from django.views.decorators.http import require_safe


@require_safe
def landing(request):
    """Where everything is: the admin, the API and its docs, Flower, the health probes."""
    return render(request, "landing.html", {"flower_url": settings.FLOWER_URL})
