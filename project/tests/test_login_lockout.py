"""Failed password logins lock a username and an address out (django-axes): the admin's login and the API's
token endpoint alike, until the cool-off passes or an administrator unlocks them (manage.py axes_reset*)."""

import time
from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.core.management import call_command
from django.test import RequestFactory
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from project.http.throttles import client_address

pytestmark = pytest.mark.django_db

LOGIN = "/admin/login/"
TOKEN = "/api/auth/token/"
PASSWORD = "staff-password-1"  # conftest's staff_user
LIMIT = 5  # AXES_FAILURE_LIMIT's default


@pytest.fixture(autouse=True)
def quick_logins(settings):
    """TOKEN_OBTAIN_THROTTLE (10/min per address) answers 429 too: out of the way, these tests are about axes.
    A fast password hash (autouse: before the users are made), or each login costs PBKDF2's second."""
    settings.TOKEN_OBTAIN_THROTTLE = None
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # The defaults, whatever the environment running the tests says.
    settings.AXES_FAILURE_LIMIT = LIMIT
    settings.AXES_COOLOFF_TIME = timedelta(minutes=15)


def admin_login(client, username: str, password: str, address: str = "192.0.2.1"):
    return client.post(LOGIN, {"username": username, "password": password, "next": "/admin/"}, REMOTE_ADDR=address)


def token_login(username: str, password: str, address: str = "192.0.2.1"):
    return APIClient().post(TOKEN, {"username": username, "password": password}, format="json", REMOTE_ADDR=address)


def logged_in(response) -> bool:
    return response.status_code == 302 and response["Location"] == "/admin/"


def assert_locked_page(response) -> None:
    assert response.status_code == 429, response.content
    assert response["Content-Type"].startswith("text/html")
    assert b"Login locked" in response.content
    assert f"There were {LIMIT} failed logins".encode() in response.content


def assert_locked_json(response) -> None:
    assert response.status_code == 429, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"code", "detail"} and body["code"] == "locked_out", body
    assert int(response["Retry-After"]) == 15 * 60  # the cool-off


def test_the_admin_login_locks_a_user_out_after_the_failure_limit(client, staff_user):
    answers = [admin_login(client, "staff", f"guess-{n}").status_code for n in range(LIMIT - 1)]
    last = admin_login(client, "staff", "guess-last")
    right = admin_login(client, "staff", PASSWORD)

    assert answers == [200] * (LIMIT - 1)  # the form again, "Please enter the correct username and password"
    assert_locked_page(last)
    assert_locked_page(right)  # the right password too, until the cool-off or an unlock
    assert "_auth_user_id" not in client.session


def test_a_username_is_locked_whichever_addresses_the_guesses_come_from(client, staff_user):
    for n in range(LIMIT):
        admin_login(client, "staff", f"guess-{n}", address=f"198.51.100.{n + 1}")

    assert_locked_page(admin_login(client, "staff", PASSWORD, address="203.0.113.9"))


def test_an_address_is_locked_whichever_usernames_it_tries(client, staff_user, django_user_model):
    for n in range(LIMIT):
        admin_login(client, f"someone-{n}", "guess", address="198.51.100.1")

    assert_locked_page(admin_login(client, "staff", PASSWORD, address="198.51.100.1"))
    # The same user from another address: neither the username nor that address has failed.
    assert logged_in(admin_login(client, "staff", PASSWORD, address="198.51.100.2"))


def test_a_right_password_below_the_limit_does_not_wipe_the_failures(client, staff_user):
    for n in range(LIMIT - 1):
        admin_login(client, "staff", f"guess-{n}")
    assert logged_in(admin_login(client, "staff", PASSWORD))
    client.logout()

    # AXES_RESET_ON_SUCCESS=False: knowing one password does not buy more guesses.
    assert_locked_page(admin_login(client, "staff", "guess-again"))


def test_the_token_endpoint_counts_and_answers_429_locked_out(staff_user):
    answers = [token_login("staff", f"guess-{n}").status_code for n in range(LIMIT - 1)]
    last = token_login("staff", "guess-last")
    right = token_login("staff", PASSWORD)

    assert answers == [400] * (LIMIT - 1)
    assert_locked_json(last)
    assert_locked_json(right)
    assert not Token.objects.exists()


def test_failures_at_the_api_lock_the_admin_login_too(client, staff_user):
    for n in range(LIMIT):
        token_login("staff", f"guess-{n}", address=f"198.51.100.{n + 1}")

    assert_locked_page(admin_login(client, "staff", PASSWORD))


def test_the_lock_lifts_after_the_cool_off(client, staff_user, settings):
    settings.AXES_COOLOFF_TIME = timedelta(seconds=2)
    for n in range(LIMIT):
        admin_login(client, "staff", f"guess-{n}")
    assert admin_login(client, "staff", PASSWORD).status_code == 429

    time.sleep(2.1)

    assert logged_in(admin_login(client, "staff", PASSWORD))


def test_a_login_during_the_lock_starts_the_cool_off_again(client, staff_user, settings):
    settings.AXES_COOLOFF_TIME = timedelta(seconds=2)
    for n in range(LIMIT):
        admin_login(client, "staff", f"guess-{n}")

    time.sleep(1.2)
    assert admin_login(client, "staff", PASSWORD).status_code == 429  # refused, and counted as a failure
    time.sleep(1.2)  # 2.4 s after the lock began, 1.2 s after that login
    assert admin_login(client, "staff", PASSWORD).status_code == 429
    time.sleep(2.1)
    assert logged_in(admin_login(client, "staff", PASSWORD))


@pytest.mark.parametrize(
    "command",
    [("axes_reset_username", "staff"), ("axes_reset_ip", "192.0.2.1"), ("axes_reset",)],
)
def test_an_administrator_unlocks_with_a_management_command(client, staff_user, command):
    for n in range(LIMIT):
        admin_login(client, "staff", f"guess-{n}")
    assert admin_login(client, "staff", PASSWORD).status_code == 429

    call_command(*command)

    assert not AccessAttempt.objects.exists()
    assert logged_in(admin_login(client, "staff", PASSWORD))


def test_the_admin_lists_the_attempts_an_administrator_can_delete(admin_client, staff_user):
    for n in range(LIMIT):
        admin_login(APIClient(), "staff", f"guess-{n}")
    attempt = AccessAttempt.objects.get()

    listing = admin_client.get("/admin/axes/accessattempt/")
    deleted = admin_client.post(f"/admin/axes/accessattempt/{attempt.pk}/delete/", {"post": "yes"})

    assert listing.status_code == 200 and b"staff" in listing.content
    assert deleted.status_code == 302
    assert not AccessAttempt.objects.exists()


def request_from(remote: str, forwarded: str):
    return RequestFactory().post(LOGIN, REMOTE_ADDR=remote, HTTP_X_FORWARDED_FOR=forwarded)


def test_the_lockout_keys_on_the_address_the_throttles_use(settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 0}
    assert client_address(request_from("10.0.0.2", "203.0.113.5")) == "10.0.0.2"  # a client's own header is ignored

    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    assert client_address(request_from("10.0.0.2", "198.51.100.66, 203.0.113.5")) == "203.0.113.5"  # what the proxy saw
