"""OrderCreateThrottle: N per period with a burst of N, one number of state per user."""

import types

import pytest
from django.core.cache import caches

from project.http.throttles import OrderCreateThrottle


@pytest.fixture
def clock(monkeypatch):
    now = types.SimpleNamespace(t=1_000_000.0)
    monkeypatch.setattr(OrderCreateThrottle, "timer", lambda self: now.t)
    caches["throttle"].clear()
    yield now
    caches["throttle"].clear()


def post_as(user_id: int):
    user = types.SimpleNamespace(pk=user_id, is_authenticated=True)
    return types.SimpleNamespace(user=user, method="POST", META={})


def attempt(user_id: int = 1) -> OrderCreateThrottle:
    throttle = OrderCreateThrottle()
    throttle.allowed = throttle.allow_request(post_as(user_id), None)
    return throttle


def test_a_burst_of_n_then_one_every_period_over_n(clock, settings):
    settings.ORDER_CREATE_THROTTLE = "3/min"

    assert [attempt().allowed for _ in range(3)] == [True, True, True]
    refused = attempt()
    assert not refused.allowed
    assert refused.wait() == 20  # the next one is due a third of a minute on

    clock.t += 19.5
    assert not attempt().allowed
    clock.t += 0.5
    assert attempt().allowed
    assert not attempt().allowed

    clock.t += 60  # a quiet minute gives the whole burst back
    assert [attempt().allowed for _ in range(4)] == [True, True, True, False]


def test_each_user_has_an_allowance_of_their_own(clock, settings):
    settings.ORDER_CREATE_THROTTLE = "1/min"

    assert [attempt(1).allowed, attempt(1).allowed, attempt(2).allowed] == [True, False, True]


def test_state_is_one_number_whatever_the_limit(clock, settings):
    settings.ORDER_CREATE_THROTTLE = "100000/min"
    for _ in range(500):
        assert attempt().allowed

    assert isinstance(caches["throttle"].get("throttle_order_create_1"), float)


def test_a_request_history_an_older_version_stored_starts_afresh(clock, settings):
    settings.ORDER_CREATE_THROTTLE = "2/min"
    caches["throttle"].set("throttle_order_create_1", [clock.t] * 5, 60)

    assert [attempt().allowed for _ in range(3)] == [True, True, False]
