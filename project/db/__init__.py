"""Which database alias owns each service's tables (docs/design.md §6)."""

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Model
from django.utils import timezone

from project.broker_publish import BrokerUnavailable

logger = logging.getLogger(__name__)


def service_db(service: str) -> str:
    """The alias that owns `service`'s rows: name it in every atomic/on_commit."""
    return settings.SERVICE_DATABASES[service]


def after_commit(using: str, func: Callable[..., Any], /, *args: Any, robust: bool = False, **kwargs: Any) -> None:
    """``transaction.on_commit(func(*args, **kwargs), using=using, robust=robust)``, arguments bound now.

    The partial gets the ``__qualname__`` Django 5.2 logs a failed robust
    callback by: without it the AttributeError escaped instead of the broker
    error being logged (found by the RabbitMQ-restart drill: orders placed
    while the broker was down answered 500).

    robust: an exception is logged, not raised (the commit stands). A publish
    the broker could not take in time (project.broker_publish.BrokerUnavailable:
    the caller's record, e.g. the pending order, is what gets it sent later) is
    one warning line; anything else is Django's error log with its traceback.
    """
    callback = (_QuietWhenBrokerUnavailable if robust else partial)(func, *args, **kwargs)
    callback.__qualname__ = getattr(func, "__qualname__", repr(func))
    transaction.on_commit(callback, using=using, robust=robust)


class _QuietWhenBrokerUnavailable(partial):
    """A partial (``func``, ``args``, ``keywords`` as ever) that logs BrokerUnavailable in one line, not raised."""

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except BrokerUnavailable as exc:
            shown = [repr(a) if isinstance(a, int | str) else "…" for a in self.args]
            shown += [f"{k}={v!r}" if isinstance(v, int | str) else f"{k}=…" for k, v in self.keywords.items()]
            logger.warning("on commit: %s(%s) not published: %s", self.__qualname__, ", ".join(shown), exc)
            return None


class Statement:
    """One SQL statement on one model's table, its text built once per database.

    For the saga's three conditional UPDATEs only (stock taken, sale counted,
    order confirmed): the ORM builds and compiles ``filter().update(F(…))``
    on every call, 0.35–0.7 ms of CPU against 0.06–0.09 ms to run the same
    SQL, and the same-run A/B in docs/performance.md ("ORM or statements
    built once") measured the ORM forms 15 % slower end to end. The
    template names the table as ``{table}`` and columns by field name
    (``{stock}``, ``{product_id}``), filled in quoted from the model's metadata;
    every value is a parameter, prepared by the field `params` names for it as
    the ORM prepares a value it saves (dates and decimals differ by database).
    Queries run through Django's cursor: they are counted and logged like the
    ORM's.
    """

    def __init__(
        self, model: type[Model], template: str, *, params: Iterable[str], returns: Iterable[str] = ()
    ) -> None:
        self.model = model
        self.template = template
        self.fields = [model._meta.get_field(name) for name in params]
        # The fields of a ``RETURNING`` clause, in its order (`fetch`).
        self.returns = [model._meta.get_field(name) for name in returns]
        self._text: dict[str, str] = {}
        self.sql(connections[DEFAULT_DB_ALIAS])  # a misspelt name fails at import, not in a worker

    def sql(self, connection: BaseDatabaseWrapper) -> str:
        text = self._text.get(connection.alias)
        if text is None:
            quote = connection.ops.quote_name
            names = {}
            for field in self.model._meta.concrete_fields:
                names[field.name] = names[field.attname] = quote(field.column)
            text = self._text[connection.alias] = self.template.format(table=quote(self.model._meta.db_table), **names)
        return text

    def execute(self, *values: Any, using: str) -> int:
        """Run the statement with `values` (one per `params`); returns the number of rows it changed."""
        connection = connections[using]
        with connection.cursor() as cursor:
            cursor.execute(self.sql(connection), self._params(values, connection))
            return cursor.rowcount

    def fetch(self, *values: Any, using: str) -> tuple | None:
        """Run a statement whose template ends ``RETURNING`` the fields `returns` names, with `values`.

        Returns the first row it returned, each value converted as the ORM
        converts what it reads (a datetime is aware, whatever the database),
        or None when it changed no row. ``UPDATE … RETURNING``: PostgreSQL,
        and SQLite from 3.35 (https://www.sqlite.org/lang_returning.html).
        """
        connection = connections[using]
        with connection.cursor() as cursor:
            cursor.execute(self.sql(connection), self._params(values, connection))
            row = cursor.fetchone()
        if row is None:
            return None
        return tuple(_from_db(field, value, connection) for field, value in zip(self.returns, row, strict=True))

    def _params(self, values: tuple, connection: BaseDatabaseWrapper) -> list:
        return [field.get_db_prep_save(value, connection) for field, value in zip(self.fields, values, strict=True)]


