"""The one error type services raise, and the one JSON shape the API answers with.

Every API error body is ``{"code": str, "detail": str, "fields": {...}}``;
``fields`` is present only for input errors and maps a field path to messages.

An outage that retrying can outlast — the database unreachable, read-only or
busy, a full disk, the broker unavailable — is a ``503`` with ``Retry-After``
(`outage_of` classifies it), from the API, the admin and any other page alike.
"""

import errno
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from html import escape
from typing import Any

from django.conf import settings
from django.core.exceptions import (
    DisallowedHost,
    PermissionDenied,
    RequestDataTooBig,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DatabaseError
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views import defaults
from kombu.exceptions import OperationalError as BrokerOperationalError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from project.broker_publish import BrokerBlocked, BrokerUnavailable
from project.db import errors as db_errors
from project.http.headers import is_api_path

logger = logging.getLogger(__name__)


class ApplicationError(Exception):
    """A business error: the request (or the saga step) cannot succeed as asked.

    Saga tasks never retry these; the API answers them with `http_status`.
    """

    code = "application_error"
    http_status = status.HTTP_400_BAD_REQUEST

    def __init__(self, message: str, *, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


class InvalidInput(ApplicationError):
    code = "invalid"


class NotFound(ApplicationError):
    code = "not_found"
    http_status = status.HTTP_404_NOT_FOUND


class InvalidCredentials(ApplicationError):
    code = "invalid_credentials"


class Conflict(ApplicationError):
    code = "conflict"
    http_status = status.HTTP_409_CONFLICT


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is larger than the server accepts."
    default_code = "request_too_large"


class LockedOut(exceptions.Throttled):
    """Too many failed password logins for this username or from this address (django-axes): 429.

    `cool_off` is how long the lock lasts after the latest failure (None: until
    an administrator lifts it); it is the Retry-After, so a client that waits it
    out passes.
    """

    default_detail = "Too many failed logins for this username or from this address."
    default_code = "locked_out"

    def __init__(self, cool_off: timedelta | None) -> None:
        if cool_off is None:
            super().__init__(detail=f"{self.default_detail} Logins stay locked until an administrator unlocks them.")
        else:
            super().__init__(wait=cool_off.total_seconds())


def lockout_response(request, original_response=None, credentials=None) -> HttpResponse:
    """django-axes's answer to a locked-out login (AXES_LOCKOUT_CALLABLE), 429 either way.

    Under /api/ the API's JSON shape, code `locked_out`, with Retry-After the
    cool-off; elsewhere (the admin's login) the page AXES_LOCKOUT_TEMPLATE with
    the failure limit and the cool-off in minutes (None: until unlocked).
    `original_response` (what the login view answered) and `credentials` are
    the arguments django-axes passes (axes.helpers.get_lockout_response).
    """
    from axes.helpers import get_cool_off, get_failure_limit  # it imports axes's models: not before apps are ready

    cool_off = get_cool_off(request)
    if is_api_path(request.path):
        locked = LockedOut(cool_off)
        response: HttpResponse = JsonResponse(error_body(locked.default_code, str(locked.detail)), status=429)
        if locked.wait is not None:
            response["Retry-After"] = str(locked.wait)
        return response
    context = {
        "failure_limit": get_failure_limit(request, credentials),
        "cool_off_minutes": math.ceil(cool_off.total_seconds() / 60) if cool_off else None,
    }
    return render(request, settings.AXES_LOCKOUT_TEMPLATE, context, status=429)


def error_body(code: str, detail: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "detail": detail}
    if fields:
        body["fields"] = fields
    return body


# --- outages: 503 with Retry-After -----------------------------------------------------------


@dataclass(frozen=True)
class Outage:
    """A failure that retrying later can outlast: the API's code and detail, and when to retry (seconds)."""

    code: str
    detail: str
    retry_after: int
    #: For /readyz: "unavailable", "read-only", "busy", "disk full", "blocked".
    state: str


DATABASE_UNAVAILABLE = Outage(
    "database_unavailable", "The database is unavailable. Try again shortly.", 5, "unavailable"
)
DATABASE_READ_ONLY = Outage(
    "database_read_only",
    "The database accepts no writes at the moment (read-only, e.g. during a failover). Try again later.",
    30,
    "read-only",
)
DATABASE_BUSY = Outage(
    "database_busy", "The database is busy (a lock or a conflicting transaction). Try again.", 1, "busy"
)
DISK_FULL = Outage("disk_full", "The server's disk is full. Try again later.", 60, "disk full")
BROKER_UNAVAILABLE = Outage(
    "broker_unavailable", "The message broker is unavailable. Try again shortly.", 5, "unavailable"
)
BROKER_BLOCKED = Outage(
    "broker_unavailable",
    "The message broker accepts no messages at the moment (a resource alarm). Try again later.",
    10,
    "blocked",
)

# project.db.errors classifies database errors (SQLSTATE, SQLite's messages) for the saga and here.
_BY_DATABASE_FAULT = {
    db_errors.UNAVAILABLE: DATABASE_UNAVAILABLE,
    db_errors.READ_ONLY: DATABASE_READ_ONLY,
    db_errors.DISK_FULL: DISK_FULL,
    db_errors.CONTENTION: DATABASE_BUSY,
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what caused it (``__cause__``, else ``__context__``), outermost first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def outage_of(exc: BaseException) -> Outage | None:
    """The outage `exc` stands for, or None when it is not one (a bug, a refused request: a 500 or 4xx).

    Looks through the exception and its causes:

    * a database error: project.db.errors.database_fault (by SQLSTATE on
      PostgreSQL: connection exceptions, shutdowns, insufficient resources,
      25006 read-only, 53100 disk full, serialization failures and deadlocks;
      by message on SQLite);
    * ``OSError`` ENOSPC/EDQUOT anywhere (the embedded broker's folder, a file
      cache): disk full;
    * project.broker_publish.BrokerBlocked / BrokerUnavailable, kombu's
      ``OperationalError``: the broker.
    """
    for error in _chain(exc):
        if isinstance(error, BrokerBlocked):
            return BROKER_BLOCKED
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return DISK_FULL
    for error in _chain(exc):
        if isinstance(error, DatabaseError):
            kind = db_errors.database_fault(error)
            return _BY_DATABASE_FAULT.get(kind) if kind else None
        if isinstance(error, BrokerUnavailable | BrokerOperationalError):
            return BROKER_UNAVAILABLE
    return None


def _log_outage(outage: Outage, exc: BaseException, where: str) -> None:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    logger.warning("%s: 503 %s (%s: %s)", where, outage.code, type(exc).__name__, first_line)


def _logged(response: HttpResponse) -> HttpResponse:
    """Mark the 503 as logged (django.utils.log.log_response's flag): `_log_outage` said it, with the cause."""
    response._has_been_logged = True
    return response


def outage_response(outage: Outage, request=None) -> HttpResponse:
    """The 503 for `outage`: the API's JSON shape under /api/ (and for JSON clients), a short page elsewhere."""
    wants_json = request is None or is_api_path(request.path)
    if wants_json:
        response: HttpResponse = JsonResponse(error_body(outage.code, outage.detail), status=503)
    else:
        title = "<!doctype html><title>Service unavailable</title><h1>Service unavailable</h1>"
        page = f"{title}<p>{escape(outage.detail)}</p>"
        response = HttpResponse(page, status=503, content_type="text/html; charset=utf-8")
    response["Retry-After"] = str(outage.retry_after)
    return _logged(response)


class OutageMiddleware:
    """An outage raised by any view (the admin's included) is a 503 with Retry-After, not a 500.

    The API's views answer it themselves (`exception_handler`); this catches
    the rest. An outage raised outside a view (a middleware saving the session)
    reaches `server_error_view`, which answers the same.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        outage = outage_of(exception)
        if outage is None:
            return None
        _log_outage(outage, exception, f"{request.method} {request.path}")
        return outage_response(outage, request)


def exception_handler(exc: Exception, context: dict) -> Response | None:
    outage = outage_of(exc)
    if outage is not None:
        set_rollback()
        request = context.get("request")
        _log_outage(outage, exc, f"{request.method} {request.path}" if request is not None else "API")
        return _logged(
            Response(
                error_body(outage.code, outage.detail), status=503, headers={"Retry-After": str(outage.retry_after)}
            )
        )
    if isinstance(exc, ApplicationError):
        return Response(error_body(exc.code, exc.message, exc.fields), status=exc.http_status)
    if isinstance(exc, DjangoValidationError):
        # A model's full_clean() in a service (e.g. a taken sku): a 400, not a 500.
        exc = exceptions.ValidationError(as_serializer_error(exc))
    elif isinstance(exc, RequestDataTooBig):
        # Above DATA_UPLOAD_MAX_MEMORY_SIZE: refused unread, in the API's shape (else Django's HTML 400).
        exc = RequestTooLarge()
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        fields = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        response.data = error_body("invalid", "The request is not valid.", fields)
    else:
        detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
        code = exc.get_codes() if isinstance(exc, exceptions.APIException) else "error"
        response.data = error_body(str(code), str(detail))
    return response


def _is_api(request) -> bool:
    return is_api_path(request.path)


def _bad_request_body(exception: BaseException | None) -> tuple[int, dict[str, Any]]:
    """The status and error body for what Django refuses before (or while) a view reads the request."""
    if isinstance(exception, RequestDataTooBig):
        return 413, error_body(RequestTooLarge.default_code, str(RequestTooLarge.default_detail))
    if isinstance(exception, TooManyFieldsSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        return 400, error_body("too_many_fields", f"More than {limit} query parameters or form fields.")
    if isinstance(exception, TooManyFilesSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FILES
        return 400, error_body("too_many_files", f"More than {limit} files.")
    if isinstance(exception, DisallowedHost):
        # Not echoed back: the Host header is the client's text.
        return 400, error_body("bad_host", "The Host header names no host this server answers for.")
    return 400, error_body("bad_request", "The server could not read this request.")


def bad_request_view(request, exception=None):
    """Django's 400s in the API's shape under /api/; Django's own page elsewhere (project/urls.py handler400).

    Django answers a SuspiciousOperation or BadRequest raised anywhere (a
    middleware, the view) through this: a Host header not in ALLOWED_HOSTS
    (`bad_host`), more than DATA_UPLOAD_MAX_NUMBER_FIELDS query parameters or
    form fields (`too_many_fields`), too many files, a malformed body
    (`bad_request`). A body above DATA_UPLOAD_MAX_MEMORY_SIZE read outside a
    DRF view (RequestDataTooBig, which Django files under 400) is the API's
    413 `request_too_large` here, as inside one (`exception_handler`).
    """
    if not _is_api(request):
        return defaults.bad_request(request, exception)
    status_code, body = _bad_request_body(exception)
    return JsonResponse(body, status=status_code)


def permission_denied_view(request, exception=None):
    """Django's 403 (PermissionDenied outside a DRF view) in the API's shape under /api/, its page elsewhere."""
    if not _is_api(request):
        return defaults.permission_denied(request, exception)
    return JsonResponse(error_body("permission_denied", str(exceptions.PermissionDenied.default_detail)), status=403)


def not_found_view(request, exception=None):
    """404 for URLs no view matched: the API's JSON shape under /api/, Django's page elsewhere."""
    if _is_api(request):
        return JsonResponse(error_body("not_found", "No such resource."), status=404)
    return defaults.page_not_found(request, exception)


def server_error_view(request):
    """500, or 503 with Retry-After when the error is an outage (`outage_of`) raised outside any view.

    Django calls it while handling the exception, so ``sys.exc_info()`` holds it.
    """
    exc = sys.exc_info()[1]
    outage = outage_of(exc) if exc is not None else None
    if outage is not None:
        _log_outage(outage, exc, f"{request.method} {request.path}")
        return outage_response(outage, request)
    if is_api_path(request.path):
        return JsonResponse(error_body("server_error", "The server failed; the error was logged."), status=500)
    return defaults.server_error(request)
