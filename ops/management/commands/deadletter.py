"""List the dead-letter queue, or re-drive its messages to the queues they died in (project/deadletter.py)."""

import argparse
import json
import sys

from amqp.exceptions import AMQPError
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from kombu.exceptions import OperationalError

from project import deadletter, queues


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a --limit of 0 or less would look at nothing and say so as success)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected 1 or more")
    return value


class Command(BaseCommand):
    help = (
        "The dead-letter queue (RabbitMQ: filled on BROKER_QUEUE_TYPE=quorum, still read after a switch to classic): "
        "`list` shows each dead message's task, order, "
        "queue and death reason; `redrive` re-publishes them (all, by task id, or those of one queue) to the queue "
        "they died in, each removed only once RabbitMQ confirmed its copy."
    )

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        listing = actions.add_parser("list", help="show the dead messages (the queue is left as it was)")
        listing.add_argument(
            "--limit", type=_positive_int, default=deadletter.DEFAULT_LIMIT, help="show at most this many"
        )
        listing.add_argument("--json", action="store_true", help="print one JSON document")
        redrive = actions.add_parser("redrive", help="re-publish dead messages to their queues")
        redrive.add_argument("--all", action="store_true", help="every dead message (with --queue: of that queue)")
        redrive.add_argument("ids", nargs="*", default=[], help="the task ids to re-drive")
        redrive.add_argument("--queue", help="only messages that died in this queue (e.g. inventory)")
        redrive.add_argument(
            "--limit",
            type=_positive_int,
            default=deadletter.DEFAULT_LIMIT,
            help="look at no more than this many messages",
        )

    def handle(self, *args, **options):
        try:
            if options["action"] == "list":
                self._list(options)
            else:
                self._redrive(options)
        except deadletter.DeadLetterUnavailable as exc:
            raise CommandError(str(exc)) from exc
        except (OperationalError, OSError) as exc:
            raise CommandError(f"the broker did not answer: {exc}") from exc
        except AMQPError as exc:  # a refused login (ACCESS_REFUSED), a vhost that does not exist (NOT_ALLOWED)
            raise CommandError(f"the broker refused: {exc}") from exc

    def _list(self, options):
        depth, found = deadletter.peek(limit=options["limit"])
        if options["json"]:
            self.stdout.write(json.dumps({"depth": depth, "messages": [d.as_dict() for d in found]}, indent=2))
            return
        self.stdout.write(f"{depth} dead message(s) in {queues.DEAD_LETTER_QUEUE}")
        for dead in found:
            died = dead.died_at.isoformat(timespec="seconds") if dead.died_at else "?"
            self.stdout.write(
                f"{dead.task_id}  {dead.task or '?'}  order={dead.order_id}  queue={dead.queue or '?'}  "
                f"reason={dead.reason}  count={dead.count}  first={dead.first_death_reason or '?'}"
                f"@{dead.first_death_queue or '?'}  died={died}"
            )
        if depth > len(found):
            self.stdout.write(f"… and {depth - len(found)} more (--limit)")

    def _redrive(self, options):
        if bool(options["all"]) == bool(options["ids"]):
            raise CommandError("name the task ids to re-drive, or --all (not both)")
        task_queues = [*settings.SERVICE_QUEUES, *settings.COMPENSATION_QUEUES.values()]
        if options["queue"] is not None and options["queue"] not in task_queues:
            raise CommandError(f"--queue {options['queue']!r}: expected one of {', '.join(task_queues)}")
        result = deadletter.redrive(task_ids=options["ids"], queue=options["queue"], limit=options["limit"])
        for dead in result.sent:
            self.stdout.write(f"re-driven {dead.task_id} {dead.task} order={dead.order_id} to {dead.queue}")
        unknown = [d for d in result.skipped if d.queue is None]
        for dead in unknown:
            self.stderr.write(f"left {dead.task_id} {dead.task}: the queue it died in is not a task queue")
        missing = set(options["ids"]) - {d.task_id for d in result.sent}
        left = len(result.skipped) + result.not_looked_at
        past = (
            f" ({result.not_looked_at} past --limit {options['limit']}, not looked at)" if result.not_looked_at else ""
        )
        self.stdout.write(f"{len(result.sent)} re-driven, {left} left in the dead-letter queue{past}")
        if missing:
            self.stderr.write(f"not re-driven: {', '.join(sorted(missing))}")
            sys.exit(1)
