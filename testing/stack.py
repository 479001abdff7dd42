"""The whole system, black-box, on a database and a broker of its own: for fault drills.

`Stack` runs what `make run` runs in production shape, without supervisord:
`manage.py migrate` for every database alias, gunicorn with the Procfile's web
command line on a free port, one `celery worker` per service queue and beat,
every process a child of this one with its log in the stack's folder. A drill
talks to it only as a client would (HTTP, the standard library) and reads the
outcome through the API and `manage.py check_consistency`. Nothing here
imports pytest; testing/plugin.py builds the `drill_stack` fixture on it.
"""

import http.client
import itertools
import json as jsonlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from testing.instances import WEB_PORTS, free_port
from testing.permissions import OPERATOR_PERMISSIONS
from testing.workers import BASE_DIR, SupervisionFailed, Workers, test_environment, wait_for

SERVICE_QUEUES = ("orders", "inventory", "reports")
_stacks = itertools.count(1)


class Reply(NamedTuple):
    """One HTTP exchange: `status` None when no answer came (timeout, refused: `body` says which)."""

    status: int | None
    body: Any  # the decoded JSON, else the text
    seconds: float


def stack_environment() -> dict[str, str]:
    """The saga settings the test workers run with (testing.workers.test_environment): fast retries, a short
    saga timeout and sweep interval. Not its database URLs, nor CONN_MAX_AGE (a stack keeps production's)."""
    return {
        key: value
        for key, value in test_environment().items()
        if not key.startswith("DATABASE_URL") and key != "CONN_MAX_AGE"
    }


