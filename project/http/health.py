"""Probes for load balancers and orchestrators: `/healthz` (liveness) and `/readyz` (readiness).

`/healthz` answers 200 whenever this process can serve a request at all; it
touches no database or broker, so an outage elsewhere never gets healthy web
processes restarted. `/readyz` answers 200 only when every database alias
answers and takes writes, the broker takes a message, and (embedded shape) the
local disk has room, else 503 naming what failed and how ("read-only: …",
"blocked: …", "disk full: …"): send traffic on it. Every probe is bounded in
time, the broker's by BROKER_PUBLISH_TIMEOUT_SECONDS.

`/readyz` also reports each service queue's consumers under "queues": a queue
with messages waiting and no consumer, or (on the embedded broker, which can
tell) none that took a message for CONSUMER_STALL_SECONDS, is "stalled". That
is a worker problem, not the web's: it is reported, and does not make the web
process unready (a load balancer would otherwise take every web process away
while orders can still be taken and wait for the worker). On quorum queues
"dead_letters" names a non-empty dead-letter queue the same way (project/deadletter.py).
"""

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from amqp.exceptions import NotFound
from django.conf import settings
from django.db import connections
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from project import broker, broker_publish, deadletter, queues
from project.broker_publish import BrokerBlocked, BrokerUnavailable
from project.celery import app
from project.http.errors import outage_of

logger = logging.getLogger(__name__)


class NotReady(Exception):
    """A probe's finding that is not an exception of its own: `state` names it ("read-only", "disk full")."""

    def __init__(self, state: str, detail: str) -> None:
        super().__init__(detail)
        self.state = state


def _check_database(alias: str) -> None:
    check_database_connection(connections[alias])


def check_database_connection(connection) -> None:
    """Raise unless the database behind `connection` (a Django connection) answers and takes writes.

    PostgreSQL: ``SHOW transaction_read_only`` is ``on`` on a standby (recovery)
    and under ``default_transaction_read_only`` (what a managed failover or a
    full-disk guard sets): NotReady("read-only"). SQLite: its file and folder
    must be writable. A database that does not answer raises the driver's
    error (Django's OperationalError: "unavailable" in `_failure`).
    """
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SHOW transaction_read_only")
            (read_only,) = cursor.fetchone()
            if read_only == "on":
                raise NotReady("read-only", "the server accepts no writes (transaction_read_only is on)")
        else:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    if connection.vendor == "sqlite":
        name = str(connection.settings_dict["NAME"])
        if name and ":memory:" not in name and not name.startswith("file:"):
            for path in (name, os.path.dirname(name) or "."):
                if os.path.exists(path) and not os.access(path, os.W_OK):
                    raise NotReady("read-only", f"{path} is not writable")


def _check_broker() -> None:
    """Raise BrokerBlocked / BrokerUnavailable unless the broker takes a message now (a bounded publish).

    A connection alone is not enough: RabbitMQ accepts connections under a
    resource alarm and blocks them only when they publish.
    """
    broker_publish.probe(app)


def disk_folders() -> list[Path]:
    """The folders the embedded shape writes: SQLite databases, the file broker, the file cache of the throttles."""
    folders = []
    for alias in connections:
        if connections[alias].vendor == "sqlite":
            name = str(connections[alias].settings_dict["NAME"])
            if name and ":memory:" not in name and not name.startswith("file:"):
                folders.append(Path(name).parent)
    options = app.conf.broker_transport_options or {}
    if "data_folder_in" in options:
        folders.append(Path(options["data_folder_in"]))
    throttle = settings.CACHES.get("throttle", {})
    if throttle.get("BACKEND", "").endswith("FileBasedCache"):
        folders.append(Path(throttle["LOCATION"]))
    return list(dict.fromkeys(folders))


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_disk() -> None:
    """Raise NotReady("disk full" / "disk nearly full") when a folder of `disk_folders` has too little room.

    Two checks per filesystem: the free space against the setting (statvfs,
    shutil.disk_usage), and a 4 KiB file written and removed, which a full
    filesystem refuses whatever the threshold (what SQLite would meet writing
    a page: "database or disk is full").
    """
    minimum = settings.DISK_FREE_MIN_MB * 2**20
    checked = set()
    for folder in disk_folders():
        folder = _existing(folder)
        device = folder.stat().st_dev
        if device in checked:
            continue
        checked.add(device)
        free = shutil.disk_usage(folder).free
        if free < minimum:
            raise NotReady(
                "disk full" if free < 2**20 else "disk nearly full",
                f"{free / 2**20:.1f} MB free at {folder} (DISK_FREE_MIN_MB is {settings.DISK_FREE_MIN_MB:g})",
            )
        try:
            with tempfile.TemporaryFile(dir=folder, prefix=".readyz-") as probe:
                probe.write(b"\0" * 4096)
                probe.flush()
        except OSError as exc:
            state = "disk full" if outage_of(exc) is not None else "unavailable"
            raise NotReady(state, f"cannot write in {folder}: {exc.strerror or exc}") from exc


