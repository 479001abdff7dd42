"""Orders' counts are taken only when what they count commits (project/metrics.py)."""

import pytest
from django.db import transaction
from prometheus_client import REGISTRY

from orders import services
from orders.models import Order
from project import metrics


def placed() -> float:
    return REGISTRY.get_sample_value("orderflow_orders_placed_total") or 0.0


@pytest.fixture
def counting(tmp_path, monkeypatch):
    """This process counts as one with an exporter does (the registry stays this process's own)."""
    monkeypatch.setenv(metrics.MULTIPROC_DIR_VARIABLE, str(tmp_path))


def test_a_placed_order_is_counted_once_it_commits_and_a_replay_is_not(
    user, make_product, counting, django_capture_on_commit_callbacks
):
    product = make_product(stock=5)
    before = placed()

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}], idempotency_key="k")
    assert placed() == before  # not before the commit
    for callback in callbacks:
        if callback.func is metrics.order_placed:
            callback()
    assert placed() == before + 1

    with django_capture_on_commit_callbacks(execute=True):
        replay = services.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}], idempotency_key="k")
    assert not replay.created
    assert placed() == before + 1


def test_an_order_rolled_back_is_not_counted(user, make_product, counting, django_capture_on_commit_callbacks):
    product = make_product(stock=5)
    before = placed()

    class Boom(Exception):
        pass

    with django_capture_on_commit_callbacks(execute=True), pytest.raises(Boom), transaction.atomic():
        services.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}])
        raise Boom

    assert Order.objects.count() == 0
    assert placed() == before


def test_without_an_exporter_nothing_is_registered_to_count(user, make_product, django_capture_on_commit_callbacks):
    product = make_product(stock=5)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.order_create(user=user, lines=[{"product": product.pk, "quantity": 1}])

    assert [callback.func for callback in callbacks] == [services._publish]
