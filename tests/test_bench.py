"""`manage.py bench_orders` drives the real pipeline and ends with a clean audit.

A smoke test of the benchmark against the suite's real workers: no timing
asserts (the machine is shared), only that every order ended and the books
balance.
"""

import io
import json

import pytest
from django.core.management import call_command

from ops.audit import audit
from orders.models import CancelledOrder, Order

pytestmark = [pytest.mark.saga, pytest.mark.timeout(180)]


@pytest.mark.parametrize("refusals", ["spread", "last"])
def test_bench_orders_runs_the_saga_and_the_floor_and_stays_consistent(workers, refusals):
    out = io.StringIO()
    call_command(
        "bench_orders", "--orders", "20", "--concurrency", "4", "--via", "service", "--baseline", "--json",
        "--refusals", refusals, stdout=out, stderr=io.StringIO(),
    )  # fmt: skip
    report = json.loads(out.getvalue())

    assert report["ok"], report.get("error")
    assert report["audit"] == {"ok": True, "violations": []}
    saga = report["saga"]
    assert saga["orders"] == 20
    assert saga["confirmed"] + saga["cancelled"] == 20
    # Stock refuses a tenth of the orders (fail ratio 0.1 by default).
    assert (saga["confirmed"], saga["cancelled"]) == (report["expected"]["confirmed"], 2)
    assert saga["confirmed"] == report["expected"]["confirmed"]
    assert saga["latency_ms"]["commit_to_confirmed"]["count"] == saga["confirmed"]
    assert report["floor"]["chains"] == 20
    assert report["ratio"] > 0
    # The warm-up orders too: nothing is left in flight.
    assert not Order.objects.exclude(status=Order.Status.CONFIRMED).exists()
    assert CancelledOrder.objects.count() == saga["cancelled"]
    assert audit() == []
