"""The saga dashboard's numbers: whether orders flow, read from all three services.

It asks orders, inventory and reports through their public modules (never
their models) and writes nothing; ops.views renders it at /admin/dashboard/.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from inventory import public as inventory
from orders import public as orders
from project import deadletter
from project.admin import humanized_age
from project.saga import human_duration
from reports import public as reports

WINDOWS_MINUTES = (5, 15, 60)
STUCK_SHOWN = 50
REASONS_SHOWN = 10
PRODUCTS_SHOWN = 200
# The page reloads itself this often; ?refresh=N changes it (0 stops it), within these bounds.
REFRESH_SECONDS = 10
REFRESH_BOUNDS = (5, 3600)


@dataclass(frozen=True)
class Window:
    minutes: int
    confirmed: int
    compensated: int


@dataclass(frozen=True)
class StuckOrder:
    id: int
    username: str
    age: str
    dispatch_attempts: int
    since_dispatch: str


@dataclass(frozen=True)
class Compensation:
    order_id: int
    username: str
    reason: str
    cause: str
    ago: str


@dataclass(frozen=True)
class ProductLine:
    id: int
    sku: str
    name: str
    active: bool
    stock: int
    held: int
    sold: int

    @property
    def unbalanced(self) -> int:
        """Units held by reservations minus units reports counted: 0 once every saga settled (docs/design.md §2.5)."""
        return self.held - self.sold


@dataclass(frozen=True)
class DeadLetters:
    """The dead-letter queue (quorum queues only): its depth, or why it could not be read.

    Its depth only: RabbitMQ cannot show a quorum queue's messages without
    delivering them, and each delivery returned counts on the message and moves
    it to the back (project/deadletter.py `peek`), which a page that reloads
    itself must not do. `manage.py deadletter list` shows them on demand.
    """

    depth: int
    error: str = ""


def dead_letters() -> DeadLetters | None:
    """The dead-letter queue as the page shows it; None where there is none (classic queues, embedded broker)."""
    if not settings.QUORUM_QUEUES:
        return None
    try:
        depth = deadletter.depth(timeout=settings.BROKER_PUBLISH_TIMEOUT_SECONDS)
    except Exception as exc:  # the page still shows the database's numbers
        return DeadLetters(0, f"{type(exc).__name__}: {exc}")
    return DeadLetters(depth)


@dataclass(frozen=True)
class Dashboard:
    now: datetime
    by_status: dict[str, int]
    cancelled: int
    windows: list[Window]
    stuck: list[StuckOrder]
    stuck_total: int
    compensations: list[Compensation]
    products: list[ProductLine]
    products_limit: int
    timeout_seconds: int
    deadline: str
    dead_letters: DeadLetters | None = None


def dashboard_data(*, now: datetime | None = None) -> Dashboard:
    """Every number on the page, read at `now`."""
    now = now or timezone.now()
    finished = orders.orders_finished_since(now - timedelta(minutes=minutes) for minutes in WINDOWS_MINUTES)
    windows = [Window(m, f.confirmed, f.cancelled) for m, f in zip(WINDOWS_MINUTES, finished, strict=True)]

    stuck_orders, stuck_total = orders.stuck_pending_orders(now=now, limit=STUCK_SHOWN)
    stuck = [
        StuckOrder(
            id=order.id,
            username=order.username,
            age=humanized_age(order.created_at, now),
            dispatch_attempts=order.dispatch_attempts,
            since_dispatch=humanized_age(order.last_dispatched_at, now) if order.last_dispatched_at else "never",
        )
        for order in stuck_orders
    ]

    compensations = [
        Compensation(c.order_id, c.username, c.reason, c.cause, humanized_age(c.cancelled_at, now))
        for c in orders.latest_cancellations(limit=REASONS_SHOWN)
    ]

    held = inventory.active_units_by_product()
    sold = reports.units_sold_by_product()
    products = [
        ProductLine(p.id, p.sku, p.name, p.active, p.stock, held.get(p.id, 0), sold.get(p.id, 0))
        for p in inventory.product_stock_levels(limit=PRODUCTS_SHOWN)
    ]

    return Dashboard(
        now=now,
        by_status=orders.order_counts_by_status(),
        cancelled=orders.cancelled_order_count(),
        windows=windows,
        stuck=stuck,
        stuck_total=stuck_total,
        compensations=compensations,
        products=products,
        products_limit=PRODUCTS_SHOWN,
        timeout_seconds=settings.SAGA_TIMEOUT_SECONDS,
        deadline=human_duration(settings.ORDER_DEADLINE_SECONDS),
        dead_letters=dead_letters(),
    )


def refresh_seconds(value: str | None) -> int:
    """?refresh=N: 0 stops the reloads; anything else is kept within REFRESH_BOUNDS."""
    value = (value or "").strip()
    if not (value.isascii() and value.isdigit()):
        return REFRESH_SECONDS
    seconds = int(value)
    if seconds == 0:
        return 0
    low, high = REFRESH_BOUNDS
    return min(max(seconds, low), high)
