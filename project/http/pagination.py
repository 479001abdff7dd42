"""How every API list is paged: `?page=` and a bounded `?page_size=`."""

from django.conf import settings
from rest_framework import pagination


class PageNumberPagination(pagination.PageNumberPagination):
    """PAGE_SIZE items a page unless `?page_size=` asks for another number, at most API_MAX_PAGE_SIZE.

    A larger `page_size` is cut to the maximum (DRF's behaviour), so one
    request never reads an unbounded number of rows.
    """

    page_size_query_param = "page_size"

    @property
    def max_page_size(self) -> int:
        # Read per request, not at import, like the throttle rates.
        return settings.API_MAX_PAGE_SIZE

    def get_page_size(self, request) -> int:
        # DRF cuts only an asked-for size; a maximum below PAGE_SIZE bounds the default too.
        return min(super().get_page_size(request), self.max_page_size)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["description"] = (
                    f"Results per page: {min(settings.REST_FRAMEWORK['PAGE_SIZE'], settings.API_MAX_PAGE_SIZE)} "
                    f"unless given, at most {settings.API_MAX_PAGE_SIZE} (a larger number is cut to it)."
                )
                parameter["schema"] = {"type": "integer", "minimum": 1}
        return parameters
