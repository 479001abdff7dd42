"""The admin's app configuration: Django's admin with the project's site as the default (project.admin.AdminSite).

Django's documented way to replace `admin.site`: INSTALLED_APPS names this
instead of "django.contrib.admin"; `admin.site`, `@admin.register` and every
app's admin module then use the project's site.
"""

from django.contrib.admin.apps import AdminConfig as DjangoAdminConfig


class AdminConfig(DjangoAdminConfig):
    default_site = "project.admin.AdminSite"
