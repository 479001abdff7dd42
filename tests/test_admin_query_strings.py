"""No crafted URL makes the admin answer 500: every registered ModelAdmin, every changelist.

Unknown or malformed filter values, NUL bytes, wrong types, huge integers,
unknown lookups, junk ordering, paging and search are ignored (Django's
`?e=1` redirect, or the filter left out) or a 400. Walks `admin.site._registry`,
so an admin registered later is covered without touching this file; run on
SQLite and on PostgreSQL (DATABASE_URL), which refuses NUL in text and
checks value ranges where SQLite does not.
"""

import pytest
from django.contrib import admin
from django.db import models
from django.urls import reverse

pytestmark = pytest.mark.django_db

ALLOWED = {200, 302, 400}
HUGE = "99999999999999999999"

# Query strings for any changelist; {field} is each of the model's own fields in turn.
COMMON = [
    "q=%00",
    "q=abc%00def",
    "q=%27unterminated",
    "q=" + "x" * 5000,
    "o=%00",
    "o=junk",
    "o=99.-1.x.1",
    "o=-99999999999999999999",
    "p=%00",
    "p=abc",
    "p=-1",
    f"p={HUGE}",
    "e=1",
    "all=%00",
    "_to_field=password",
    "_popup=%00",
    "_changelist_filters=%00",
    "unknown_field__exact=1",
    "pk__nosuchlookup=1",
    "pk__exact=abc",
    "pk__exact=%00",
    f"pk__exact={HUGE}",
    f"pk__exact=-{HUGE}",
    f"pk__in=1,{HUGE}",
    f"pk__range=1,{HUGE}",
    f"pk__gte={HUGE}",
    "pk__in=%00",
    "pk__isnull=maybe",
    "pk__regex=(",
    "%00=1",
    "%00__exact=1",
]
PER_FIELD = [
    "{field}=%00",
    "{field}__exact=%00",
    "{field}__iexact=%00",
    "{field}__icontains=%00",
    "{field}__in=%00,1",
    "{field}__gte=notavalue",
    "{field}__gte=1e999999",
    "{field}__lt=-1e999999",
    f"{{field}}__exact={HUGE}",
    "{field}__year=99999",
    "{field}__date=notadate",
    "{field}__regex=(",
    "{field}__iregex=(a%2B)%2B%24",
    "{field}__isnull=%00",
    "{field}__has_key=%00",
    "{field}__contains=%00",
]


def registered() -> list[str]:
    return sorted(f"{model._meta.app_label}.{model._meta.model_name}" for model in admin.site._registry)


def admin_for(label: str) -> tuple[type[models.Model], admin.ModelAdmin]:
    for model, model_admin in admin.site._registry.items():
        if f"{model._meta.app_label}.{model._meta.model_name}" == label:
            return model, model_admin
    raise LookupError(label)


def crafted(model: type[models.Model]) -> list[str]:
    fields = [f.name for f in model._meta.get_fields() if f.concrete and not f.many_to_many]
    return COMMON + [template.format(field=field) for field in fields for template in PER_FIELD]


@pytest.fixture
def superuser_client(client, admin_superuser):
    client.force_login(admin_superuser)
    client.raise_request_exception = False  # a 500 must show as a 500, not as the test's exception
    return client


def test_the_walk_covers_every_service_and_django_admin():
    labels = registered()
    for expected in ("orders.order", "orders.cancelledorder", "inventory.product", "reports.productreport"):
        assert expected in labels
    assert "auth.user" in labels and "auth.group" in labels
    assert any(label.startswith("authtoken.") for label in labels)


@pytest.mark.parametrize("label", registered())
def test_no_crafted_query_string_is_a_500(superuser_client, label):
    model, _ = admin_for(label)
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")

    answers = {query: superuser_client.get(f"{url}?{query}").status_code for query in crafted(model)}

    wrong = {query: status for query, status in answers.items() if status not in ALLOWED}
    assert wrong == {}, f"{label}: {wrong}"


@pytest.mark.parametrize("label", registered())
def test_crafted_object_ids_are_not_a_500(superuser_client, label):
    model, _ = admin_for(label)
    info = model._meta.app_label, model._meta.model_name
    answers = {}
    for object_id in ["%00", "abc", HUGE, f"-{HUGE}", "1e3", "0", "%27"]:
        for view in ("change", "history", "delete"):
            url = reverse(f"admin:{info[0]}_{info[1]}_{view}", args=["__ID__"]).replace("__ID__", object_id)
            answers[f"{view} {object_id}"] = superuser_client.get(url).status_code

    wrong = {what: status for what, status in answers.items() if status not in ALLOWED | {403, 404}}
    assert wrong == {}, f"{label}: {wrong}"


def test_a_nul_in_a_filter_is_a_400_on_every_database(superuser_client):
    # issue 14: GET /admin/orders/order/?status__exact=%00 was a 500 on PostgreSQL
    response = superuser_client.get(reverse("admin:orders_order_changelist") + "?status__exact=%00")

    assert response.status_code == 400


def test_a_value_the_database_refuses_is_djangos_invalid_lookup_redirect(superuser_client):
    url = reverse("admin:inventory_product_changelist")

    response = superuser_client.get(f"{url}?price__gte=1e999999")

    # PostgreSQL refuses the number (DataError); SQLite compares it. Either way, no 500.
    assert response.status_code in (200, 302)
    if response.status_code == 302:
        assert response.url == f"{url}?e=1"
        assert superuser_client.get(response.url).status_code == 200


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("query", ["price__gte=1e999999", f"id__in=1,{HUGE}", "created_at__year=99999"])
def test_a_value_the_database_refuses_outside_a_transaction_too(superuser_client, query):
    # As in production: no request transaction around the changelist, so no savepoint either.
    url = reverse("admin:inventory_product_changelist")

    response = superuser_client.get(f"{url}?{query}")

    assert response.status_code in (200, 302)
    assert superuser_client.get(url).status_code == 200  # the connection is still usable


def test_a_regex_lookup_from_the_query_string_is_refused(superuser_client):
    url = reverse("admin:orders_order_changelist")

    assert superuser_client.get(f"{url}?status__regex=%5Epending%24").status_code == 400
    assert superuser_client.get(f"{url}?status__exact=pending").status_code == 200


@pytest.mark.parametrize("label", registered())
def test_crafted_selections_for_an_action_are_not_a_500(superuser_client, admin_superuser, rf, label):
    model, model_admin = admin_for(label)
    request = rf.get("/")
    request.user = admin_superuser
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
    answers = {}
    for action in list(model_admin.get_actions(request)) or ["delete_selected"]:
        for selected in ["abc", "\x00", "", HUGE, f"-{HUGE}", "1e3"]:
            response = superuser_client.post(url, {"action": action, "index": "0", "_selected_action": [selected]})
            answers[f"{action} {selected!r}"] = response.status_code

    wrong = {what: status for what, status in answers.items() if status not in ALLOWED}
    assert wrong == {}, f"{label}: {wrong}"
