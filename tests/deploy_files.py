"""Read deploy/: the Prometheus alert rules and the Grafana dashboard, and the metric names
their expressions use (shared by tests/unit/test_deploy.py and the e2e scrape check)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ALERTS = DEPLOY / "prometheus" / "tierq-alerts.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "tierq-dashboard.json"
METRIC = re.compile(r"\btierq_[a-z0-9_]+\b")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def expressions() -> list[str]:
    return [str(rule["expr"]) for rule in alert_rules()] + dashboard_exprs()


def deploy_metric_names() -> set[str]:
    return {name for expr in expressions() for name in METRIC.findall(expr)}


def exported_names(exposition: str) -> set[str]:
    """The sample names a Prometheus text exposition offers, whether it has samples yet or
    not (a labelled metric nothing incremented shows only its ``# TYPE`` line)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names
