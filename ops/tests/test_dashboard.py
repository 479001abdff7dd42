"""The saga dashboard (ops/dashboard.py, ops/views.py): who may see it, and that its numbers are right.

Rendered with Django's test client on a small data set written at known times;
no workers run (inventory and reports are filled through their services directly).
"""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from inventory import services as inventory_services
from ops import dashboard
from orders.models import CancelledOrder, Order
from reports import services as reports_services

pytestmark = pytest.mark.django_db

PENDING, CONFIRMED, CANCELLING = Order.Status.PENDING, Order.Status.CONFIRMED, Order.Status.CANCELLING


def url() -> str:
    return reverse("ops:dashboard")


@pytest.fixture
def admin_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser(username="root", password="root-password-1"))
    return client


@pytest.fixture
def now():
    return timezone.now()


@pytest.fixture
def history(user, make_product, settings, now):
    """Orders, cancelled orders, reservations and sales at known ages (saga timeout 60 s)."""
    settings.SAGA_TIMEOUT_SECONDS = 60
    settings.ORDER_DEADLINE_SECONDS = 3 * 3600

    def order(status, *, created, dispatched=None, confirmed=None, attempts=1) -> int:
        """An Order row `created` ago, last dispatched / confirmed that long ago (None: never)."""
        pk = Order.objects.create(user=user, status=status, dispatch_attempts=attempts).pk
        Order.objects.filter(pk=pk).update(
            created_at=now - created,
            last_dispatched_at=None if dispatched is None else now - dispatched,
            confirmed_at=None if confirmed is None else now - confirmed,
        )
        return pk

    def cancelled(order_id: int, reason: str, *, ago) -> None:
        CancelledOrder.objects.create(
            order_id=order_id, user=user, username=user.username, reason=reason, status_before=CANCELLING,
            created_at=now - ago - timedelta(seconds=5),
        )  # fmt: skip
        CancelledOrder.objects.filter(pk=order_id).update(cancelled_at=now - ago)

    minutes, seconds = (lambda n: timedelta(minutes=n)), (lambda n: timedelta(seconds=n))
    ids = {
        "confirmed_2m": order(CONFIRMED, created=minutes(3), dispatched=minutes(3), confirmed=minutes(2)),
        "confirmed_10m": order(CONFIRMED, created=minutes(11), dispatched=minutes(11), confirmed=minutes(10)),
        "confirmed_30m": order(CONFIRMED, created=minutes(31), dispatched=minutes(31), confirmed=minutes(30)),
        "confirmed_2h": order(CONFIRMED, created=minutes(121), dispatched=minutes(121), confirmed=minutes(120)),
        "fresh": order(PENDING, created=seconds(5), dispatched=seconds(5)),
        "stuck_old": order(PENDING, created=minutes(10), dispatched=minutes(2), attempts=2),
        "stuck_never": order(PENDING, created=minutes(3), attempts=0),
        "cancelling": order(CANCELLING, created=minutes(1), dispatched=minutes(1)),
    }
    cancelled(9001, "insufficient stock for product 7: wanted 3, have 1", ago=minutes(1))
    cancelled(9002, "cancelled by user", ago=minutes(20))
    cancelled(9003, "the saga did not finish after 3 dispatches; timed out", ago=minutes(180))

    keyboard = make_product(sku="KB", name="Keyboard", price="10.00", stock=10)
    mouse = make_product(sku="MS", name="Mouse", price="5.00", stock=5)
    make_product(sku="LAMP", name="Lamp", stock=0, active=False)
    # A settled order (reserved and counted) and one in flight (reserved, not counted yet).
    inventory_services.stock_reserve(order_id=ids["confirmed_2m"], lines=[{"product": keyboard.pk, "quantity": 3}])
    reports_services.sale_record(
        order_id=ids["confirmed_2m"],
        lines=[{"product": keyboard.pk, "quantity": 3, "unit_price": "10.00", "product_name": "Keyboard"}],
    )
    inventory_services.stock_reserve(order_id=ids["fresh"], lines=[{"product": mouse.pk, "quantity": 2}])
    return ids


# --- who may see it ---------------------------------------------------------------------------


def test_anonymous_is_sent_to_the_login_page(client):
    response = client.get(url())

    assert response.status_code == 302
    assert response.url == f"{reverse('admin:login')}?next={url()}"


def test_a_user_who_is_not_staff_is_sent_to_the_login_page(client, user):
    client.force_login(user)

    response = client.get(url())

    assert response.status_code == 302
    assert response.url.startswith(reverse("admin:login"))


def test_staff_without_the_orders_view_permission_is_refused(client, staff_user):
    client.force_login(staff_user)

    assert client.get(url()).status_code == 403


def test_staff_who_may_view_orders_get_the_page(client, staff_user):
    staff_user.user_permissions.add(Permission.objects.get(codename="view_order"))
    client.force_login(staff_user)

    response = client.get(url())

    assert response.status_code == 200
    assert "admin/ops/dashboard.html" in [t.name for t in response.templates]
    assert '<meta http-equiv="refresh" content="10">' in response.content.decode()


def test_the_index_and_the_order_list_link_to_it(admin_client, client, staff_user):
    assert f'href="{url()}"' in admin_client.get(reverse("admin:index")).content.decode()
    assert f'href="{url()}"' in admin_client.get(reverse("admin:orders_order_changelist")).content.decode()

    client.force_login(staff_user)  # no permission on orders: no link
    assert f'href="{url()}"' not in client.get(reverse("admin:index")).content.decode()


