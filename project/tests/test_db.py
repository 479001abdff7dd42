"""project.db.claim_row: one INSERT … ON CONFLICT DO NOTHING says whether the row is new."""

import pytest
from django.db import transaction

from inventory.models import OrderReservation
from project.db import claim_row, service_db

pytestmark = pytest.mark.django_db

DB = service_db("inventory")


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
