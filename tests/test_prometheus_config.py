"""deploy/prometheus/: the scrape configurations and alert rules are valid and cover every process group.

Read with PyYAML (every rule complete; every group that prometheus.yml and
prometheus-local.yml scrape has a missing-target rule), then checked by
promtool, Debian's prometheus package (`make install-prometheus`): `check
config`, `check rules`, and the alerts' unit tests in
tests/prometheus/alerts_test.yml (series that go down or vanish, the alerts
that must fire). Without promtool those are skipped, except under CI=true.
No process, no database: cheap to run with every change to the rules.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from testing import BASE_DIR

pytestmark = pytest.mark.shape_independent

PROMETHEUS_DIR = BASE_DIR / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
SCRAPE_CONFIGS = {"compose": PROMETHEUS_DIR / "prometheus.yml", "make run": PROMETHEUS_DIR / "prometheus-local.yml"}
ALERT_TESTS = BASE_DIR / "tests" / "prometheus" / "alerts_test.yml"
#: The process groups that serve metrics (docs/operations.md, "Metrics"): (job, service or None).
GROUPS = {
    ("orderflow-web", None),
    ("orderflow-worker", "orders"),
    ("orderflow-worker", "inventory"),
    ("orderflow-worker", "reports"),
    ("orderflow-beat", None),
}


def load(path) -> dict:
    return yaml.safe_load(path.read_text())


def rules() -> list[dict]:
    return [rule for group in load(ALERTS)["groups"] for rule in group["rules"]]


def scraped_groups(config: dict) -> set[tuple[str, str | None]]:
    """(job, service) of every target group a configuration scrapes, service as its labels or relabelling give it."""
    groups = set()
    for job in config["scrape_configs"]:
        name = job["job_name"]
        for static in job.get("static_configs", []):
            groups.add((name, static.get("labels", {}).get("service")))
        relabels = {rule.get("target_label"): rule for rule in job.get("relabel_configs", [])}
        for dns in job.get("dns_sd_configs", []):
            for dns_name in dns["names"]:
                service = None
                if "service" in relabels:  # worker-(.*) -> service
                    match = re.fullmatch(relabels["service"]["regex"], dns_name)
                    service = match.group(1) if match else None
                groups.add((name, service))
    return groups


def absent_groups(expr: str) -> set[tuple[str, str | None]]:
    """(job, service) of every absent(up{...}) in `expr`."""
    groups = set()
    for matchers in re.findall(r"absent\(up\{([^}]*)\}\)", expr):
        labels = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', matchers))
        groups.add((labels["job"], labels.get("service")))
    return groups


def test_every_rule_is_complete():
    found = rules()
    assert found
    for rule in found:
        name = rule.get("alert")
        assert name and name.startswith("Orderflow"), rule
        assert rule.get("expr", "").strip(), name
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        assert rule.get("annotations", {}).get("summary"), name
    names = [rule["alert"] for rule in found]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("shape", SCRAPE_CONFIGS)
def test_every_scraped_group_has_a_missing_target_rule(shape):
    """A group whose targets all vanish (compose: its containers gone from the DNS name) still alerts."""
    assert scraped_groups(load(SCRAPE_CONFIGS[shape])) == GROUPS
    missing = [rule for rule in rules() if "absent(" in rule["expr"]]
    covered = set().union(*(absent_groups(rule["expr"]) for rule in missing))
    assert covered == GROUPS
    # And `up == 0` still covers a target that is listed but does not answer (a static one).
    assert any(re.search(r'up\{job=~"orderflow-\.\*"\}\s*==\s*0', rule["expr"]) for rule in rules())


def test_make_run_targets_are_the_ports_make_run_gives():
    """prometheus-local.yml's targets: PORT (8000) + 90, + 190, + 290, + 390, + 490 (scripts/supervisord)."""
    config = load(SCRAPE_CONFIGS["make run"])
    targets = {
        (job["job_name"], static.get("labels", {}).get("service")): static["targets"]
        for job in config["scrape_configs"]
        for static in job["static_configs"]
    }
    assert targets == {
        ("orderflow-web", None): ["127.0.0.1:8090"],
        ("orderflow-worker", "orders"): ["127.0.0.1:8190"],
        ("orderflow-worker", "inventory"): ["127.0.0.1:8290"],
        ("orderflow-worker", "reports"): ["127.0.0.1:8390"],
        ("orderflow-beat", None): ["127.0.0.1:8490"],
    }
    # What make run gives each program: scripts/supervisord/configure.sh renders the Procfile as make run does.
    assert _make_run_metrics_ports() == {
        "web": "8090",
        "worker_orders": "8190",
        "worker_inventory": "8290",
        "worker_reports": "8390",
        "beat": "8490",
    }


