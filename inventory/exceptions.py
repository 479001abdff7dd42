"""Inventory's business errors."""

from project.errors import ApplicationError


class UnknownProduct(ApplicationError):
    code = "unknown_product"


class StockRefused(ApplicationError):
    """An order cannot be reserved; `shortfalls` says why, line by line."""

    code = "insufficient_stock"
    http_status = 409

    def __init__(self, shortfalls: list[str]) -> None:
        super().__init__("; ".join(shortfalls))
        self.shortfalls = shortfalls