class Stack:
    """web + one worker per service queue + beat, on `database_url` and `broker_url`, in `directory`.

    `database_url` / `broker_url` None: the embedded default (SQLite, the
    filesystem broker) in the stack's own var/ folder. `settings` are
    environment variables for every process, applied last (e.g.
    `{"SAGA_TIMEOUT_SECONDS": "30", "ORDER_DEADLINE_SECONDS": "120"}`; a
    DATABASE_URL_INVENTORY there splits the databases; WEB_CONCURRENCY,
    WEB_THREADS, WORKER_POOL and WORKER_CONCURRENCY[_<QUEUE>] shape the
    processes as in the Procfile). The children get:
    the URLs, ORDERFLOW_VAR_DIR=`directory`/var, SECRET_KEY and DEBUG unset
    as under `make run` (a key generated once into var/, DEBUG off), the saga
    settings of `stack_environment()`, ORDER_CREATE_THROTTLE off (drills place
    many orders as one user), the benchmark app not installed, and a faults
    file (`stack.workers.set_faults`, project/saga/faults.py).

    `start()` raises SupervisionFailed, with a log's end, when a process
    exits or does not get ready in `start_timeout` s; `stop()` stops every
    process it started, pass or fail.
    """

    def __init__(
        self,
        directory: Path,
        *,
        database_url: str | None = None,
        broker_url: str | None = None,
        settings: Mapping[str, str] | None = None,
        web_port: int | None = None,
        start_timeout: float = 90.0,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = web_port or free_port(*WEB_PORTS)
        self.start_timeout = start_timeout
        self.env = {
            **stack_environment(),
            "DATABASE_URL": database_url or "",
            # Unset in the children (empty counts as unset): one database unless `settings` split it.
            "DATABASE_URL_INVENTORY": "",
            "DATABASE_URL_REPORTS": "",
            "CELERY_BROKER_URL": broker_url or "",
            "ORDERFLOW_VAR_DIR": str(self.directory / "var"),
            "SECRET_KEY": "",
            "DEBUG": "false",
            "ORDERFLOW_BENCH": "false",
            "ORDER_CREATE_THROTTLE": "off",
            "DJANGO_SETTINGS_MODULE": "project.settings",
            **(settings or {}),
        }
        number = next(_stacks)
        self.workers = Workers(self.directory / "logs", env=self.env, node=f"{{queue}}-stack{number}@%h")
        self._staff_token: str | None = None
        self._products = itertools.count(1)

    @property
    def url(self) -> str:
        """The web's base URL, http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    # --- life cycle

    def start(self) -> "Stack":
        """migrate every alias, then web, the three workers and beat; returns when all are ready."""
        try:
            for alias in self.database_aliases():
                self.manage("migrate", f"--database={alias}", "--noinput", timeout=self.start_timeout)
            env = self.env
            self.workers.start_process(
                "web",
                [
                    sys.executable, "-m", "gunicorn", "project.wsgi", "--bind", f"127.0.0.1:{self.port}",
                    "--workers", env.get("WEB_CONCURRENCY", "2"), "--threads", env.get("WEB_THREADS", "4"),
                    "--access-logfile", "-", "--error-logfile", "-", "--no-control-socket",
                ],
            )  # fmt: skip
            offsets = {name: self._log_size(name) for name in (*SERVICE_QUEUES, "beat")}
            for queue in SERVICE_QUEUES:
                self._start_worker(queue)
            self.workers.start_beat()
            deadline = time.monotonic() + self.start_timeout
            for queue in SERVICE_QUEUES:
                self._wait_log(queue, f"{self.workers.node_name(queue)} ready.", deadline, since=offsets[queue])
            self._wait_log("beat", "beat: Starting...", deadline, since=offsets["beat"])
            wait_for(self._web_ready, timeout=max(1.0, deadline - time.monotonic()), interval=0.1, what="the web")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process of the stack (SIGTERM to each one's group, SIGKILL after 20 s)."""
        self.workers.stop_all()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def database_aliases(self) -> list[str]:
        return ["default"] + [a for a in ("inventory", "reports") if self.env.get(f"DATABASE_URL_{a.upper()}")]

    def _start_worker(self, queue: str) -> None:
        """The Procfile's worker line: its pool (WORKER_POOL) and concurrency (WORKER_CONCURRENCY[_QUEUE]), -O fair."""
        env = self.env
        concurrency = env.get(f"WORKER_CONCURRENCY_{queue.upper()}") or env.get("WORKER_CONCURRENCY") or "2"
        self.workers.start(queue, int(concurrency), pool=env.get("WORKER_POOL") or "prefork", options=["-O", "fair"])

    def _log_size(self, name: str) -> int:
        default = f"worker-{name}" if name in SERVICE_QUEUES else name
        path = self.workers.log_path(self.workers.logs.get(name, default))
        return path.stat().st_size if path.exists() else 0

    def _wait_log(self, name: str, text: str, deadline: float, since: int = 0) -> None:
        """Until `text` is in the log of process `name` after byte `since`; SupervisionFailed if it exits first."""
        process = self.workers.processes[name]
        path = self.workers.log_path(self.workers.logs[name])

        def seen():
            if process.poll() is not None:
                raise SupervisionFailed(f"{name} exited with {process.returncode}:\n{self.workers.tail(name)}")
            with path.open("rb") as log:
                log.seek(since)
                return text in log.read().decode(errors="replace")

        wait_for(seen, timeout=max(1.0, deadline - time.monotonic()), interval=0.1, what=f"{name}: {text!r}")

    def start_worker(self, queue: str, timeout: float = 60.0) -> None:
        """Start the queue's worker again (after `stop_worker` or a kill) and wait until it is ready."""
        since = self._log_size(queue)
        self._start_worker(queue)
        self._wait_log(queue, f"{self.workers.node_name(queue)} ready.", time.monotonic() + timeout, since=since)

    def stop_worker(self, queue: str, *, warm: bool = False) -> None:
        """Stop the queue's worker (`warm`: SIGTERM to the main process only, so it finishes its tasks)."""
        self.workers.stop(queue, warm=warm)

    def _web_ready(self) -> bool:
        web = self.workers.processes["web"]
        if web.poll() is not None:
            raise SupervisionFailed(f"web exited with {web.returncode}:\n{self.workers.tail('web')}")
        return self.request("GET", "/healthz", timeout=2).status == 200

    def check_alive(self) -> None:
        """SupervisionFailed, with its log's end, if a process of the stack has exited."""
        self.workers.check_alive()

    # --- commands

    def _manage(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(  # noqa: S603 (our interpreter, our manage.py)
            [sys.executable, "manage.py", *args],
            cwd=BASE_DIR,
            env=self.workers.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def manage(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """`manage.py ARGS` with the stack's environment; SupervisionFailed (with its output) if it fails."""
        done = self._manage(args, timeout)
        if done.returncode != 0:
            command = " ".join(args)
            raise SupervisionFailed(f"manage.py {command} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        return done

    def audit(self, timeout: float = 120.0) -> tuple[bool, str]:
        """`manage.py check_consistency` on the stack's databases: (clean, its output)."""
        done = self._manage(["check_consistency"], timeout)
        return done.returncode == 0, done.stdout + done.stderr

    def create_user(self, username: str, *, staff: bool = False, permissions: Sequence[str] = ()) -> str:
        """A user (created if missing; staff if asked) holding `permissions` ("app_label.codename"),
        and its API token (DRF's Token), via `manage.py shell`."""
        script = (
            "from django.contrib.auth import get_user_model\n"
            "from rest_framework.authtoken.models import Token\n"
            "from testing.permissions import grant\n"
            f"user, _ = get_user_model().objects.get_or_create(username={username!r})\n"
            f"user.is_staff = {bool(staff)!r}\n"
            "user.save()\n"
            f"grant(user, {list(permissions)!r})\n"
            "print(Token.objects.get_or_create(user=user)[0].key)\n"
        )
        return self.manage("shell", "-c", script).stdout.strip().splitlines()[-1]

    @property
    def staff_token(self) -> str:
        """The token of "stack-staff", made on first use: a staff user with the model permissions its
        requests need (testing.permissions.OPERATOR_PERMISSIONS: products, everyone's orders, the reports)."""
        if self._staff_token is None:
            self._staff_token = self.create_user("stack-staff", staff=True, permissions=OPERATOR_PERMISSIONS)
        return self._staff_token

    # --- HTTP

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        token: str | None = None,
        timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One HTTP request to the web; never raises for the network: status None and the error instead.

        `timeout` (s) bounds connecting and each read (http.client's socket
        timeout); `seconds` is the whole exchange as the client saw it.
        """
        sent = {"Accept": "application/json", **(headers or {})}
        body = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            sent["Content-Type"] = "application/json"
        if token:
            sent["Authorization"] = f"Token {token}"
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            raw = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            return Reply(None, f"{type(exc).__name__}: {exc}", time.monotonic() - started)
        finally:
            connection.close()
        seconds = time.monotonic() - started
        text = raw.decode(errors="replace")
        try:
            return Reply(status, jsonlib.loads(text), seconds)
        except ValueError:
            return Reply(status, text, seconds)

    def create_product(self, stock: int, price: str = "10.00", *, name: str | None = None) -> int:
        """A product made through the API as staff (POST /api/products/); its id. SupervisionFailed unless 201."""
        n = next(self._products)
        sku = f"DRILL-{os.getpid()}-{n}-{uuid.uuid4().hex[:8]}"
        reply = self.request(
            "POST",
            "/api/products/",
            {"sku": sku, "name": name or f"Drill product {n}", "price": price, "stock": stock},
            token=self.staff_token,
        )
        if reply.status != 201:
            raise SupervisionFailed(f"POST /api/products/ answered {reply.status}: {reply.body}")
        return reply.body["id"]

    def place_order(
        self,
        lines: Sequence[tuple[int, int]],
        *,
        token: str | None = None,
        attempts: int = 1,
        timeout: float = 10.0,
        idempotency_key: str | None = None,
    ) -> Reply:
        """POST /api/orders/ with lines [(product id, quantity), ...] and an Idempotency-Key.

        With `attempts` > 1 it is a careful client: after no answer or a 5xx
        it waits 0.2 s and sends the same request again, same key, at most
        that many times. The last reply.
        """
        key = idempotency_key or str(uuid.uuid4())
        payload = {"lines": [{"product": product, "quantity": quantity} for product, quantity in lines]}
        for attempt in range(attempts):
            reply = self.request(
                "POST", "/api/orders/", payload, token=token or self.staff_token, timeout=timeout,
                headers={"Idempotency-Key": key},
            )  # fmt: skip
            if reply.status is not None and reply.status < 500:
                return reply
            if attempt < attempts - 1:
                time.sleep(0.2)
        return reply

    def place_orders(
        self,
        n: int,
        products: Sequence[int] = (),
        *,
        quantity: int = 1,
        lines: Callable[[int], Sequence[tuple[int, int]]] | None = None,
        token: str | None = None,
        threads: int = 8,
        attempts: int = 1,
        timeout: float = 10.0,
        interval: float = 0.0,
    ) -> list[Reply]:
        """`n` orders from `threads` concurrent clients: order i is `lines(i)`, else products[i % len] × `quantity`.

        `interval` (s) spaces the starts (a stream rather than a burst);
        `attempts` and `timeout` as in `place_order`. Replies in the order the
        orders were numbered; `order_ids` takes the ids of those accepted.
        """
        token = token or self.staff_token
        started = time.monotonic()

        def one(i: int) -> Reply:
            if interval:
                time.sleep(max(0.0, started + i * interval - time.monotonic()))
            order = lines(i) if lines is not None else [(products[i % len(products)], quantity)]
            return self.place_order(order, token=token, attempts=attempts, timeout=timeout)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(one, range(n)))

    @staticmethod
    def order_ids(replies: Sequence[Reply]) -> list[int]:
        """The ids of the orders a list of replies accepted (202, or an idempotent replay)."""
        return [r.body["id"] for r in replies if r.status in (200, 202, 410) and isinstance(r.body, dict)]

    def order_state(self, order_id: int, token: str | None = None) -> str | None:
        """ "confirmed" (200, confirmed), "cancelled" (410), else None (pending, cancelling, no answer)."""
        reply = self.request("GET", f"/api/orders/{order_id}/", token=token or self.staff_token)
        if reply.status == 410:
            return "cancelled"
        if reply.status == 200 and reply.body.get("status") == "confirmed":
            return "confirmed"
        return None

    def wait_terminal(self, order_ids: Sequence[int], timeout: float = 120.0) -> dict[int, str]:
        """Until every order is confirmed or cancelled, polling the API; {id: state}.

        SupervisionFailed after `timeout` s, naming the orders still open.
        """
        states: dict[int, str | None] = dict.fromkeys(order_ids)
        deadline = time.monotonic() + timeout
        while True:
            for order_id, state in states.items():
                if state is None:
                    states[order_id] = self.order_state(order_id)
            if all(states.values()):
                return states  # type: ignore[return-value]
            if time.monotonic() > deadline:
                open_ = [order_id for order_id, state in states.items() if state is None]
                raise SupervisionFailed(f"{len(open_)} of {len(states)} orders not terminal after {timeout}s: {open_}")
            time.sleep(0.3)

    def _pages(self, path: str) -> list[dict]:
        items: list[dict] = []
        page = 1
        while True:
            separator = "&" if "?" in path else "?"
            reply = self.request("GET", f"{path}{separator}page={page}&page_size=200", token=self.staff_token)
            if reply.status != 200:
                raise SupervisionFailed(f"GET {path} answered {reply.status}: {reply.body}")
            items += reply.body["results"]
            if not reply.body.get("next"):
                return items
            page += 1

    def cancelled_reasons(self) -> dict[int, str]:
        """{order id: reason} of every cancelled order (GET /api/orders/?status=cancelled, as staff)."""
        return {item["id"]: item["reason"] for item in self._pages("/api/orders/?status=cancelled")}

    def stock(self) -> dict[int, int]:
        """{product id: stock} from GET /api/products/."""
        return {item["id"]: item["stock"] for item in self._pages("/api/products/")}

    def units_sold(self) -> dict[int, int]:
        """{product id: units sold} from the sales read model (GET /api/reports/products/)."""
        return {item["product"]: item["units_sold"] for item in self._pages("/api/reports/products/")}

    def check_books(self, initial: Mapping[int, int]) -> None:
        """AssertionError unless the books balance: per product, stock >= 0 and stock + units sold == `initial`
        (its stock before the orders), and the audit is clean."""
        stock, sold = self.stock(), self.units_sold()
        for product, started_with in initial.items():
            assert stock[product] >= 0, (product, stock[product])
            assert stock[product] + sold.get(product, 0) == started_with, (product, stock[product], sold.get(product))
        ok, output = self.audit()
        assert ok, output
