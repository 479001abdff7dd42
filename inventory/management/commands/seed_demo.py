"""Create the demo products (idempotent: existing skus are left as they are)."""

from decimal import Decimal

from django.core.management.base import BaseCommand

from inventory import selectors, services

DEMO_PRODUCTS = [
    ("KB-01", "Mechanical keyboard", Decimal("89.00"), 25),
    ("MS-01", "Wireless mouse", Decimal("29.50"), 40),
    ("MN-27", "27-inch monitor", Decimal("249.00"), 5),
    ("HS-01", "Headset", Decimal("59.90"), 10),
    ("CB-USB", "USB-C cable", Decimal("9.99"), 200),
    ("LT-01", "Limited edition lamp", Decimal("120.00"), 1),
]


class Command(BaseCommand):
    help = "Create the demo products if they do not exist (safe to run again)."

    def handle(self, *args, **options):
        existing = set(selectors.product_list().values_list("sku", flat=True))
        created = 0
        for sku, name, price, stock in DEMO_PRODUCTS:
            if sku not in existing:
                services.product_create(sku=sku, name=name, price=price, stock=stock)
                created += 1
        self.stdout.write(f"seed_demo: {created} products created, {len(DEMO_PRODUCTS) - created} already there")
