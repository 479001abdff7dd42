"""The orders and reports admin: orders are placed, cancelled and re-dispatched only through orders.services.

Rendered with Django's test client; no workers run, and the saga's publish is
only captured as an on-commit callback (never executed: it would reach the broker).
"""

import pytest
from django.conf import settings as django_settings
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.urls import reverse

from orders import services
from orders.models import CancelledOrder, Order
from project.http.errors import InvalidInput
from reports import services as reports_services
from reports.models import ProductReport, ReportedOrder

pytestmark = pytest.mark.django_db

ADD_URL = "admin:orders_order_add"
LIST_URL = "admin:orders_order_changelist"


def add_data(user, lines, *, form_key="admin-form-test-1", total_forms=3) -> dict:
    """The POST of the "Add order" page: a customer and (product id, quantity) rows."""
    data = {
        "user": user.pk,
        "form_key": form_key,
        "lines-TOTAL_FORMS": str(max(total_forms, len(lines))),
        "lines-INITIAL_FORMS": "0",
        "lines-MIN_NUM_FORMS": "0",
        "lines-MAX_NUM_FORMS": "50",
        "_save": "Place order",
    }
    for index, (product, quantity) in enumerate(lines):
        data[f"lines-{index}-product"] = str(product)
        data[f"lines-{index}-quantity"] = str(quantity)
    return data


def place(user, *products, quantity=1) -> Order:
    return services.order_create(user=user, lines=[{"product": p.pk, "quantity": quantity} for p in products]).order


def action(client, name: str, orders: list[Order], **extra):
    data = {"action": name, "_selected_action": [o.pk for o in orders], **extra}
    return client.post(reverse(LIST_URL), data)


def page_messages(response) -> list[str]:
    return [str(m) for m in response.wsgi_request._messages]


def log_entries(order: Order) -> list[tuple[str, str]]:
    """The admin's LogEntry rows for `order`, oldest first: (username, change message)."""
    entries = LogEntry.objects.filter(
        content_type=ContentType.objects.get_for_model(Order), object_id=str(order.pk)
    ).order_by("action_time", "pk")
    return [(entry.user.get_username(), entry.get_change_message()) for entry in entries]


def _post_request(user, **data):
    """A POST to the order list by `user`, with messages: for calling an action with a list read earlier."""
    from django.contrib.messages.storage.fallback import FallbackStorage
    from django.contrib.sessions.backends.base import SessionBase
    from django.test import RequestFactory

    request = RequestFactory().post(reverse(LIST_URL), data)
    request.user = user
    request.session = SessionBase()
    request._messages = FallbackStorage(request)
    return request


# --- "Add order" ----------------------------------------------------------------------


def test_add_page_is_usable(admin_client, admin_superuser, make_product):
    on_sale = make_product(sku="ON-SALE", name="Widget", price="2.50", stock=4)
    make_product(sku="RETIRED", active=False)

    response = admin_client.get(reverse(ADD_URL))

    assert response.status_code == 200
    form = response.context["adminform"].form
    assert form.initial["user"] == admin_superuser.pk
    assert form.initial["form_key"].startswith("admin-form-")
    content = response.content.decode()
    for text in ("Add order", "Customer", "Product", "Quantity", "Place order", "Add another line"):
        assert text in content
    assert "appears in their orders" in content  # the customer's help text
    assert "the order keeps the name and price they have now" in content
    assert f'<option value="{on_sale.pk}">ON-SALE — Widget (2.50, 4 in stock)</option>' in content
    assert "RETIRED" not in content
    assert 'id="lines-empty"' in content and 'name="lines-TOTAL_FORMS"' in content
    assert "admin/js/inlines" in content  # rows are added and removed like admin inlines


def test_add_order_with_two_lines_runs_order_create_and_dispatches_once(
    admin_client, user, make_product, django_capture_on_commit_callbacks, monkeypatch
):
    a, b = make_product(name="A", price="3.00"), make_product(name="B", price="4.00")
    seen = []
    real = services.order_create
    monkeypatch.setattr(services, "order_create", lambda **kw: seen.append(kw) or real(**kw))

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = admin_client.post(reverse(ADD_URL), add_data(user, [(a.pk, 2), (b.pk, 1)]))

    assert response.status_code == 302
    order = Order.objects.get()
    assert response.url == reverse("admin:orders_order_change", args=[order.pk])
    assert (order.user, order.status, order.dispatch_attempts) == (user, Order.Status.PENDING, 1)
    assert sorted(
        (line.product_id, line.product_name, str(line.unit_price), line.quantity) for line in order.lines.all()
    ) == [
        (a.pk, "A", "3.00", 2),
        (b.pk, "B", "4.00", 1),
    ]
    assert len(seen) == 1 and seen[0]["user"] == user
    assert seen[0]["lines"] == [{"product": a.pk, "quantity": 2}, {"product": b.pk, "quantity": 1}]
    assert len(callbacks) == 1  # the saga, published after commit
    assert any(f"Order {order.pk} placed" in m for m in page_messages(response))


