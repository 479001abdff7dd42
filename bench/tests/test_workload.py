"""The bench's workload: which orders the stock refuses, and stock sized for the rest.

The runs themselves (real workers) are in bench/tests/test_bench.py.
"""

import itertools
from collections import Counter

import pytest

from bench.run import BenchOptions
from bench.workload import refused_orders, workload
from inventory.models import Product


def test_spread_refusals_come_evenly_through_the_run():
    refused = sorted(refused_orders(1000, 0.1))

    assert len(refused) == 100
    assert refused[0] == 5
    assert {b - a for a, b in itertools.pairwise(refused)} == {10}


@pytest.mark.parametrize(("n", "ratio", "count"), [(20, 0.1, 2), (7, 0.5, 3), (10, 0.0, 0), (3, 0.9, 3), (1, 0.2, 0)])
def test_as_many_refusals_as_the_stock_allows_for(n, ratio, count):
    refused = refused_orders(n, ratio)

    assert len(refused) == count == n - round(n * (1 - ratio))
    assert all(0 <= i < n for i in refused)


@pytest.mark.django_db
def test_spread_workload_refuses_exactly_the_chosen_orders_with_a_sold_out_product():
    n = 50
    lines_for, stock = workload(BenchOptions(orders=n, products=4, fail_ratio=0.1), "t1", n)

    refused = refused_orders(n, 0.1)
    assert stock == n - len(refused) == 45
    ordered = Counter(lines_for(i)[0]["product"] for i in range(n))
    products = {p.pk: p for p in Product.objects.filter(pk__in=ordered)}
    (sold_out,) = {lines_for(i)[0]["product"] for i in refused}
    assert products[sold_out].stock == 0
    assert ordered[sold_out] == len(refused)
    # every other product has stock for exactly the orders that ask for it
    assert all(products[pk].stock == count for pk, count in ordered.items() if pk != sold_out)
    assert len(ordered) == 5


@pytest.mark.django_db
def test_last_workload_lets_each_products_stock_run_out_at_the_end():
    n = 40
    lines_for, stock = workload(BenchOptions(orders=n, products=4, fail_ratio=0.1, refusals="last"), "t2", n)

    assert stock == 36
    ordered = Counter(lines_for(i)[0]["product"] for i in range(n))
    assert sorted(ordered.values()) == [10, 10, 10, 10]
    assert sorted(Product.objects.filter(pk__in=ordered).values_list("stock", flat=True)) == [9, 9, 9, 9]
