"""Order lines as a typed value, and the one check of a positive integer.

An order's lines are checked once, where they come in, into `OrderLines`
(docs/design.md §2): the API's serializer and `orders.services.order_create`
(the admin's form and the bench go through it) build one with
`OrderLines.parse`, and every saga step parses the lines of its JSON message
with `step_lines`. The rules live here only: at least one line and at most
ORDER_MAX_LINES, a product at most once, product ids within 64 bits (the id
columns' range), quantities from 1 to ORDER_MAX_QUANTITY.

A failed parse says what is wrong twice, from the same rule: `fields`, the
messages a person sees on the form or in the API's 400 body (field path →
messages), and `problem`, one line for a log or a saga step's failure reason.
"""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings

# Database ids are 64-bit (BigAutoField): a larger id can name nothing, and a
# larger integer overflows the SQLite driver in a lookup.
MAX_ID = 2**63 - 1
# The quantity columns are PositiveIntegerField: 32-bit on every database Django supports.
MAX_QUANTITY = 2**31 - 1
# Every price column is numeric(12, 2) (inventory's Product.price, orders' OrderLine.unit_price):
# a price is 0 to MAX_PRICE, to the cent. What a line can add to a sales total follows from
# these two (docs/design.md "Numeric ranges").
MAX_PRICE = Decimal("9999999999.99")


class NotPositiveInt(ValueError):
    pass


def positive_int(value: Any, name: str, *, minimum: int = 1, maximum: int = MAX_ID) -> int:
    """`value` if it is an int (not a bool) from `minimum` to `maximum`; else NotPositiveInt naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise NotPositiveInt(f"{name} must be a positive integer, got {value!r}")
    return value


class InvalidLines(ValueError):
    """Lines that make no order: `fields` for people, `problem` for logs and saga steps."""

    def __init__(self, message: str, *, fields: dict[str, Any], problem: str) -> None:
        super().__init__(problem)
        self.message = message
        self.fields = fields
        self.problem = problem


@dataclass(frozen=True, slots=True)
class OrderLine:
    product: int
    quantity: int


@dataclass(frozen=True, slots=True)
class OrderLines:
    """An order's lines, valid by construction: build them with `parse`. Kept in the order given."""

    lines: tuple[OrderLine, ...]

    def __iter__(self) -> Iterator[OrderLine]:
        return iter(self.lines)

    def __len__(self) -> int:
        return len(self.lines)

    def as_dict(self) -> dict[int, int]:
        """{product id: quantity}, in the order given (a line's index names it in errors)."""
        return {line.product: line.quantity for line in self.lines}

    def by_product(self) -> tuple[OrderLine, ...]:
        """The lines in product id order: the order rows are locked in."""
        return tuple(sorted(self.lines, key=lambda line: line.product))

    @classmethod
    def parse(cls, data: Any, *, limits: bool = True) -> "OrderLines":
        """JSON lines ``[{"product": id, "quantity": n}, …]`` → OrderLines, or InvalidLines saying why.

        Other keys of a line are left alone (a step's message carries more).
        `limits=False` (a saga step's message) checks the shape only, not
        ORDER_MAX_LINES and ORDER_MAX_QUANTITY: an order taken under the limits
        of its day must not be refused mid-saga because a setting was lowered since.
        """
        max_lines = settings.ORDER_MAX_LINES if limits else len(data) if isinstance(data, list) else 0
        max_quantity = settings.ORDER_MAX_QUANTITY if limits else MAX_QUANTITY
        if not isinstance(data, list) or not data:
            raise InvalidLines(
                "An order needs at least one line.",
                fields={"lines": ["At least one line is required."]},
                problem="lines must be a non-empty list",
            )
        if len(data) > max_lines:
            raise InvalidLines(
                "Too many lines.",
                fields={"lines": [f"At most {settings.ORDER_MAX_LINES} lines per order."]},
                problem=f"at most {settings.ORDER_MAX_LINES} lines, got {len(data)}",
            )
        wanted: dict[int, int] = {}
        errors: dict[str, dict[str, list[str]]] = {}
        problems: list[str] = []
        for index, line in enumerate(data):
            if not isinstance(line, Mapping):
                errors[str(index)] = {"non_field_errors": ["Each line must be an object."]}
                problems.append(f"each line must be an object, got {line!r}")
                continue
            line_errors: dict[str, list[str]] = {}
            product, quantity = line.get("product"), line.get("quantity")
            try:
                positive_int(product, "product")
            except NotPositiveInt:
                line_errors["product"] = ["A product id (positive integer) is required."]
                problems.append(f"product and quantity must be positive integers: {dict(line)!r}")
            else:
                if product in wanted:
                    line_errors["product"] = [f"Product {product} appears in more than one line."]
                    problems.append(f"product {product} appears twice")
            try:
                positive_int(quantity, "quantity", maximum=max_quantity)
            except NotPositiveInt:
                line_errors["quantity"] = [f"An integer from 1 to {max_quantity} is required."]
                problems.append(
                    f"product and quantity must be positive integers, quantity at most {max_quantity}: {dict(line)!r}"
                )
            if line_errors:
                errors[str(index)] = line_errors
            else:
                wanted[product] = quantity
        if errors:
            raise InvalidLines("Some lines are not valid.", fields={"lines": errors}, problem=problems[0])
        return cls(tuple(OrderLine(product, quantity) for product, quantity in wanted.items()))