def _failure(exc: Exception) -> str:
    """A failed check in words: "<state>: <why>"; states: unavailable, read-only, busy, disk full, disk nearly
    full, blocked."""
    if isinstance(exc, NotReady):
        return f"{exc.state}: {exc}"
    if isinstance(exc, BrokerBlocked):
        return f"blocked: {exc.reason}"
    if isinstance(exc, BrokerUnavailable):
        return f"unavailable: {exc.reason}"
    outage = outage_of(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{outage.state if outage else 'unavailable'}: {type(exc).__name__}" + (f": {text}" if text else "")


def _queue_state(waiting: int, consumers: int, taken: list[float] | None, stall_after: float) -> str:
    """One queue's state from its depth, the broker's consumer count and (embedded broker) when each took last."""
    if not waiting:
        return "idle"
    if taken is None:  # AMQP: only the consumer count is known
        return "ok" if consumers else f"stalled: {waiting} waiting, no consumer"
    if not taken:
        return f"stalled: {waiting} waiting, no consumer"
    quiet = time.time() - max(taken)
    if quiet > stall_after:
        return f"stalled: {waiting} waiting, none taken for {quiet:.0f} s by {len(taken)} consumer(s)"
    return "ok"


def queue_states() -> dict[str, str]:
    """{queue: "idle" | "ok" | "stalled: …" | "error: …"} for every service queue.

    "stalled" when messages wait and no live consumer took one for
    CONSUMER_STALL_SECONDS (embedded broker: claim markers, project.broker.queue_consumers),
    or when messages wait and the broker counts no consumer (AMQP's queue.declare-ok
    consumer_count; RabbitMQ cannot tell a consumer that stopped taking messages).
    On RabbitMQ the whole look, connecting and closing included, takes at most
    BROKER_PUBLISH_TIMEOUT_SECONDS (project.broker_publish.bounded_connection).
    """
    options = app.conf.broker_transport_options or {}
    claimed_root = Path(options["data_folder_in"]).parent / "claimed" if "data_folder_in" in options else None
    connection = app.connection_for_write()
    if claimed_root is not None:  # the embedded broker: files, nothing to wait on
        with connection:
            return _queue_states_on(connection, claimed_root)
    deadline = time.monotonic() + settings.BROKER_PUBLISH_TIMEOUT_SECONDS
    with broker_publish.bounded_connection(connection, deadline):
        states = _queue_states_on(connection, None)
        connection.release()  # the closing handshake, bounded too
    return states


def _queue_states_on(connection, claimed_root: Path | None) -> dict[str, str]:
    states = {}
    connection.ensure_connection(max_retries=0)
    for queue in settings.SERVICE_QUEUES:
        # A channel per queue: on AMQP a passive declare of a missing queue closes its channel.
        try:
            with connection.channel() as channel:
                _, waiting, consumers = channel.queue_declare(queue=queue, passive=True)
        except NotFound:
            states[queue] = "idle"  # never declared: no worker has consumed it, nothing was sent to it
            continue
        except Exception as exc:  # reported like any other failure
            if isinstance(exc, TimeoutError | OSError):
                raise  # the connection is gone: the caller drops it
            states[queue] = f"error: {type(exc).__name__}"
            continue
        taken = broker.queue_consumers(claimed_root, queue) if claimed_root else None
        states[queue] = _queue_state(waiting, consumers, taken, settings.CONSUMER_STALL_SECONDS)
    return states


def dead_letter_state() -> str:
    """ "empty", "<n> dead message(s): manage.py deadletter list", or "error: …" (quorum queues on RabbitMQ only).

    Named, never fatal to readiness: a dead message waits for an operator
    (docs/operations.md, "Dead letters"), the service still takes orders.
    """
    try:
        count = deadletter.depth()
    except Exception as exc:  # reported like the queues' states
        logger.warning("dead-letter check failed: %s", exc)
        return f"error: {type(exc).__name__}"
    return f"{count} dead message(s) in {queues.DEAD_LETTER_QUEUE}: manage.py deadletter list" if count else "empty"


def readiness_checks() -> dict[str, str]:
    """{"database:<alias>": …, "broker": …, "disk": …}: "ok" or "<state>: <why>" (`_failure`).

    "disk" only where something is written to local folders (`disk_folders`).
    Every probe is bounded: the broker's by BROKER_PUBLISH_TIMEOUT_SECONDS.
    """
    checks = {}
    probes = {f"database:{alias}": (lambda a=alias: _check_database(a)) for alias in connections}
    probes["broker"] = _check_broker
    if disk_folders():
        probes["disk"] = _check_disk
    for name, probe in probes.items():
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not ready", with the reason
            checks[name] = _failure(exc)
            logger.warning("readiness check %s failed: %s", name, checks[name])
    return checks


@never_cache
@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request):
    checks = readiness_checks()
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    if checks.get("broker") == "ok":
        try:
            body["queues"] = queue_states()
        except Exception as exc:  # reported, never fatal: see the module docstring
            logger.warning("queue check failed: %s", exc)
            body["queues"] = {"error": type(exc).__name__}
        if settings.QUORUM_QUEUES:
            body["dead_letters"] = dead_letter_state()
    return JsonResponse(body, status=200 if ready else 503)
