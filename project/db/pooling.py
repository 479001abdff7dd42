"""Session settings that survive PgBouncer's transaction pooling: lock_timeout as the role's default, set by migrate.

In transaction pooling a client's transactions run on whichever server
connection is free, so nothing a client sets for its session (``SET``, libpq's
startup ``options``) reliably reaches the next transaction. PgBouncer 1.18
refuses a startup parameter it does not track (only client_encoding,
DateStyle, TimeZone, standard_conforming_strings and application_name; its
``ignore_startup_parameters`` drops the others, "handled by the admin":
pgbouncer.ini(5)). What PgBouncer's maintainers advise for such a parameter is a
default on the server for the role (github.com/pgbouncer/pgbouncer/issues/1074):
``ALTER ROLE … IN DATABASE … SET`` applies to every new server session of that
role in that database, and ``RESET ALL`` / ``DISCARD ALL`` return to it.

`migrate` records DATABASE_LOCK_TIMEOUT_SECONDS so on every PostgreSQL alias
(pooled or not: a direct connection also passes it at startup), and
orderflow.W014 (project/checks.py) reads what a session really gets.
"""

from typing import Any

from django.conf import settings
from django.db import connections
from django.db.models.signals import post_migrate
from django.dispatch import receiver

# project/settings.py's DATABASE_POOLER values: "" connects straight to PostgreSQL.
POOLERS = ("", "pgbouncer")
# What PgBouncer answers a client that sends libpq's startup options (DATABASE_POOLER unset): orderflow.E015.
REFUSED_STARTUP_OPTIONS = "unsupported startup parameter: options"
# The app whose post_migrate applies the role's settings: once per migrate of an alias, not once per app.
_SENDER_LABEL = "orders"


def lock_timeout_ms() -> int:
    """DATABASE_LOCK_TIMEOUT_SECONDS in milliseconds (int, > 0 when orderflow.E013 passes): PostgreSQL's unit for it."""
    return round(settings.DATABASE_LOCK_TIMEOUT_SECONDS * 1000)


def lock_timeout_in_force(using: str) -> int:
    """The lock_timeout, in ms, a new transaction on alias `using` runs with now (0: none), read from the server.

    Opens the alias's connection if needed; raises django.db.Error when the
    database does not answer. On a pooled alias the answer comes from whichever
    server connection PgBouncer hands the transaction.
    """
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT setting::int FROM pg_settings WHERE name = 'lock_timeout'")
        return cursor.fetchone()[0]


def role_defaults(using: str) -> dict[str, str]:
    """The settings the connected role has as defaults in the connected database (pg_db_role_setting), name -> value."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            "SELECT unnest(s.setconfig) FROM pg_db_role_setting s"
            " JOIN pg_database d ON d.oid = s.setdatabase JOIN pg_roles r ON r.oid = s.setrole"
            " WHERE d.datname = current_database() AND r.rolname = current_user"
        )
        return dict(row[0].split("=", 1) for row in cursor.fetchall())


def role_defaults_apply(using: str) -> bool:
    """Make lock_timeout (DATABASE_LOCK_TIMEOUT_SECONDS) the connected role's default in its database; True if changed.

    ``ALTER ROLE CURRENT_USER IN DATABASE <db> SET lock_timeout = <ms>``: every
    role may set its own defaults (PostgreSQL's ALTER ROLE). A default applies
    to sessions opened afterwards, so the role's *idle* sessions in the
    database are ended (pg_terminate_backend, allowed on one's own role's
    sessions): PgBouncer's pooled server connections, which it replaces with
    new ones that have the new value, and direct persistent connections, which
    Django's CONN_HEALTH_CHECKS replace before their next use. A session busy
    in a transaction keeps the old value until it ends (PgBouncer's
    server_lifetime, or RECONNECT on its admin console); the session running
    this gets the value set in it, as a new session would. Nothing is written
    when the value is already there (flush, which tests run often, also sends
    post_migrate). Only PostgreSQL aliases; django.db.Error if the role may not.
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return False
    wanted = str(lock_timeout_ms())
    if role_defaults(using).get("lock_timeout") == wanted:
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        database = connection.ops.quote_name(cursor.fetchone()[0])
        # Utility statements take no parameters; `wanted` is an int's text.
        cursor.execute(f"ALTER ROLE CURRENT_USER IN DATABASE {database} SET lock_timeout = {wanted}")
        # This session was opened before too: give it what a new one gets (through PgBouncer it is
        # a pooled server connection that will serve other clients).
        cursor.execute("SELECT set_config('lock_timeout', %s, false)", [wanted])
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND usename = current_user AND state = 'idle'"
            " AND pid <> pg_backend_pid()"
        )
    return True


@receiver(post_migrate, dispatch_uid="project.db.pooling.role_defaults")
def _role_defaults_after_migrate(sender: Any, app_config: Any = None, using: str = "default", **kwargs: Any) -> None:
    if app_config is not None and app_config.label == _SENDER_LABEL:
        role_defaults_apply(using)
