"""Check docs/design.md §2's invariants on live data; exit 1 on any violation."""

import json
import sys
from datetime import timedelta

from django.core.management.base import BaseCommand

from ops.audit import audit


class Command(BaseCommand):
    help = "Check orderflow's invariants across the three services; exit status 1 on any violation."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="print one JSON document")
        parser.add_argument(
            "--stale-after",
            type=float,
            default=None,
            help="seconds after which a pending/cancelling order counts as stuck "
            "(default: ORDER_DEADLINE_SECONDS + SAGA_TIMEOUT_SECONDS)",
        )

    def handle(self, *args, **options):
        stale = timedelta(seconds=options["stale_after"]) if options["stale_after"] is not None else None
        violations = audit(stale_after=stale)
        if options["json"]:
            self.stdout.write(
                json.dumps({"ok": not violations, "violations": [v.as_dict() for v in violations]}, indent=2)
            )
        else:
            for v in violations:
                where = " ".join(
                    f"{k}={v}" for k, v in (("order", v.order_id), ("product", v.product_id)) if v is not None
                )
                self.stdout.write(f"VIOLATION {v.invariant} {where}: {v.message}")
            self.stdout.write("consistent" if not violations else f"{len(violations)} violation(s)")
        if violations:
            sys.exit(1)
