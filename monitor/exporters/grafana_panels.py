"""Grafana dashboard JSON, built from small pieces: queries, panels, a grid layout, variables.

Every panel names its datasource by the fixed uid `DATASOURCE_UID` (file provisioning cannot
fill `${DS_...}` inputs), and panels are numbered by `Layout` in the order they are added, so a
regenerated dashboard is byte-identical to the committed one. Queries select through the
dashboard variables (`sel`): job, run, rank and layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DATASOURCE_UID = "trainmon-prometheus"
DS = {"type": "prometheus", "uid": DATASOURCE_UID}
SCHEMA_VERSION = 39
TAG = "trainmon"


# -- selectors -------------------------------------------------------------------------------------

def sel(*labels: str) -> str:
    """A label selector over the dashboard variables: sel("run", "rank") -> {job=~"$job", run=~"$run", ...}."""
    return "{" + ", ".join(f'{name}=~"${name}"' for name in ("job", *labels)) + "}"


RATE = "$__rate_interval"


# -- panels ----------------------------------------------------------------------------------------

@dataclass
class Q:
    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False


def _targets(queries: list[Q]) -> list[dict[str, Any]]:
    out = []
    for i, q in enumerate(queries):
        out.append({
            "datasource": DS,
            "editorMode": "code",
            "expr": q.expr,
            "format": "table" if q.table else "time_series",
            "instant": q.instant,
            "legendFormat": q.legend or "__auto",
            "range": not q.instant,
            "refId": chr(ord("A") + i),
        })
    return out


def _thresholds(steps: list[tuple[float | None, str]] | None) -> dict[str, Any]:
    steps = steps or [(None, "green")]
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def right_axis(regex: str, unit: str | None = None, bars: bool = False) -> dict[str, Any]:
    props: list[dict[str, Any]] = [{"id": "custom.axisPlacement", "value": "right"}]
    if unit:
        props.append({"id": "unit", "value": unit})
    if bars:
        props += [{"id": "custom.drawStyle", "value": "bars"}, {"id": "custom.fillOpacity", "value": 60}]
    return {"matcher": {"id": "byRegexp", "options": regex}, "properties": props}


def timeseries(title: str, description: str, queries: list[Q], *, unit: str = "short",
               thresholds: list[tuple[float | None, str]] | None = None, log: int | None = None,
               bars: bool = False, overrides: list[dict[str, Any]] | None = None,
               minimum: float | None = None, maximum: float | None = None) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "axisPlacement": "auto",
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else 0,
        "lineWidth": 1,
        "pointSize": 4,
        "scaleDistribution": {"log": log, "type": "log"} if log else {"type": "linear"},
        "showPoints": "never",
        "spanNulls": False,
        "thresholdsStyle": {"mode": "line" if thresholds else "off"},
    }
    defaults: dict[str, Any] = {"color": {"mode": "palette-classic"}, "custom": custom,
                                "thresholds": _thresholds(thresholds), "unit": unit}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    return {
        "datasource": DS,
        "description": description,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {"legend": {"calcs": [], "displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": _targets(queries),
        "title": title,
        "type": "timeseries",
    }


def stat(title: str, description: str, queries: list[Q], *, unit: str = "short",
         thresholds: list[tuple[float | None, str]] | None = None) -> dict[str, Any]:
    return {
        "datasource": DS,
        "description": description,
        "fieldConfig": {"defaults": {"color": {"mode": "thresholds"}, "thresholds": _thresholds(thresholds),
                                     "unit": unit},
                        "overrides": []},
        "options": {"colorMode": "background", "graphMode": "none", "justifyMode": "auto", "orientation": "auto",
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "textMode": "value_and_name"},
        "targets": _targets([Q(q.expr, q.legend, instant=True) for q in queries]),
        "title": title,
        "type": "stat",
    }


def table(title: str, description: str, query: Q, *, columns: list[str], hide: list[str]) -> dict[str, Any]:
    return {
        "datasource": DS,
        "description": description,
        "fieldConfig": {"defaults": {"custom": {"align": "auto", "cellOptions": {"type": "auto"}},
                                     "thresholds": _thresholds(None)},
                        "overrides": []},
        "options": {"cellHeight": "sm", "footer": {"show": False}, "showHeader": True},
        "targets": _targets([Q(query.expr, query.legend, instant=True, table=True)]),
        "title": title,
        "transformations": [{"id": "organize", "options": {
            "excludeByName": {name: True for name in hide},
            "indexByName": {name: i for i, name in enumerate(columns)},
            "renameByName": {},
        }}],
        "type": "table",
    }


@dataclass
class Layout:
    """Places panels left to right in rows of 24 units, numbering them 1, 2, ... in order."""

    panels: list[dict[str, Any]] = field(default_factory=list)
    x: int = 0
    y: int = 0
    row_h: int = 0

    def add(self, panel: dict[str, Any], w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel = {**panel, "id": len(self.panels) + 1, "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y}}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


# -- variables and dashboards ----------------------------------------------------------------------

def variable(name: str, label: str, query: str, *, sort: int = 1, current: str | None = None) -> dict[str, Any]:
    """A multi-value query variable over label_values, 'All' matching any value."""
    cur = {"selected": True, "text": [current], "value": [current]} if current else {}
    return {
        "allValue": ".*",
        "current": cur,
        "datasource": DS,
        "definition": query,
        "hide": 0,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "options": [],
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": sort,
        "type": "query",
    }


def variables(job: str, *names: str) -> list[dict[str, Any]]:
    v = {
        "job": variable("job", "job", "label_values(trainmon_optimizer_steps_total, job)", current=job),
        "run": variable("run", "run", 'label_values(trainmon_optimizer_steps_total{job=~"$job"}, run)'),
        "rank": variable("rank", "rank", 'label_values(trainmon_optimizer_steps_total{job=~"$job", run=~"$run"}, rank)',
                         sort=3),
        "layer": variable("layer", "layer",
                          'label_values(trainmon_attention_entropy_ratio{job=~"$job", run=~"$run"}, layer)', sort=7),
    }
    return [v["job"], *(v[n] for n in names)]


ALERT_ANNOTATION = {
    "datasource": DS,
    "enable": True,
    "expr": f"changes(trainmon_alerts_total{sel('run', 'rank')}[$__interval]) > 0",
    "iconColor": "red",
    "name": "trainmon alerts",
    "step": "$__interval",
    "tagKeys": "rule,severity",
    "textFormat": "{{rule}} ({{severity}}) at run {{run}} rank {{rank}}",
    "titleFormat": "{{rule}}",
}


# Where a run's attempt changed: a resume or a restart into its run directory (trainmon_attempt), one
# mark per run. changes() sees a series step from attempt N to N+1 (`monitor watch` serves it across
# the gap); the `unless ... offset` part catches a new process's series that appears above attempt 1
# where no series was a window before (a new endpoint, or a gap longer than the window). No panel
# filter: drawn on every panel.
_ATTEMPT = f"trainmon_attempt{sel('run')}"
ATTEMPT_ANNOTATION = {
    "datasource": DS,
    "enable": True,
    "expr": (f"max by (run) (\n  changes({_ATTEMPT}[{RATE}]) > 0\n"
             f"  or ({_ATTEMPT} > 1 unless {_ATTEMPT} offset {RATE})\n)"),
    "iconColor": "purple",
    "name": "Attempts (resume/restart)",
    "step": "$__interval",
    "textFormat": "run {{run}}: a new attempt started (resumed from a checkpoint or restarted)",
    "titleFormat": "new attempt",
}


def dashboard(uid: str, title: str, description: str, layout: Layout, templating: list[dict[str, Any]],
              annotations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    builtin = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
               "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}
    return {
        "annotations": {"list": [builtin, *(annotations or [])]},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [{"asDropdown": False, "icon": "external link", "includeVars": True, "keepTime": True,
                   "tags": [TAG], "targetBlank": False, "title": "trainmon", "type": "dashboards"}],
        "panels": layout.panels,
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": [TAG],
        "templating": {"list": templating},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
    }