def _make_run_metrics_ports() -> dict[str, str]:
    """Program -> METRICS_PORT in the supervisord configuration make run writes for PORT=8000."""
    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        env.pop("NGINX_LISTEN", None)
        done = subprocess.run(
            ["sh", "scripts/supervisord/configure.sh", directory, "8000"],
            capture_output=True, text=True, timeout=60, cwd=BASE_DIR, env=env, check=True,
        )  # fmt: skip
        conf = Path(done.stdout.strip()).read_text()
    ports = {}
    for program, body in re.findall(r"^\[program:([^\]]+)\]\n(.*?)(?=^\[|\Z)", conf, re.M | re.S):
        port = re.search(r'METRICS_PORT="(\d+)"', body)
        if port:
            ports[program] = port.group(1)
    return ports


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("promtool is not installed, and CI must run these checks (make install-prometheus)")
    pytest.skip("promtool is not installed (make install-prometheus installs Debian's prometheus, as root)")


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=BASE_DIR)
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_promtool_accepts_the_configurations_and_rules(promtool):
    run(promtool, "check", "rules", str(ALERTS))
    # The compose file's rule_files is the container's path (/etc/prometheus/alerts.yml): syntax only.
    run(promtool, "check", "config", "--syntax-only", str(SCRAPE_CONFIGS["compose"]))
    # make run's names alerts.yml beside it: checked with its rules.
    assert "1 rule files found" in run(promtool, "check", "config", str(SCRAPE_CONFIGS["make run"]))


def test_alerts_fire_when_a_target_goes_down_or_vanishes(promtool):
    """tests/prometheus/alerts_test.yml: up == 0, a group with no target left, one replica of three gone."""
    assert "SUCCESS" in run(promtool, "test", "rules", str(ALERT_TESTS))


def compose() -> dict:
    return load(BASE_DIR / "docker-compose.yml")


def test_compose_observability_profile_is_optional_pinned_and_loopback_only():
    """`prometheus` and `grafana` start only with --profile observability, on 127.0.0.1, with the repo's files."""
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        service = services[name]
        assert service["profiles"] == ["observability"], name
        image, _, tag = service["image"].rpartition(":")
        assert image and tag and tag != "latest", service["image"]
        assert service["ports"] and all(port.startswith("127.0.0.1:") for port in service["ports"]), name
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (BASE_DIR / source).exists(), f"{name}: {source}"
    # Nothing else needs the profile: `docker compose up` without it starts the app as before.
    assert [name for name, service in services.items() if "profiles" in service] == ["prometheus", "grafana"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounts["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"
    assert load(SCRAPE_CONFIGS["compose"])["rule_files"] == ["/etc/prometheus/alerts.yml"]
    # Grafana's data source is that service, its dashboard the repo's.
    provisioning = BASE_DIR / "deploy" / "grafana" / "provisioning"
    (source,) = load(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert (source["type"], source["url"], source["isDefault"]) == ("prometheus", "http://prometheus:9090", True)
    (provider,) = load(provisioning / "dashboards" / "orderflow.yml")["providers"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in services["grafana"]["volumes"]}
    assert mounts[f"{provider['options']['path']}/orderflow.json"] == "./deploy/grafana/orderflow.json"


def test_every_compose_service_that_serves_metrics_is_scraped():
    """Each service with METRICS_PORT set is a DNS name prometheus.yml scrapes on that port."""
    services = compose()["services"]
    serving = {name: service["environment"]["METRICS_PORT"] for name, service in services.items()
               if "METRICS_PORT" in (service.get("environment") or {})}  # fmt: skip
    assert set(serving) == {"web", "worker-orders", "worker-inventory", "worker-reports", "beat"}
    scraped = {
        name: str(dns["port"])
        for job in load(SCRAPE_CONFIGS["compose"])["scrape_configs"]
        for dns in job.get("dns_sd_configs", [])
        for name in dns["names"]
    }
    assert scraped == serving
    for name in serving:
        assert services[name]["expose"] == [serving[name]], name
        assert "ports" not in services[name], name
