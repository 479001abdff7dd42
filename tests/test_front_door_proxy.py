"""Slow clients against the front door, and Flower's read-only front (issue 15, items 2 and 4).

Black-box, on the production process list's web part: the Procfile's `web`
(gunicorn as configured) behind its `proxy` (nginx, deploy/nginx/ rendered by
scripts/nginx.sh), each on a free port, started as `make run` and
docker-compose.yml start them. Slow clients connect to nginx's port; the only
connections made straight to gunicorn are the control's, which shows the same
attack does stall gunicorn alone. Flower is the Procfile's `flower` line
(scripts/flower.sh: basic auth, Flower's read-only mode) behind the same nginx.

nginx is a Debian package (`make install-nginx`). Without it these tests are
skipped, except in CI (CI=true), where they fail: CI installs it.
"""

import base64
import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testing import BASE_DIR, terminate, wait_for
from testing.instances import free_port

BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
# deploy/nginx/nginx.conf.template: client_header_timeout and client_body_timeout.
CLIENT_TIMEOUT = 10.0
# The attack: 16 connections trickling headers, 16 stopping halfway through a body.
SLOW_CLIENTS = 16
# "answers" means within this, not fast: a bound on hanging, not a speed test.
ANSWER_WITHIN = 1.0
FLOWER_LOGIN = "ops:ops-password-1"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", autouse=True)
def nginx_installed() -> None:
    if NGINX:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("nginx is not installed, and CI must run these tests (make install-nginx)")
    pytest.skip("nginx is not installed (make install-nginx installs Debian's, as root)")


