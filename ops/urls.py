"""ops' pages, under /admin/ beside Django's admin (project/urls.py includes this before admin.site.urls)."""

from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

from . import views

app_name = "ops"

urlpatterns = [
    path("dashboard/", admin.site.admin_view(views.dashboard_view), name="dashboard"),
    # Where the dashboard was while it lived in orders' admin: old bookmarks still find it.
    path("orders/order/dashboard/", RedirectView.as_view(pattern_name="ops:dashboard", query_string=True)),
]
