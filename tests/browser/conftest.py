"""Browser tests: Debian's headless Chromium, driven by Playwright, against the live server and real workers.

Playwright launches the machine's /usr/bin/chromium (Debian's `chromium` package, `make
browser-deps`) and never downloads a browser. Without it, or without the playwright package,
every `@pytest.mark.browser` test is skipped with the reason. With SCREENSHOTS=1 the tests save
the pictures docs/tour.md shows into docs/img/; otherwise they write nothing there, so test runs
never rewrite committed files.
"""

import base64
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings
from kombu import Exchange, Queue

from project.celery import app as celery_app
from testing import BASE_DIR, Workers, terminate, wait_for

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # the skip below says so
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
# No GPU, sandbox or first-run UI on a headless CI machine, and none of Chromium's own traffic
# (updates, sync, QUIC): the machine's network is closed and refuses it noisily.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1440, "height": 900}
# Generous: two busy cores run Chromium, the live server, three workers and the database.
TIMEOUT_MS = 30_000
SCREENSHOTS = os.environ.get("SCREENSHOTS") == "1"
DOCS_IMG = BASE_DIR / "docs" / "img"
# Where workers publish task events (Celery's default event exchange), which Flower listens to.
EVENT_EXCHANGE = Exchange("celeryev", type="topic")


def _why_skipped() -> str | None:
    if not CHROMIUM.exists():
        return (
            f"Debian's Chromium is not installed ({CHROMIUM} is missing): run `make browser-deps` as root, "
            "or apt-get install chromium chromium-driver"
        )
    if sync_playwright is None:
        return "the playwright package is not installed (pip install -r requirements.txt)"
    return None


def pytest_collection_modifyitems(items):
    reason = _why_skipped()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def chromium(celery_workers: Workers) -> Iterator["Browser"]:
    """One headless Chromium for a test module.

    Playwright's sync API keeps an asyncio event loop running in this thread while the browser
    is open, and Django refuses ORM calls from a thread with a running loop
    (SynchronousOnlyOperation), even the plain synchronous ones that the tests and pytest-django's
    fixtures (the database flush after each test) make between browser steps. None of them runs
    inside that loop, so Django's check is switched off for exactly as long as Playwright runs.
    The workers start first (this fixture asks for them) so their processes never inherit the switch.
    """
    expect.set_options(timeout=TIMEOUT_MS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                yield browser
            finally:
                browser.close()


@pytest.fixture
def page(chromium: "Browser", live_server) -> Iterator["Page"]:
    """A fresh browser context (no cookies) on the live server; relative URLs go to it."""
    context = chromium.new_context(
        base_url=live_server.url, viewport=VIEWPORT, color_scheme="light", locale="en-US", timezone_id="UTC"
    )
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def screenshot() -> Callable[..., None]:
    """screenshot(page, name): docs/img/<name>.png, only when SCREENSHOTS=1."""

    def take(page: "Page", name: str, *, full_page: bool = False) -> None:
        if SCREENSHOTS:
            DOCS_IMG.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=DOCS_IMG / f"{name}.png", full_page=full_page, animations="disabled")

    return take


# --- Flower ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flower:
    url: str
    username: str
    password: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flower_get(flower: Flower, path: str) -> bytes | None:
    """GET a Flower page with its basic auth; None while Flower does not answer."""
    request = urllib.request.Request(f"{flower.url}{path}")
    token = base64.b64encode(f"{flower.username}:{flower.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read()
    except OSError:  # refused, reset, timed out, or an HTTP error before it is ready
        return None


def _event_queues() -> set[str]:
    """Queues bound to Celery's event exchange, where the broker keeps that table on disk (filesystem://)."""
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        if not hasattr(channel, "get_table"):
            return set()
        return {binding.queue for binding in channel.get_table(EVENT_EXCHANGE.name)}


def _drop_event_queues(names: set[str]) -> None:
    """Unbind and empty event queues whose consumer is gone.

    kombu's filesystem transport keeps a binding until someone deletes the queue, and a stopped
    Flower does not: every later event of the session would be written into the shared queue
    folder for nobody. RabbitMQ deletes such a queue itself (auto-delete) when Flower disconnects.
    """
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        for name in names:
            queue = Queue(name, EVENT_EXCHANGE, routing_key="#", auto_delete=True)(channel)
            queue.declare()  # makes the binding known to this channel, so delete() removes it
            queue.delete()


def _task_events(*, on: bool) -> set[str]:
    """Switch the workers' task events on or off; the names (before the @) of those that answered."""
    switch = celery_app.control.enable_events if on else celery_app.control.disable_events
    replies = switch(reply=True, timeout=2) or []
    return {name.partition("@")[0] for reply in replies for name in reply}


@pytest.fixture
def flower(workers: Workers, tmp_path: Path) -> Iterator[Flower]:
    """Flower watching the test's broker (the workers' environment), behind basic auth.

    Yielded once Flower hears every worker and every worker sends task events: from then on
    Flower sees every task. Workers send them only when asked (CELERY_WORKER_SEND_TASK_EVENTS
    is off by default); Flower asks every 5 s, the fixture at once, and switches them off again.
    """
    found = Flower(f"http://127.0.0.1:{_free_port()}", "operator", "flower-test-password")
    env = {key: value for key, value in workers.env().items() if not key.startswith("FLOWER_")}
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    log_path = tmp_path / "flower.log"
    before = _event_queues()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "project", "flower", "--address=127.0.0.1",
             f"--port={found.url.rpartition(':')[2]}", f"--basic-auth={found.username}:{found.password}"],
            cwd=BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def hears_every_worker() -> bool:
        if process.poll() is not None:
            pytest.fail(f"Flower exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        body = _flower_get(found, "/workers?json=1")
        if body is None:
            return False
        heard = {worker.get("hostname", "").partition("@")[0] for worker in json.loads(body)["data"]}
        return expected <= heard

    expected = {f"{queue}-test" for queue in settings.SERVICE_QUEUES}
    try:
        wait_for(hears_every_worker, timeout=90, interval=0.5, what="Flower to hear every worker")
        wait_for(lambda: expected <= _task_events(on=True), timeout=60, interval=1, what="task events switched on")
        yield found
    finally:
        if not settings.CELERY_WORKER_SEND_TASK_EVENTS:
            _task_events(on=False)
        terminate(process)
        _drop_event_queues(_event_queues() - before)


@pytest.fixture
def flower_page(chromium: "Browser", flower: Flower) -> Iterator["Page"]:
    """A browser page logged in to Flower (basic auth); relative URLs go to Flower."""
    context = chromium.new_context(
        base_url=flower.url,
        viewport=VIEWPORT,
        color_scheme="light",
        locale="en-US",
        timezone_id="UTC",
        http_credentials={"username": flower.username, "password": flower.password},
    )
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()
