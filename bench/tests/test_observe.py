"""The bench's scraper (bench/observe.py) and what scripts/plot_metrics.py computes from its samples.

Real prometheus-client exporters in this process stand in for the spawned
groups' (the same `start_http_server` the groups serve with); the spawned
stack with metrics and tracing on is test_bench.py's.
"""

import json
import runpy
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from bench.isolation import BenchFailed
from bench.observe import Scraper, parse
from bench.run import BenchOptions, run
from testing import BASE_DIR, wait_for
from testing.instances import free_port

PLOT = runpy.run_path(str(BASE_DIR / "scripts" / "plot_metrics.py"))


@pytest.fixture
def exporter():
    """An exporter with a counter and a histogram, as a group serves them; yields (port, counter, histogram)."""
    registry = CollectorRegistry()
    placed = Counter("orderflow_orders_placed_total", "placed", registry=registry)
    latency = Histogram(
        "orderflow_order_confirmed_latency_seconds", "latency", buckets=(0.1, 1, float("inf")), registry=registry
    )
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield port, placed, latency
    server.shutdown()
    thread.join()


def test_parse_keeps_orderflow_and_http_samples_without_created():
    text = (
        "# TYPE orderflow_orders_placed counter\norderflow_orders_placed_total 3.0\n"
        "orderflow_orders_placed_created 1.7e9\n"
        '# TYPE python_gc_collections counter\npython_gc_collections_total{generation="0"} 9.0\n'
        "# TYPE django_http_requests_total_by_method counter\n"
        'django_http_requests_total_by_method_total{method="POST"} 2.0\n'
    )
    assert parse(text) == [
        ["orderflow_orders_placed_total", {}, 3.0],
        ["django_http_requests_total_by_method_total", {"method": "POST"}, 2.0],
    ]


def test_the_scraper_records_every_group_each_interval_and_marks_phases(exporter, tmp_path):
    port, placed, latency = exporter
    scraper = Scraper({"web": port, "orders": port}, interval=0.1)
    assert scraper.answering()
    scraper.start()
    scraper.mark("saga")
    for _ in range(20):
        placed.inc()
        latency.observe(0.5)
        time.sleep(0.02)
    wait_for(lambda: len(scraper.scrapes) >= 8, timeout=10)
    scraper.mark("end")
    scraper.stop()
    scraper.write(tmp_path / "m.json", run_id="r1")

    document = json.loads((tmp_path / "m.json").read_text())
    assert [phase["name"] for phase in document["phases"]] == ["saga", "end"]
    assert document["endpoints"] == {"web": port, "orders": port}
    groups = [scrape["group"] for scrape in document["scrapes"]]
    assert groups == ["web", "orders"] * (len(groups) // 2)  # rounds of every group, in order
    last = document["scrapes"][-1]["samples"]
    assert ["orderflow_orders_placed_total", {}, 20.0] in last
    assert ["orderflow_order_confirmed_latency_seconds_bucket", {"le": "1.0"}, 20.0] in last
    assert scraper.summary() == {
        "web": {"scrapes": len(groups) // 2, "failed": 0},
        "orders": {"scrapes": len(groups) // 2, "failed": 0},
    }
    # Summed over the two groups (here the same exporter twice): 40 placed, all within the run.
    data = PLOT["rounds"](document)
    assert PLOT["summed"](data[-1][1], "orderflow_orders_placed_total") == {(): 40.0}


def test_a_group_that_does_not_answer_is_recorded_as_failed():
    scraper = Scraper({"web": free_port()}, interval=0.1, timeout=1)
    assert not scraper.answering()
    assert "error" in scraper.scrape("web")


def _document(points: list[tuple[float, float, dict[str, float]]]) -> dict:
    """Scrapes of one group: (time, placed so far, cumulative latency buckets)."""
    scrapes = []
    for t, count, buckets in points:
        samples = [["orderflow_orders_placed_total", {}, count]]
        samples += [["orderflow_order_confirmed_latency_seconds_bucket", {"le": le}, n] for le, n in buckets.items()]
        scrapes.append({"t": t, "group": "web", "samples": samples})
    return {"endpoints": {"web": 1}, "interval": 1.0, "scrapes": scrapes}


def test_rates_and_quantiles_are_computed_as_prometheus_does():
    data = PLOT["rounds"](
        _document(
            [
                (0.0, 0, {"0.1": 0, "1.0": 0, "+Inf": 0}),
                (1.0, 10, {"0.1": 10, "1.0": 10, "+Inf": 10}),
                (2.0, 30, {"0.1": 10, "1.0": 30, "+Inf": 30}),
                (3.0, 60, {"0.1": 10, "1.0": 30, "+Inf": 60}),
            ]
        )
    )

    times, rates = PLOT["rate"](data, "orderflow_orders_placed_total", window=1.0)[()]
    assert (times, rates) == ([1.0, 2.0, 3.0], [10.0, 20.0, 30.0])
    latency = PLOT["quantiles"](data, 0.5, "orderflow_order_confirmed_latency_seconds", window=1.0)[()]
    # Second 1: every observation under 0.1 -> the median interpolated halfway into (0, 0.1];
    # second 2: all 20 in (0.1, 1] -> halfway into it; second 3: all 30 above 1 -> the highest finite bound.
    assert latency == ([1.0, 2.0, 3.0], [0.05, 0.55, 1.0])
    assert PLOT["quantile"](0.9, {0.1: 0.0, 1.0: 0.0, float("inf"): 0.0}) is None


def test_the_plot_is_drawn_from_a_samples_file(tmp_path):
    pytest.importorskip("matplotlib")  # requirements-bench.txt
    samples = tmp_path / "m.json"
    samples.write_text(json.dumps(_document([(t, t * 10, {"0.1": t, "1.0": 2 * t, "+Inf": 2 * t}) for t in range(6)])))

    subprocess.run(
        [sys.executable, "scripts/plot_metrics.py", str(samples), "-o", str(tmp_path / "m.png")],
        cwd=BASE_DIR,
        check=True,
        capture_output=True,
    )

    assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG")


def test_metrics_and_tracing_need_the_spawned_stack():
    for options in (BenchOptions(metrics=True), BenchOptions(tracing=True), BenchOptions(metrics_out="x.json")):
        with pytest.raises(BenchFailed, match="add --spawn"):
            run(options)
