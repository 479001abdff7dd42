"""What the OpenAPI description (drf-spectacular) shares across the services' APIs.

The error body of project/http/errors.py as one component, the documented error
responses built from it, the parameters more than one view declares, and the
hook that names each endpoint once.
"""

from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from project.db.fields import MAX_ID


class ErrorSerializer(serializers.Serializer):
    """Every error the API answers with, whatever the status."""

    code = serializers.CharField(
        help_text=(
            "What went wrong, for programs: `invalid`, `parse_error`, `not_authenticated`, "
            "`authentication_failed`, `invalid_credentials`, `permission_denied`, `not_found`, `method_not_allowed`, "
            "`conflict`, "
            "`insufficient_stock`, `request_too_large`, `unsupported_media_type`, `throttled`, "
            "`too_many_fields`, `bad_host`, `bad_request`, "
            "`database_unavailable`, `database_read_only`, `database_busy`, `disk_full`, `broker_unavailable`, ..."
        )
    )
    detail = serializers.CharField(help_text="What went wrong, for people.")
    fields = serializers.DictField(
        required=False,
        help_text=(
            "Input errors only (400): the request's shape with messages at the leaves, e.g. "
            '`{"lines": {"0": {"quantity": ["..."]}}}` (order lines are keyed by their index).'
        ),
    )

    class Meta:
        ref_name = "Error"


_DESCRIPTIONS = {
    400: "The request is not valid (`invalid`, with `fields`), or its JSON does not parse (`parse_error`). "
    "Nothing was written.",
    401: "No credentials (`not_authenticated`) or bad ones (`authentication_failed`).",
    403: "Signed in but not allowed (`permission_denied`): the request needs a Django model permission the "
    "user lacks (the admin's, e.g. `inventory.change_product`), or a session-authenticated write without "
    "its CSRF token.",
    404: "No such resource, or one you may not see (`not_found`): another user's order, without "
    "`orders.view_order`, answers 404, not 403.",
    405: "The resource does not answer this method (`method_not_allowed`); `Allow` lists the ones it does.",
    409: "Conflict with the current state (`conflict`, `insufficient_stock`). Nothing was written.",
    413: "The body is larger than `DATA_UPLOAD_MAX_MEMORY_SIZE` (`request_too_large`); it was not read.",
    415: "The body is not `application/json` (`unsupported_media_type`).",
    429: "Too many requests (`throttled`): wait `Retry-After` seconds.",
}


def errors(*statuses: int, **descriptions: str) -> dict[int, OpenApiResponse]:
    """Documented error responses in the one error shape; `_409="..."` overrides a description."""
    return {
        status: OpenApiResponse(ErrorSerializer, description=descriptions.get(f"_{status}", _DESCRIPTIONS[status]))
        for status in statuses
    }


def id_parameter(name: str, what: str) -> OpenApiParameter:
    return OpenApiParameter(
        name,
        type={"type": "integer", "minimum": 1, "maximum": MAX_ID},
        location=OpenApiParameter.PATH,
        description=f"The {what}'s id.",
        # What Swagger UI fills in: the first demo product (`seed_demo`), the first order placed.
        examples=[OpenApiExample("first", value=1)],
    )


def document_outages(result, generator, request, public):
    """Every operation can answer 503 with Retry-After (project.http.errors.outage_of): say so once, here."""
    for methods in result.get("paths", {}).values():
        for operation in methods.values():
            operation.setdefault("responses", {})["503"] = {
                "description": (
                    "A failure that retrying outlasts: the database unavailable (`database_unavailable`), "
                    "read-only (`database_read_only`) or busy (`database_busy`), the disk full (`disk_full`), "
                    "the broker unavailable where the request needs it (`broker_unavailable`). "
                    "Retry after `Retry-After` seconds (an order with the same `Idempotency-Key`: a failure "
                    "while committing leaves it unknown whether the first attempt was written)."
                ),
                "headers": {
                    "Retry-After": {
                        "schema": {"type": "integer", "minimum": 1},
                        "description": "Seconds to wait before trying again.",
                    }
                },
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
    return result


def one_path_per_endpoint(endpoints, **kwargs):
    """Leave out the slash-less aliases of the API's URLs (project/urls.py): each endpoint once, as `/api/x/`."""
    return [endpoint for endpoint in endpoints if endpoint[0].endswith("/")]


# Response headers.
WWW_AUTHENTICATE = OpenApiParameter(
    "WWW-Authenticate",
    type=str,
    location=OpenApiParameter.HEADER,
    response=[401],
    description="`Token`: the scheme to authenticate with.",
)
RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    type={"type": "integer", "minimum": 1},
    location=OpenApiParameter.HEADER,
    response=[429],
    description="Seconds to wait before trying again.",
)
