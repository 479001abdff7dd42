"""project.db: statements built once (names from the model, values prepared by its fields), and claim_row."""

from decimal import Decimal

import pytest
from django.core.exceptions import FieldDoesNotExist
from django.db import connections, transaction
from django.utils import timezone

from inventory.models import OrderReservation, Product
from project.db import Statement, claim_row, service_db

pytestmark = pytest.mark.django_db

DB = service_db("inventory")

RENAME = Statement(
    Product,
    "UPDATE {table} SET {name} = %s, {price} = {price} + %s, {updated_at} = %s WHERE {id} = %s",
    params=["name", "price", "updated_at", "id"],
)


def test_a_statement_quotes_the_models_names_and_counts_the_rows_it_changed():
    product = Product.objects.using(DB).create(sku="s-1", name="Old", price=Decimal("1.10"), stock=3)
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


STOCK_TAKEN = Statement(
    Product,
    "UPDATE {table} SET {stock} = {stock} - %s WHERE {id} = %s AND {stock} >= %s RETURNING {stock}, {created_at}",
    params=["stock", "id", "stock"],
    returns=["stock", "created_at"],
)


def test_a_statement_returning_fields_gives_the_changed_row_converted_as_the_orm_reads_it():
    product = Product.objects.using(DB).create(sku="s-2", name="Held", price=Decimal("1.00"), stock=5)

    assert STOCK_TAKEN.fetch(2, product.pk, 2, using=DB) == (3, product.created_at)
    stock, created_at = STOCK_TAKEN.fetch(3, product.pk, 3, using=DB)
    assert stock == 0 and created_at.tzinfo is not None  # aware on SQLite too, where the cursor gives text
    assert STOCK_TAKEN.fetch(1, product.pk, 1, using=DB) is None  # the condition held no row: nothing changed
    product.refresh_from_db(using=DB)
    assert product.stock == 0


def test_a_statement_with_a_misspelt_name_fails_when_it_is_built():
    with pytest.raises(KeyError):
        Statement(Product, "UPDATE {table} SET {stok} = %s WHERE {id} = %s", params=["stock", "id"])
    with pytest.raises(FieldDoesNotExist):
        Statement(Product, "UPDATE {table} SET {stock} = %s WHERE {id} = %s", params=["stok", "id"])


def test_a_statement_takes_one_value_per_parameter():
    with pytest.raises(ValueError, match="zip"):
        RENAME.execute("New", Decimal("1"), timezone.now(), using=DB)


def test_claim_row_inserts_a_new_row_in_one_statement_and_finds_an_existing_one(django_assert_num_queries):
    with transaction.atomic(using=DB):
        with django_assert_num_queries(1, using=DB):
            row, created = claim_row(OrderReservation, using=DB, order_id=7, status="reserved", reason="")
        assert created
        assert not row._state.adding and row._state.db == DB
        assert row.created_at is not None and row.created_at == row.updated_at

        again, created_again = claim_row(OrderReservation, using=DB, order_id=7, status="refused", reason="x")

    assert not created_again
    assert (again.pk, again.status, again.reason) == (7, "reserved", "")
    assert OrderReservation.objects.using(DB).get(pk=7).status == "reserved"