def procfile() -> dict[str, str]:
    """The Procfile's processes: name to command line."""
    lines = {}
    for line in (BASE_DIR / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, command = line.split(":", 1)
            lines[name.strip()] = command.strip()
    return lines


class Processes:
    """Procfile lines started as `make run`'s supervisord starts them (`sh -c 'exec LINE'`), logs in a folder."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, **env: str) -> None:
        """Start the Procfile line `name` (KeyError if there is none) with `env` over the folder's environment."""
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.running[name] = subprocess.Popen(
            ["sh", "-c", f"exec {procfile()[name]}"],
            cwd=BASE_DIR, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()

    def log(self, name: str) -> str:
        """The last 3,000 characters of the process's output."""
        return (self.directory / f"{name}.log").read_text(errors="replace")[-3000:]

    def check_alive(self) -> None:
        """AssertionError, with its output, if a started process has exited."""
        for name, process in self.running.items():
            assert process.poll() is None, f"{name} exited with {process.returncode}:\n{self.log(name)}"

    def stop(self) -> None:
        """SIGTERM to each process's group, SIGKILL after 10 s (testing.terminate)."""
        for process in self.running.values():
            terminate(process, timeout=10)


def get(port: int, path: str, *, timeout: float = ANSWER_WITHIN, method: str = "GET", body=None, headers=None):
    """(status, headers, body bytes, seconds); status None when no answer came within `timeout`."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read(), time.monotonic() - started
    except (TimeoutError, OSError):
        return None, {}, b"", time.monotonic() - started
    finally:
        connection.close()


def process_env(directory: Path, **extra: str) -> dict[str, str]:
    """The environment the Procfile's processes get here, as `make run` with the proxy on gives it, plus `extra`.

    The embedded default in `directory`'s own var/: nothing here is about a database or a
    broker, and the suite's own (CI's PostgreSQL and RabbitMQ) stay untouched; a task Flower
    sends goes nowhere.
    """
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "ORDERFLOW_VAR_DIR": str(directory / "var"),
        "DATABASE_URL": "",
        "DATABASE_URL_INVENTORY": "",
        "DATABASE_URL_REPORTS": "",
        "CELERY_BROKER_URL": "",
        "SECRET_KEY": "",
        "DEBUG": "false",
        "DJANGO_SETTINGS_MODULE": "project.settings",
        "PYTHONUNBUFFERED": "1",
        # As make run exports it with the proxy on: the address is nginx's X-Forwarded-For entry,
        # and gunicorn takes the request sizes nginx lets through (gunicorn.conf.py).
        "NUM_PROXIES": "1",
        **extra,
    }
    env.pop("ORDERFLOW_BENCH", None)
    return env


@pytest.fixture(scope="module")
def front_door(tmp_path_factory) -> Iterator[dict]:
    """The Procfile's web and proxy, as `make run` wires them: {"front": nginx's port, "gunicorn": gunicorn's}."""
    directory = tmp_path_factory.mktemp("front-door")
    front, backend = free_port(), free_port()
    env = process_env(directory)
    processes = Processes(directory, env)
    upstream = f"127.0.0.1:{backend}"
    try:
        processes.start("web", PORT=str(backend), WEB_BIND=upstream)
        processes.start("proxy", NGINX_LISTEN=f"127.0.0.1:{front}", NGINX_UPSTREAM=upstream)

        def ready():
            processes.check_alive()
            return get(front, "/healthz", timeout=2)[0] == 200

        wait_for(ready, timeout=60, interval=0.2, what="/healthz through nginx")
        yield {"front": front, "gunicorn": backend}
    finally:
        processes.stop()


class SlowClient:
    """One connection that sends `first` and then only what `trickle` sends."""

    def __init__(self, port: int, first: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(first)
        self.closed_at: float | None = None
        self.received = b""

    def trickle(self, data: bytes) -> None:
        if self.closed_at is None:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed_at = time.monotonic()

    def closed(self) -> bool:
        """Whether the server has closed (or reset) the connection; reads whatever it sent first."""
        while self.closed_at is None and select.select([self.sock], [], [], 0)[0]:
            try:
                data = self.sock.recv(65536)
                self.received += data
                if not data:
                    self.closed_at = time.monotonic()
            except OSError:
                self.closed_at = time.monotonic()
        return self.closed_at is not None

    def close(self) -> None:
        self.sock.close()


def slow_headers(port: int, n: int) -> list[SlowClient]:
    """Clients that send a request line and then a header line now and then, never the blank line."""
    return [SlowClient(port, b"GET /api/ HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(n)]


def slow_bodies(port: int, n: int) -> list[SlowClient]:
    """Clients that send whole headers and 100 of the 1000 body bytes they announce, then nothing."""
    head = (
        b"POST /api/auth/token/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    return [SlowClient(port, head + b"{" + b" " * 99) for _ in range(n)]


def test_healthz_answers_through_nginx_while_slow_clients_hold_connections(front_door):
    front = front_door["front"]
    started = time.monotonic()
    headers_only, half_bodies = slow_headers(front, SLOW_CLIENTS), slow_bodies(front, SLOW_CLIENTS)
    slow = headers_only + half_bodies
    line = 0
    try:
        # For 4 s the slow clients keep at it (a header line every 2 s, more often than the
        # issue's 5 s) and /healthz is asked every half second.
        probes = []
        while time.monotonic() - started < 4:
            if time.monotonic() - started >= 2 * line:
                line += 1
                for client in headers_only:
                    client.trickle(f"X-Slow-{line}: x\r\n".encode())
            probes.append(get(front, "/healthz"))
            time.sleep(0.5)
        for status, headers, body, seconds in probes:
            assert status == 200, f"/healthz did not answer within {ANSWER_WITHIN} s ({seconds:.2f} s)"
            assert json.loads(body) == {"status": "ok"}
            # nginx answered: not a connection to gunicorn.
            assert headers.get("Server") == "nginx", headers
        # ...while every slow connection was still open: nginx holds them, no gunicorn thread does.
        assert not [client for client in slow if client.closed()], "a slow connection closed before its timeout"

        # nginx closes them at its timeouts (whole headers within 10 s however they trickle;
        # 10 s without a byte of body), while the header lines keep coming.
        def all_closed():
            nonlocal line
            if time.monotonic() - started >= 2 * line:
                line += 1
                for client in headers_only:
                    client.trickle(f"X-Slow-{line}: x\r\n".encode())
            return all(client.closed() for client in slow)

        wait_for(all_closed, timeout=CLIENT_TIMEOUT + 10, interval=0.2, what="nginx to close the slow connections")
        lasted = sorted(client.closed_at - started for client in slow)
        assert lasted[0] >= CLIENT_TIMEOUT - 1, f"closed after {lasted[0]:.1f} s, before the timeouts"
        assert lasted[-1] <= CLIENT_TIMEOUT + 6, f"one lasted {lasted[-1]:.1f} s"
        assert get(front, "/healthz")[0] == 200
    finally:
        for client in slow:
            client.close()


def test_control_the_same_slow_clients_straight_at_gunicorn_stall_it(front_door):
    """Without nginx the attack works: what the test above shows is nginx's doing, not gunicorn's.

    Which of gunicorn's two processes accepts a connection is a race, and one may take nearly all
    of them while the other still has free threads; so more slow clients than above, in waves, and
    the control asks only that /healthz goes unanswered at least once in five tries (through
    nginx, the test above requires an answer every time).
    """
    gunicorn = front_door["gunicorn"]
    assert get(gunicorn, "/healthz")[0] == 200
    slow = []
    try:
        for _ in range(8):
            slow += slow_headers(gunicorn, SLOW_CLIENTS // 2)
            time.sleep(0.05)
        time.sleep(0.5)
        statuses = [get(gunicorn, "/healthz")[0] for _ in range(5)]
        assert None in statuses, (
            f"gunicorn answered /healthz every time while {len(slow)} clients trickled headers at it: {statuses}"
        )
    finally:
        for client in slow:
            client.close()
    wait_for(lambda: get(gunicorn, "/healthz")[0] == 200, timeout=30, what="gunicorn to recover")


def test_one_address_gets_32_requests_at_once_and_health_probes_still_answer(front_door):
    """limit_conn (NGINX_CONN_PER_ADDRESS, 32): more half-sent bodies than that from one address get
    the API's JSON 429 at once; /healthz, from the same address, is never counted."""
    front = front_door["front"]
    slow = slow_bodies(front, 40)
    try:
        time.sleep(1)
        for _ in range(3):
            status, headers, _, seconds = get(front, "/healthz")
            assert status == 200, f"/healthz: {status} after {seconds:.2f} s"
            assert headers.get("Server") == "nginx"
        for client in slow:
            client.closed()
        refused = [client.received for client in slow if client.received.startswith(b"HTTP/1.1 429")]
        assert len(refused) == 40 - 32, [client.received[:12] for client in slow]
        assert b'"code": "throttled"' in refused[0]
    finally:
        for client in slow:
            client.close()


def test_nginx_refuses_a_body_above_djangos_limit_in_the_apis_error_shape(front_door, settings):
    front = front_door["front"]
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    status, headers, body, _ = get(
        front, "/api/auth/token/", method="POST", body=b"x" * (limit + 1),
        headers={"Content-Type": "application/json"}, timeout=10,
    )  # fmt: skip

    assert status == 413
    assert headers.get("Server") == "nginx"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["code"] == "request_too_large"
    assert "no-store" in headers["Cache-Control"]
    # A body at the limit reaches Django (which reads it: 400 for not being JSON, not 413).
    status, headers, body, _ = get(
        front, "/api/auth/token/", method="POST", body=b"x" * limit,
        headers={"Content-Type": "application/json"}, timeout=10,
    )  # fmt: skip
    assert status == 400, body
    assert json.loads(body)["code"] != "request_too_large"


def test_1100_query_parameters_reach_django_through_the_front_door_and_get_its_json_400(front_door):
    """Review of issue 15: a 7.7 KB request line was gunicorn's HTML 414 (its 4 KiB line limit behind nginx's 8 KiB)."""
    query = "&".join(f"field{i}=1" for i in range(1100))
    assert len(query) > 8192

    status, headers, body, _ = get(front_door["front"], f"/api/products/?{query}", timeout=10)

    assert status == 400, body[:300]
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["code"] == "too_many_fields"
    assert "no-store" in headers["Cache-Control"]
    # 105 headers too (gunicorn's own limit is 100): Django answers, here its 401 for no credentials.
    many = {f"X-Extra-{i}": "1" for i in range(105)}
    status, headers, body, _ = get(front_door["front"], "/api/orders/", headers=many, timeout=10)
    assert status == 401, body[:300]
    assert headers["Content-Type"] == "application/json"


def test_a_request_line_nginx_cannot_read_is_refused_in_the_apis_json_shape(front_door):
    status, headers, body, _ = get(front_door["front"], "/api/products/?q=" + "x" * 20_000, timeout=10)

    assert status == 414, body[:300]
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["code"] == "request_header_too_large"
    assert "no-store" in headers["Cache-Control"]
    status, headers, body, _ = get(front_door["front"], "/api/products/", headers={"X-Big": "x" * 20_000}, timeout=10)
    assert status == 400, body[:300]
    assert json.loads(body)["code"] == "request_header_too_large"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_api_without_its_slash_is_djangos_answer_and_no_redirect_names_the_clients_host(front_door, method):
    """Review of issue 15: nginx's own 301 for /api echoed `Host: evil.example` into its Location."""
    status, headers, body, _ = get(
        front_door["front"],
        "/api",
        method=method,
        headers={"Host": "evil.example"},
        body=b"" if method == "POST" else None,
    )

    assert status == 400, (status, headers, body[:300])  # Django's ALLOWED_HOSTS refusal, in the JSON shape
    assert json.loads(body)["code"] == "bad_host"
    assert "evil.example" not in headers.get("Location", "")
    status, headers, body, _ = get(front_door["front"], "/api", method=method, body=b"" if method == "POST" else None)
    assert status in (200, 401, 405), (status, headers, body[:300])
    assert "Location" not in headers


def test_nginx_answers_the_apis_json_503_while_gunicorn_is_down(tmp_path):
    """The proxy alone, its gunicorn not started: /api/ gets the API's error shape and Retry-After."""
    front = free_port()
    processes = Processes(tmp_path, {**os.environ, "ORDERFLOW_VAR_DIR": str(tmp_path / "var")})
    try:
        processes.start("proxy", NGINX_LISTEN=f"127.0.0.1:{front}", NGINX_UPSTREAM=f"127.0.0.1:{free_port()}")
        wait_for(lambda: processes.check_alive() or get(front, "/api/")[0], timeout=30, what="nginx")

        status, headers, body, _ = get(front, "/api/orders/", timeout=10)

        assert status == 503
        assert headers["Content-Type"] == "application/json"
        assert headers["Retry-After"] == "5"
        assert json.loads(body)["code"] == "web_unavailable"
    finally:
        processes.stop()


def test_nginx_logs_json_lines_whose_request_id_joins_djangos_lines(tmp_path):
    """nginx's access line is JSON and names nginx's request id, which gunicorn gets as X-Request-ID:
    the web's lines about the request (LOG_FORMAT=json) carry the same id. A client's own X-Request-ID
    is replaced, never trusted."""
    front, backend = free_port(), free_port()
    upstream = f"127.0.0.1:{backend}"
    processes = Processes(tmp_path, process_env(tmp_path, LOG_FORMAT="json"))
    try:
        processes.start("web", PORT=str(backend), WEB_BIND=upstream)
        processes.start("proxy", NGINX_LISTEN=f"127.0.0.1:{front}", NGINX_UPSTREAM=upstream)
        wait_for(
            lambda: processes.check_alive() or get(front, "/healthz", timeout=2)[0] == 200,
            timeout=60, interval=0.2, what="/healthz through nginx",
        )  # fmt: skip

        status, _, _, _ = get(front, "/api/?page=1", timeout=10, headers={"X-Request-ID": "chosen-by-the-client"})
        assert status is not None

        def logged(name: str, predicate) -> list[dict]:
            entries = []
            for line in (tmp_path / f"{name}.log").read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    entry = json.loads(line)
                    if predicate(entry):
                        entries.append(entry)
            return entries

        def nginx_line():
            found = logged("proxy", lambda e: e.get("logger") == "nginx.access" and e.get("path") == "/api/")
            return found[0] if found else None

        entry = wait_for(nginx_line, timeout=10, what="nginx's access line")
        assert (entry["method"], entry["query"], entry["status"], entry["level"]) == ("GET", "page=1", status, "INFO")
        assert entry["request_id"] != "chosen-by-the-client" and len(entry["request_id"]) == 32
        assert isinstance(entry["duration_s"], int | float) and isinstance(entry["pid"], int)
        web = wait_for(
            lambda: logged("web", lambda e: e.get("logger") == "gunicorn.access" and e.get("path") == "/api/"),
            timeout=10,
            what="gunicorn's access line",
        )
        assert [line.get("request_id") for line in web] == [entry["request_id"]]
        # Straight to gunicorn, an X-Request-ID that is not a plain token is not logged.
        get(backend, "/api/orders/", timeout=10, headers={"X-Request-ID": 'not a token: {"x": 1}'})
        direct = wait_for(
            lambda: logged("web", lambda e: e.get("logger") == "gunicorn.access" and e.get("path") == "/api/orders/"),
            timeout=10,
            what="the direct request's line",
        )
        assert "request_id" not in direct[0]
    finally:
        processes.stop()


# --- Flower -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flower(tmp_path_factory) -> Iterator[dict]:
    """The Procfile's flower (basic auth) behind the proxy: {"front": nginx's port, "flower": Flower's own}."""
    directory = tmp_path_factory.mktemp("flower")
    front, backend = free_port(), free_port()
    env = process_env(
        directory,
        FLOWER_BASIC_AUTH=FLOWER_LOGIN,
        # An operator's attempt to switch the read-only mode off: scripts/flower.sh's option wins.
        FLOWER_READ_ONLY="false",
    )
    processes = Processes(directory, env)
    try:
        processes.start("flower", ORDERFLOW_FLOWER_BACKEND_PORT=str(backend))
        processes.start(
            "proxy",
            NGINX_LISTEN=f"127.0.0.1:{free_port()}",
            NGINX_FLOWER_LISTEN=f"127.0.0.1:{front}",
            NGINX_FLOWER_UPSTREAM=f"127.0.0.1:{backend}",
        )

        def ready():
            processes.check_alive()
            return get(front, "/healthcheck", timeout=2)[0] == 200

        wait_for(ready, timeout=60, interval=0.3, what="Flower through nginx")
        yield {"front": front, "flower": backend}
    finally:
        processes.stop()


def auth(**extra: str) -> dict[str, str]:
    """Request headers with the fixture's Flower login (basic auth), plus `extra`."""
    return {"Authorization": "Basic " + base64.b64encode(FLOWER_LOGIN.encode()).decode(), **extra}


RUN_AND_CONTROL = [
    "/api/task/async-apply/orders.order_compensate",
    "/api/task/apply/orders.order_compensate",
    "/api/task/send-task/orders.order_compensate",
    "/api/task/revoke/0f3b5c2e-0000-4000-8000-000000000000",
    "/api/task/abort/0f3b5c2e-0000-4000-8000-000000000000",
    "/api/task/timeout/orders.order_compensate",
    "/api/task/rate-limit/orders.order_compensate",
    "/api/worker/shutdown/orders@host",
    "/api/worker/pool/grow/orders@host",
    "/api/worker/pool/restart/orders@host",
    "/api/worker/queue/cancel-consumer/orders@host",
]
# The same, spelled so that only a decoding, normalising proxy sees through it.
RESPELLED = ["/api/task/async%2Dapply/orders.order_compensate", "//api/task/./async-apply/orders.order_compensate"]


@pytest.mark.parametrize("path", RUN_AND_CONTROL + RESPELLED)
def test_flower_refuses_running_and_controlling_through_the_front(flower, path):
    body = json.dumps({"args": [1], "kwargs": {"force": True}}).encode()

    status, _, text, _ = get(
        flower["front"], path, method="POST", body=body, headers=auth(**{"Content-Type": "application/json"}),
        timeout=10,
    )  # fmt: skip

    assert status == 403, text
    assert b"read-only" in text


@pytest.mark.parametrize("path", RUN_AND_CONTROL)
def test_flower_itself_refuses_running_and_controlling(flower, path):
    """Behind the front, Flower runs read-only too (scripts/flower.sh): its own port refuses the same calls."""
    status, _, text, _ = get(
        flower["flower"], path, method="POST", body=json.dumps({"args": [1]}).encode(),
        headers=auth(**{"Content-Type": "application/json"}), timeout=10,
    )  # fmt: skip

    assert status == 403, text
    assert b"Read only mode is enabled" in text
    # The same login reads: the 403 is the read-only mode's, not a failed login.
    assert get(flower["flower"], "/api/workers", headers=auth(), timeout=10)[0] == 200


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_flower_front_answers_no_other_method(flower, method):
    assert get(flower["front"], "/api/workers", method=method, headers=auth(), timeout=10)[0] == 403


@pytest.mark.parametrize("path", ["/", "/workers", "/tasks", "/api/workers", "/api/tasks", "/api/task/types"])
def test_flower_front_keeps_what_operators_watch(flower, path):
    status, headers, text, _ = get(flower["front"], path, headers=auth(), timeout=10)

    assert status == 200, text
    assert headers.get("Server") == "nginx"
    assert get(flower["front"], path, timeout=10)[0] == 401  # basic auth still applies behind nginx


def test_flower_front_keeps_the_tasks_pages_table(flower):
    """The Tasks page reads its table with a POST to /tasks/datatable, which is open (Flower answers it as a GET)."""
    form = b"draw=1&start=0&length=10&order[0][column]=0&order[0][dir]=asc&columns[0][data]=name"

    status, _, text, _ = get(
        flower["front"], "/tasks/datatable", method="POST", body=form,
        headers=auth(**{"Content-Type": "application/x-www-form-urlencoded"}), timeout=10,
    )  # fmt: skip

    assert status == 200, text
    assert json.loads(text)["draw"] == 1
