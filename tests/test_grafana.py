"""deploy/grafana/orderflow.json asks only for metrics and labels that the processes export.

The names exported are read from the metric objects themselves: project/metrics.py's
counters and histograms, django-prometheus's middleware and database metrics, and the families
the two scrape-time collectors yield (the order gauges read from a real database).
No worker, no scrape: cheap enough to run with every change to the dashboard.
"""

import json
import re

import pytest
from django_prometheus import db as django_prometheus_db
from django_prometheus.middleware import Metrics
from prometheus_client.metrics import MetricWrapperBase

from orders.metrics import OrderStateCollector
from project import metrics
from project.celery import app
from testing import BASE_DIR

DASHBOARD = BASE_DIR / "deploy" / "grafana" / "orderflow.json"
#: Labels Prometheus adds to every series it scrapes (deploy/prometheus/prometheus.yml).
TARGET_LABELS = {"job", "instance", "service"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def _wrapper_samples(wrapper: MetricWrapperBase) -> dict[str, set[str]]:
    """The sample names a prometheus-client metric object exports, each with its label names."""
    labels = set(wrapper._labelnames)
    name = wrapper._name
    if wrapper._type == "counter":
        return {f"{name}_total": labels}
    if wrapper._type == "histogram":
        return {f"{name}_bucket": labels | {"le"}, f"{name}_count": labels, f"{name}_sum": labels}
    if wrapper._type == "gauge":
        return {name: labels}
    raise AssertionError(f"{name}: a {wrapper._type} the dashboard test does not know")


def exported() -> dict[str, set[str]]:
    """Every sample name orderflow's exporters serve, with its label names."""
    wrappers = [value for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)]
    wrappers += [value for value in vars(Metrics.get_instance()).values() if isinstance(value, MetricWrapperBase)]
    # Its database engines' (settings.py takes them with metrics on, METRICS_DATABASE).
    wrappers += [value for value in vars(django_prometheus_db).values() if isinstance(value, MetricWrapperBase)]
    names: dict[str, set[str]] = {}
    for wrapper in wrappers:
        names.update(_wrapper_samples(wrapper))
    # The scrape-time gauges: the order states from the database, queue depth from the broker
    # (no queue asked here: the family is yielded whether or not the broker answers).
    families = [*OrderStateCollector().collect(), *metrics.QueueDepthCollector(app, []).collect()]
    for family in families:
        assert family.type == "gauge", family.name
        names[family.name] = set(family._labelnames)
    return names


def queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, expr, legend format) of every target of every panel, rows' own panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"], target.get("legendFormat", "")))
    return found


def names_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names a PromQL expression uses (the forms the dashboard writes)."""
    labels: set[str] = set()
    expr = re.sub(r'"[^"]*"', '""', expr)
    for listed in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in listed.split(",") if label.strip()}
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges, $__rate_interval
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        if not match.group(2) and match.group(1) not in PROMQL_WORDS:
            names.add(match.group(1))
    return names, labels


def test_names_and_labels_reads_the_forms_the_dashboard_writes():
    expr = 'histogram_quantile(0.95, sum by (le, task) (rate(a_bucket{cause="x"}[$__rate_interval]))) / max(b)'
    assert names_and_labels(expr) == ({"a_bucket", "b"}, {"le", "task", "cause"})


def test_the_dashboard_is_grafana_json_with_the_datasource_a_variable():
    dashboard = json.loads(DASHBOARD.read_text())

    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            assert all(target["datasource"] == panel["datasource"] for target in panel["targets"]), panel["title"]


@pytest.mark.django_db(transaction=True)
def test_every_query_names_metrics_and_labels_that_are_exported():
    names = exported()
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()

    for title, expr, legend in queries(dashboard):
        metric_names, labels = names_and_labels(expr)
        unknown = metric_names - set(names)
        assert not unknown, f"{title}: {expr} names {unknown}, which nothing exports"
        known_labels = TARGET_LABELS.union(*(names[name] for name in metric_names))
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert labels | legend_labels <= known_labels, f"{title}: {expr} uses labels {labels - known_labels}"
        used |= metric_names

    # Every family orderflow counts has a panel (django-prometheus's: the HTTP and database ones the dashboard shows).
    families = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in used}
    ours = {re.sub(r"_(bucket|count|sum|total)$", "", name) for name in names if name.startswith("orderflow_")}
    assert ours <= families, f"no panel for {ours - families}"
    assert {"django_db_execute", "django_db_query_duration_seconds", "django_db_errors"} <= families
