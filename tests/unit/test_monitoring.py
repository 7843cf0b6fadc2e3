"""manifests/monitoring/: the alerts run by promtool on made-up series, and every series the alerts and the
dashboard read is one vmop exports, named as its registry names it.

The metric names are taken from the operator's own prometheus-client registry, so that a renamed metric or
label value fails here rather than leaving an alert that can never fire. Each alert is tested firing and
not firing, at the edge of its threshold and of its `for`, so that a wrong threshold or duration fails.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.metrics import Metrics
from testbed.controlplane import find_binaries

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "manifests" / "monitoring"
PROMTOOL = "/usr/bin/promtool"
# Labels the scrape adds (podmonitor.yaml), not the operator.
SCRAPE_LABELS = {"job", "instance", "node"}
# Series Prometheus makes itself; everything else must come from vmop.
PROMETHEUS_OWN = {"up"}


def load_yaml(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((MONITORING / name).read_text())
    return loaded


def groups() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = load_yaml("prometheusrule.yaml")["spec"]["groups"]
    return found


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups() for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def exported() -> dict[str, list[dict[str, str]]]:
    """Each sample name the operator exports (counters' _total, histograms' _bucket, ...) with its label sets."""
    samples: dict[str, list[dict[str, str]]] = defaultdict(list)
    for family in Metrics().registry.collect():
        for sample in family.samples:
            samples[sample.name].append(sample.labels)
    return samples


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"')
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The series selectors of a PromQL expression: (metric name, [(label, operator, value)]).

    Enough PromQL for these files: range durations and grouping clauses are dropped first, since their
    words are not metric names, and a word followed by "(" is a function or an aggregation."""
    text = _GROUPING.sub(" ", re.sub(r"\[[^\]]*\]", " ", expr))
    found = []
    for match in _SELECTOR.finditer(text):
        name, braces = match.group(1), match.group(2)
        if name in _KEYWORDS or (not braces and text[match.end() :].lstrip().startswith("(")):
            continue
        found.append((name, _MATCHER.findall(braces or "")))
    return found


def unknown_series(expr: str, samples: dict[str, list[dict[str, str]]]) -> list[str]:
    """What in expr names a series, label or label value that nothing exports."""
    problems = []
    for name, matchers in selectors(expr):
        if name in PROMETHEUS_OWN:
            problems += [f"{name}: label {label}" for label, _, _ in matchers if label not in SCRAPE_LABELS]
            continue
        if name not in samples:
            problems.append(f"{name}: not exported")
            continue
        for label, operator, value in matchers:
            if label in SCRAPE_LABELS:
                continue
            values = {labels[label] for labels in samples[name] if label in labels}
            if not values:
                problems.append(f"{name}: no label {label}")
            elif operator == "=" and value not in values:
                problems.append(f"{name}: {label}={value!r} is never exported (only {sorted(values)})")
    return problems


def test_the_expression_reader_finds_what_it_must() -> None:
    """The checks below are only as good as this reader: a metric it missed would go unchecked."""
    expr = 'sum by (node, le) (rate(a_bucket{le="1.0", node=~"$node"}[$__rate_interval])) - b and on (x) c == 1'
    assert selectors(expr) == [("a_bucket", [("le", "=", "1.0"), ("node", "=~", "$node")]), ("b", []), ("c", [])]


def test_every_series_the_alerts_read_is_exported() -> None:
    samples = exported()
    problems = {name: unknown_series(rule["expr"], samples) for name, rule in alerts().items()}
    assert {name: found for name, found in problems.items() if found} == {}


def test_every_series_the_dashboard_reads_is_exported() -> None:
    samples = exported()
    problems = [problem for expr in dashboard_exprs() for problem in unknown_series(expr, samples)]
    node_variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "node")
    query = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", node_variable["query"]["query"])
    assert query is not None
    assert query.group(1) in samples
    assert query.group(2) in SCRAPE_LABELS
    assert problems == []


def test_a_misnamed_series_would_be_caught() -> None:
    """The operator's registry names le "1.0", not "1"; counters end in _total."""
    samples = exported()
    assert unknown_series('vmop_forced_stop_after_deadline_seconds_bucket{le="1"}', samples)
    assert unknown_series("vmop_shutdowns", samples)
    assert unknown_series('vmop_shutdowns_total{outcome="Graceful"}', samples) == []


