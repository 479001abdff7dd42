"""Inventory's business errors, and a stock refusal as data."""

from typing import Any

from project.http.errors import ApplicationError

#: Why a line of an order cannot be had (the `code` of a refusal item).
INSUFFICIENT_STOCK = "insufficient_stock"
UNKNOWN_PRODUCT = "unknown_product"
INACTIVE_PRODUCT = "inactive_product"


def refusal_item(
    product: int, code: str, *, wanted: int | None = None, available: int | None = None, sku: str | None = None
) -> dict[str, Any]:
    """One line of a refusal, as JSON: ``{"product", "code", "wanted", "available"}`` (and `sku` when inactive)."""
    item: dict[str, Any] = {"product": product, "code": code}
    if wanted is not None:
        item["wanted"] = wanted
    if available is not None:
        item["available"] = available
    if sku is not None:
        item["sku"] = sku
    return item


def refusal_sentence(item: dict[str, Any]) -> str:
    """One refusal item as people read it ("insufficient stock for product 7: wanted 3, have 1")."""
    product, code = item.get("product"), item.get("code")
    if code == UNKNOWN_PRODUCT:
        return f"unknown product {product}"
    if code == INACTIVE_PRODUCT:
        return f"product {product} ({item.get('sku', '?')}) is not on sale"
    sentence = f"insufficient stock for product {product}: wanted {item.get('wanted')}"
    if "available" in item:
        sentence += f", have {item['available']}"
    return sentence


def refusal_text(refusal: list[dict[str, Any]]) -> str:
    """A whole refusal as one line of text, for people (`reason`)."""
    return "; ".join(refusal_sentence(item) for item in refusal)


class UnknownProduct(ApplicationError):
    code = "unknown_product"


class StockRefused(ApplicationError):
    """An order (or a stock change) cannot be had; `refusal` says why, one item per line.

    The message is the refusal rendered for people; `text` overrides it where
    the refusal is older than its items (a record kept as text only) or the
    change is not an order's (stock_adjust).
    """

    code = "insufficient_stock"
    http_status = 409

    def __init__(self, refusal: list[dict[str, Any]], *, text: str | None = None) -> None:
        super().__init__(text or refusal_text(refusal))
        self.refusal = refusal

    @property
    def shortfalls(self) -> list[str]:
        """The refusal line by line, as text."""
        return [refusal_sentence(item) for item in self.refusal] or [self.message]


class StockLimitExceeded(ApplicationError):
    """A stock change within its own range whose result would not be: more than STOCK_MAX units in all.

    A state conflict (409): the same delta fits another product, or this one
    once stock is sold. `fields` names `stock_delta`, the input that asked for it.
    """

    code = "stock_limit_exceeded"
    http_status = 409

    def __init__(self, *, product_id: int, delta: int, stock: int, held: int, limit: int) -> None:
        room = max(0, limit - stock - held)
        message = (
            f"Adding {delta} units would give product {product_id} more than {limit} units "
            f"({stock} in stock, {held} held by orders): at most {room} more can be added."
        )
        super().__init__(message, fields={"stock_delta": [message]})
