"""The floor of `bench_orders --baseline`: three trivial tasks, one per service queue.

Each commits one UPDATE of one row (its chain's BenchFloorChain row) and does
nothing else, so a chain of them costs what the broker, the database and the
worker settings cost and no more: the physical limit of this architecture on
the machine. The names carry the service prefixes, so `task_routes` sends each
to its own queue exactly as it sends the saga's steps. Celery's autodiscovery
finds them only where the bench app is installed (ORDERFLOW_BENCH=1): no
production worker registers them.
"""

from celery import shared_task
from django.db.models import F
from django.utils import timezone

from .models import BenchFloorChain


def _step(chain_id, last: bool) -> None:
    if isinstance(chain_id, bool) or not isinstance(chain_id, int):
        return  # a malformed message: nothing to do, nothing to retry
    changes = {"steps": F("steps") + 1}
    if last:
        changes["done_at"] = timezone.now()
    BenchFloorChain.objects.filter(pk=chain_id).update(**changes)


@shared_task(name="inventory.bench_floor")
def inventory_floor(chain_id):
    _step(chain_id, last=False)


@shared_task(name="reports.bench_floor")
def reports_floor(chain_id):
    _step(chain_id, last=False)


@shared_task(name="orders.bench_floor")
def orders_floor(chain_id):
    _step(chain_id, last=True)