def test_add_order_with_the_same_product_twice_shows_the_service_error_and_writes_nothing(
    admin_client, user, make_product, django_capture_on_commit_callbacks
):
    product = make_product()

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = admin_client.post(reverse(ADD_URL), add_data(user, [(product.pk, 1), (product.pk, 2)]))

    assert response.status_code == 200
    lines = response.context["formset"]
    assert lines.forms[0].errors == {}
    assert lines.forms[1].errors["product"] == [f"Product {product.pk} appears in more than one line."]
    assert b"appears in more than one line" in response.content
    assert b"Please correct the error below." in response.content
    assert not Order.objects.exists()
    assert callbacks == []


def test_add_order_with_an_unknown_product_shows_an_error_and_writes_nothing(
    admin_client, user, make_product, django_capture_on_commit_callbacks
):
    make_product()

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = admin_client.post(reverse(ADD_URL), add_data(user, [(987654, 1)]))

    assert response.status_code == 200
    assert "Select a valid choice" in response.context["formset"].forms[0].errors["product"][0]
    assert not Order.objects.exists()
    assert callbacks == []


def test_add_order_for_a_product_gone_since_the_form_was_checked_shows_the_service_error(
    admin_client, user, make_product, monkeypatch
):
    """The service has the last word: its per-line errors land on the line they name."""
    product = make_product()

    def refuse(**kwargs):
        raise InvalidInput(
            "Some lines are not valid.", fields={"lines": {"0": {"product": ["Product 7 is not on sale."]}}}
        )

    monkeypatch.setattr(services, "order_create", refuse)
    response = admin_client.post(reverse(ADD_URL), add_data(user, [(product.pk, 1)]))

    assert response.status_code == 200
    assert response.context["formset"].forms[0].errors["product"] == ["Product 7 is not on sale."]
    assert not Order.objects.exists()


def test_add_order_without_lines_or_above_the_quantity_limit_is_refused(admin_client, user, make_product, settings):
    settings.ORDER_MAX_QUANTITY = 5
    product = make_product()

    empty = admin_client.post(reverse(ADD_URL), add_data(user, []))
    too_many = admin_client.post(reverse(ADD_URL), add_data(user, [(product.pk, 6)]))

    assert empty.status_code == too_many.status_code == 200
    assert empty.context["adminform"].form.non_field_errors() == ["At least one line is required."]
    assert too_many.context["formset"].forms[0].errors["quantity"] == ["An integer from 1 to 5 is required."]
    assert not Order.objects.exists()


@pytest.mark.parametrize(
    "quantity",
    ["99999999999999999999", "2147483648", str(django_settings.ORDER_MAX_QUANTITY + 1), "0", "-1", "1e3", "1.5", "NaN"],
)
def test_add_order_with_a_quantity_out_of_range_is_a_form_error(admin_client, user, make_product, quantity):
    product = make_product()

    response = admin_client.post(reverse(ADD_URL), add_data(user, [(product.pk, quantity)]))

    assert response.status_code == 200
    assert "quantity" in response.context["formset"].forms[0].errors
    assert not Order.objects.exists()


def test_add_order_takes_the_largest_quantity(admin_client, user, make_product, settings):
    product = make_product(stock=settings.ORDER_MAX_QUANTITY)

    response = admin_client.post(reverse(ADD_URL), add_data(user, [(product.pk, settings.ORDER_MAX_QUANTITY)]))

    assert response.status_code == 302
    assert Order.objects.get().lines.get().quantity == settings.ORDER_MAX_QUANTITY


def test_submitting_the_same_add_form_twice_places_one_order(admin_client, user, make_product):
    product = make_product()
    data = add_data(user, [(product.pk, 1)], form_key="admin-form-twice")

    first = admin_client.post(reverse(ADD_URL), data)
    second = admin_client.post(reverse(ADD_URL), data)

    order = Order.objects.get()
    assert first.url == second.url == reverse("admin:orders_order_change", args=[order.pk])
    assert any("already submitted" in m for m in page_messages(second))


def test_staff_without_add_permission_cannot_add(client, staff_user):
    staff_user.user_permissions.add(Permission.objects.get(codename="view_order"))
    client.force_login(staff_user)

    assert client.get(reverse(LIST_URL)).status_code == 200
    assert client.get(reverse(ADD_URL)).status_code == 403


# --- existing orders are read-only and never deleted here -----------------------------


