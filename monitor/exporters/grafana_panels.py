"""Grafana dashboard JSON, built from small pieces: queries, panels, a grid layout, variables.

Every panel, annotation and query variable names its datasource through the dashboard's
datasource variable `$datasource` (type datasource, any Prometheus), never a fixed uid, so a
dashboard works wherever it lands:

- file provisioning (the committed grafana/ tree): the variable's current value is the
  `${DS_PROMETHEUS}` placeholder, which provisioning leaves as is; Grafana then selects the
  datasource by the current text, the provisioned datasource's name `DATASOURCE_NAME`;
- "Import dashboard": `__inputs` asks for a Prometheus datasource and Grafana writes its uid
  over `${DS_PROMETHEUS}`, so the variable starts on the datasource picked there.

Panels are numbered by `Layout` in the order they are added, so a regenerated dashboard is
byte-identical to the committed one. Queries select through the dashboard variables (`sel`): job,
run, rank and layer, multi-value with "All" (regex matchers), listed by label_values, so the
selectors scale to hundreds of ranks; per-rank panels draw the `$topk` most extreme ranks per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DATASOURCE_UID = "trainmon-prometheus"  # the provisioned datasource (grafana.datasource_provisioning)
DATASOURCE_NAME = "trainmon Prometheus"  # ... and its name, which the provisioned dashboards select it by
DS_VARIABLE = "datasource"
DS_INPUT = "DS_PROMETHEUS"  # the import input: Grafana replaces ${DS_PROMETHEUS} with the uid chosen
DS = {"type": "prometheus", "uid": f"${{{DS_VARIABLE}}}"}
SCHEMA_VERSION = 39
GRAFANA_VERSION = "10.0.0"  # the oldest Grafana the dashboards need (__requires)
TAG = "trainmon"
TOPK = "$topk"  # how many ranks per run a per-rank panel draws
TOPK_OPTIONS = (5, 10, 20, 50, 100)
TOPK_DEFAULT = 10


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


def dashed(regex: str) -> dict[str, Any]:
    """An override drawing the series whose name matches `regex` dashed (a reference line)."""
    return {"matcher": {"id": "byRegexp", "options": regex},
            "properties": [{"id": "custom.lineStyle", "value": {"dash": [6, 4], "fill": "dash"}}]}


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

def datasource_variable() -> dict[str, Any]:
    """$datasource: any Prometheus datasource. Its current value is the import input's placeholder (an
    import writes the chosen uid there); its current text names the provisioned datasource, which
    Grafana selects by name where the value matches none (file provisioning fills no inputs)."""
    return {
        "current": {"selected": False, "text": DATASOURCE_NAME, "value": f"${{{DS_INPUT}}}"},
        "hide": 0,
        "includeAll": False,
        "label": "Prometheus",
        "multi": False,
        "name": DS_VARIABLE,
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
        "type": "datasource",
    }


def variable(name: str, label: str, query: str, *, sort: int = 1, current: str | None = None) -> dict[str, Any]:
    """A multi-value query variable over label_values, 'All' matching any value (a regex: selectors
    use =~), so it scales to hundreds of values."""
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


def topk_variable() -> dict[str, Any]:
    """$topk: how many ranks per run the per-rank panels draw (the most extreme ones at each step)."""
    options = [{"selected": k == TOPK_DEFAULT, "text": str(k), "value": str(k)} for k in TOPK_OPTIONS]
    return {
        "current": {"selected": True, "text": str(TOPK_DEFAULT), "value": str(TOPK_DEFAULT)},
        "description": "Per-rank panels draw this many ranks per run: the highest (or, for throughput, "
                       "lowest) at each step. Narrow $rank to see given ranks.",
        "hide": 0,
        "includeAll": False,
        "label": "ranks per panel",
        "multi": False,
        "name": TOPK[1:],
        "options": options,
        "query": ",".join(str(k) for k in TOPK_OPTIONS),
        "skipUrlSync": False,
        "type": "custom",
    }


def variables(job: str, *names: str) -> list[dict[str, Any]]:
    """The datasource variable, job, then the named ones (run, rank, layer, topk) in that order."""
    v = {
        "job": variable("job", "job", "label_values(trainmon_optimizer_steps_total, job)", current=job),
        "run": variable("run", "run", 'label_values(trainmon_optimizer_steps_total{job=~"$job"}, run)'),
        "rank": variable("rank", "rank", 'label_values(trainmon_optimizer_steps_total{job=~"$job", run=~"$run"}, rank)',
                         sort=3),
        "layer": variable("layer", "layer",
                          'label_values(trainmon_attention_entropy_ratio{job=~"$job", run=~"$run"}, layer)', sort=7),
        "topk": topk_variable(),
    }
    return [datasource_variable(), v["job"], *(v[n] for n in names)]


def alert_annotations(*labels: str) -> list[dict[str, Any]]:
    """The rules' alerts on the time series, one mark per run and rule (not per rank: a rule firing on
    every one of hundreds of ranks is one mark). Firing: a region while trainmon_alert_active is 1
    (shown). Raised: where trainmon_alerts_total grew or appeared, which also catches an alert that
    fired and resolved between two scrapes (hidden by default: toggle it above the panels)."""
    s = sel(*labels)
    counter = f"trainmon_alerts_total{s}"
    return [{
        "datasource": DS,
        "enable": True,
        "expr": f"max by (run, rule, severity) (trainmon_alert_active{s} == 1)",
        "iconColor": "red",
        "name": "Alerts firing",
        "step": "$__interval",
        "tagKeys": "run,rule,severity",
        "textFormat": "{{rule}} ({{severity}}) firing in run {{run}}",
        "titleFormat": "{{rule}}",
    }, {
        "datasource": DS,
        "enable": False,
        "expr": (f"max by (run, rule, severity) (\n  increase({counter}[{RATE}]) > 0\n"
                 f"  or ({counter} unless {counter} offset {RATE})\n)"),
        "iconColor": "orange",
        "name": "Alerts raised",
        "step": "$__interval",
        "tagKeys": "run,rule,severity",
        "textFormat": "{{rule}} ({{severity}}) raised in run {{run}}",
        "titleFormat": "{{rule}}",
    }]


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

_PANEL_NAMES = {"stat": "Stat", "table": "Table", "timeseries": "Time series"}


def requires(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """__requires: the Grafana version, the Prometheus datasource plugin and the panel plugins used."""
    return [{"id": "grafana", "name": "Grafana", "type": "grafana", "version": GRAFANA_VERSION},
            {"id": "prometheus", "name": "Prometheus", "type": "datasource", "version": "1.0.0"},
            *({"id": t, "name": _PANEL_NAMES[t], "type": "panel", "version": ""}
              for t in sorted({p["type"] for p in panels}))]


IMPORT_INPUTS = [{"description": "The Prometheus that scrapes the trainmon endpoints (job trainmon) or "
                                 "`monitor watch`.",
                  "label": "Prometheus", "name": DS_INPUT, "pluginId": "prometheus", "pluginName": "Prometheus",
                  "type": "datasource"}]


def dashboard(uid: str, title: str, description: str, layout: Layout, templating: list[dict[str, Any]],
              annotations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    builtin = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
               "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}
    return {
        "__inputs": IMPORT_INPUTS,
        "__requires": requires(layout.panels),
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
