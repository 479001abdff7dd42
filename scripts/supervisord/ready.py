"""Print `make run`'s "ready" banner once every process is up, /readyz answers 200 and every worker pings back.

Run by supervisord as the `ready` program (scripts/supervisord/supervisord.conf),
so the start-up lines of every process come first and the banner with every URL
last. The processes' states come from supervisord itself (its XML-RPC interface,
through the SUPERVISOR_SERVER_URL it gives its children);
a Celery worker counts once it answers a ping (`app.control.ping`): supervisord
calls it RUNNING after a few seconds, before it consumes.
The banner's text is ORDERFLOW_READY_BANNER (the Makefile builds it); PORT is the
web port. Gives up after READY_WAIT_SECONDS (default 180) and says what is not up.
"""

import os
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client

import django
from supervisor.xmlrpc import SupervisorTransport

sys.path.insert(0, os.getcwd())  # supervisord starts this in the checkout (directory=)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django.setup()

from project.celery import app  # noqa: E402 (after django.setup)

url = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}/readyz"
deadline = time.monotonic() + float(os.environ.get("READY_WAIT_SECONDS", "180"))
me = os.environ.get("SUPERVISOR_PROCESS_NAME", "ready")
# childutils.getRPCInterface, with the credentials the configuration gives this program.
supervisor = xmlrpc.client.ServerProxy(
    "http://127.0.0.1",
    SupervisorTransport(
        os.environ.get("SUPERVISOR_USERNAME", ""),
        os.environ.get("SUPERVISOR_PASSWORD", ""),
        os.environ["SUPERVISOR_SERVER_URL"],
    ),
).supervisor


def readyz() -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def workers_answering() -> int:
    return len(app.control.ping(timeout=1.0))


while True:
    states = {p["name"]: p["statename"] for p in supervisor.getAllProcessInfo() if p["name"] != me}
    not_up = {name: state for name, state in states.items() if state != "RUNNING"}
    status = None if not_up else readyz()
    workers = sum(name.startswith("worker") for name in states)
    if status == 200 and workers_answering() < workers:
        status = "200, but not every worker answers a ping yet"
    if status == 200:
        print(os.environ.get("ORDERFLOW_READY_BANNER", "orderflow is ready"), flush=True)
        sys.exit(0)
    if time.monotonic() > deadline or "FATAL" in not_up.values():
        problems = ", ".join(f"{name} {state}" for name, state in sorted(not_up.items())) or f"{url} answered {status}"
        print(f"\norderflow is NOT ready: {problems}; see the lines above\n", flush=True)
        sys.exit(0)
    time.sleep(0.5)
