"""Process deaths on the embedded default, against the real `make run` process list (issue 19).

The stack is the Procfile's processes under supervisord, configured as `make run`
configures them (`honcho export` with scripts/supervisord/), on the test database
and a broker folder of its own. Orders come over HTTP from four clients while
pool processes, or a whole worker, are killed with SIGKILL (what an OOM killer
or a crashing C extension does). Every order must end, confirmed or cancelled
for a business reason, with the books balanced and the audit clean.
"""

import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from rest_framework.authtoken.models import Token

from inventory.models import Product
from orders.models import CancelledOrder, Order
from reports.models import ProductReport
from testing import BASE_DIR, wait_for
from testing.workers import database_url

EMBEDDED = settings.CELERY_BROKER_URL.startswith("filesystem") and settings.DATABASES["default"]["ENGINE"].endswith(
    "sqlite3"
)
pytestmark = [
    pytest.mark.saga,
    pytest.mark.faults,
    pytest.mark.timeout(420),
    pytest.mark.skipif(not EMBEDDED, reason="the embedded default (SQLite + filesystem broker)"),
]

BIN = Path(sys.executable).parent
STOCK = 60
ORDERS = 150
CLIENTS = 4
# The "wait three minutes": far beyond what a healthy stack needs (seconds).
END_WITHIN = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """`make run`'s processes under supervisord, in a folder of their own."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.var = directory / "var"
        self.run_dir = self.var / "run"
        self.run_dir.mkdir(parents=True)
        self.port = _free_port()
        self.log_path = directory / "stack.log"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "ORDERFLOW_VAR_DIR": str(self.var),
            "DATABASE_URL": database_url("default"),
            "PORT": str(self.port),
            "FLOWER_PORT": str(_free_port()),
            # As in the reproduction; everything else is make run's default.
            "SAGA_TIMEOUT_SECONDS": "10",
            # ...which is shorter than the time limit, the backoff ceiling and the sweep interval
            # allow (project/checks.py): make run would refuse to start without this.
            "SILENCED_SYSTEM_CHECKS": "orderflow.E006,orderflow.E007,orderflow.E008",
            "ORDER_CREATE_THROTTLE": "off",
            "ORDERFLOW_READY_BANNER": "STACK READY",
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("ORDERFLOW_FAULTS_FILE", "ORDERFLOW_BENCH"):  # make run has neither
            self.env.pop(name, None)
        self.conf = self.run_dir / "orderflow.conf"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        subprocess.run(
            ["sh", "scripts/supervisord/configure.sh", str(self.run_dir), str(self.port)],
            cwd=BASE_DIR, env=self.env, check=True, capture_output=True,
        )  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen(
            [BIN / "supervisord", "-n", "-c", str(self.conf)],
            cwd=BASE_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_for(lambda: "STACK READY" in self.log() or self._exited(), timeout=120, what="the stack to be ready")
        assert "STACK READY" in self.log(), self.log()[-5000:]

    def _exited(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"supervisord exited with {self.process.returncode}:\n{self.log()[-5000:]}")
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def supervisorctl(self, *args: str) -> str:
        out = subprocess.run(
            [BIN / "supervisorctl", "-c", str(self.conf), *args], env=self.env, capture_output=True, text=True
        )
        return out.stdout

    def pid(self, program: str) -> int:
        return int(self.supervisorctl("pid", program).strip())

    def pool_processes(self, program: str) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid(program))], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # supervisord stops every program, then exits
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        # Whatever outlived it (each program runs in its own process group).
        for pid in subprocess.run(["pgrep", "-f", "celery|gunicorn"], capture_output=True, text=True).stdout.split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if f"ORDERFLOW_VAR_DIR={self.var}".encode() in environ.split(b"\0"):
                os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def stack(transactional_db, tmp_path):
    stack = Stack(tmp_path)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _post_orders(stack: Stack, token: str, product_ids: list[int], count: int, errors: list) -> None:
    rng = random.Random(count)
    for _ in range(count):
        body = json.dumps({"lines": [{"product": rng.choice(product_ids), "quantity": rng.randint(1, 2)}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{stack.port}/api/orders/",
            data=body,
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 202
        except Exception as exc:
            errors.append(exc)
        time.sleep(0.02)


def _kill_pools(stack: Stack, rounds: int = 3) -> list[int]:
    killed = []
    for _ in range(rounds):
        for program in ("worker_orders", "worker_inventory", "worker_reports"):
            for pid in stack.pool_processes(program):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        time.sleep(1)
    return killed


def _settled(placed: int) -> bool:
    return (
        Order.objects.count() + CancelledOrder.objects.count() == placed
        and not Order.objects.exclude(status=Order.Status.CONFIRMED).exists()
    )


@pytest.mark.parametrize("whole_worker", [0, 1, 5], ids=["pool-processes", "whole-worker", "whole-worker-5-times"])
def test_orders_all_end_when_worker_processes_are_killed_while_they_flow(stack, user, make_product, whole_worker):
    token = Token.objects.create(user=user).key
    products = [make_product(stock=STOCK).pk for _ in range(3)]
    errors: list = []
    shares = [ORDERS // CLIENTS + (i < ORDERS % CLIENTS) for i in range(CLIENTS)]
    clients = [threading.Thread(target=_post_orders, args=(stack, token, products, n, errors)) for n in shares]
    for client in clients:
        client.start()
    time.sleep(0.5)
    killed = _kill_pools(stack)
    for _ in range(whole_worker):
        # Main process and pool, as a crashed host would; again, as soon as it is back.
        before = stack.pid("worker_inventory")
        os.killpg(before, signal.SIGKILL)
        wait_for(
            lambda before=before: (
                "RUNNING" in stack.supervisorctl("status", "worker_inventory")
                and stack.pid("worker_inventory") not in (0, before)
            ),
            timeout=60,
            what="supervisord to restart the inventory worker",
        )
    for client in clients:
        client.join()

    assert not errors, errors[:3]
    assert killed, "no pool process was killed"
    wait_for(lambda: _settled(ORDERS), timeout=END_WITHIN, interval=0.5, what="every order to end")

    # Cancelled only for a business reason: stock ran out (the lines name existing, active products).
    reasons = list(CancelledOrder.objects.values_list("reason", flat=True))
    assert all(re.fullmatch(r"insufficient stock for product \d+: wanted \d(, have \d+)?", r) for r in reasons), reasons
    # Books balance: what is left plus what was sold is what there was.
    sold = dict(ProductReport.objects.filter(product_id__in=products).values_list("product_id", "units_sold"))
    for product in Product.objects.filter(pk__in=products):
        assert product.stock + sold.get(product.pk, 0) == STOCK, (product.pk, product.stock, sold)
    assert Order.objects.count() > 0  # some confirmed: the drill is not all refusals
    out = io.StringIO()
    call_command("check_consistency", stdout=out)  # exits 1 on any violation
    assert out.getvalue().strip() == "consistent"
