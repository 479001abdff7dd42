"""A private PgBouncer (transaction pooling) in front of a PostgreSQL, for tests and drills: start, read, remove.

`PgBouncer(directory, upstream_port=...)` renders and runs scripts/pgbouncer.sh
(the configuration production uses, deploy/pgbouncer/) on a free loopback port,
trust authentication as user postgres, its files under `directory`. A context
manager: started on enter, stopped and its files removed on exit, pass or fail.
Nothing here imports pytest: testing/plugin.py makes the `pgbouncer` fixture.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

from testing.instances import POSTGRES_PORTS, InstanceError, _port_open, _stop_session, _tail, free_port

BASE_DIR = Path(__file__).resolve().parent.parent
SCRIPT = BASE_DIR / "scripts" / "pgbouncer.sh"


def pgbouncer_binary() -> str | None:
    """The pgbouncer executable (PATH, else Debian's /usr/sbin/pgbouncer), None when not installed."""
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    return found if os.access(found, os.X_OK) else None


def pgbouncer_available() -> str | None:
    """Why no private PgBouncer can run here (None: it can): Debian's pgbouncer package missing."""
    return None if pgbouncer_binary() else "pgbouncer is not installed (make install-pgbouncer)"


class PgBouncer:
    """PgBouncer in transaction pooling on 127.0.0.1:`port` (free if None) before `upstream_host`:`upstream_port`.

    `pool_size` is default_pool_size: server connections per (database,
    user); `max_client_conn` the client connections in all. Every database
    name is passed through to the upstream under the same name. `start()`
    returns once the port accepts connections (InstanceError with the log's
    end after `start_timeout` s); `stop()` is SIGTERM (PgBouncer's immediate
    shutdown), SIGKILL after 10 s; `remove()` stops it and deletes `directory`.
    """

    def __init__(
        self,
        directory: Path,
        *,
        upstream_port: int = 5432,
        upstream_host: str = "127.0.0.1",
        pool_size: int = 20,
        max_client_conn: int = 1000,
        port: int | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        self.directory = Path(directory)
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.port = port or free_port(*POSTGRES_PORTS)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    @property
    def log_file(self) -> Path:
        return self.directory / "pgbouncer.log"

    def url(self, dbname: str, user: str = "postgres") -> str:
        """postgres://USER@127.0.0.1:PORT/DBNAME: a DATABASE_URL through it (with DATABASE_POOLER=pgbouncer)."""
        return f"postgres://{user}@127.0.0.1:{self.port}/{dbname}"

    def env(self) -> dict[str, str]:
        """The PGBOUNCER_* settings scripts/pgbouncer.sh is run with."""
        return {
            "PGBOUNCER_VAR_DIR": str(self.directory),
            "PGBOUNCER_LISTEN_ADDR": "127.0.0.1",
            "PGBOUNCER_LISTEN_PORT": str(self.port),
            "PGBOUNCER_UPSTREAM_HOST": self.upstream_host,
            "PGBOUNCER_UPSTREAM_PORT": str(self.upstream_port),
            "PGBOUNCER_POOL_SIZE": str(self.pool_size),
            "PGBOUNCER_MAX_CLIENT_CONN": str(self.max_client_conn),
            "PGBOUNCER_AUTH_TYPE": "trust",
            "PGBOUNCER_AUTH_USER": "postgres",
        }

    def start(self) -> "PgBouncer":
        if self.process is not None and self.process.poll() is None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603
                ["sh", str(SCRIPT)],  # noqa: S607
                env={**os.environ, **self.env()},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while not _port_open(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise InstanceError(f"PgBouncer on port {self.port} did not start:\n{_tail(self.log_file)}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None:
            _stop_session(self.process, timeout=10)
            self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "PgBouncer":
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc) -> None:
        self.remove()

    def admin(self, command: str) -> list[dict]:
        """One admin console command (``SHOW POOLS``, ``RECONNECT``) as postgres; its rows as dicts by column name."""
        import psycopg2

        connection = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="pgbouncer", connect_timeout=10
        )
        connection.autocommit = True  # the console takes no transactions
        try:
            with connection.cursor() as cursor:
                cursor.execute(command)
                if cursor.description is None:
                    return []
                names = [column.name for column in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            connection.close()

    def log_tail(self, chars: int = 3000) -> str:
        return _tail(self.log_file, chars)
