"""What the bench orders: its own products, with stock sized so that a chosen share of the orders is refused."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING

from inventory import services as inventory_services

if TYPE_CHECKING:
    from bench.run import BenchOptions

SKU_PREFIX = "BENCH-"  # + run id: every product of a run, which the cleanup finds by it


def sku(run_id: str, name: int | str) -> str:
    return f"{SKU_PREFIX}{run_id}-{name}"


def refused_orders(n: int, fail_ratio: float) -> set[int]:
    """The orders, of 0..n-1, that ``--refusals spread`` places for a sold-out product.

    round(n × fail_ratio) of them, evenly through the run: order ⌊(j + ½)·n/k⌋
    for each j of the k.
    """
    k = n - round(n * (1 - fail_ratio))
    return {int((j + 0.5) * n / k) for j in range(k)}


def product_create(run_id: str, name: int | str, stock: int, price: str = "9.99") -> int:
    """A product of this run, made through inventory's service as an operator would make one."""
    return inventory_services.product_create(
        sku=sku(run_id, name), name=f"Bench product {name} ({run_id})", price=Decimal(price), stock=stock
    ).pk


def workload(options: BenchOptions, run_id: str, n: int) -> tuple[Callable[[int], list[dict]], int]:
    """Products for `n` orders of one unit each, and order i's lines; returns those and the stock made.

    Stock is sized so that round(n × fail_ratio) orders are refused: with
    ``--refusals spread`` the refused ones order a product made with no stock
    (a sold-out item) and every other order's product has stock for exactly
    its orders; with ``last`` all orders go round robin and each product has
    stock for all but about fail_ratio of its orders, so the last of each
    product's orders are refused and every refusal and its compensation comes
    in the last tenth of the run (the first three sessions' workload).
    """
    refused = refused_orders(n, options.fail_ratio) if options.refusals == "spread" else set()
    served = [i for i in range(n) if i not in refused]
    count = max(1, min(options.products, len(served)))
    demand = [0] * count
    for position in range(len(served)):
        demand[position % count] += 1
    if options.refusals == "spread":
        stocks = demand
    else:
        allowed = round(n * (1 - options.fail_ratio))
        stocks = [wanted * allowed // n for wanted in demand]
        for k in range(count):  # what the rounding down left, one unit each
            if sum(stocks) < allowed and stocks[k] < demand[k]:
                stocks[k] += 1

    ids = [product_create(run_id, k, stock) for k, stock in enumerate(stocks)]
    product_of = {i: ids[position % count] for position, i in enumerate(served)}
    if refused:
        sold_out = product_create(run_id, "sold-out", 0)
        product_of.update(dict.fromkeys(refused, sold_out))

    def lines_for(i: int) -> list[dict]:
        return [{"product": product_of[i], "quantity": 1}]

    return lines_for, sum(stocks)
