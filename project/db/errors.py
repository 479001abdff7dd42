"""What a database error means: a fault of the infrastructure that passes, or a fault of the data or the code.

One classifier for every caller (saga steps retry the first kind and record
the second; the API answers 503 for the first): `database_fault(exc)`.

PostgreSQL errors are classified by SQLSTATE, the code psycopg2 keeps as
`pgcode` on the error Django wraps (``exc.__cause__``); the classes are
PostgreSQL's "Appendix A. PostgreSQL Error Codes"
(https://www.postgresql.org/docs/current/errcodes-appendix.html). SQLite
has no codes in Python's sqlite3 before 3.11's `sqlite_errorname`, and
Django does not keep them, so its messages are read
(https://www.sqlite.org/rescode.html).
"""

from django.db import DatabaseError, InterfaceError, OperationalError

#: The kinds `database_fault` returns, each a passing fault.
UNAVAILABLE = "unavailable"  # refused, cut, shutting down, not yet accepting, too many connections
READ_ONLY = "read_only"  # a standby or a primary set read-only (a managed failover in progress)
DISK_FULL = "disk_full"  # the server's, or the embedded database's, disk
CONTENTION = "contention"  # serialization failure, deadlock, lock or statement timeout: run it again

_BY_SQLSTATE = {
    "3D000": UNAVAILABLE,  # invalid_catalog_name: the database is not there (yet, or any more)
    "25006": READ_ONLY,  # read_only_sql_transaction
    "53100": DISK_FULL,  # disk_full
    "53200": UNAVAILABLE,  # out_of_memory
    "53300": UNAVAILABLE,  # too_many_connections
    "55P03": CONTENTION,  # lock_not_available (lock_timeout)
    "57014": CONTENTION,  # query_canceled (statement_timeout)
    "57P01": UNAVAILABLE,  # admin_shutdown
    "57P02": UNAVAILABLE,  # crash_shutdown
    "57P03": UNAVAILABLE,  # cannot_connect_now (starting up, or recovering)
    "58030": DISK_FULL,  # io_error
}
_BY_SQLSTATE_CLASS = {
    "08": UNAVAILABLE,  # connection exception
    "28": UNAVAILABLE,  # invalid authorization: pg_hba.conf rejects, a password refused
    "40": CONTENTION,  # transaction rollback: serialization failure (40001), deadlock (40P01)
    "53": UNAVAILABLE,  # insufficient resources
}
# SQLite's messages for its passing faults (result codes SQLITE_BUSY, SQLITE_LOCKED,
# SQLITE_FULL, SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_READONLY).
_SQLITE_MESSAGES = (
    ("database is locked", CONTENTION),
    ("database table is locked", CONTENTION),
    ("database or disk is full", DISK_FULL),
    ("disk i/o error", DISK_FULL),
    ("unable to open database", UNAVAILABLE),
    ("attempt to write a readonly database", READ_ONLY),
)


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE of a database error (Django's or psycopg2's), or None (SQLite, no code)."""
    for error in (exc, exc.__cause__):
        code = getattr(error, "pgcode", None)
        if code:
            return code
    return None


def database_fault(exc: BaseException) -> str | None:
    """`exc`'s kind when it is a passing fault of the database, else None.

    Returns one of UNAVAILABLE, READ_ONLY, DISK_FULL, CONTENTION; None for
    anything else: data exceptions (SQLSTATE class 22, e.g. numeric
    overflow), integrity violations (23), syntax and undefined objects (42),
    and exceptions that are not database errors at all — faults of the data
    or the code, which running again will not fix.

    An OperationalError or InterfaceError without a SQLSTATE is a failure to
    connect or a connection that broke (psycopg2 raises it without a code
    when the server cannot be reached); SQLite's own are read by message.
    """
    if not isinstance(exc, DatabaseError):
        return None
    code = sqlstate(exc)
    if code:
        return _BY_SQLSTATE.get(code) or _BY_SQLSTATE_CLASS.get(code[:2])
    if isinstance(exc, InterfaceError):
        return UNAVAILABLE
    if isinstance(exc, OperationalError):
        message = str(exc).lower()
        for text, kind in _SQLITE_MESSAGES:
            if text in message:
                return kind
        if message.startswith(("no such ", "near ", "table ")) or "syntax error" in message:
            return None  # SQLite reports a bad statement as OperationalError too: a bug
        return UNAVAILABLE
    return None
