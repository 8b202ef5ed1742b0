"""deploy/: the alert rules and the Grafana dashboard parse, are well formed, cover what an
operator must hear about, and name only metrics (and labels) that tierq exports.
(tests/e2e/test_queue_metrics.py checks the same names against a running app's /metrics.)"""

from __future__ import annotations

import re
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from deploy_files import (
    ALERTS,
    DASHBOARD,
    METRIC,
    PROMETHEUS,
    alert_rules,
    dashboard,
    deploy_metric_names,
    exported_names,
    expressions,
    load_yaml,
)
from tierq.observability.metrics import Metrics

SELECTOR = re.compile(r"\b(tierq_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
DURATION = re.compile(r"^\d+[smhd]$")


def wrappers(metrics: Metrics) -> list[MetricWrapperBase]:
    found: list[MetricWrapperBase] = []
    for value in vars(metrics).values():
        values = value.values() if isinstance(value, dict) else [value]
        found += [v for v in values if isinstance(v, MetricWrapperBase)]
    return found


def exported_labels() -> dict[str, set[str]]:
    """Sample name → its label names, for every metric of the app and the broker."""
    labels: dict[str, set[str]] = {}
    for metric in wrappers(Metrics()):
        names = set(metric._labelnames)  # the client keeps them private
        (family,) = metric.describe()
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
        }.get(family.type, [""])
        for suffix in suffixes:
            labels[family.name + suffix] = names | ({"le"} if suffix == "_bucket" else set())
    return labels


def test_every_metric_named_is_in_the_registry() -> None:
    labels = exported_labels()
    names = deploy_metric_names()
    assert len(names) >= 15
    assert sorted(names - set(labels)) == []
    assert exported_names(Metrics().render().decode()) >= names  # and in its exposition


@pytest.mark.parametrize("expr", expressions())
def test_labels_used_exist(expr: str) -> None:
    labels = exported_labels()
    for name, matchers in SELECTOR.findall(expr):
        for label in MATCHER.findall(matchers):
            assert label in labels[name], (name, label)
    allowed = set().union(*(labels[n] for n in METRIC.findall(expr)))
    for group in BY.findall(expr):
        for label in (x.strip() for x in group.split(",")):
            assert label in allowed, (label, expr)


def test_alert_rules_are_well_formed() -> None:
    groups = load_yaml(ALERTS)["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"Tierq[A-Z][A-Za-z]+", rule["alert"])
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
        assert "for" not in rule or DURATION.match(rule["for"])
        assert expr_balanced(str(rule["expr"])), rule["alert"]


def expr_balanced(expr: str) -> bool:
    depth = {"(": 0, "{": 0, "[": 0}
    closing = {")": "(", "}": "{", "]": "["}
    for char in expr:
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            if depth[closing[char]] < 0:
                return False
    return not any(depth.values())


def alert_metrics(*alerts: str) -> set[str]:
    by_name = {r["alert"]: str(r["expr"]) for r in alert_rules()}
    return {m for a in alerts for m in METRIC.findall(by_name[a])}


def test_alerts_cover_what_an_operator_must_hear() -> None:
    """DLQ growing, lag rising, guard rejections and parking, upstream error rate, SSE drops,
    lease expiries, each on the metric that says it."""
    assert alert_metrics("TierqDLQGrowing") == {"tierq_queue_dlq_messages"}
    assert alert_metrics("TierqQueueLagRising") == {"tierq_queue_lag"}
    assert "tierq_admission_rejections_total" in alert_metrics("TierqAdmissionRejections")
    assert "tierq_jobs_parked_total" in alert_metrics("TierqJobsHeldByGuards")
    assert "tierq_guard_waits_total" in alert_metrics("TierqGuardFullAtDelivery")
    assert {"tierq_job_attempt_failures_total", "tierq_jobs_failed_total"} <= alert_metrics(
        "TierqUpstreamErrorRate"
    )
    assert "tierq_sse_dropped_slow_clients_total" in alert_metrics("TierqSSESlowClientDrops")
    assert alert_metrics("TierqLeaseExpiries") == {"tierq_lease_expiries_total"}


def test_grafana_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "tierq-overview"
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["queue"]["includeAll"] is True
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["expr"], panel["title"]
            assert expr_balanced(target["expr"]), panel["title"]
    shown = {m for p in graphs for t in p["targets"] for m in METRIC.findall(t["expr"])}
    gauges = {f"tierq_queue_{n}" for n in ("lag", "parked", "in_flight", "dlq_messages")}
    assert gauges <= shown
    assert "$queue" in DASHBOARD.read_text()


def test_example_prometheus_config_loads_the_rules() -> None:
    config: dict[str, Any] = load_yaml(PROMETHEUS)
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS.parent / rule_file).is_file()
    assert {job["job_name"] for job in config["scrape_configs"]} == {"tierq", "tierq-broker"}
