"""Every publish to the broker has a time bound (docs/design.md §3, issue 14).

Celery publishes every message through one function,
``app.amqp.send_task_message``: a task sent from the web on commit, a chain's
next step, a retry (``Task.retry``), an error callback, beat's sweep, a product
event. `AMQP` (installed as the app's ``amqp`` class in project/celery.py) wraps
it in `bounded_publish`, so every one of them either completes within
BROKER_PUBLISH_TIMEOUT_SECONDS or raises `BrokerUnavailable` — a kombu
``OperationalError``, which saga steps already treat as transient.

What Celery and kombu offer, and why it is not enough alone (Celery 5.7,
kombu 5.7, py-amqp 5.4; docs/celery.md 21):

* ``apply_async(timeout=, confirm_timeout=)`` reach py-amqp's
  ``basic_publish`` (a socket-write timeout) and the publisher-confirm wait.
  They bound neither connecting (``broker_connection_timeout``, 4 s per
  attempt, retried with 2 s sleeps by ``Connection.default_channel``), nor the
  queue declare and channel open that precede a publish (RPCs with no timeout),
  nor Celery's publish retries (``task_publish_retry_policy``: each retry
  reconnects and gets the whole timeout again).
* RabbitMQ under a resource alarm stops reading from every connection that
  publishes and sends it ``connection.blocked``
  (https://www.rabbitmq.com/docs/connection-blocked); py-amqp reports it to an
  ``on_blocked`` callback, but only while something reads the connection.

So `bounded_publish` sets one deadline, connects with what is left of it (one
attempt), puts the remaining time on the socket itself (every read and write of
the declare, the publish and the confirm) and passes it as ``timeout`` and
``confirm_timeout``; it does Celery's one useful retry itself (a pooled
connection found dead, e.g. after a broker restart: reconnect once, within the
same deadline). A ``connection.blocked`` that arrives while a publish waits ends
that publish at once (`connection_blocked` raises `BrokerBlocked`). A publish
that failed drops its connection without the closing handshake (a blocked or
frozen broker would never answer it): an unconfirmed publish leaves the
connection's confirms out of step, so it is never reused.

After a publish timed out, or the broker said it is blocked, the process stops
trying for RETRY_INTERVAL_SECONDS: every publish fails at once with the same
reason, except one trial at a time after that interval, whose success (or a
``connection.unblocked``) ends the outage. A web request therefore waits on a
blocked or frozen broker at most once per interval per process, and the others
answer at once. Before the first timeout tells, a burst of publishes to a broker
that just froze would each wait the bound, and a web process's every thread
with them: at most WAITING_PUBLISHES publishes of a process wait on one broker
at a time, the others wait their turn, and give up at once when those waiting
look stuck (waiting STALL_FRACTION of the bound), so the other threads stay free
for the requests that need no broker (health checks, reads). A healthy broker,
even a slow one, confirms in milliseconds, so the turn comes long before that.
Whether a publish that timed out reached the broker is unknown:
the saga's records (the order row, the idempotent steps) make sending it again
safe.
"""

from __future__ import annotations

import errno
import itertools
import logging
import select
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import monotonic
from typing import Any, TypeVar

from celery.app import amqp as celery_amqp
from celery.app import events as celery_events
from celery.events.dispatcher import EventDispatcher
from django.conf import settings
from kombu import Connection, Producer
from kombu.exceptions import OperationalError
from kombu.pools import ProducerPool
from kombu.utils.url import sanitize_url

from project import metrics

logger = logging.getLogger(__name__)

#: After a publish timed out or the broker said it is blocked, how long every
#: publish of this process fails at once before one is tried again (seconds).
RETRY_INTERVAL_SECONDS = 2.0

#: At most this many publishes of a process wait on one broker at a time (a bulkhead:
#: a web process's threads are not all taken by a broker that stopped answering) ...
WAITING_PUBLISHES = 2
#: ... and one waiting its turn gives up once the oldest of them has waited this fraction
#: of BROKER_PUBLISH_TIMEOUT_SECONDS: the broker looks stuck.
STALL_FRACTION = 0.5

#: The routing key of `probe`'s message: no queue is bound to it, so RabbitMQ
#: drops the message (and confirms it) at once.
PROBE_ROUTING_KEY = "orderflow.publish-probe"

T = TypeVar("T")


class BrokerUnavailable(OperationalError):
    """The broker did not take a message within BROKER_PUBLISH_TIMEOUT_SECONDS, or is known not to now.

    `reason` says why in words ("timed out after 1.0 s", "blocked by the broker:
    …", "disk full: …"); `code` is the API's error code for it.
    """

    code = "broker_unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(f"broker unavailable: {reason}")
        self.reason = reason


