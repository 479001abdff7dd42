"""The embedded broker: kombu's filesystem transport, made safe for several processes.

kombu 5.7's filesystem transport (`kombu.transport.filesystem`) keeps each
message as a file in a shared folder. Three things it does are unsafe for a
saga whose workers can die, and this module replaces them:

1. **Torn writes.** It creates a message file and then writes it; a consumer
   polling the folder can take it in between and read an empty file ("Unrecoverable
   error: JSONDecodeError"). Here a message is written under a name consumers
   ignore, synced and renamed into place: it appears whole or not at all. A
   file that does not parse is set aside in `rejected/` with a log line.
2. **Messages held only in memory.** It deletes a message file as it reads it,
   so an unacknowledged (`acks_late`) message lives only in the consumer's
   memory and is lost with the process. Here a consumer *claims* a message by
   renaming it into a folder of its own, `claimed/<owner>/`, and deletes it only
   when the message is acknowledged; a rejected or restored message is renamed
   back into the queue. Each owner folder holds a lock file that its process
   keeps locked (`fcntl.lockf`) for its lifetime. The kernel drops that lock
   when the process dies, even by SIGKILL, so any other consumer that finds an
   owner folder whose lock it can take knows the owner is dead and moves the
   messages back into the queue (`recover_orphaned_claims`), as RabbitMQ
   requeues a closed channel's unacknowledged deliveries.
3. **No event loop.** Its transport is synchronous, so a Celery worker runs its
   blocking loop (`celery.worker.loops.synloop`) and the threaded billiard pool,
   whose pool processes read tasks from one shared pipe under one lock. A pool
   process killed while holding that lock (an OOM kill, a crashing C extension)
   leaves it held for ever: the respawned processes wait on it, and the worker
   receives tasks but never runs another one (issue 19; seen with py-spy:
   every pool process in `SemLock.__enter__` under `SimpleQueue.get_payload`).
   Here the transport polls its folder from the worker's event loop (a hub timer,
   `register_with_event_loop`), so Celery runs `asynloop` and its `AsynPool`,
   which gives each pool process its own pipes and re-sends or fails the jobs of
   a dead process: the code path RabbitMQ workers use.

Selected by settings (CELERY_BROKER_TRANSPORT) for `filesystem://`.
"""

import contextlib
import fcntl
import logging
import os
import re
import threading
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic, monotonic_ns, time

from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)

#: How often a consuming process looks for claims left by dead processes (seconds).
ORPHAN_CHECK_SECONDS = 2.0
#: A message file still being written after this long was left by a process that died
#: mid-publish (the write takes microseconds); it is removed. Its publish never
#: returned, so the task that published it was not acknowledged and runs again.
ABANDONED_WRITE_SECONDS = 60.0
#: Celery's transient queues: an event receiver's (`celeryev.<id>`: Flower) and a remote
#: control client's replies (`<id>.reply.celery.pidbox`). Celery declares them to expire
#: when unused (auto_delete, x-expires), which RabbitMQ enforces and this transport did
#: not: each Flower restart left a queue that events kept filling (issue 19 review).
TRANSIENT_QUEUE = re.compile(r"^celeryev\.|\.reply\.celery\.pidbox$")
#: A transient queue with no live consumer for this long is deleted, binding and
#: messages (Celery's event_queue_expires default is 60 s).
TRANSIENT_QUEUE_EXPIRES = 60.0
#: How often a consuming process looks for expired transient queues (seconds).
EXPIRY_CHECK_SECONDS = 10.0
#: At most this many messages are delivered per event-loop poll before the loop
#: gets a turn (pool results, timers, remote control); the rest follow at once.
DELIVERIES_PER_POLL = 32

_LOCK_NAME = "lock"
_MARKER_SUFFIX = ".consumer"


