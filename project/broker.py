"""kombu's filesystem transport, made safe for several processes.

kombu 5.7's filesystem transport creates a message file and then writes it; a
consumer polling the folder can move and read it in between, get an empty
file, and die with "Unrecoverable error: JSONDecodeError" (seen in this
project's saga tests when a worker published a retry while its own consumer
polled). Here a message is written under a name consumers ignore, synced to
disk and renamed into place, so it appears whole or not at all. A file that
does not parse is moved to a `rejected/` folder beside the queue with a log
line instead of stopping the worker. Selected by settings (CELERY_BROKER_TRANSPORT) for `filesystem://`.
"""

import logging
import os
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic

from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

logger = logging.getLogger(__name__)


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
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
        """Take the oldest message of `queue`: claim it by renaming, then read it."""
        suffix = f".{queue}.msg"
        claimed = Path(self.data_folder_in).parent / "claimed"
        claimed.mkdir(exist_ok=True)
        for filename in sorted(os.listdir(self.data_folder_in)):
            if not filename.endswith(suffix) or filename.partition(".")[2] != suffix[1:]:
                continue
            mine = claimed / filename
            try:
                os.rename(os.path.join(self.data_folder_in, filename), mine)
            except OSError:
                continue  # another consumer took it
            payload = mine.read_bytes()
            try:
                message = loads(bytes_to_str(payload))
            except ValueError as exc:
                rejected = mine.parent.parent / "rejected"
                rejected.mkdir(exist_ok=True)
                os.rename(mine, rejected / filename)
                logger.error("filesystem broker: unreadable message %s set aside in %s: %s", filename, rejected, exc)
                continue
            mine.unlink()
            return message
        raise Empty()


class Transport(filesystem.Transport):
    Channel = Channel
