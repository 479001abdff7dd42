"""The tour (docs/tour.md) in a real browser: staff place orders in the admin and watch the saga settle them.

Headless Chromium (Playwright) against pytest-django's live server, with one real Celery worker
per service queue (the `workers` fixture of testing/plugin.py), so every saga really runs, and Flower
watching them.
Waiting is done as a person would: reload the page until it shows the outcome, for a bounded time.
With SCREENSHOTS=1 the pictures of the tour (docs/tour.md) are saved into docs/img/.
"""

import re
import time

import pytest
from django.core.management import call_command

from inventory.models import Product

# Without playwright the module is skipped, not an import error (conftest skips without Chromium).
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
Page, expect = sync_api.Page, sync_api.expect

pytestmark = [pytest.mark.browser, pytest.mark.saga, pytest.mark.timeout(600)]

USERNAME, PASSWORD = "admin", "tour-password-1"
# A saga takes well under a second on an idle machine; CI machines are busy.
SAGA_WAIT_SECONDS = 120


def reload_until(page: Page, shows, *, what: str, timeout: float = SAGA_WAIT_SECONDS) -> None:
    """Reload `page` about once a second until `shows(page)` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not shows(page):
        if time.monotonic() > deadline:
            pytest.fail(f"the page did not show {what} within {timeout}s (last at {page.url})")
        page.wait_for_timeout(1000)
        page.reload()


def readonly(page: Page, field: str) -> str:
    """The text of a read-only field on an admin change page ('' when the page has none)."""
    cell = page.locator(f".field-{field} .readonly")
    return cell.inner_text().strip() if cell.count() else ""


def messages(page: Page):
    return page.locator("ul.messagelist")


def fill_order(page: Page, *lines: tuple[int, int]) -> None:
    """Open "Add order" and fill in (product id, quantity) lines; the customer stays the logged-in user."""
    page.goto("/admin/orders/order/add/")
    for index, (product_id, quantity) in enumerate(lines):
        page.select_option(f"#id_lines-{index}-product", str(product_id))
        page.fill(f"#id_lines-{index}-quantity", str(quantity))


def submit_order(page: Page) -> int:
    """Press "Place order"; returns the new order's id (the page is now the order's)."""
    page.click("input[name=_save]")
    expect(messages(page)).to_contain_text(f"placed for {USERNAME}")
    return int(re.search(r"/orders/order/(\d+)/change/", page.url).group(1))


def test_tour_orders_confirm_compensate_and_cancel(page, flower_page, workers, screenshot, django_user_model):
    django_user_model.objects.create_superuser(username=USERNAME, password=PASSWORD, email="admin@example.com")
    call_command("seed_demo", verbosity=0)  # the demo products, as `make run` loads them
    mouse = Product.objects.get(sku="MS-01")

    # --- log in: the index links to the saga dashboard ---------------------------------------
    page.goto("/admin/")
    expect(page).to_have_url(re.compile(r"/admin/login/"))
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#saga-dashboard-module")).to_contain_text("Saga dashboard")
    screenshot(page, "tour-admin-index")

    # --- add a product -----------------------------------------------------------------------------
    page.goto("/admin/inventory/product/add/")
    page.fill("#id_sku", "DESK-01")
    page.fill("#id_name", "Standing desk")
    page.fill("#id_price", "399.00")
    page.fill("#id_stock", "5")
    screenshot(page, "tour-add-product")
    page.click("input[name=_save]")
    expect(messages(page)).to_contain_text("was added successfully")
    desk = Product.objects.get(sku="DESK-01")

    # --- an order with two lines becomes confirmed ---------------------------------------------
    fill_order(page, (desk.pk, 2), (mouse.pk, 1))
    screenshot(page, "tour-add-order")
    confirmed_id = submit_order(page)
    reload_until(page, lambda p: readonly(p, "status") == "Confirmed", what=f"order {confirmed_id} confirmed")
    expect(page.locator(".field-stock_held .readonly")).to_contain_text("2 × product")

    page.goto("/admin/orders/order/")
    row = page.locator("#result_list tbody tr", has=page.locator(f"input[value='{confirmed_id}']"))
    expect(row.locator("td.field-status")).to_have_text("Confirmed")
    screenshot(page, "tour-orders-confirmed")

    # --- an order larger than the stock is compensated, with its reason ---------------------
    fill_order(page, (desk.pk, 10))
    short_id = submit_order(page)
    # The order's page leads to its cancelled record once compensation deleted the order.
    reload_until(page, lambda p: "/orders/cancelledorder/" in p.url, what=f"order {short_id} cancelled")
    reason = f"insufficient stock for product {desk.pk}: wanted 10, have 3"
    expect(messages(page)).to_contain_text(f"Order {short_id} was cancelled: {reason}")

    page.goto("/admin/orders/cancelledorder/")
    cancelled_row = page.locator("#result_list tbody tr", has_text=reason)
    expect(cancelled_row).to_have_count(1)
    expect(cancelled_row.locator("th.field-order_id")).to_have_text(str(short_id))
    screenshot(page, "tour-cancelled-orders")

    # --- the dashboard, from the index's link -----------------------------------------------
    page.goto("/admin/")
    page.locator("#saga-dashboard-module").get_by_role("link", name="Saga dashboard").click()
    expect(page).to_have_url(re.compile(r"/admin/dashboard/$"))
    expect(page.locator("#status-confirmed .count")).to_have_text("1")
    expect(page.locator("#status-pending .count")).to_have_text("0")
    expect(page.locator("#status-cancelled .count")).to_have_text("1")
    expect(page.locator("#throughput-confirmed td")).to_have_text(["1", "1", "1"])
    expect(page.locator("#throughput-compensated td")).to_have_text(["1", "1", "1"])
    expect(page.locator("#compensations")).to_contain_text(reason)
    # in stock, held by reservations, units sold, held − sold
    expect(page.locator(f"#product-{desk.pk} td.number")).to_have_text(["3", "2", "2", "0"])
    expect(page.locator(f"#product-{mouse.pk} td.number")).to_have_text(["39", "1", "1", "0"])
    screenshot(page, "tour-dashboard", full_page=True)

    # --- cancel the confirmed order: the stock comes back -----------------------------------
    page.goto("/admin/orders/order/")
    page.check(f"input[name=_selected_action][value='{confirmed_id}']")
    page.select_option("select[name=action]", "cancel_orders")
    page.click("button[name=index]")
    expect(page.locator("#content h1")).to_have_text("Cancel orders?")
    expect(page.locator("#content")).to_contain_text(f"Order {confirmed_id}")
    screenshot(page, "tour-cancel-confirmation")
    page.click("input[type=submit][value='Yes, cancel them']")
    expect(messages(page)).to_contain_text(f"Cancelling 1 order(s): {confirmed_id}.")

    page.goto(f"/admin/inventory/product/{desk.pk}/change/")
    reload_until(page, lambda p: readonly(p, "stock") == "5", what="the 2 desks back in stock")
    expect(page.locator(".field-reserved_units .readonly")).to_contain_text("0 (reservations)")
    screenshot(page, "tour-stock-restored")
    page.goto(f"/admin/inventory/product/{mouse.pk}/change/")
    expect(page.locator(".field-stock .readonly")).to_have_text("40")

    page.goto(f"/admin/orders/order/{confirmed_id}/change/")
    reload_until(page, lambda p: "/orders/cancelledorder/" in p.url, what=f"order {confirmed_id} deleted")
    expect(messages(page)).to_contain_text(f"Order {confirmed_id} was cancelled: cancelled by user")

    # --- Flower saw every step, each on its own service's worker -----------------------------
    flower_page.goto("/tasks")
    table = flower_page.locator("#tasks-table tbody")
    for name in ("inventory.stock_reserve", "reports.sale_record", "orders.order_confirm", "orders.order_compensate",
                 "reports.sale_revert", "inventory.stock_release", "orders.order_delete"):  # fmt: skip
        expect(table).to_contain_text(name)
    failed = table.locator("tr", has_text="inventory.stock_reserve").filter(has_text="FAILURE")
    expect(failed).to_have_count(1)  # the refused reservation that started the compensation
    screenshot(flower_page, "tour-flower-tasks", full_page=True)
