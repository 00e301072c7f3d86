"""Grafana dashboards and provisioning, generated; plus the Prometheus files they go with.

`grafana_tree(out_dir)` writes the whole tree that the repository commits as `grafana/`:

    dashboards/{overview,alerts,attention,ddp}.json
    provisioning/datasources/trainmon.yaml   a Prometheus datasource of fixed uid trainmon-prometheus
    provisioning/dashboards/trainmon.yaml    a file provider for dashboards/
    prometheus/alerts.yml, alerts.test.yml   promrules.prometheus_rules / promtool_tests
    prometheus/prometheus.yml                scrape.scrape_config, complete
    README.md

Dashboards name their datasource by that uid (file provisioning cannot fill `${DS_...}`
inputs), and are deterministic: fixed panel ids, sorted keys, so a regenerated tree diffs
cleanly against the committed one. Thresholds drawn on panels come from the rules' configs.

`python -m monitor.exporters.grafana OUT_DIR` (what `make grafana` runs) writes the tree.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.exporters import promrules
from monitor.exporters.generated import dump_json, dump_yaml, write
from monitor.exporters.scrape import ALERTMANAGER_PORT, DAEMON_PORT, scrape_config

DATASOURCE_UID = "trainmon-prometheus"
DS = {"type": "prometheus", "uid": DATASOURCE_UID}
SCHEMA_VERSION = 39
TAG = "trainmon"
DEFAULT_PROMETHEUS_URL = "http://localhost:9090"
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/trainmon"
SCRAPE_INTERVAL = "15s"
_SOURCE = "monitor.exporters.grafana"


# -- selectors -------------------------------------------------------------------------------------

def sel(*labels: str) -> str:
    """A label selector over the dashboard variables: sel("run", "rank") -> {job=~"$job", run=~"$run", ...}."""
    return "{" + ", ".join(f'{name}=~"${name}"' for name in ("job", *labels)) + "}"


RATE = "$__rate_interval"


def quantile(q: float, labels: tuple[str, ...] = ("run", "rank")) -> str:
    by = ", ".join((*labels, "le"))
    return (f"histogram_quantile({q}, sum by ({by}) "
            f"(rate(trainmon_step_duration_seconds_bucket{sel('run', 'rank')}[{RATE}])))")


def mean_step_time(selector: str) -> str:
    return (f"sum by (run, rank) (rate(trainmon_step_duration_seconds_sum{selector}[{RATE}]))\n"
            f"  / sum by (run, rank) (rate(trainmon_step_duration_seconds_count{selector}[{RATE}]))")


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


def _right_axis(regex: str, unit: str | None = None, bars: bool = False) -> dict[str, Any]:
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


def _cfg(rule_id: str, options: Any) -> Any:
    return promrules.rule_config(rule_id, options)


def overview(options: Any = None, job: str = promrules.JOB) -> dict[str, Any]:
    stalled = _cfg("run.stalled", options)
    floor = float(getattr(stalled, "floor_seconds", promrules.STALL_FLOOR_SECONDS))
    collapse = _cfg("amp.scale_collapse", options)
    L = Layout()
    L.add(stat("Optimizer steps", "Optimizer steps so far (GradScaler-skipped ones included), per run.",
               [Q(f"max by (run) (trainmon_optimizer_steps_total{sel('run', 'rank')})", "{{run}}")]), w=6, h=4)
    L.add(stat("Since the last step", "Seconds since the last optimizer step ended (slowest rank); red from "
               "run.stalled's floor_seconds.",
               [Q(f"time() - min by (run) (trainmon_last_step_timestamp_seconds{sel('run', 'rank')})", "{{run}}")],
               unit="s", thresholds=[(None, "green"), (floor / 2, "yellow"), (floor, "red")]), w=6, h=4)
    L.add(stat("Active alerts", "Rules firing now (trainmon_alert_active == 1); the Alerts dashboard lists them.",
               [Q(f"count(trainmon_alert_active{sel('run', 'rank')} == 1) or vector(0)", "active")],
               thresholds=[(None, "green"), (1, "red")]), w=6, h=4)
    L.add(stat("Monitor health", "Step records the monitor dropped (publisher queue full) and errors it caught; "
               "both should stay 0.",
               [Q(f"sum(trainmon_dropped_records_total{sel('run', 'rank')})", "dropped records"),
                Q(f"sum(trainmon_internal_errors_total{sel('run', 'rank')})", "internal errors")],
               thresholds=[(None, "green"), (1, "orange")]), w=6, h=4)
    L.add(timeseries("Loss", "Training loss of each optimizer step (mean over micro-batches), per rank. "
                     "NaN/Inf appear as gaps: see loss.nonfinite.",
                     [Q(f"trainmon_loss{sel('run', 'rank')}", "{{run}} rank {{rank}}")]))
    L.add(timeseries("Learning rate", "Learning rate per param group, as used by each optimizer step (rank 0).",
                     [Q(f"trainmon_learning_rate{sel('run')}", "{{run}} group {{group}}")]))
    L.add(timeseries(
        "Gradient norm", "Global L2 norm of the unscaled gradients before and after clipping (rank 0), and the "
        "factor clipping applied (right axis, 1 = not clipped).",
        [Q(f"trainmon_grad_norm{sel('run')}", "{{run}} before clipping"),
         Q(f"trainmon_grad_norm_clipped{sel('run')}", "{{run}} after clipping"),
         Q(f"trainmon_clip_coefficient{sel('run')}", "{{run}} clip coefficient")],
        overrides=[_right_axis(".* clip coefficient$", unit="percentunit")]))
    L.add(timeseries(
        "Loss scale and skipped steps", "GradScaler's loss scale (log2 axis; red below amp.scale_collapse's floor) "
        "and the optimizer steps it skipped for inf/NaN gradients (bars, right axis).",
        [Q(f"trainmon_loss_scale{sel('run')}", "{{run}} loss scale"),
         Q(f"sum by (run) (increase(trainmon_skipped_steps_total{sel('run', 'rank')}[{RATE}]))",
           "{{run}} skipped steps")],
        log=2, thresholds=[(None, "red"), (float(getattr(collapse, "floor", 1.0)), "transparent")],
        overrides=[_right_axis(".* skipped steps$", bars=True)]))
    L.add(timeseries("Step time", "Wall time per optimizer step: median, p90 and p99 per rank "
                     "(from the trainmon_step_duration_seconds histogram).",
                     [Q(quantile(q), f"{{{{run}}}} rank {{{{rank}}}} p{round(q * 100)}") for q in (0.5, 0.9, 0.99)],
                     unit="s"))
    L.add(timeseries("Throughput (tokens/s)", "Tokens (input elements) processed per second, per rank.",
                     [Q(f"sum by (run, rank) (rate(trainmon_tokens_total{sel('run', 'rank')}[{RATE}]))",
                        "{{run}} rank {{rank}}")], unit="suffix: tok/s"), w=6)
    L.add(timeseries("Throughput (steps/s)", "Optimizer steps per second, per rank.",
                     [Q(f"sum by (run, rank) (rate(trainmon_optimizer_steps_total{sel('run', 'rank')}[{RATE}]))",
                        "{{run}} rank {{rank}}")], unit="suffix: steps/s"), w=6)
    return dashboard("trainmon-overview", "trainmon / Overview",
                     "Loss, learning rate, gradient norms, loss scale, step time and throughput of trainmon runs.",
                     L, variables(job, "run", "rank"), [ALERT_ANNOTATION])


def alerts(options: Any = None, job: str = promrules.JOB) -> dict[str, Any]:
    L = Layout()
    L.add(stat("Active alerts by severity", "Rules firing now, by severity (trainmon_alert_active).",
               [Q(f"sum by (severity) (trainmon_alert_active{sel('run', 'rank')})", "{{severity}}")],
               thresholds=[(None, "green"), (1, "red")]), w=8, h=5)
    L.add(timeseries("Prometheus alerts (exported rules)", "Alerts of the exported Prometheus rules "
                     "(grafana/prometheus/alerts.yml) firing now, by name and severity.",
                     [Q('sum by (alertname, severity) (ALERTS{alertname=~"Trainmon.*", alertstate="firing"})',
                        "{{alertname}} ({{severity}})")], bars=True), w=16, h=5)
    L.add(table("Active alerts", "Every rule firing now, per run and rank; `monitor check RUN_DIR` or "
                "alerts.jsonl in the run directory has the message, the evidence and the fix.",
                Q(f"trainmon_alert_active{sel('run', 'rank')} == 1"),
                columns=["run", "rank", "rule", "severity"],
                hide=["Time", "Value", "__name__", "instance", "job", "trainmon_run", "trainmon_rank"]), w=24, h=8)
    L.add(timeseries("Alerts raised, by rule", "Alerts raised per interval, by rule and severity "
                     "(trainmon_alerts_total).",
                     [Q(f"sum by (rule, severity) (increase(trainmon_alerts_total{sel('run', 'rank')}[$__interval]))",
                        "{{rule}} ({{severity}})")], bars=True), w=24)
    L.add(table("Alerts raised per run", "Alerts raised since each rank started, per rule and severity, over the "
                "runs seen in the time range.",
                Q(f"max by (run, rank, rule, severity) "
                  f"(max_over_time(trainmon_alerts_total{sel('run', 'rank')}[$__range]))"),
                columns=["run", "rank", "rule", "severity", "Value"], hide=["Time"]), w=24)
    return dashboard("trainmon-alerts", "trainmon / Alerts",
                     "What the trainmon rules engines (in-process and `monitor watch`) flag, now and over time.",
                     L, variables(job, "run", "rank"), [ALERT_ANNOTATION])


def attention(options: Any = None, job: str = promrules.JOB) -> dict[str, Any]:
    entropy = _cfg("attention.entropy_collapse", options)
    logits = _cfg("attention.logit_growth", options)
    floor = float(getattr(entropy, "floor", 0.05))
    warn, crit = float(getattr(logits, "warning", 100.0)), float(getattr(logits, "critical", 1000.0))
    entropy_steps = [(None, "red"), (floor, "green")]
    logit_steps = [(None, "green"), (warn, "orange"), (crit, "red")]
    s = sel("run", "layer")
    L = Layout()
    L.add(stat("Entropy ratio now, per layer", "Attention entropy / log(visible keys), mean over heads (rank 0, "
               "sampled steps); red below attention.entropy_collapse's floor.",
               [Q(f"trainmon_attention_entropy_ratio{s}", "{{run}} {{layer}}")], unit="percentunit",
               thresholds=entropy_steps), h=5)
    L.add(stat("Max logit now, per layer", "Largest attention logit (rank 0, sampled steps); orange and red at "
               "attention.logit_growth's warning and critical thresholds.",
               [Q(f"trainmon_attention_max_logit{s}", "{{run}} {{layer}}")], thresholds=logit_steps), h=5)
    L.add(timeseries("Attention entropy ratio", "Normalised attention entropy per layer: a collapse (a sharp drop) "
                     "precedes loss spikes (Zhai et al. 2023).",
                     [Q(f"trainmon_attention_entropy_ratio{s}", "{{run}} {{layer}}")], unit="percentunit",
                     thresholds=entropy_steps, minimum=0, maximum=1), w=24)
    L.add(timeseries("Max attention logit", "Largest attention logit per layer (log axis): ~100 is a healthy "
                     "ceiling, growth past it precedes divergence (Wortsman et al. 2023).",
                     [Q(f"trainmon_attention_max_logit{s}", "{{run}} {{layer}}")], thresholds=logit_steps, log=10),
          w=24)
    L.add(timeseries("Lowest entropy ratio and highest max logit over layers", "The extreme layer per run "
                     "(entropy ratio left, max logit right).",
                     [Q(f"min by (run) (trainmon_attention_entropy_ratio{s})", "{{run}} lowest entropy ratio"),
                      Q(f"max by (run) (trainmon_attention_max_logit{s})", "{{run}} highest max logit")],
                     unit="percentunit", overrides=[_right_axis(".* highest max logit$", unit="short")]), w=24)
    r = sel("run")
    L.add(timeseries("Probe cost and interval", "What the last attention probe cost the training thread (left) and "
                     "the interval the overhead budget keeps (right, optimizer steps).",
                     [Q(f"trainmon_attention_probe_seconds{r}", "{{run}} probe cost"),
                      Q(f"trainmon_attention_probe_interval_steps{r}", "{{run}} interval")],
                     unit="s", overrides=[_right_axis(".* interval$", unit="short")]), w=24)
    return dashboard("trainmon-attention", "trainmon / Attention",
                     "Per-layer attention statistics of trainmon runs (rank 0, sampled steps).",
                     L, variables(job, "run", "layer"))


def ddp(options: Any = None, job: str = promrules.JOB) -> dict[str, Any]:
    per_rank = sel("run", "rank")
    all_ranks = sel("run")
    L = Layout()
    L.add(stat("Ranks reporting", "Ranks with a metrics series, per run.",
               [Q(f"count by (run) (trainmon_optimizer_steps_total{all_ranks})", "{{run}}")]), w=8, h=4)
    L.add(stat("Step spread", "Optimizer steps of the most advanced rank minus the least advanced one, per run "
               "(ranks step together: more than a few means a rank is stuck or restarted).",
               [Q(f"max by (run) (trainmon_optimizer_steps_total{all_ranks}) - "
                  f"min by (run) (trainmon_optimizer_steps_total{all_ranks})", "{{run}}")],
               thresholds=[(None, "green"), (3, "orange")]), w=8, h=4)
    L.add(stat("Since the last step, per rank", "Seconds since each rank's last optimizer step.",
               [Q(f"time() - trainmon_last_step_timestamp_seconds{per_rank}", "{{run}} rank {{rank}}")], unit="s"),
          w=8, h=4)
    L.add(timeseries("Loss per rank", "Each rank's loss on its own micro-batches.",
                     [Q(f"trainmon_loss{per_rank}", "{{run}} rank {{rank}}")]))
    L.add(timeseries("Step time per rank (median)", "Median wall time per optimizer step, per rank.",
                     [Q(quantile(0.5), "{{run}} rank {{rank}}")], unit="s"))
    L.add(timeseries("Step time relative to the median rank", "Each rank's mean step time divided by the median "
                     "over the run's ranks: a straggler stays above 1.",
                     [Q(f"(\n  {mean_step_time(per_rank)}\n)\n/ on (run) group_left ()\nquantile by (run) (0.5,\n  "
                        f"{mean_step_time(all_ranks)}\n)", "{{run}} rank {{rank}}")], unit="none"))
    L.add(timeseries("Throughput per rank (tokens/s)", "Tokens (input elements) per second, per rank.",
                     [Q(f"sum by (run, rank) (rate(trainmon_tokens_total{per_rank}[{RATE}]))",
                        "{{run}} rank {{rank}}")], unit="suffix: tok/s"))
    judged = 'phase=~"input|compute"'
    L.add(timeseries("Step phases per rank", "Seconds of each rank's last step per phase: input (previous step's end "
                     "to the forward: data loading, summed over micro-batches), compute (the forward inside the DDP "
                     "wrapper) and collective_wait (DDP's buffer broadcast and the gradient all-reduce left after "
                     "the backward). A straggler's input or compute stands out; the ranks waiting for it have the "
                     "higher collective_wait.",
                     [Q(f"trainmon_step_phase_seconds{per_rank}", "{{run}} rank {{rank}} {{phase}}")], unit="s"))
    L.add(timeseries("Input and compute relative to the median rank", "Each rank's input and compute phases "
                     "(averaged over the interval) divided by the median over the run's ranks: what ddp.straggler "
                     "judges (it names a rank persistently above its factor).",
                     [Q(f"avg_over_time(trainmon_step_phase_seconds{per_rank[:-1]}, {judged}}}[{RATE}])\n"
                        f"/ on (run, phase) group_left ()\nquantile by (run, phase) (0.5,\n  "
                        f"avg_over_time(trainmon_step_phase_seconds{all_ranks[:-1]}, {judged}}}[{RATE}])\n)",
                        "{{run}} rank {{rank}} {{phase}}")], unit="none"))
    L.add(timeseries("Skipped steps per rank", "Optimizer steps GradScaler skipped per interval, per rank.",
                     [Q(f"sum by (run, rank) (increase(trainmon_skipped_steps_total{per_rank}[{RATE}]))",
                        "{{run}} rank {{rank}}")], bars=True), w=24)
    return dashboard("trainmon-ddp", "trainmon / DDP ranks",
                     "Per-rank statistics of distributed trainmon runs: loss, step time, stragglers, throughput, "
                     "step phases (input, compute, collective wait), skipped steps.", L, variables(job, "run", "rank"), [ALERT_ANNOTATION])


DASHBOARDS = {"overview": overview, "alerts": alerts, "attention": attention, "ddp": ddp}


def dashboards(options: Any = None, job: str = promrules.JOB) -> dict[str, dict[str, Any]]:
    """Every dashboard by file stem."""
    return {name: build(options, job) for name, build in DASHBOARDS.items()}


def datasource_provisioning(prometheus_url: str = DEFAULT_PROMETHEUS_URL,
                            scrape_interval: str = SCRAPE_INTERVAL) -> dict[str, Any]:
    return {"apiVersion": 1, "datasources": [{
        "name": "trainmon Prometheus",
        "uid": DATASOURCE_UID,
        "type": "prometheus",
        "access": "proxy",
        "url": prometheus_url,
        "isDefault": False,
        "editable": False,
        # Grafana's $__rate_interval is at least 4 scrape intervals: tell it the scrape interval.
        "jsonData": {"timeInterval": scrape_interval, "httpMethod": "POST"},
    }]}


def dashboard_provisioning(dashboards_path: str = DASHBOARDS_PATH) -> dict[str, Any]:
    return {"apiVersion": 1, "providers": [{
        "name": "trainmon",
        "folder": "trainmon",
        "type": "file",
        "disableDeletion": False,
        "allowUiUpdates": True,
        "updateIntervalSeconds": 30,
        "options": {"path": dashboards_path, "foldersFromFilesStructure": False},
    }]}


README = """\
# grafana/: dashboards, provisioning and Prometheus files for trainmon