def test_order_list_shows_status_age_and_lines(admin_client, user, make_product):
    a, b = make_product(name="Apple"), make_product(name="Pear")
    order = place(user, a, b, quantity=2)

    response = admin_client.get(reverse(LIST_URL), {"status__exact": "pending"})

    assert response.status_code == 200
    assert [o.pk for o in response.context["cl"].result_list] == [order.pk]
    content = response.content.decode()
    assert "2 × Apple, 2 × Pear" in content
    assert "0 s" in content or "1 s" in content  # age
    assert admin_client.get(reverse(LIST_URL), {"status__exact": "confirmed"}).context["cl"].result_count == 0
    for term, found in ((str(order.pk), 1), ("alice", 1), ("nobody", 0), ("not-a-number", 0)):
        response = admin_client.get(reverse(LIST_URL), {"q": term})
        assert response.status_code == 200
        assert response.context["cl"].result_count == found, term


def test_order_change_view_is_read_only(admin_client, user, make_product):
    order = place(user, make_product(name="Lamp"))
    url = reverse("admin:orders_order_change", args=[order.pk])

    response = admin_client.get(url)

    assert response.status_code == 200
    content = response.content.decode()
    assert "Lamp" in content and "none recorded" in content
    assert 'name="_save"' not in content
    assert 'name="lines-0-quantity"' not in content
    assert admin_client.post(url, {"status": "confirmed"}).status_code == 403
    assert Order.objects.get().status == Order.Status.PENDING


def test_orders_cannot_be_deleted(admin_client, user, make_product):
    order = place(user, make_product())

    assert admin_client.get(reverse("admin:orders_order_delete", args=[order.pk])).status_code == 403
    assert admin_client.post(reverse("admin:orders_order_delete", args=[order.pk]), {"post": "yes"}).status_code == 403
    action(admin_client, "delete_selected", [order], post="yes")
    assert Order.objects.filter(pk=order.pk).exists()
    listed = admin_client.get(reverse(LIST_URL))
    offered = [name for name, _ in listed.context["action_form"].fields["action"].choices]
    assert offered == ["", "cancel_orders", "redispatch_orders"]


def test_a_deleted_order_leads_to_its_cancelled_record(admin_client, user, make_product):
    order = place(user, make_product())
    services.order_cancel(order=order, actor=order.user)
    services.order_delete(order_id=order.pk)

    response = admin_client.get(reverse("admin:orders_order_change", args=[order.pk]))

    assert response.status_code == 302
    assert response.url == reverse("admin:orders_cancelledorder_change", args=[order.pk])


# --- actions -------------------------------------------------------------------------


def test_cancel_action_asks_first_then_starts_compensation(
    admin_client, user, make_product, django_capture_on_commit_callbacks
):
    order = place(user, make_product())

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        asked = action(admin_client, "cancel_orders", [order])
    assert asked.status_code == 200
    assert b"Cancel these orders?" in asked.content and b"Yes, cancel them" in asked.content
    assert Order.objects.get().status == Order.Status.PENDING
    assert callbacks == []

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        done = action(admin_client, "cancel_orders", [order], post="yes")

    assert done.status_code == 302
    order.refresh_from_db()
    # Staff cancelled the customer's order: the reason names them, not the customer.
    reason = "cancelled by staff user 'root' in the admin"
    assert (order.status, order.cancel_reason) == (Order.Status.CANCELLING, reason)
    assert len(callbacks) == 1  # the compensation chain
    assert any("Cancelling 1 order(s)" in m for m in page_messages(done))
    assert log_entries(order) == [("root", f"Cancel: compensation started ({reason}).")]


def test_cancel_action_on_ones_own_order_keeps_the_user_reason(admin_client, admin_superuser, make_product):
    order = place(admin_superuser, make_product())

    action(admin_client, "cancel_orders", [order], post="yes")

    order.refresh_from_db()
    assert order.cancel_reason == services.USER_CANCEL_REASON
    assert log_entries(order) == [("root", f"Cancel: compensation started ({services.USER_CANCEL_REASON}).")]


def test_cancel_action_logs_an_order_already_gone(admin_superuser, user, make_product):
    order = place(user, make_product())
    listed = Order.objects.filter(pk=order.pk)
    services.order_compensate(order_id=order.pk, reason="deadline")
    services.order_delete(order_id=order.pk)

    # The action's queryset was read before compensation deleted the order (two staff, one list page).
    admin.site._registry[Order].cancel_orders(_post_request(admin_superuser, post="yes"), [order])

    assert not listed.exists()
    assert log_entries(order) == [("root", "Cancel asked: the order was already gone (see Cancelled orders).")]
    assert CancelledOrder.objects.get(pk=order.pk).reason == "deadline"


