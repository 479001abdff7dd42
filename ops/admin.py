"""ops in the admin: the index links to the saga dashboard (ops.views, routed by ops.urls).

ops has no models to register; the admin imports this module at start-up
(autodiscover), which is where the index learns about the dashboard.
"""

from django.contrib import admin

admin.site.index_template = "admin/ops/index.html"
