"""project.lines: order lines parsed once into a typed value, and the one positive-integer check."""

import pytest

from project.lines import MAX_ID, InvalidLines, NotPositiveInt, OrderLine, OrderLines, positive_int
from project.saga import InvalidMessage, step_lines


@pytest.mark.parametrize("value", [1, 7, MAX_ID])
def test_positive_int_accepts_positive_integers(value):
    assert positive_int(value, "n") == value


@pytest.mark.parametrize("value", [0, -1, MAX_ID + 1, True, False, None, "3", 3.0, [3]])
def test_positive_int_refuses_everything_else_naming_the_value(value):
    with pytest.raises(NotPositiveInt, match=r"^order_id must be a positive integer, got "):
        positive_int(value, "order_id")


def test_positive_int_bounds():
    assert positive_int(0, "version", minimum=0) == 0
    assert positive_int(5, "quantity", maximum=5) == 5
    with pytest.raises(NotPositiveInt):
        positive_int(6, "quantity", maximum=5)


def test_lines_parse_into_a_typed_value_in_the_order_given():
    lines = OrderLines.parse([{"product": 9, "quantity": 2, "unit_price": "1.00"}, {"product": 3, "quantity": 1}])

    assert lines.lines == (OrderLine(9, 2), OrderLine(3, 1))
    assert lines.as_dict() == {9: 2, 3: 1}
    assert lines.by_product() == (OrderLine(3, 1), OrderLine(9, 2))
    assert len(lines) == 2
    with pytest.raises(AttributeError):
        lines.lines[0].quantity = 5  # frozen


@pytest.mark.parametrize(
    ("data", "fields"),
    [
        (None, {"lines": ["At least one line is required."]}),
        ([], {"lines": ["At least one line is required."]}),
        ([{"product": 1, "quantity": 1}] * 51, {"lines": ["At most 50 lines per order."]}),
        (["x"], {"lines": {"0": {"non_field_errors": ["Each line must be an object."]}}}),
        (
            [{"product": True, "quantity": 1}],
            {"lines": {"0": {"product": ["A product id (positive integer) is required."]}}},
        ),
        (
            [{"product": 2**63, "quantity": 1}],
            {"lines": {"0": {"product": ["A product id (positive integer) is required."]}}},
        ),
        (
            [{"product": 1, "quantity": 1001}],
            {"lines": {"0": {"quantity": ["An integer from 1 to 1000 is required."]}}},
        ),
        (
            [{"product": 1, "quantity": 1}, {"product": 1, "quantity": 2}],
            {"lines": {"1": {"product": ["Product 1 appears in more than one line."]}}},
        ),
    ],
)
def test_lines_that_make_no_order_say_why_by_field(settings, data, fields):
    settings.ORDER_MAX_LINES, settings.ORDER_MAX_QUANTITY = 50, 1000

    with pytest.raises(InvalidLines) as refused:
        OrderLines.parse(data)

    assert refused.value.fields == fields


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("lines", "lines must be a non-empty list"),
        ([7], "each line must be an object, got 7"),
        ([{"product": 1, "quantity": "lots"}], "product and quantity must be positive integers"),
        ([{"product": 1, "quantity": 1}, {"product": 1, "quantity": 1}], "product 1 appears twice"),
    ],
)
def test_a_steps_lines_are_refused_as_an_invalid_message(data, problem):
    with pytest.raises(InvalidMessage, match=problem):
        step_lines(data)


def test_a_steps_message_is_not_held_to_limits_lowered_since_the_order_was_taken(settings):
    """Only the edge enforces ORDER_MAX_LINES/ORDER_MAX_QUANTITY: a saga in flight is not refused for them."""

    lines = [{"product": 1, "quantity": 5}, {"product": 2, "quantity": 1}]
    settings.ORDER_MAX_LINES = 1
    settings.ORDER_MAX_QUANTITY = 2

    assert step_lines(lines).as_dict() == {1: 5, 2: 1}
    with pytest.raises(InvalidLines):
        OrderLines.parse(lines)
    with pytest.raises(InvalidMessage):  # the shape is still checked
        step_lines([{"product": 1, "quantity": 0}])
