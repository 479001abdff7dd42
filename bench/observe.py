"""Metrics and tracing in the bench's spawned stack: the scraper that records the metrics, and the span sink.

With ``--metrics`` each spawned process group counts and serves its metrics
as `make run` sets it up (PROMETHEUS_MULTIPROC_DIR and METRICS_PORT per group,
testing.workers.Workers.metrics_env); `Scraper` reads every group's
endpoint once per interval in a thread and keeps the samples, written to
``--metrics-out`` as JSON (`scripts/plot_metrics.py` draws them). With
``--tracing`` the processes export their spans to a `testing.otlp.Collector`
that only counts them.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

#: Families kept in the samples file: orderflow's own and django-prometheus's HTTP ones
#: (not the interpreter's gc and process families every exporter adds).
KEPT_PREFIXES = ("orderflow_", "django_http_")


def parse(text: str) -> list[list]:
    """The kept samples of a Prometheus text exposition: ``[[name, {label: value}, value], ...]``.

    ``_created`` samples (a series' creation time, not a count) are left out.
    """
    samples = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(KEPT_PREFIXES):
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                samples.append([sample.name, dict(sample.labels), sample.value])
    return samples


class Scraper:
    """Scrapes ``http://127.0.0.1:<port>/metrics`` of each group every `interval` seconds, from a thread.

    `endpoints`: group name ("web", "orders", ...) -> port. Each scrape is
    recorded as ``{"t": epoch seconds, "group": name, "samples": [...]}``
    (`parse`), or with ``"error"`` instead of samples when the endpoint did not
    answer within `timeout` s. `mark(name)` records a phase's start (warm-up,
    floor, saga, end) on the same clock, so a plot can show the measured window.
    """

    def __init__(self, endpoints: dict[str, int], *, interval: float = 1.0, timeout: float = 5.0) -> None:
        self.endpoints = dict(endpoints)
        self.interval = interval
        self.timeout = timeout
        self.scrapes: list[dict] = []
        self.phases: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)

    def scrape(self, group: str) -> dict:
        """One scrape of `group`'s endpoint, as recorded."""
        at = time.time()
        url = f"http://127.0.0.1:{self.endpoints[group]}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as answer:
                return {"t": at, "group": group, "samples": parse(answer.read().decode())}
        except OSError as exc:
            return {"t": at, "group": group, "error": str(exc)}

    def answering(self) -> bool:
        """Whether every endpoint answers now (the exporters start a moment after their processes)."""
        return all("error" not in self.scrape(group) for group in self.endpoints)

    def mark(self, phase: str) -> None:
        self.phases.append({"name": phase, "t": time.time()})

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            for group in self.endpoints:
                self.scrapes.append(self.scrape(group))  # list.append is atomic
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after one last scrape of every group (the counts at the end of the run)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for group in self.endpoints:
            self.scrapes.append(self.scrape(group))

    def write(self, path: Path, **about) -> None:
        """The samples file: `about` (run id, options), the endpoints, the phases and every scrape."""
        document = {
            **about,
            "interval": self.interval,
            "endpoints": self.endpoints,
            "phases": self.phases,
            "scrapes": self.scrapes,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, separators=(",", ":"), default=str))

    def summary(self) -> dict:
        """For the report: scrapes made and failed per group."""
        made: dict[str, dict[str, int]] = {group: {"scrapes": 0, "failed": 0} for group in self.endpoints}
        for scrape in self.scrapes:
            made[scrape["group"]]["scrapes"] += 1
            made[scrape["group"]]["failed"] += "error" in scrape
        return made
