"""The API's own endpoints beside the services': its root, listing the others, and a token for a password."""

from axes.helpers import get_cool_off
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from project.http.errors import InvalidCredentials, LockedOut
from project.http.schema import RETRY_AFTER, errors
from project.http.serializers import InputSerializer
from project.http.throttles import TokenObtainThrottle

# What GET /api/ lists: a name for each URL name (the services' urls.py, project/urls.py).
ENDPOINTS = {
    "orders": "order-list",
    "products": "product-list",
    "reports": "product-report-list",
    "token": "token-obtain",
    "schema": "schema",
    "docs": "docs",
}


class ApiRootApi(APIView):
    """Every endpoint's URL, like DRF's router root; public, so a newcomer can start here."""

    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(exclude=True)  # a map of the API, not an operation of it (as DRF's own root)
    def get(self, request):
        links = {name: reverse(url_name, request=request) for name, url_name in ENDPOINTS.items()}
        links["cancelled_orders"] = f"{links['orders']}?status=cancelled"
        return Response(links)


class TokenObtainInputSerializer(InputSerializer, AuthTokenSerializer):
    """DRF's username and password, refusing other fields like every input of the API."""

    class Meta:
        ref_name = "TokenObtainInput"


class TokenOutputSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="Send it as `Authorization: Token <token>`. The same each time.")

    class Meta:
        ref_name = "Token"


class TokenObtainApi(ObtainAuthToken):
    """DRF's obtain_auth_token in the API's manner: JSON in, the one error shape, rate limited."""

    # A password is the credential here: a session or a token sent along is ignored (and needs no CSRF).
    authentication_classes = []
    permission_classes = [AllowAny]
    parser_classes = api_settings.DEFAULT_PARSER_CLASSES
    renderer_classes = api_settings.DEFAULT_RENDERER_CLASSES
    throttle_classes = [TokenObtainThrottle]
    serializer_class = TokenObtainInputSerializer

    @extend_schema(
        operation_id="auth_token_create",
        summary="Get an API token",
        description=(
            "Exchanges a username and password for the user's token (created on first use, then the same "
            "one every time), for any active user, staff or not. Rate limited per client address "
            "(`TOKEN_OBTAIN_THROTTLE`), wrong passwords included. After `AXES_FAILURE_LIMIT` failed logins "
            "for a username, or from an address, its logins are locked for `AXES_COOLOFF_MINUTES` (429 "
            "`locked_out`), the admin's included."
        ),
        tags=["auth"],
        auth=[],
        request=TokenObtainInputSerializer,
        parameters=[RETRY_AFTER],
        examples=[
            OpenApiExample(
                "the superuser of .env.example",
                value={"username": "admin", "password": "change-me"},
                request_only=True,
            )
        ],
        responses={
            200: OpenApiResponse(TokenOutputSerializer, description="The user's token."),
            **errors(
                400,
                413,
                415,
                429,
                _400="No user with this username and password, or an inactive one (`invalid_credentials`); "
                "a missing field (`invalid`, with `fields`); or malformed JSON (`parse_error`).",
                _429="Too many logins from this address (`throttled`), or too many failed ones for this username "
                "or from this address (`locked_out`): wait `Retry-After` seconds.",
            ),
        },
    )
    def post(self, request, *args, **kwargs):
        try:
            return super().post(request, *args, **kwargs)
        except exceptions.ValidationError as exc:
            # AuthTokenSerializer's refusal of the username and password together. django-axes marks the
            # request when its backend refused a locked-out login, or this failure reached the limit.
            if getattr(request, "axes_locked_out", False):
                raise LockedOut(get_cool_off(request)) from None
            if exc.get_codes() == {"non_field_errors": ["authorization"]}:
                raise InvalidCredentials("Unable to log in with the username and password given.") from None
            raise
