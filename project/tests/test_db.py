"""project.db's statements built once: names from the model, values prepared by its fields."""

from decimal import Decimal

import pytest
from django.core.exceptions import FieldDoesNotExist
from django.db import connections
from django.utils import timezone

from inventory.models import Product
from project.db import Statement, insert_rows, service_db

pytestmark = pytest.mark.django_db

DB = service_db("inventory")

RENAME = Statement(
    Product,
    "UPDATE {table} SET {name} = %s, {price} = {price} + %s, {updated_at} = %s WHERE {id} = %s",
    params=["name", "price", "updated_at", "id"],
)


def test_a_statement_quotes_the_models_names_and_counts_the_rows_it_changed():
    (product,) = insert_rows(Product, [Product(sku="s-1", name="Old", price=Decimal("1.10"), stock=3)], using=DB)
    later = timezone.now()

    assert RENAME.sql(connections[DB]) == (
        f'UPDATE "{Product._meta.db_table}" SET "name" = %s, "price" = "price" + %s, "updated_at" = %s WHERE "id" = %s'
    )
    assert RENAME.execute("New; DROP TABLE x", Decimal("0.15"), later, product.pk, using=DB) == 1
    assert RENAME.execute("Nobody", Decimal("1"), later, product.pk + 1000, using=DB) == 0

    product.refresh_from_db(using=DB)
    assert (product.name, product.price, product.updated_at, product.stock) == (
        "New; DROP TABLE x",
        Decimal("1.25"),
        later,
        3,
    )


def test_a_statement_with_a_misspelt_name_fails_when_it_is_built():
    with pytest.raises(KeyError):
        Statement(Product, "UPDATE {table} SET {stok} = %s WHERE {id} = %s", params=["stock", "id"])
    with pytest.raises(FieldDoesNotExist):
        Statement(Product, "UPDATE {table} SET {stock} = %s WHERE {id} = %s", params=["stok", "id"])


def test_a_statement_takes_one_value_per_parameter():
    with pytest.raises(ValueError, match="zip"):
        RENAME.execute("New", Decimal("1"), timezone.now(), using=DB)


def test_insert_rows_fills_defaults_and_timestamps_and_reads_the_keys_back_in_order():
    rows = [Product(sku=f"i-{n}", name=f"N{n}", price=Decimal(f"{n}.05"), stock=n) for n in (3, 1, 2)]

    returned = insert_rows(Product, rows, using=DB)

    assert returned is rows
    assert all(not row._state.adding and row._state.db == DB for row in rows)
    for row in rows:
        stored = Product.objects.using(DB).get(pk=row.pk)
        assert (stored.sku, stored.name, stored.price, stored.stock, stored.active, stored.version) == (
            row.sku,
            row.name,
            row.price,
            row.stock,
            True,
            1,
        )
        assert stored.created_at == row.created_at == row.updated_at