Generated by `make grafana` (`python -m monitor.exporters.grafana grafana/`) from the rule catalogue
and the metric definitions; do not edit by hand (a test regenerates the tree and compares).

- `prometheus/prometheus.yml`: scrapes `monitor watch`'s own /metrics ({daemon}), which serves every
  run it watches, and the per-rank endpoints of these runs: {runs}; loads `alerts.yml`; sends alerts
  to Alertmanager ({alertmanager}). `prometheus --config.file=grafana/prometheus/prometheus.yml`
  To scrape the training processes themselves (job `trainmon`, which most alert rules select),
  `monitor export scrape-config runs/` lists each run's `targets.json` (file_sd; Prometheus
  cannot glob directories, so regenerate and reload it for new runs).
- `prometheus/alerts.yml`: the alerting rules; `promtool test rules grafana/prometheus/alerts.test.yml`.
- `provisioning/`: a Prometheus datasource (uid `{uid}`, url {url}) and a dashboard provider
  reading `{path}`. With Docker:
  `docker run --network=host -v $PWD/grafana/provisioning:/etc/grafana/provisioning
   -v $PWD/grafana/dashboards:{path} grafana/grafana`
- `dashboards/`: Overview, Alerts, Attention and DDP ranks (uids `trainmon-overview`, ...).