def test_a_cancelled_orders_history_shows_who_cancelled_it(admin_client, user, make_product):
    order = place(user, make_product())
    action(admin_client, "cancel_orders", [order], post="yes")
    services.order_delete(order_id=order.pk)

    page = admin_client.get(reverse("admin:orders_cancelledorder_history", args=[order.pk]))

    assert page.status_code == 200
    assert [(e.user.username, e.change_message) for e in page.context["action_list"]] == [
        ("root", "Cancel: compensation started (cancelled by staff user 'root' in the admin).")
    ]
    cancelled = CancelledOrder.objects.get(pk=order.pk)
    assert (cancelled.reason, cancelled.cause) == ("cancelled by staff user 'root' in the admin", "user")


def test_redispatch_action_bumps_attempts_of_pending_orders_only(
    admin_client, user, make_product, django_capture_on_commit_callbacks
):
    pending = place(user, make_product())
    confirmed = place(user, make_product())
    services.order_confirm(order_id=confirmed.pk)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = action(admin_client, "redispatch_orders", [pending, confirmed])

    assert response.status_code == 302
    pending.refresh_from_db()
    confirmed.refresh_from_db()
    assert (pending.dispatch_attempts, confirmed.dispatch_attempts) == (2, 1)
    assert len(callbacks) == 1  # the saga, published again
    assert any(f"Skipped, not pending: {confirmed.pk}" in m for m in page_messages(response))
    assert log_entries(pending) == [("root", "Re-dispatch: the saga was published again.")]
    assert log_entries(confirmed) == [("root", "Re-dispatch skipped: the order is not pending.")]


def test_staff_with_view_permission_only_gets_no_actions(client, staff_user, user, make_product):
    staff_user.user_permissions.add(Permission.objects.get(codename="view_order"))
    client.force_login(staff_user)
    order = place(user, make_product())

    listed = client.get(reverse(LIST_URL))
    assert "action_form" not in listed.context or listed.context["action_form"] is None
    action(client, "cancel_orders", [order], post="yes")
    assert Order.objects.get().status == Order.Status.PENDING


# --- cancelled orders and reports: read-only --------------------------------------------


@pytest.fixture
def history(user, make_product):
    """One cancelled order, one product report and one reported sale, made through the services."""
    product = make_product(name="Kettle", price="20.00")
    order = place(user, product, quantity=2)
    services.order_cancel(order=order, actor=order.user)
    cancelled = services.order_delete(order_id=order.pk)
    reports_services.product_sync(product_id=product.pk, name=product.name, version=product.version)
    lines = [{"product": product.pk, "quantity": 2, "unit_price": "20.00", "product_name": "Kettle"}]
    reports_services.sale_record(order_id=order.pk, lines=lines)
    return cancelled


def test_cancelled_order_detail_shows_lines_and_reason(admin_client, history):
    response = admin_client.get(reverse("admin:orders_cancelledorder_change", args=[history.pk]))

    assert response.status_code == 200
    content = response.content.decode()
    assert "cancelled by user" in content
    assert "<td>Kettle</td><td>20.00</td><td>2</td>" in content
    assert "40.00" in content  # total
    assert 'name="_save"' not in content


def test_cancelled_orders_search(admin_client, history):
    for term, found in ((str(history.pk), 1), ("alice", 1), ("by user", 1), ("unrelated", 0), ("x1", 0)):
        response = admin_client.get(reverse("admin:orders_cancelledorder_changelist"), {"q": term})
        assert response.status_code == 200
        assert response.context["cl"].result_count == found, term


@pytest.mark.parametrize("model", [CancelledOrder, ProductReport, ReportedOrder])
def test_records_are_read_only(admin_client, history, model):
    obj = model.objects.get()
    name = f"admin:{model._meta.app_label}_{model._meta.model_name}"

    assert admin_client.get(reverse(f"{name}_add")).status_code == 403
    assert admin_client.get(reverse(f"{name}_delete", args=[obj.pk])).status_code == 403
    assert admin_client.post(reverse(f"{name}_change", args=[obj.pk]), {}).status_code == 403
    view = admin_client.get(reverse(f"{name}_change", args=[obj.pk]))
    assert view.status_code == 200
    assert b'name="_save"' not in view.content
    assert model.objects.filter(pk=obj.pk).exists()


def test_every_registered_admin_page_renders(admin_client, user, make_product, history):
    place(user, make_product())  # a live order too
    for model in admin.site._registry:
        opts = model._meta
        changelist = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
        response = admin_client.get(changelist)
        assert response.status_code == 200, changelist
        assert admin_client.get(changelist, {"q": "1"}).status_code == 200, changelist
        obj = model._default_manager.first()
        if obj is not None:
            change = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
            assert admin_client.get(change).status_code == 200, change
    assert admin_client.get(reverse("admin:index")).status_code == 200