def _from_db(field: Any, value: Any, connection: BaseDatabaseWrapper) -> Any:
    """`value` of `field` as a raw cursor read it, through the backend's and the field's converters.

    What the ORM's SQL compiler applies to every value it reads.
    """
    column = field.get_col(field.model._meta.db_table)
    for converter in connection.ops.get_db_converters(column) + field.get_db_converters(connection):
        value = converter(value, column, connection)
    return value


def _insert_sql(model: type[Model], connection: BaseDatabaseWrapper, rows: list[Model], *, with_pk: bool):
    """claim_row's INSERT of the instances `rows`, auto_now fields set as save() sets them: SQL and parameters."""
    now = timezone.now()
    fields = [f for f in model._meta.concrete_fields if with_pk or not f.primary_key]
    params = []
    for row in rows:
        for field in fields:
            if getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
                setattr(row, field.attname, now)
            params.append(field.get_db_prep_save(getattr(row, field.attname), connection))
    # Identifiers are quoted from the model's metadata; values are parameters.
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in fields)
    values = ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * len(rows))
    return f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES {values}", params  # noqa: S608


def claim_row(model: type[Model], *, using: str, **values: Any) -> tuple[Model, bool]:
    """Insert `model`'s row keyed by its primary key unless it exists; return it locked, and whether it is new.

    The idempotency records of the saga's steps are claimed this way. A new
    row comes back from one ``INSERT … ON CONFLICT DO NOTHING RETURNING``: it
    is this transaction's own until commit, and a concurrent claim of the same
    key waits for that commit. Only an existing row costs a second statement,
    ``SELECT … FOR UPDATE``. Call it inside ``transaction.atomic(using=using)``.

    Why not the ORM: it has no one-statement way to say whether a row is new.
    ``get_or_create`` reads first (a SELECT, then an INSERT in a savepoint,
    then a SELECT again after an IntegrityError when two deliveries race);
    ``bulk_create(ignore_conflicts=True)`` writes the row but neither returns
    its key nor says whether it inserted it. The saga's first delivery of
    every step would pay two to four statements instead of one, and the
    statement-count tests (inventory, reports: test_a_first_…) hold it to one.
    The SQL is still the ORM's vocabulary: table, columns and values come
    from the model's metadata and are prepared by its fields.
    """
    connection = connections[using]
    row = model(**values)
    sql, params = _insert_sql(model, connection, [row], with_pk=True)
    pk = connection.ops.quote_name(model._meta.pk.column)
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} ON CONFLICT ({pk}) DO NOTHING RETURNING {pk}", params)
        inserted = cursor.fetchone() is not None
    if inserted:
        row._state.adding = False
        row._state.db = using
        return row, True
    return model._default_manager.using(using).select_for_update().get(pk=row.pk), False


@contextmanager
def read_snapshot(*aliases: str) -> Iterator[None]:
    """Read each database in `aliases` from one snapshot, for a report that must add up.

    On PostgreSQL every distinct alias gets a ``REPEATABLE READ READ ONLY``
    transaction, so rows committed while the report reads (orders moving on
    through the saga) are either all seen or not at all: with every service
    on one database the report is exact under load; split databases still
    skew between each other by the time between their first reads. Inside a
    transaction already (tests), or on SQLite, it reads in what is there.
    """
    with ExitStack() as stack:
        for alias in dict.fromkeys(aliases):
            connection = connections[alias]
            if connection.vendor != "postgresql" or connection.in_atomic_block:
                continue
            stack.enter_context(transaction.atomic(using=alias))
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield
