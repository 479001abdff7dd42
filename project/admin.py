"""Admin pieces the three services (and the operations pages) share, and the admin site itself.

`AdminSite` is the project's default site (project.apps.AdminConfig): every
ModelAdmin registered on it, the services' and Django's and DRF's alike, gets
`GuardedModelAdmin` mixed in, so no crafted query string makes an admin page
answer 500 (docs/design.md §5).
"""

import contextlib
import logging
from collections.abc import Callable
from datetime import datetime
from functools import wraps

from django.contrib import admin
from django.contrib.admin import helpers
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import BadRequest, ValidationError
from django.db import DataError, NotSupportedError, ProgrammingError, router, transaction
from django.db.models.constants import LOOKUP_SEP
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

logger = logging.getLogger(__name__)

# Lookups a query string may not ask for: a pattern from a URL is a denial of
# service (catastrophic backtracking runs in the web process on SQLite, whose
# REGEXP is Python's `re`), and a malformed one was a 500 there.
REFUSED_LOOKUPS = frozenset({"regex", "iregex"})

# What running a changelist's query raises when the query string asks for
# something the database cannot do (the lookups' names were checked by Django):
# a PostgreSQL data exception (SQLSTATE class 22: a number past the column's
# range, a malformed JSON value), a lookup the backend does not have (SQLite's
# JSON `contains`), a value the driver cannot bind (SQLite's 64-bit integers:
# OverflowError; `pk__range=a,b` on a text key: a wrong number of parameters,
# ProgrammingError on SQLite, TypeError from psycopg), a date part Python's
# datetime refuses (`__year=99999`: ValueError while the SQL is built). Django
# shows its "database error" page if the `?e=1` page fails too. Connection
# errors (OperationalError) are not among them: those are the database's
# trouble, not the URL's.
REFUSED_VALUE_ERRORS = (DataError, NotSupportedError, ProgrammingError, OverflowError, TypeError, ValueError)


def humanized_age(since: datetime, now: datetime | None = None) -> str:
    """'45 s', '3 min', '2 h', '4 d': coarse, like a glance at a clock."""
    seconds = max(0, int(((now or timezone.now()) - since).total_seconds()))
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows only the saga's services write: the admin shows them and changes nothing."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class GuardedChangeList(ChangeList):
    """Django's changelist, but a filter value the database refuses is Django's "invalid lookup" (`?e=1`), never a 500.

    Django turns a lookup it cannot build into IncorrectLookupParameters (a
    redirect to `?e=1`, Django's own answer to "wacky lookup parameters"), but
    not a value the database refuses when the query runs. Here the count and
    the page's rows are read where a refusal is caught (in a savepoint when a
    transaction is open, which PostgreSQL would otherwise abort), and it
    becomes the same redirect.
    """

    def get_results(self, request: HttpRequest) -> None:
        using = router.db_for_read(self.model)
        # A savepoint only inside a transaction: outside one nothing needs undoing, and
        # on SQLite (transaction_mode IMMEDIATE) a transaction would take the write lock.
        in_transaction = transaction.get_connection(using).in_atomic_block
        try:
            with transaction.atomic(using=using) if in_transaction else contextlib.nullcontext():
                super().get_results(request)
                self.result_list._fetch_all()  # the page's rows, while refusals are still caught
        except REFUSED_VALUE_ERRORS as exc:
            logger.warning("admin changelist %s: the database refused the query string: %r", self.opts.label, exc)
            raise IncorrectLookupParameters(exc) from exc


class GuardedModelAdmin(admin.ModelAdmin):
    """What every ModelAdmin on the project's site adds (AdminSite.register mixes it in)."""

    def get_changelist(self, request: HttpRequest, **kwargs) -> type[ChangeList]:
        changelist = super().get_changelist(request, **kwargs)
        if issubclass(changelist, GuardedChangeList):
            return changelist
        return type(f"Guarded{changelist.__name__}", (GuardedChangeList, changelist), {})

    def response_action(self, request: HttpRequest, queryset):
        # The selected ids are a POST's: each must be a value of the primary key
        # (Django filters pk__in with them, and a 500 was the answer to "abc").
        pk = self.opts.pk
        for value in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME):
            try:
                if "\x00" in value:
                    raise ValidationError("null character")
                pk.run_validators(pk.to_python(value))
            except ValidationError as exc:
                raise BadRequest(f"Not an id of {self.opts.verbose_name}: {value!r}") from exc
        return super().response_action(request, queryset)

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest) -> bool:
        # False: Django answers 400 (DisallowedModelAdminLookup).
        if REFUSED_LOOKUPS & set(lookup.split(LOOKUP_SEP)):
            return False
        return super().lookup_allowed(lookup, value, request)


def refuse_nul(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """The admin view, answering 400 to a query string with a NUL character in a name or a value.

    PostgreSQL cannot store or compare text with NUL in it (the driver refuses
    it before sending); Django's forms refuse NUL in a POST for the same reason
    (ProhibitNullCharactersValidator), and this does the same for GET.
    """

    @wraps(view)
    def guarded(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if any("\x00" in key or any("\x00" in value for value in values) for key, values in request.GET.lists()):
            raise BadRequest("Null characters are not allowed in the query string.")
        return view(request, *args, **kwargs)

    return guarded


class AdminSite(admin.AdminSite):
    """The project's default admin site (project.apps.AdminConfig): Django's, hardened against crafted URLs.

    Every admin view refuses a NUL in the query string with a 400, and every
    ModelAdmin registered here, whichever app registers it (the services',
    django.contrib.auth's, DRF's tokens), gets GuardedModelAdmin mixed in:
    its changelist turns values the database refuses into Django's `?e=1`
    redirect and refuses regex lookups from the query string (400).
    """

    def admin_view(self, view, cacheable=False):
        return super().admin_view(refuse_nul(view), cacheable)

    def register(self, model_or_iterable, admin_class=None, **options) -> None:
        admin_class = admin_class or admin.ModelAdmin
        if not issubclass(admin_class, GuardedModelAdmin):
            # As Django's register builds a subclass for **options: same name and module.
            admin_class = type(
                admin_class.__name__, (GuardedModelAdmin, admin_class), {"__module__": admin_class.__module__}
            )
        super().register(model_or_iterable, admin_class, **options)