def test_the_dashboard_has_its_variables_and_every_panel_a_query() -> None:
    board = dashboard()
    assert board["schemaVersion"] == 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["node"]["type"] == "query"
    assert board["panels"]
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            # Every query follows the node picker (up is the scrape's, which carries the node too).
            assert 'node=~"$node"' in target["expr"], panel["title"]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_rules_and_the_dashboards_queries(tmp_path: Path) -> None:
    """Syntax, templates and label names of the rules; the dashboard's queries as recording rules, with
    Grafana's variables given values, since promtool has no other way to parse a bare expression."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups()}))
    recorded = [
        {"record": f"dashboard:query{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$node", ".*")}
        for i, expr in enumerate(dashboard_exprs())
    ]
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    result = promtool("check", "rules", "rules.yaml", "dashboard.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_pages_with_a_severity_and_says_where() -> None:
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
        if name != "VmopOperatorAbsent":  # absent() has no node to name
            assert "{{ $labels.node }}" in rule["annotations"]["summary"], name


def series(name: str, node: str, instance: str = "10.0.0.1:9090", **labels: str) -> str:
    every = {"job": "vmop", "instance": instance, "node": node, **labels}
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in every.items()) + "}"


def at(node: str, severity: str = "warning", **labels: str) -> dict[str, str]:
    return {"node": node, "severity": severity, **labels}


N1, N2 = "10.0.0.1:9090", "10.0.0.2:9090"
DOWN = {"job": "vmop", "instance": N1}
FORCED = "vmop_shutdowns_total"
LATE_COUNT, LATE_BUCKET = (
    "vmop_forced_stop_after_deadline_seconds_count",
    "vmop_forced_stop_after_deadline_seconds_bucket",
)

# Per alert: input series (1 sample a minute) and the alerts expected at each evaluation time.
SCENARIOS: dict[str, tuple[dict[str, str], list[tuple[str, list[dict[str, str]]]]]] = {
    # n1 stops answering at 5m; n2 answers throughout. Pending 5m, then firing.
    "VmopOperatorDown": (
        {series("up", "n1", N1): "1x4 0x10", series("up", "n2", N2): "1x14"},
        [("9m", []), ("10m", [at("n1", "critical", **DOWN)])],
    ),
    # The last target goes at 3m (a stale marker): absent from then, firing 10m later.
    "VmopOperatorAbsent": (
        {series("up", "n1", N1): "1x2 stale"},
        [("2m", []), ("12m", []), ("13m", [{"job": "vmop", "severity": "critical"}])],
    ),
    # n1 has an active copy beside a standby (no alert); n2 only a standby.
    "VmopNodeNotActing": (
        {
            series("vmop_node_lock_held", "n1", N1): "1x10",
            series("vmop_node_lock_held", "n1", N2): "0x10",
            series("vmop_node_lock_held", "n2", "10.0.0.3:9090"): "0x10",
        },
        [("4m", []), ("5m", [at("n2")])],
    ),
    # The active copy of n1 loses libvirt at 1m; its standby, never connected, does not page.
    "VmopLibvirtDisconnected": (
        {
            series("vmop_libvirt_connected", "n1", N1): "1 0x10",
            series("vmop_node_lock_held", "n1", N1): "1x11",
            series("vmop_libvirt_connected", "n1", N2): "0x11",
            series("vmop_node_lock_held", "n1", N2): "0x11",
        },
        [("1m", []), ("2m", [at("n1", "critical", **DOWN)])],
    ),
    # n1 has a VM overdue from 1m on; n2's is overdue for 3 minutes only (forced by a person), then again.
    "VmopShutdownOverdue": (
        {
            series("vmop_virtual_machines_shutdown_overdue", "n1", N1): "0 1x20",
            series("vmop_virtual_machines_shutdown_overdue", "n2", N2): "0 1x3 0x5 1x3",
        },
        [("5m", []), ("6m", [at("n1")]), ("12m", [at("n1")])],
    ),
    # 6 forced stops an hour on n1 (over the threshold of 5), 4.8 on n2; graceful ones never count.
    "VmopForcedStopsRising": (
        {
            series(FORCED, "n1", outcome="Forced"): "0+0.1x120",
            series(FORCED, "n2", N2, outcome="Forced"): "0+0.08x120",
            series(FORCED, "n2", N2, outcome="Graceful"): "0+1x120",
        },
        [("120m", [at("n1")])],
    ),
    # Every forced stop of n1 lands within a second of its deadline; one of n2's, at 30m, does not.
    "VmopForcedStopLate": (
        {
            series(LATE_COUNT, "n1"): "0+1x60",
            series(LATE_BUCKET, "n1", le="1.0"): "0+1x60",
            series(LATE_COUNT, "n2", N2): "0x29 1x31",
            series(LATE_BUCKET, "n2", N2, le="1.0"): "0x60",
        },
        [("29m", []), ("45m", [at("n2")])],
    ),
    # One unexpected error on n1 at 11m; a stream of failed starts on n2 is not a bug.
    "VmopReconcileBug": (
        {
            series("vmop_reconcile_errors_total", "n1", kind="unexpected"): "0x10 1x10",
            series("vmop_reconcile_errors_total", "n2", N2, kind="Start"): "0+1x20",
            series("vmop_reconcile_errors_total", "n2", N2, kind="unexpected"): "0x20",
        },
        [("10m", []), ("11m", [at("n1")])],
    ),
    # 2 failed steps a minute on n1 (over 15 in 15 minutes from 8m on); 0.9 a minute on n2 (13.5).
    "VmopReconcileErrorsRising": (
        {
            series("vmop_reconcile_errors_total", "n1", kind="Start"): "0+1x60",
            series("vmop_reconcile_errors_total", "n1", kind="ForceOff"): "0+1x60",
            series("vmop_reconcile_errors_total", "n2", N2, kind="Start"): "0+0.9x60",
        },
        [("22m", []), ("23m", [at("n1")]), ("60m", [at("n1")])],
    ),
}


def test_every_alert_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(alerts())


@pytest.mark.parametrize("alert", sorted(SCENARIOS))
def test_alert_fires_when_it_must_and_not_before(alert: str, tmp_path: Path) -> None:
    inputs, expectations = SCENARIOS[alert]
    # Annotations are left out here: promtool compares them whole, and `check rules` has parsed them.
    stripped = [
        {**group, "rules": [{k: v for k, v in rule.items() if k != "annotations"} for rule in group["rules"]]}
        for group in groups()
    ]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": stripped}))
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in inputs.items()],
                "alert_rule_test": [
                    {
                        "eval_time": time,
                        "alertname": alert,
                        "exp_alerts": [{"exp_labels": labels} for labels in expected],
                    }
                    for time, expected in expectations
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomize_renders_the_rules_the_scrape_and_the_dashboard_configmap() -> None:
    kubectl = find_binaries() / "kubectl"
    rendered = subprocess.run(
        [str(kubectl), "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    objects = {doc["kind"]: doc for doc in yaml.safe_load_all(rendered)}
    assert set(objects) == {"ConfigMap", "PodMonitor", "PrometheusRule"}
    assert {doc["metadata"]["namespace"] for doc in objects.values()} == {"vmop-system"}
    config_map = objects["ConfigMap"]
    assert config_map["metadata"]["name"] == "vmop-dashboard"
    assert config_map["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert json.loads(config_map["data"]["dashboard.json"]) == dashboard()
    assert objects["PrometheusRule"]["spec"]["groups"] == groups()


def test_the_scrape_selects_the_daemonsets_pods_under_the_job_the_rules_read() -> None:
    monitor = load_yaml("podmonitor.yaml")["spec"]
    daemonset = yaml.safe_load((ROOT / "manifests" / "daemonset.yaml").read_text())
    pod = daemonset["spec"]["template"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {port["name"] for container in pod["spec"]["containers"] for port in container["ports"]}
    assert {endpoint["port"] for endpoint in monitor["podMetricsEndpoints"]} <= ports
    assert pod["metadata"]["labels"][monitor["jobLabel"]] == "vmop"
    assert all('job="vmop"' in rule["expr"] for rule in alerts().values() if "up{" in rule["expr"])
    relabel = monitor["podMetricsEndpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in relabel