class _Owner:
    """This process's claim folder, `claimed/<pid>-<token>/`, locked for the process's lifetime."""

    def __init__(self, claimed_root: Path) -> None:
        self.pid = os.getpid()
        self.name = f"{self.pid}-{uuid.uuid4().hex[:12]}"
        # Built under a dot name and renamed into place already locked, so no
        # other process ever sees the folder without its lock held.
        building = claimed_root / f".new-{self.name}"
        building.mkdir(parents=True)
        self._lock_fd = os.open(building / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # POSIX record locks belong to the process (not inherited by forked
        # pool processes) and are released by the kernel when it dies.
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.folder = claimed_root / self.name
        os.rename(building, self.folder)


_owners: dict[tuple[int, str], _Owner] = {}
# queue name -> when this process first saw that no live process consumes it (monotonic seconds).
_unconsumed_since: dict[str, float] = {}


def _owner(claimed_root: Path) -> _Owner:
    """The claim folder of this process (a forked child gets its own)."""
    key = (os.getpid(), str(claimed_root))
    owner = _owners.get(key)
    if owner is None:
        owner = _owners[key] = _Owner(claimed_root)
    return owner


def recover_orphaned_claims(claimed_root: Path, queue_folder: Path, *, skip: str = "") -> int:
    """Move the claimed messages of dead processes back into the queue folder.

    Args:
        claimed_root: the `claimed/` folder holding one folder per consuming process.
        queue_folder: the queue folder the messages go back to (under their own
            names, so each returns to its place at the head of its queue).
        skip: an owner folder name not to look at (the caller's own).

    Returns the number of messages moved. An owner is dead when its lock can be
    taken; a live owner's folder is left alone. Safe to run from several
    processes and threads at once: the lock file lets one process at a time into a
    dead owner's folder, and a thread lock one thread of each process.
    """
    if not _recovery_lock.acquire(blocking=False):
        return 0  # another thread of this process is at it (the lock file serialises processes only)
    try:
        return _recover(claimed_root, queue_folder, skip)
    finally:
        _recovery_lock.release()


_recovery_lock = threading.Lock()


def _recover(claimed_root: Path, queue_folder: Path, skip: str) -> int:
    moved = 0
    try:
        names = os.listdir(claimed_root)
    except FileNotFoundError:
        return 0
    for name in names:
        if name == skip or name.startswith("."):
            continue
        folder = claimed_root / name
        try:
            fd = os.open(folder / _LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            continue  # being cleaned up by another process, or not an owner folder
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its process is alive
            requeued = 0
            try:
                filenames = sorted(os.listdir(folder))
            except FileNotFoundError:
                continue  # another process emptied it first
            for filename in filenames:
                if not filename.endswith(".msg"):
                    continue
                try:
                    os.rename(folder / filename, queue_folder / filename)
                    requeued += 1
                except FileNotFoundError:
                    pass
            if requeued:
                logger.warning(
                    "filesystem broker: process %s died holding %d unacknowledged message(s); requeued them",
                    name.partition("-")[0],
                    requeued,
                )
            moved += requeued
            try:
                for filename in os.listdir(folder):
                    os.unlink(folder / filename)  # the lock and the consumer markers
                os.rmdir(folder)
            except OSError:
                pass
        finally:
            os.close(fd)
    return moved


def _live_owner_folders(claimed_root: Path) -> list[Path]:
    """The claim folders of processes that are alive: this process's, and those whose lock is held.

    This process's own folder is never tested: a POSIX lock taken and released
    through a second descriptor in the owning process would release its own lock.
    """
    own = _owners.get((os.getpid(), str(claimed_root)))
    live = [own.folder] if own is not None else []
    try:
        names = os.listdir(claimed_root)
    except FileNotFoundError:
        return live
    for name in names:
        if name.startswith(".") or (own is not None and name == own.name):
            continue
        folder = claimed_root / name
        try:
            fd = os.open(folder / _LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            continue
        try:
            # Taken and given back at once when free: is the lock held by another process?
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            live.append(folder)  # held: the owner is alive
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    return live


def queue_consumers(claimed_root: Path, queue: str) -> list[float]:
    """When each live consumer of `queue` last took a message from it (Unix times, seconds).

    A consumer is a live process (see _live_owner_folders) that consumes `queue`:
    its claim folder holds a `<queue>.consumer` marker, made when it starts
    consuming and touched at every claim; the time is the marker's mtime. Reads
    only: a dead owner's folder is left for `recover_orphaned_claims`.
    """
    taken = []
    for folder in _live_owner_folders(claimed_root):
        with contextlib.suppress(FileNotFoundError):
            taken.append((folder / f"{queue}{_MARKER_SUFFIX}").stat().st_mtime)
    return taken


def consumed_queues(claimed_root: Path) -> set[str]:
    """The names of the queues some live process consumes (their markers)."""
    queues = set()
    for folder in _live_owner_folders(claimed_root):
        with contextlib.suppress(FileNotFoundError):
            queues.update(n[: -len(_MARKER_SUFFIX)] for n in os.listdir(folder) if n.endswith(_MARKER_SUFFIX))
    return queues


def remove_abandoned_writes(queue_folder: Path, *, older_than: float = ABANDONED_WRITE_SECONDS) -> int:
    """Delete `tmp-*` files (unfinished `_put`s) older than `older_than` seconds; returns how many."""
    removed = 0
    cutoff = time() - older_than
    for entry in os.scandir(queue_folder):
        if not entry.name.startswith("tmp-"):
            continue
        try:
            if entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


class Channel(filesystem.Channel):
    """A filesystem channel whose unacknowledged messages survive their consumer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # delivery tag -> path of the claimed message file, until ack/reject.
        self._claims: dict[str, Path] = {}
        self._no_ack_queues: set[str] = set()
        self._orphans_checked_at: float | None = None
        self._expiry_checked_at: float | None = None
        self._markers: dict[str, Path] = {}

    @property
    def _claimed_root(self) -> Path:
        return Path(self.data_folder_in).parent / "claimed"

    def _put(self, queue, payload, **kwargs):
        # Consumers take the lowest name first: the time, zero-padded so that names sort
        # as numbers do (kombu's unpadded milliseconds misorder when they gain a digit,
        # and two messages of one millisecond came out in random order).
        name = f"{monotonic_ns():020d}_{uuid.uuid4()}.{queue}.msg"
        # No "<queue>.msg" suffix: consumers skip it until the rename.
        partial = os.path.join(self.data_folder_out, f"tmp-{uuid.uuid4().hex}")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
                f.flush()
                os.fsync(f.fileno())
            os.rename(partial, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add message {name!r} to {self.data_folder_out!r}") from exc

    def _get(self, queue):
        """Claim the oldest message of `queue` (rename it into this process's folder), then read it."""
        self._maybe_recover_orphans()
        suffix = f".{queue}.msg"
        owner = _owner(self._claimed_root)
        for filename in sorted(os.listdir(self.data_folder_in)):
            if not filename.endswith(suffix) or filename.partition(".")[2] != suffix[1:]:
                continue
            mine = owner.folder / filename
            try:
                os.rename(os.path.join(self.data_folder_in, filename), mine)
            except OSError:
                continue  # another consumer took it
            payload = mine.read_bytes()
            try:
                message = loads(bytes_to_str(payload))
                tag = message["properties"]["delivery_tag"]
            except (ValueError, KeyError, TypeError) as exc:
                rejected = self._claimed_root.parent / "rejected"
                rejected.mkdir(exist_ok=True)
                os.rename(mine, rejected / filename)
                logger.error("filesystem broker: unreadable message %s set aside in %s: %s", filename, rejected, exc)
                continue
            if queue in self._no_ack_queues:
                mine.unlink()  # consumed without acknowledgement: it is delivered now
            else:
                self._claims[tag] = mine
                self._mark_taken(owner, queue)
            return message
        raise Empty()

    def _mark_taken(self, owner: _Owner, queue: str) -> None:
        """Touch `<owner>/<queue>.consumer`: this process took a message of `queue` now (see queue_consumers)."""
        marker = self._markers.get(queue)
        if marker is None or marker.parent != owner.folder:
            marker = self._markers[queue] = owner.folder / f"{queue}{_MARKER_SUFFIX}"
        marker.touch()

    def _maybe_recover_orphans(self) -> None:
        now = monotonic()
        if self._orphans_checked_at is None or now - self._orphans_checked_at >= ORPHAN_CHECK_SECONDS:
            self._orphans_checked_at = now
            recover_orphaned_claims(self._claimed_root, Path(self.data_folder_in), skip=_owner(self._claimed_root).name)
            remove_abandoned_writes(Path(self.data_folder_in))
        if self._expiry_checked_at is None or now - self._expiry_checked_at >= EXPIRY_CHECK_SECONDS:
            self._expiry_checked_at = now
            self._expire_transient_queues(now)

    def _expire_transient_queues(self, now: float) -> None:
        """Delete transient queues (TRANSIENT_QUEUE) that no live process has consumed for TRANSIENT_QUEUE_EXPIRES.

        A queue's binding goes from its exchange's table and its messages from the
        folder (kombu's own `_delete`), so publishers stop filling it.
        """
        live = consumed_queues(self._claimed_root)
        expired = set()
        for table in Path(self.control_folder).glob("*.exchange"):
            exchange = table.name[: -len(".exchange")]
            for routing_key, pattern, queue in self.get_table(exchange):
                if not TRANSIENT_QUEUE.search(queue) or queue in live:
                    _unconsumed_since.pop(queue, None)
                    continue
                since = _unconsumed_since.setdefault(queue, now)
                if now - since >= TRANSIENT_QUEUE_EXPIRES:
                    self._delete(queue, exchange, routing_key, pattern)
                    expired.add(queue)
                    logger.info("filesystem broker: deleted %s, unused for %.0f s", queue, now - since)
        # Messages of a transient queue with no binding left and no consumer (published
        # while it was being deleted, or left from before): nothing will ever read them.
        folder = Path(self.data_folder_in)
        for name in os.listdir(folder):
            queue = name.partition(".")[2].removesuffix(".msg")
            if not name.endswith(".msg") or not TRANSIENT_QUEUE.search(queue) or queue in live:
                continue
            since = _unconsumed_since.setdefault(queue, now)
            if queue in expired or now - since >= TRANSIENT_QUEUE_EXPIRES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / name)
        for queue in expired:
            _unconsumed_since.pop(queue, None)

    def _release(self, delivery_tag) -> None:
        path = self._claims.pop(delivery_tag, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        if no_ack:
            self._no_ack_queues.add(queue)
        # The marker says "a live process consumes this queue" from now on (queue_consumers,
        # consumed_queues), before any message has come.
        self._mark_taken(_owner(self._claimed_root), queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag):
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        marker = self._markers.pop(queue, None) if queue is not None else None
        if marker is not None:
            marker.unlink(missing_ok=True)
        return result

    def basic_get(self, queue, no_ack=False, **kwargs):
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self._release(message.delivery_tag)
        return message

    def basic_ack(self, delivery_tag, multiple=False):
        super().basic_ack(delivery_tag, multiple=multiple)
        self._release(delivery_tag)

    def basic_reject(self, delivery_tag, requeue=False):
        # With requeue, QoS.reject calls _restore first, which moves the claim back.
        super().basic_reject(delivery_tag, requeue=requeue)
        self._release(delivery_tag)

    def _restore(self, message):
        """Put an unacknowledged message back at the head of the queue it came from."""
        path = self._claims.pop(message.delivery_tag, None)
        if path is None:
            return super()._restore(message)
        # FileNotFoundError: already requeued by another process's recovery; nothing is lost.
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, Path(self.data_folder_in) / path.name)


class Transport(filesystem.Transport):
    """The filesystem transport, polled from a Celery worker's event loop.

    `implements.asynchronous` makes Celery run `asynloop` with `AsynPool`
    (celery.worker.worker.WorkController.should_use_eventloop). The folder has
    no file descriptor to wait on, so a hub timer polls it every
    `polling_interval` seconds (transport option, as in synchronous use).
    """

    Channel = Channel
    implements = filesystem.Transport.implements.extend(asynchronous=True)

    def __init__(self, client, **kwargs):
        super().__init__(client, **kwargs)
        self._poll_timer = None
        # The folders this transport keeps its queues in (settings only name them).
        options = client.transport_options
        for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
            if options.get(key):
                Path(options[key]).mkdir(parents=True, exist_ok=True)

    def register_with_event_loop(self, connection, loop):
        self.unregister_from_event_loop(connection, loop)

        def poll():
            for _ in range(DELIVERIES_PER_POLL):
                try:
                    self.cycle.get(self._deliver)
                except Empty:
                    return
            loop.call_soon(poll)  # more are waiting: go on after the loop's other work

        self._poll_timer = loop.call_repeatedly(self.polling_interval, poll)

    def unregister_from_event_loop(self, connection, loop):
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None

    def close_connection(self, connection):
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        return super().close_connection(connection)
