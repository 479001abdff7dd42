"""The sales read model over REST: every customer's sales, for users holding reports.view_productreport."""

from decimal import Decimal

import pytest
from rest_framework.test import APIClient

from reports import services

pytestmark = pytest.mark.django_db

REPORTS = "/api/reports/products/"


def test_report_rows_have_the_documented_shape(reports_api):
    services.product_sync(product_id=301, name="Widget", version=1)
    services.product_sync(product_id=302, name="Gadget", version=1)
    services.sale_record(
        order_id=1,
        lines=[
            {"product": 301, "quantity": 2, "unit_price": "2.50", "product_name": "Widget"},
            {"product": 302, "quantity": 1, "unit_price": "4.00", "product_name": "Gadget"},
        ],
    )
    services.sale_record(
        order_id=2, lines=[{"product": 301, "quantity": 1, "unit_price": "2.50", "product_name": "Widget"}]
    )

    response = reports_api.get(REPORTS)

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    rows = body["results"]
    assert {"product", "product_name", "units_sold", "orders_count", "revenue"} <= set(rows[0])
    summary = [
        (r["product"], r["product_name"], r["units_sold"], r["orders_count"], Decimal(r["revenue"])) for r in rows
    ]
    assert summary == [
        (301, "Widget", 3, 2, Decimal("7.50")),
        (302, "Gadget", 1, 1, Decimal("4.00")),
    ]


def test_a_reverted_sale_leaves_the_totals(reports_api):
    services.product_sync(product_id=303, name="Thing", version=1)
    services.sale_record(
        order_id=3, lines=[{"product": 303, "quantity": 2, "unit_price": "1.00", "product_name": "Thing"}]
    )
    services.sale_revert(order_id=3)

    (row,) = reports_api.get(REPORTS).json()["results"]

    assert (row["units_sold"], row["orders_count"], Decimal(row["revenue"])) == (0, 0, Decimal("0"))


def test_reports_need_a_signed_in_user():
    response = APIClient().get(REPORTS)

    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"


@pytest.mark.parametrize("who", ["user", "staff", "view_product"])
def test_reports_need_view_productreport(who, api, staff_api, api_with):
    client = {"user": api, "staff": staff_api, "view_product": api_with("inventory.view_product")}[who]

    response = client.get(REPORTS)

    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"
    assert "reports.view_productreport" in response.json()["detail"]


def test_change_productreport_may_read_them_too(api_with):
    # As in the admin: "change" includes "view".
    assert api_with("reports.change_productreport").get(REPORTS).status_code == 200


def test_reports_are_read_only(admin_superuser):
    # A superuser holds every permission: what is left is the endpoint's own refusal.
    superuser = APIClient()
    superuser.force_authenticate(admin_superuser)

    response = superuser.post(REPORTS, {"product": 1}, format="json")

    assert response.status_code == 405
    assert set(response.json()) <= {"code", "detail", "fields"}


@pytest.mark.parametrize(("query", "status"), [({"page": "1 OR 1=1"}, 404), ({"page": "99"}, 404)])
def test_bad_pages_are_404_in_the_error_shape(reports_api, query, status):
    response = reports_api.get(REPORTS, query)

    assert response.status_code == status
    assert set(response.json()) == {"code", "detail"}


def test_page_size_is_bounded(reports_api, settings):
    settings.API_MAX_PAGE_SIZE = 2
    for product_id in (401, 402, 403):
        services.product_sync(product_id=product_id, name=f"P{product_id}", version=1)

    assert [r["product"] for r in reports_api.get(REPORTS, {"page_size": 1}).json()["results"]] == [401]
    body = reports_api.get(REPORTS, {"page_size": 100}).json()
    assert (body["count"], len(body["results"])) == (3, 2)
