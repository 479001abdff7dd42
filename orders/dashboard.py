"""The saga dashboard: one admin page that tells operators whether orders flow.

It reads orders' own tables and asks inventory and reports through their public
modules (never their models); it writes nothing. OrderAdmin mounts it at
/admin/orders/order/dashboard/ and the admin index links to it.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.admin import ModelAdmin
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone

from inventory import public as inventory
from project.db import service_db
from reports import public as reports

from .admin import humanized_age
from .models import CancelledOrder, Order

TEMPLATE = "admin/orders/dashboard.html"
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
        """Units held by reservations minus units reports counted: 0 once every saga has settled (DESIGN §2.5)."""
        return self.held - self.sold


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
    max_attempts: int


def dashboard_data(*, now: datetime | None = None) -> Dashboard:
    """Every number on the page, read at `now`."""
    now = now or timezone.now()
    db = service_db("orders")
    orders = Order.objects.using(db)
    cancelled = CancelledOrder.objects.using(db)

    by_status = dict.fromkeys(Order.Status.values, 0)
    for row in orders.order_by().values("status").annotate(count=Count("pk")):
        by_status[row["status"]] = row["count"]

    cutoffs = {minutes: now - timedelta(minutes=minutes) for minutes in WINDOWS_MINUTES}
    # An order cancelled after it was confirmed counts as compensated only (once deleted, it is no Order).
    confirmed = orders.filter(status=Order.Status.CONFIRMED).aggregate(
        **{f"m{m}": Count("pk", filter=Q(confirmed_at__gte=cutoff)) for m, cutoff in cutoffs.items()}
    )
    compensated = cancelled.aggregate(
        **{f"m{m}": Count("pk", filter=Q(cancelled_at__gte=cutoff)) for m, cutoff in cutoffs.items()}
    )
    windows = [Window(m, confirmed[f"m{m}"], compensated[f"m{m}"]) for m in WINDOWS_MINUTES]

    # What the sweeper will pick up next: the same condition as orders.services.saga_sweep.
    stale = now - timedelta(seconds=settings.SAGA_TIMEOUT_SECONDS)
    stuck_orders = orders.filter(
        Q(last_dispatched_at__lt=stale) | Q(last_dispatched_at=None), status=Order.Status.PENDING
    ).order_by("created_at", "pk")
    stuck = [
        StuckOrder(
            id=order.pk,
            username=order.user.get_username(),
            age=humanized_age(order.created_at, now),
            dispatch_attempts=order.dispatch_attempts,
            since_dispatch=humanized_age(order.last_dispatched_at, now) if order.last_dispatched_at else "never",
        )
        for order in stuck_orders.select_related("user")[:STUCK_SHOWN]
    ]

    compensations = [
        Compensation(record.order_id, record.username, record.reason, humanized_age(record.cancelled_at, now))
        for record in cancelled.order_by("-cancelled_at", "-order_id")[:REASONS_SHOWN]
    ]

    held = inventory.active_units_by_product()
    sold = reports.units_sold_by_product()
    products = [
        ProductLine(p.id, p.sku, p.name, p.active, p.stock, held.get(p.id, 0), sold.get(p.id, 0))
        for p in inventory.product_stock_levels(limit=PRODUCTS_SHOWN)
    ]

    return Dashboard(
        now=now,
        by_status=by_status,
        cancelled=cancelled.count(),
        windows=windows,
        stuck=stuck,
        stuck_total=len(stuck) if len(stuck) < STUCK_SHOWN else stuck_orders.count(),
        compensations=compensations,
        products=products,
        products_limit=PRODUCTS_SHOWN,
        timeout_seconds=settings.SAGA_TIMEOUT_SECONDS,
        max_attempts=settings.SAGA_MAX_ATTEMPTS,
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


def dashboard_view(request: HttpRequest, *, model_admin: ModelAdmin) -> TemplateResponse:
    """The page itself; the admin site's admin_view (staff only) wraps it, and it asks for the orders view right."""
    if not model_admin.has_view_or_change_permission(request):
        raise PermissionDenied
    site = model_admin.admin_site
    context = {
        **site.each_context(request),
        "title": "Saga dashboard",
        "subtitle": None,
        "opts": model_admin.opts,
        "dashboard": dashboard_data(),
        "refresh_seconds": refresh_seconds(request.GET.get("refresh")),
        "refresh_default": REFRESH_SECONDS,
    }
    request.current_app = site.name
    return TemplateResponse(request, TEMPLATE, context)