For other paths, URLs or thresholds: `monitor export grafana DIR` and `monitor export prometheus-rules`
with your config.
"""


def grafana_tree(out_dir: str | Path, options: Any = None, *, job: str = promrules.JOB,
                 prometheus_url: str = DEFAULT_PROMETHEUS_URL, run_dirs: list[str] | None = None,
                 scrape_interval: str = SCRAPE_INTERVAL, daemon: str | None = f"127.0.0.1:{DAEMON_PORT}",
                 alertmanager: str | None = f"127.0.0.1:{ALERTMANAGER_PORT}",
                 dashboards_path: str = DASHBOARDS_PATH) -> list[Path]:
    """Write dashboards, provisioning and the Prometheus files under out_dir; return the paths written.

    `options`: a MonitorConfig or rule options (thresholds of the alerts and of the panels' lines);
    `run_dirs`: runs whose per-rank endpoints prometheus.yml scrapes (see scrape.file_sd_files; default
    none: the committed tree scrapes `monitor watch`, which serves every run it watches).
    """
    out = Path(out_dir)
    paths = [write(out / "dashboards" / f"{name}.json", dump_json(d)) for name, d in dashboards(options, job).items()]
    paths += [
        write(out / "provisioning" / "datasources" / "trainmon.yaml",
              dump_yaml(datasource_provisioning(prometheus_url, scrape_interval), _SOURCE)),
        write(out / "provisioning" / "dashboards" / "trainmon.yaml",
              dump_yaml(dashboard_provisioning(dashboards_path), _SOURCE)),
        *promrules.write_rules(out / "prometheus", options, job),
        write(out / "prometheus" / "prometheus.yml", dump_yaml(scrape_config(
            run_dirs or [], job, scrape_interval, daemon, rule_files=[promrules.RULES_FILE],
            alertmanagers=[alertmanager] if alertmanager else None), "monitor.exporters.scrape")),
        write(out / "README.md", README.format(
            runs=", ".join(f"`{d}`" for d in run_dirs) if run_dirs else "none", daemon=daemon or "not scraped",
            alertmanager=alertmanager or "none", uid=DATASOURCE_UID, url=prometheus_url, path=dashboards_path)),
    ]
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m monitor.exporters.grafana OUT_DIR  (e.g. grafana/)")
    for p in grafana_tree(sys.argv[1]):
        print(p)