def test_it_is_an_admin_page_of_its_own_and_its_old_address_leads_to_it(admin_client):
    assert url() == "/admin/dashboard/"

    response = admin_client.get("/admin/orders/order/dashboard/?refresh=0")

    assert response.status_code == 302
    assert response.url == f"{url()}?refresh=0"


# --- the numbers ----------------------------------------------------------------------------


def test_orders_by_status_and_lately_finished(admin_client, history):
    data = admin_client.get(url()).context["dashboard"]

    assert data.by_status == {PENDING: 3, CONFIRMED: 4, CANCELLING: 1}
    assert data.cancelled == 3
    assert [(w.minutes, w.confirmed, w.compensated) for w in data.windows] == [(5, 1, 1), (15, 2, 1), (60, 3, 2)]


def test_stuck_orders_are_pending_orders_the_sweeper_would_take_oldest_first(admin_client, history):
    data = admin_client.get(url()).context["dashboard"]

    assert data.stuck_total == 2
    assert [(o.id, o.age, o.dispatch_attempts, o.since_dispatch) for o in data.stuck] == [
        (history["stuck_old"], "10 min", 2, "2 min"),
        (history["stuck_never"], "3 min", 0, "never"),
    ]
    assert data.timeout_seconds == 60 and data.deadline == "3 h"


def test_latest_compensations_newest_first_with_their_reasons(admin_client, history):
    data = admin_client.get(url()).context["dashboard"]

    assert [(c.order_id, c.reason, c.ago) for c in data.compensations] == [
        (9001, "insufficient stock for product 7: wanted 3, have 1", "1 min"),
        (9002, "cancelled by user", "20 min"),
        (9003, "the saga did not finish after 3 dispatches; timed out", "3 h"),
    ]


def test_only_the_latest_compensations_are_listed(admin_client, history, monkeypatch):
    monkeypatch.setattr(dashboard, "REASONS_SHOWN", 2)

    data = admin_client.get(url()).context["dashboard"]

    assert [c.order_id for c in data.compensations] == [9001, 9002]
    assert data.cancelled == 3


def test_stock_against_units_sold_per_product(admin_client, history):
    data = admin_client.get(url()).context["dashboard"]

    rows = [(p.sku, p.active, p.stock, p.held, p.sold, p.unbalanced) for p in data.products]
    assert rows == [
        ("KB", True, 7, 3, 3, 0),  # settled: held == sold
        ("MS", True, 3, 2, 0, 2),  # reserved, the sale not recorded yet
        ("LAMP", False, 0, 0, 0, 0),
    ]


def test_the_page_shows_the_numbers_and_links_each_order(admin_client, history):
    content = admin_client.get(url()).content.decode()

    assert '<span class="count">3</span><span class="label">pending</span>' in content
    assert '<span class="count">4</span><span class="label">confirmed</span>' in content
    assert '<span class="count">1</span><span class="label">cancelling</span>' in content
    assert '<span class="count">3</span><span class="label">cancelled</span>' in content
    assert '<span class="count">2</span><span class="label">stuck pending</span>' in content
    assert "Stuck pending orders (2)" in content
    for order_id in (history["stuck_old"], history["stuck_never"]):
        assert f'href="{reverse("admin:orders_order_change", args=[order_id])}"' in content
    assert '<td class="number">2</td>' in content
    assert f'href="{reverse("admin:orders_cancelledorder_change", args=[9001])}"' in content
    assert "insufficient stock for product 7: wanted 3, have 1" in content
    assert '<td class="number unbalanced">2</td>' in content


def test_an_empty_system_says_so(admin_client):
    response = admin_client.get(url())

    assert response.status_code == 200
    content = response.content.decode()
    assert "None: every pending order was dispatched less than" in content
    assert "No order has been cancelled." in content
    assert "No products yet." in content


@pytest.mark.parametrize(
    ("query", "seconds"),
    [("", 10), ("0", 0), ("2", 5), ("30", 30), ("99999", 3600), ("soon", 10), ("-5", 10), ("²", 10)],
)
def test_the_refresh_interval_can_be_changed_or_stopped(admin_client, query, seconds):
    content = admin_client.get(url(), {"refresh": query} if query else {}).content.decode()

    if seconds:
        assert f'<meta http-equiv="refresh" content="{seconds}">' in content
    else:
        assert 'http-equiv="refresh"' not in content
        assert "Not reloading" in content


def test_the_dead_letter_queue_is_shown_on_quorum_queues_only(admin_client, settings):
    # On RabbitMQ with quorum queues the tile and the table read the dead-letter queue (project/deadletter.py);
    # elsewhere there is none, and nothing is shown.
    page = admin_client.get(url() + "?refresh=0").content.decode()
    if settings.QUORUM_QUEUES:
        assert 'id="status-dead-letters"' in page and 'id="dead-letters"' in page
        assert "Could not read it" not in page
    else:
        assert 'id="status-dead-letters"' not in page and 'id="dead-letters"' not in page
        assert dashboard.dead_letters() is None


def test_a_dead_letter_queue_that_cannot_be_read_is_said_so(admin_client, settings, monkeypatch):
    settings.QUORUM_QUEUES = True

    def unreachable(**_):
        raise TimeoutError("timed out")

    monkeypatch.setattr(dashboard.deadletter, "depth", unreachable)
    page = admin_client.get(url() + "?refresh=0").content.decode()

    assert "Could not read it: TimeoutError: timed out" in page
    assert 'id="status-dead-letters" class="warn"' in page
