"""Many clients at once through the real HTTP API: no oversell, books balance, every order ends.

500 orders from 16 concurrent clients (HTTP keep-alive connections with token
auth) against a few products with small stock, mixing multi-line orders and
cancellations, processed by the real workers (one per service queue) and the
saga sweeper (beat), as in production: on a loaded machine a publish can
outlast BROKER_PUBLISH_TIMEOUT_SECONDS, the order is committed with its saga
unpublished, and only the sweeper moves it on (docs/design.md, the outbox).
"""

import http.client
import json
import random
import threading
from collections import Counter
from urllib.parse import urlparse

import pytest
from rest_framework.authtoken.models import Token

from inventory.models import Product, StockReservation
from ops.audit import audit
from orders.models import CancelledOrder, Order, OrderLine
from reports.models import ProductReport
from testing import wait_for

pytestmark = [pytest.mark.saga, pytest.mark.timeout(600)]

CLIENTS = 16
ORDERS = 500


class Client:
    def __init__(self, base_url: str, token: str) -> None:
        url = urlparse(base_url)
        self.connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body=None) -> tuple[int, dict]:
        payload = json.dumps(body) if body is not None else None
        self.connection.request(method, path, body=payload, headers=self.headers)
        response = self.connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")


def test_500_orders_from_16_clients_never_oversell(sweeper, live_server, django_user_model, make_product):
    products = [make_product(stock=40), make_product(stock=25), make_product(stock=60)]
    initial = {p.pk: p.stock for p in products}
    wait_for(lambda: ProductReport.objects.filter(product_id__in=initial).count() == len(products))
    tokens = [
        Token.objects.create(user=django_user_model.objects.create_user(username=f"client{i}")).key
        for i in range(CLIENTS)
    ]
    placed: list[int] = []
    cancelled_by_client: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        rng = random.Random(index)
        client = Client(live_server.url, tokens[index])
        for _ in range(ORDERS // CLIENTS + (1 if index < ORDERS % CLIENTS else 0)):
            chosen = rng.sample(products, rng.choice([1, 1, 2, 3]))
            lines = [{"product": p.pk, "quantity": rng.randint(1, 3)} for p in chosen]
            status, body = client.call("POST", "/api/orders/", {"lines": lines})
            if status != 202:
                with lock:
                    failures.append(f"POST {status} {body}")
                continue
            order_id = body["id"]
            with lock:
                placed.append(order_id)
            if rng.random() < 0.15:  # some clients change their mind, at any point of the saga
                status, body = client.call("POST", f"/api/orders/{order_id}/cancel/")
                with lock:
                    if status == 202:
                        cancelled_by_client.append(order_id)
                    elif status != 200:  # 200: the saga had already cancelled it
                        failures.append(f"cancel {status} {body}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert len(placed) == ORDERS

    def all_terminal():
        live = Order.objects.filter(pk__in=placed).exclude(status=Order.Status.CONFIRMED).count()
        return live == 0

    wait_for(all_terminal, timeout=300, interval=0.5, what="every order to be confirmed or cancelled")

    confirmed = set(Order.objects.filter(pk__in=placed).values_list("pk", flat=True))
    cancelled = set(CancelledOrder.objects.filter(pk__in=placed).values_list("pk", flat=True))
    assert confirmed | cancelled == set(placed)
    assert not confirmed & cancelled
    assert not confirmed & set(cancelled_by_client)
    # Contention really happened: some orders were refused for stock.
    reasons = Counter(
        r.split(":")[0] for r in CancelledOrder.objects.filter(pk__in=placed).values_list("reason", flat=True)
    )
    assert any(reason.startswith("insufficient stock") for reason in reasons), reasons
    assert reasons["cancelled by user"] == len(cancelled_by_client)

    for product_id, stock_before in initial.items():
        units_confirmed = sum(
            OrderLine.objects.filter(order_id__in=confirmed, product_id=product_id).values_list("quantity", flat=True)
        )
        product = Product.objects.get(pk=product_id)
        assert product.stock >= 0
        assert product.stock + units_confirmed == stock_before, product_id
        held = sum(
            StockReservation.objects.filter(product_id=product_id, released_at=None).values_list("quantity", flat=True)
        )
        assert held == units_confirmed
        assert ProductReport.objects.get(product_id=product_id).units_sold == units_confirmed
    assert audit() == []
