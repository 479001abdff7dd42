"""Production settings come from the environment: `check --deploy` is clean with them, and the defaults stay local.

Each check runs `manage.py` in a subprocess with its own environment, since
settings are read once per process.
"""

import os
import re
import secrets
import subprocess
import sys
import threading

import pytest
from django.conf import settings

from project import settings as project_settings

SECURITY_VARIABLES = (
    "DEBUG",
    "SECRET_KEY",
    "ALLOWED_HOSTS",
    "SECURE_SSL_REDIRECT",
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_PROXY_SSL_HEADER",
)
PRODUCTION = {
    "DEBUG": "false",
    "ALLOWED_HOSTS": "example.com",
    "SECURE_SSL_REDIRECT": "true",
    "SESSION_COOKIE_SECURE": "true",
    "CSRF_COOKIE_SECURE": "true",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "SECURE_HSTS_PRELOAD": "true",
    "SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
}


def manage(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if key not in SECURITY_VARIABLES}
    # Its own var/ folder: a run without SECRET_KEY writes the generated one there.
    clean.update(DJANGO_SETTINGS_MODULE="project.settings", ORDERFLOW_VAR_DIR=str(tmp_path), **env)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=settings.BASE_DIR,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    secret = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789!@#%^&*(-_=+)") for _ in range(50))

    result = manage(tmp_path, "check", "--deploy", "--fail-level", "WARNING", SECRET_KEY=secret, **PRODUCTION)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_the_defaults_are_safe_for_local_http(tmp_path):
    result = manage(tmp_path, "check", "--deploy")

    warnings = set(re.findall(r"\(security\.(W\d+)\)", result.stdout + result.stderr))
    # HTTPS is opt-in (a local http server must keep working) ...
    assert {"W004", "W008", "W012", "W016"} <= warnings
    # ... but DEBUG is off, the generated secret is strong, and hosts are named.
    assert not warnings & {"W009", "W018", "W020"}
    assert len((tmp_path / "secret_key").read_text().strip()) >= 50


@pytest.mark.parametrize(
    ("value", "rate"),
    [("120/min", "120/min"), (" 5/Second ", "5/second"), ("1/day", "1/day"), ("off", None), ("", None)],
)
def test_order_create_throttle_is_read_from_the_environment(monkeypatch, value, rate):
    monkeypatch.setenv("ORDER_CREATE_THROTTLE", value)

    assert project_settings._throttle_rate("ORDER_CREATE_THROTTLE", "120/min") == rate


@pytest.mark.parametrize("value", ["120", "120/fortnight", "0/min", "-1/min", "10/5min", "many/min"])
def test_a_bad_order_create_throttle_stops_the_start(monkeypatch, value):
    monkeypatch.setenv("ORDER_CREATE_THROTTLE", value)

    with pytest.raises(ValueError, match="ORDER_CREATE_THROTTLE"):
        project_settings._throttle_rate("ORDER_CREATE_THROTTLE", "120/min")


def test_a_bad_proxy_header_stops_the_start(tmp_path):
    result = manage(tmp_path, "check", SECURE_PROXY_SSL_HEADER="HTTP_X_FORWARDED_PROTO")

    assert result.returncode != 0
    assert "SECURE_PROXY_SSL_HEADER" in result.stderr


@pytest.mark.django_db
def test_healthz_answers_over_plain_http_even_with_the_ssl_redirect(client, settings):
    settings.SECURE_SSL_REDIRECT = True

    assert client.get("/api/schema/").status_code == 301
    assert client.get("/healthz").status_code != 301


def test_processes_starting_together_on_a_fresh_var_share_one_generated_secret_key(tmp_path, monkeypatch):
    """Two gunicorn workers started on a fresh var/ once read an empty, half-written key (a 500 per request).

    Threads stand in for the processes (the file system is what they share);
    a barrier starts each round's 16 readers at once, on a fresh folder.
    """
    for round_ in range(20):
        var = tmp_path / str(round_)
        var.mkdir()
        monkeypatch.setattr(project_settings, "VAR_DIR", var)
        start = threading.Barrier(16)
        keys: list[str] = []

        def read(start: threading.Barrier = start, keys: list[str] = keys) -> None:
            start.wait()
            keys.append(project_settings._local_secret_key())

        threads = [threading.Thread(target=read) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(keys) == 16 and len(set(keys)) == 1 and len(keys[0]) > 40, (round_, set(keys))
        assert [p.name for p in var.iterdir()] == ["secret_key"]