class BrokerBlocked(BrokerUnavailable):
    """RabbitMQ blocks publishing (``connection.blocked``: a memory or disk alarm)."""


class _Outage:
    """This process's view of the broker: is publishing known to fail now? Thread-safe."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self._waiting: dict[int, float] = {}  # publishes waiting on the broker: token -> since (monotonic s)
        self._tokens = itertools.count()
        self._lock = threading.Condition()
        self.reason: str | None = None  # None: publishing works, as far as this process knows
        self.blocked = False
        self._retry_at = 0.0
        self._trial = False

    def admit(self, wait_for_trial: float = 0.0) -> bool:
        """Let a publish go ahead (True if it is the outage's trial), or raise BrokerUnavailable at once.

        `wait_for_trial` (s): while a trial publish is under way, wait up to that
        long for its outcome instead of answering with what was known before it
        (/readyz: the state of now, not of the last failure).
        """
        with self._lock:
            deadline = monotonic() + wait_for_trial
            while self.reason is not None and self._trial and monotonic() < deadline:
                self._lock.wait(deadline - monotonic())
            if self.reason is None:
                return False
            if self._trial or monotonic() < self._retry_at:
                raise (BrokerBlocked if self.blocked else BrokerUnavailable)(self.reason)
            self._trial = True
            return True

    def failed(self, reason: str, *, blocked: bool = False) -> None:
        """Publishing failed for want of the broker: fail every publish at once for RETRY_INTERVAL_SECONDS."""
        with self._lock:
            if self.reason is None:
                logger.warning(
                    "broker %s unavailable: %s; publishes fail at once, one tried every %g s",
                    self.broker,
                    reason,
                    RETRY_INTERVAL_SECONDS,
                )
            self.reason, self.blocked = reason, blocked
            self._retry_at = monotonic() + RETRY_INTERVAL_SECONDS
            self._trial = False
            self._lock.notify_all()

    def settled(self, trial: bool) -> None:
        """A trial publish ended without an availability failure (or it was not a trial)."""
        if trial:
            with self._lock:
                self._trial = False
                self._lock.notify_all()

    def ok(self) -> None:
        with self._lock:
            if self.reason is not None:
                logger.warning("broker %s available again (was: %s)", self.broker, self.reason)
            self.reason, self.blocked, self._trial = None, False, False
            self._lock.notify_all()

    def take_turn(self, deadline: float) -> int:
        """Wait for one of the WAITING_PUBLISHES turns, or raise BrokerUnavailable once those waiting look stuck."""
        with self._lock:
            while len(self._waiting) >= WAITING_PUBLISHES:
                now = monotonic()
                oldest = min(self._waiting.values())
                stuck_at = oldest + STALL_FRACTION * _timeout()
                if now >= stuck_at or now >= deadline:
                    raise BrokerUnavailable(f"the broker has kept a publish waiting {now - oldest:.1f} s")
                self._lock.wait(min(stuck_at, deadline) - now)
            token = next(self._tokens)
            self._waiting[token] = monotonic()
            return token

    def end_turn(self, token: int) -> None:
        with self._lock:
            self._waiting.pop(token, None)
            self._lock.notify_all()

    def state(self) -> str | None:
        """None when publishing works as far as this process knows, else "blocked: …" or "unavailable: …"."""
        with self._lock:
            if self.reason is None:
                return None
            return f"{'blocked' if self.blocked else 'unavailable'}: {self.reason}"


_outages: dict[str, _Outage] = {}
_outages_lock = threading.Lock()
_local = threading.local()


def _broker_key(connection: Connection | None) -> str:
    """Which broker a connection talks to (its URL without the password): each has an outage state of its own.

    Kept on the connection: kombu builds the URL afresh each time (tens of µs, per publish).
    """
    if connection is None:
        return ""
    key = getattr(connection, "_orderflow_broker_key", None)
    if key is None:
        # A failover list (a cluster's nodes) is one broker: a node down is no outage while another takes messages.
        key = ";".join(sanitize_url(url) for url in connection.alt) if connection.alt else connection.as_uri()
        connection._orderflow_broker_key = key
    return key


def outage_of_broker(connection: Connection | None) -> _Outage:
    """This process's outage state for the broker of `connection`."""
    key = _broker_key(connection)
    with _outages_lock:
        outage = _outages.get(key)
        if outage is None:
            outage = _outages[key] = _Outage(key)
        return outage


def broker_state(app: Any) -> str | None:
    """None when publishing to `app`'s broker works as far as this process knows, else "blocked: …"/"unavailable: …"."""
    return outage_of_broker(app.connection_for_write()).state()


def forget_outages() -> None:
    """Believe every broker works again (tests: each starts from a clean slate)."""
    with _outages_lock:
        _outages.clear()


# --- py-amqp's connection.blocked / connection.unblocked (broker_transport_options) -----------


def connection_blocked(reason: str) -> None:
    """py-amqp's ``on_blocked``: RabbitMQ blocks this connection (a resource alarm). Raises inside a publish.

    py-amqp reads frames, and so calls this, only while something waits on the
    connection: for a publishing connection, inside a publish, in its own
    thread. Before a publish, `bounded_connection` reads what the broker said
    while nobody listened (a ``blocked`` then an ``unblocked`` from an alarm
    long over must not fail it) and only notes it; once the publish is on its
    way, a ``blocked`` raises, which ends the publish at once instead of waiting
    out its timeout for a confirm that cannot come, and the broker's outage
    state fails the next ones at once. Outside a publish (a worker's consumer
    connection replying to a remote-control command) there is no telling which
    broker: nothing is kept.
    """
    outage = getattr(_local, "outage", None)
    if outage is None:
        logger.warning("broker connection blocked (%s)", reason)
        return
    _local.blocked = reason
    if getattr(_local, "raise_on_block", False):
        outage.failed(f"blocked by the broker ({reason})", blocked=True)
        raise BrokerBlocked(outage.reason or reason)


def connection_unblocked() -> None:
    """py-amqp's ``on_unblocked``: every resource alarm cleared."""
    _local.blocked = None
    outage = getattr(_local, "outage", None)
    if outage is not None and getattr(_local, "raise_on_block", False):
        outage.ok()


def _read_notifications(connection: Connection) -> None:
    """Read, without waiting, the frames the broker sent while nobody read the connection (blocked, unblocked).

    Usually there are none: one ``select`` says so (py-amqp reads frames to the
    byte, so nothing waits in its own buffer), without the two socket-mode
    changes a ``drain_events(timeout=0)`` costs.
    """
    raw = connection.connection
    sock = raw.transport.sock
    for _ in range(100):  # a handful at most; never a loop without end
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return
        try:
            raw.drain_events(timeout=0)
        except TimeoutError:
            return


def amqp_transport_options() -> dict[str, Any]:
    """Celery's ``broker_transport_options`` for RabbitMQ (py-amqp): publisher confirms, blocked/unblocked callbacks."""
    return {"confirm_publish": True, "on_blocked": connection_blocked, "on_unblocked": connection_unblocked}


# --- the bound --------------------------------------------------------------------


def _timeout() -> float:
    return float(settings.BROKER_PUBLISH_TIMEOUT_SECONDS)


def _is_network(connection: Connection) -> bool:
    return getattr(connection.transport, "driver_type", "") == "amqp"


def _describe(exc: BaseException) -> str:
    for error in _chain(exc):
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full: {error}"
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return f"timed out after {_timeout():g} s"
    return f"{type(exc).__name__}: {exc}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _drop(connection: Connection) -> None:
    """Forget the connection's socket without the closing handshake; the next use reconnects."""
    try:
        connection.collect()
    except Exception:  # already half gone: nothing to keep
        logger.debug("dropping a broker connection failed", exc_info=True)


@contextmanager
def bounded_connection(connection: Connection, deadline: float) -> Iterator[float]:
    """Connect `connection` (one attempt) and bound every socket read and write until `deadline` (monotonic s).

    Yields the seconds left once connected. On any error the connection is
    dropped (`_drop`) and the error re-raised; connection.blocked raises
    BrokerBlocked inside. Only for network transports (py-amqp).
    """
    _local.outage = outage_of_broker(connection)
    try:
        if not connection.connected:
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise TimeoutError("no time left to connect")
            saved = connection.connect_timeout
            connection.connect_timeout = remaining
            try:
                # One attempt per node of a failover list (CELERY_BROKER_URL "amqp://…;amqp://…"): kombu
                # moves to the next node after each failed connect (Connection.maybe_switch_next), and
                # stays on the one that answered. A refused node costs a round trip; an unreachable one
                # can take what is left of the bound.
                connection.ensure_connection(
                    max_retries=max(len(connection.alt), 1) - 1,
                    interval_start=0, interval_step=0, interval_max=0, timeout=remaining,
                )  # fmt: skip
            finally:
                connection.connect_timeout = saved
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise TimeoutError("no time left to publish")
        sock = connection.connection.transport.sock
        sock.settimeout(remaining)
        try:
            _local.blocked = None
            _read_notifications(connection)
            if _local.blocked is not None:  # blocked, and no unblocked since: the alarm is on
                _local.outage.failed(f"blocked by the broker ({_local.blocked})", blocked=True)
                raise BrokerBlocked(_local.outage.reason or _local.blocked)
            _local.raise_on_block = True
            yield remaining
        finally:
            if connection.connected and connection.connection.transport.sock is sock:
                sock.settimeout(None)
    except BaseException:
        _drop(connection)
        raise
    finally:
        _local.outage = None
        _local.raise_on_block = False
        _local.blocked = None


def _retryable_at_once(exc: BaseException, connection: Connection) -> bool:
    """A pooled connection found dead (reset, closed): worth one reconnect. Not a timeout or a block."""
    if isinstance(exc, BrokerBlocked | TimeoutError) or "timed out" in str(exc):
        return False
    return isinstance(exc, connection.recoverable_connection_errors + connection.connection_errors)


def _unavailability(exc: BaseException, connection: Connection | None) -> bool:
    """Whether `exc` means the broker could not take the message (not that it refused this one)."""
    errors: tuple[type[BaseException], ...] = (TimeoutError, OSError, OperationalError)
    if connection is not None:
        errors += connection.recoverable_connection_errors + connection.connection_errors
    return isinstance(exc, errors)


def _publish_network(
    producer: Producer, connection: Connection, publish: Callable[[float], T], outage: _Outage, deadline: float
) -> T:
    for attempt in (1, 2):
        try:
            with bounded_connection(connection, deadline) as left:
                return publish(left)
        except BrokerBlocked:
            producer.revive(connection)  # its connection was dropped: a fresh channel next time
            raise
        except Exception as exc:
            producer.revive(connection)
            if attempt == 1 and _retryable_at_once(exc, connection) and monotonic() < deadline:
                continue
            if _unavailability(exc, connection):
                reason = _describe(exc)
                outage.failed(reason)
                raise BrokerUnavailable(reason) from exc
            raise
    raise AssertionError("unreachable")


def bounded_publish(
    producer: Producer, publish: Callable[[float], T], *, what: str = "a message", wait_for_trial: float = 0.0
) -> T:
    """Run ``publish(seconds_left)`` on `producer` within BROKER_PUBLISH_TIMEOUT_SECONDS, or raise BrokerUnavailable.

    Args:
        producer: the kombu Producer whose connection `publish` uses.
        publish: sends the message; gets the seconds left, to pass on as
            ``timeout`` and ``confirm_timeout``. It must not retry by itself.
        what: names the message in the debug log of a failure.
        wait_for_trial: seconds to wait for a trial publish under way (see
            `_Outage.admit`) before answering from the known outage.

    Raises BrokerUnavailable at once while the broker is known to be blocked or
    unreachable (see the module docstring), BrokerBlocked when RabbitMQ blocks
    the publish, BrokerUnavailable when it times out, cannot connect, or (the
    embedded broker) the disk is full; any other error of `publish` (a message
    the broker refused) unchanged.
    """
    connection = producer.connection
    outage = outage_of_broker(connection)
    trial = outage.admit(wait_for_trial)
    try:
        if connection is not None and _is_network(connection):
            deadline = monotonic() + _timeout()  # waiting for a turn is part of the bound
            turn = outage.take_turn(deadline)
            try:
                result = _publish_network(producer, connection, publish, outage, deadline)
            finally:
                outage.end_turn(turn)
            outage.ok()
            return result
        # The embedded file broker: no socket to wait on; a full disk raises at once.
        try:
            return publish(_timeout())
        except Exception as exc:
            if any(isinstance(error, OSError) for error in _chain(exc)):
                raise BrokerUnavailable(_describe(exc)) from exc
            raise
    except BrokerUnavailable as exc:
        logger.debug("%s not published: %s", what, exc.reason)
        raise
    finally:
        outage.settled(trial)


def probe(app: Any) -> None:
    """Publish one message nobody receives on a connection of its own to `app`'s broker, within the bound.

    /readyz's broker check (project/http/health.py): on RabbitMQ a connection
    that only connects succeeds under a resource alarm, a publish does not.
    Raises BrokerBlocked or BrokerUnavailable, at once while an outage is known
    (see `_Outage`). On the embedded broker it only opens the connection (a
    publish would leave a file behind); its disk is /readyz's disk check.
    """
    connection = app.connection_for_write()
    if not _is_network(connection):
        with connection:
            connection.ensure_connection(max_retries=0)
        return
    producer = Producer(connection)
    bounded_publish(
        producer,
        lambda left: producer.publish(
            b"",
            exchange="",
            routing_key=PROBE_ROUTING_KEY,
            retry=False,
            timeout=left,
            confirm_timeout=left,
            content_type="application/octet-stream",
            content_encoding="binary",
        ),
        what="the readiness probe",
        # A publish trying the broker again is under way: its outcome is the answer.
        wait_for_trial=_timeout(),
    )
    try:
        with bounded_connection(connection, monotonic() + _timeout()):
            connection.release()  # the closing handshake, bounded too
    except Exception:  # the message went out: a connection that fails to close changes nothing
        logger.debug("closing the probe's connection failed", exc_info=True)


class BoundedProducer(Producer):
    """A kombu Producer whose every publish is bounded (`bounded_publish`), without retries of its own.

    The producers of the app's pool (`AMQP.producer_pool`) and of beat are
    these: Celery's remote control (``inspect``, ``ping``: kombu's Mailbox
    publishes a broadcast, and each worker its reply, through the pool with
    ``retry=True``) is bounded like a task. A publish already inside
    `bounded_publish` (a task's, through `AMQP`) passes straight through.
    """

    def publish(self, body, *args, **kwargs):
        if getattr(_local, "outage", None) is not None:
            return super().publish(body, *args, **kwargs)
        kwargs["retry"] = False
        publish = super().publish

        def bounded(left: float):
            return publish(body, *args, **{**kwargs, "timeout": left, "confirm_timeout": left})

        return bounded_publish(self, bounded, what=f"a message to {kwargs.get('exchange') or 'the default exchange'}")


def _failure_kind(exc: BaseException) -> str:
    """How a publish failed, for project.metrics: blocked, timeout, unavailable, or refused (the broker said no)."""
    if isinstance(exc, BrokerBlocked):
        return "blocked"
    if isinstance(exc, BrokerUnavailable):
        return "timeout" if "timed out" in exc.reason or "no time left" in exc.reason else "unavailable"
    return "refused"


class AMQP(celery_amqp.AMQP):
    """Celery's AMQP helper: its one task-publishing function bounded by `bounded_publish`, its producers bounded."""

    Producer = BoundedProducer

    @property
    def producer_pool(self) -> ProducerPool:
        # Celery's own takes kombu's shared pool of plain Producers (kombu.pools.producers);
        # this one makes BoundedProducers. Celery drops it in a forked child (Celery._after_fork).
        if self._producer_pool is None:
            self._producer_pool = ProducerPool(self.app.pool, limit=self.app.pool.limit, Producer=BoundedProducer)
        return self._producer_pool

    publisher_pool = producer_pool

    def _create_task_sender(self) -> Callable[..., Any]:
        send = super()._create_task_sender()

        def send_task_message(producer: Producer, name: str, message: Any, **options: Any) -> Any:
            # Celery's own retry (task_publish_retry, a callback's publish retry) reconnects
            # and gets the whole timeout each time: bounded_publish retries instead.
            options["retry"] = False

            def publish(left: float) -> Any:
                return send(producer, name, message, **{**options, "timeout": left, "confirm_timeout": left})

            started = monotonic()
            try:
                result = bounded_publish(producer, publish, what=name)
            except Exception as exc:
                metrics.publish_ended(name, monotonic() - started, _failure_kind(exc))
                raise
            metrics.publish_ended(name, monotonic() - started)
            return result

        return send_task_message


class BoundedEventDispatcher(EventDispatcher):
    """Celery's event dispatcher (task and worker events for Flower), each publish bounded.

    A worker publishes events from its main loop: under a broker alarm an
    unbounded confirm wait there would stop the worker (no acks, no results).
    An event that cannot be sent in time is dropped, not buffered: events are
    for monitors, and a buffer would grow for as long as the outage lasts.
    """

    def _publish(self, event, producer, routing_key, retry=False, retry_policy=None, **kwargs):
        if producer is None:
            return None
        exchange = self.exchange
        try:
            return bounded_publish(
                producer,
                lambda left: producer.publish(
                    event,
                    routing_key=routing_key,
                    exchange=exchange.name,
                    retry=False,
                    declare=[exchange],
                    serializer=self.serializer,
                    headers=self.headers,
                    delivery_mode=self.delivery_mode,
                    timeout=left,
                    confirm_timeout=left,
                ),
                what=f"event {routing_key}",
            )
        except BrokerUnavailable:
            return None
        except Exception:
            if not self.buffer_while_offline:
                raise
            self._outbound_buffer.append((event, routing_key))
            return None


class Events(celery_events.Events):
    """Celery's events helper, its dispatcher `BoundedEventDispatcher`."""

    dispatcher_cls = "project.broker_publish:BoundedEventDispatcher"
