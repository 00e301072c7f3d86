"""The exported Prometheus rules, scrape config and Grafana dashboards, against real servers.

A monitored training loop (kept stepping in a thread) and a second endpoint serving two DDP
ranks with attention statistics, a NaN loss and an alert are discovered by a real Prometheus
through their targets.json (file_sd); every dashboard query must return data there; exported
alert rules fire and reach a real Alertmanager, which delivers them to a local webhook. promtool
checks the exported files, and the committed grafana/ tree must be what the generators produce.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TinyLM, batches
from prometheus_client import CollectorRegistry
from servers import Prometheus, alertmanager, alerts_in, binary, prometheus_factory, wait_until, webhook  # noqa: F401

import monitor
from monitor.exporters import grafana, promrules
from monitor.exporters.generated import dump_yaml
from monitor.exporters.prometheus import TrainMetrics, serve
from monitor.exporters.scrape import scrape_config
from monitor.runlog.rundir import RunDir
from monitor.schema import Alert, Endpoint, Severity, StepRecord

ROOT = Path(__file__).resolve().parents[1]
JOB = promrules.JOB
LIVE, DDP = "live", "ddp-run"
LAYERS = ("blocks.0.attn", "blocks.1.attn")
# What Grafana would put for its built-in variables with 1 s scrapes and a short time range.
BUILTINS = {"$__rate_interval": "10s", "$__interval": "5s", "$__range": "5m"}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def live_run(runs_root: Path):
    """A plain PyTorch loop under monitor.attach, stepping every ~20 ms until the module ends."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = monitor.attach(model, opt, run_dir=runs_root / LIVE,
                         config={"metrics": {"port": 0}, "console": {"enabled": False}})
    stop = threading.Event()

    def loop() -> None:
        for x, y in batches(10**9):
            if stop.is_set():
                return
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            time.sleep(0.02)

    thread = threading.Thread(target=loop, name="live-run", daemon=True)
    thread.start()
    try:
        yield mon
    finally:
        stop.set()
        thread.join(timeout=30)
        mon.close()


@pytest.fixture(scope="module")
def ddp_run(runs_root: Path):
    """Two ranks' real endpoints (TrainMetrics on fresh registries), listed in the run's targets.json,
    fed StepRecords with attention statistics; rank 1's loss turns NaN and it raises loss.nonfinite."""
    run_dir = runs_root / DDP
    ranks = []
    for rank in (0, 1):
        registry = CollectorRegistry()
        metrics = TrainMetrics(registry, DDP, rank)
        server = serve(registry, port=0)
        rd = RunDir(run_dir, rank)
        rd.add_endpoint(Endpoint(rank=rank, local_rank=rank, host=server.host, port=server.port, url=server.url), DDP)
        ranks.append((metrics, server, rd))
    stop = threading.Event()

    def record(step: int, rank: int) -> StepRecord:
        skipped = step % 7 == 3
        return StepRecord(
            step=step, rank=rank, loss=float("nan") if rank == 1 and step >= 3 else 4.0 - 0.01 * step,
            lr=[1e-3, 1e-4], grad_norm=1.5, grad_norm_clipped=1.0, clip_coef=1 / 1.5, max_norm=1.0,
            loss_scale=2.0 ** (16 - step // 7), skipped=skipped, step_time=0.1 + 0.05 * rank, tokens=2048,
            attention={layer: {"entropy_ratio": 0.8 - 0.1 * i, "entropy_min": 0.6, "max_logit": 12.0 + i,
                               "max_prob": 0.5} for i, layer in enumerate(LAYERS)},
        )

    def feed() -> None:
        step = 0
        while not stop.is_set():
            for metrics, _, _ in ranks:
                metrics.observe(record(step, int(metrics.rank)))
            ranks[0][0].probe(0.002, 10)  # the attention probe's own gauges, as rank 0's monitor sets them
            if step == 3:
                ranks[1][0].emit(Alert(rule="loss.nonfinite", severity=Severity.critical, step=3, rank=1, run=DDP,
                                       message="the loss is nan at step 3.", hint="Restart from a checkpoint."))
            step += 1
            stop.wait(0.1)

    thread = threading.Thread(target=feed, name="ddp-feed", daemon=True)
    thread.start()
    try:
        yield ranks
    finally:
        stop.set()
        thread.join(timeout=10)
        for metrics, server, rd in ranks:
            rd.remove_endpoint(int(metrics.rank))
            server.close()


@pytest.fixture(scope="module")
def stack(live_run, ddp_run, runs_root, alertmanager, prometheus_factory) -> Prometheus:  # noqa: F811
    """Prometheus scraping both runs every second through file_sd, evaluating the exported rules every
    second and sending alerts to the Alertmanager; returned once the targets are up and alerts fire."""
    config = scrape_config([runs_root], JOB, "1s", rule_files=[promrules.RULES_FILE],
                           alertmanagers=[alertmanager.address])
    prom = prometheus_factory(config, {promrules.RULES_FILE: dump_yaml(promrules.prometheus_rules())})
    wait_until(lambda: len(prom.query(f'up{{job="{JOB}"}} == 1')) == 3, 20, "3 trainmon targets up")
    # Enough samples for rate() over $__rate_interval, and the exported rules evaluated.
    wait_until(lambda: prom.query(f'count_over_time(trainmon_optimizer_steps_total{{run="{LIVE}"}}[1m]) >= 4'),
               20, "4 scrapes of the live run")
    wait_until(lambda: prom.query('ALERTS{alertstate="firing"}'), 20, "an exported alert firing")
    return prom


# -- (a) file_sd discovery ---------------------------------------------------------------------------

@pytest.mark.slow
def test_prometheus_discovers_runs_through_targets_json(stack: Prometheus, live_run) -> None:
    up = stack.query(f'up{{job="{JOB}"}}')
    found = sorted((s["metric"]["trainmon_run"], s["metric"]["trainmon_rank"], s["value"][1]) for s in up)
    assert found == [(DDP, "0", "1"), (DDP, "1", "1"), (LIVE, "0", "1")]
    live_url = json.loads((live_run.run_dir / "targets.json").read_text())[0]["targets"][0]
    assert any(s["metric"]["instance"] == live_url for s in up)

    names = set(stack.api("label/__name__/values", **{"match[]": f'{{run="{LIVE}"}}'}))
    for name in ("trainmon_loss", "trainmon_learning_rate", "trainmon_grad_norm", "trainmon_grad_norm_clipped",
                 "trainmon_optimizer_steps_total", "trainmon_step_duration_seconds_bucket", "trainmon_tokens_total",
                 "trainmon_last_step_timestamp_seconds"):
        assert name in names, f"{name} not scraped from the live run: {sorted(names)}"
    # The loop is live: its step counter moves between scrapes.
    steps = f'trainmon_optimizer_steps_total{{run="{LIVE}"}}'
    first = float(stack.query(steps)[0]["value"][1])
    wait_until(lambda: float(stack.query(steps)[0]["value"][1]) > first, 10, "the live run's steps to grow")


# -- (b) every dashboard query -------------------------------------------------------------------------

_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*(\w+)\)$")


def _regex(values: list[str]) -> str:
    """A multi-value variable as Grafana's Prometheus datasource writes it: escaped, alternated."""
    return "(" + "|".join(re.escape(v).replace("\\", "\\\\") for v in values) + ")"


def _fill(expr: str, variables: dict[str, str]) -> str:
    for name, value in sorted({**BUILTINS, **variables}.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unfilled variable in {expr}"
    return expr


def _resolve_variables(prom: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each query variable's label_values against Prometheus (in order: later ones use earlier ones)."""
    filled: dict[str, str] = {}
    for var in dashboard["templating"]["list"]:
        m = _LABEL_VALUES.match(var["query"]["query"])
        assert m, f"{dashboard['uid']}: variable ${var['name']} is not a label_values query: {var['query']}"
        selector, label = _fill(m.group(1), filled), m.group(2)
        values = prom.api(f"label/{label}/values", **{"match[]": selector})
        assert values, f"{dashboard['uid']}: variable ${var['name']} ({var['definition']}) has no values"
        filled[f"${var['name']}"] = _regex(values)
    return filled


def _panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(f"{dashboard['uid']} panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
            for p in dashboard["panels"] for t in p["targets"]]


@pytest.mark.slow
def test_every_dashboard_query_returns_series(stack: Prometheus) -> None:
    failures, checked = [], 0
    for dashboard in grafana.dashboards().values():
        variables = _resolve_variables(stack, dashboard)
        assert set(variables) >= {"$job", "$run"}
        for where, expr in _panel_queries(dashboard):
            query = _fill(expr, variables)
            checked += 1
            try:
                if not stack.query(query):
                    failures.append(f"{where}: no series for {query}")
            except AssertionError as e:
                failures.append(f"{where}: {e}")
        for ann in dashboard["annotations"]["list"][1:]:  # annotation queries must at least run
            try:
                stack.query(_fill(ann["expr"], variables))
            except AssertionError as e:
                failures.append(f"{dashboard['uid']} annotation {ann['name']!r}: {e}")
    assert not failures, "\n".join(failures)
    assert checked >= 30


@pytest.mark.slow
def test_attention_and_rank_variables_take_real_values(stack: Prometheus) -> None:
    variables = _resolve_variables(stack, grafana.attention())
    assert variables["$layer"] == _regex(sorted(LAYERS))
    assert variables["$run"] == _regex(sorted([DDP, LIVE]))
    assert _resolve_variables(stack, grafana.ddp())["$rank"] == _regex(["0", "1"])


# -- (c) alerts through Alertmanager to a webhook ------------------------------------------------------

def _firing(alerts: list[dict[str, Any]], **labels: str) -> list[dict[str, Any]]:
    return [a for a in alerts if a.get("status", "firing") == "firing"
            and all(a["labels"].get(k) == v for k, v in labels.items())]


@pytest.mark.slow
def test_exported_alerts_fire_and_reach_the_webhook(stack: Prometheus, webhook, alertmanager) -> None:  # noqa: F811
    wanted = {
        "TrainmonAlertActive": {"rule": "loss.nonfinite", "severity": "critical", "run": DDP, "rank": "1"},
        "TrainmonLossNonFinite": {"rule": "loss.nonfinite", "severity": "critical", "run": DDP, "rank": "1"},
    }

    def delivered(bodies: list[Any]) -> dict[str, dict[str, Any]] | None:
        alerts = alerts_in(bodies)
        found = {name: _firing(alerts, alertname=name, **labels) for name, labels in wanted.items()}
        return {name: a[0] for name, a in found.items()} if all(found.values()) else None

    got = webhook.wait_for(delivered, timeout=30)
    fix = promrules.rule_fix("loss.nonfinite")
    for name, alert in got.items():
        assert alert["annotations"]["hint"] == fix, name
        assert "ddp-run" in alert["annotations"]["summary"] and "rank 1" in alert["annotations"]["summary"]
    assert all(b["receiver"] == "webhook" for b in webhook.bodies())
    # The Alertmanager holds them too; Prometheus shows them firing.
    assert {a["labels"]["alertname"] for a in alertmanager.alerts()} >= set(wanted)
    firing = stack.api("alerts")["alerts"]
    # The healthy ranks are neither stalled nor down, and rank 0's loss is finite.
    assert not _firing(firing, alertname="TrainmonRunStalled")
    assert not _firing(firing, alertname="TrainmonTargetDown")
    assert not _firing(firing, alertname="TrainmonLossNonFinite", run=DDP, rank="0")
    assert not _firing(firing, alertname="TrainmonLossNonFinite", run=LIVE)


# -- (d) promtool --------------------------------------------------------------------------------------

def _promtool(*args: str, cwd: Path) -> str:
    proc = subprocess.run([binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_promtool_checks_and_tests_the_exported_rules(tmp_path: Path) -> None:
    promrules.write_rules(tmp_path)
    out = _promtool("check", "rules", promrules.RULES_FILE, cwd=tmp_path)
    assert f"SUCCESS: {len(promrules.alert_definitions())} rules found" in out
    _promtool("test", "rules", promrules.TESTS_FILE, cwd=tmp_path)


@pytest.mark.slow
def test_promtool_tests_pass_with_other_thresholds(tmp_path: Path) -> None:
    """The generated unit tests follow the configured thresholds, not just the defaults."""
    options = {"run.stalled": {"floor_seconds": 600, "factor": 3}, "amp.overflow": {"max_rate": 0.1, "window": 50}}
    promrules.write_rules(tmp_path, options)
    assert "> 0.1\n" in (tmp_path / promrules.RULES_FILE).read_text()
    _promtool("test", "rules", promrules.TESTS_FILE, cwd=tmp_path)


@pytest.mark.slow
def test_promtool_checks_the_exported_scrape_config(tmp_path: Path, runs_root: Path, live_run) -> None:
    promrules.write_rules(tmp_path)
    config = scrape_config([runs_root], daemon="127.0.0.1:9739", rule_files=[promrules.RULES_FILE],
                           alertmanagers=["127.0.0.1:9093"])
    (tmp_path / "prometheus.yml").write_text(dump_yaml(config))
    _promtool("check", "config", "prometheus.yml", cwd=tmp_path)


@pytest.mark.slow
def test_promtool_accepts_the_committed_prometheus_files() -> None:
    prom_dir = ROOT / "grafana" / "prometheus"
    _promtool("check", "config", "prometheus.yml", cwd=prom_dir)
    _promtool("test", "rules", promrules.TESTS_FILE, cwd=prom_dir)


def test_unit_tests_cover_every_alert_firing_and_not() -> None:
    names = [r["alert"] for g in promrules.prometheus_rules()["groups"] for r in g["rules"]]
    assert names == ["TrainmonRunStalled", "TrainmonAlertActive", "TrainmonSkippedStepRate", "TrainmonLossNonFinite",
                     "TrainmonTargetDown"]
    checks = [c for t in promrules.promtool_tests()["tests"] for c in t["alert_rule_test"]]
    for name in names:
        assert any(c["alertname"] == name and c["exp_alerts"] for c in checks), f"{name} never expected to fire"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in checks), f"{name} never expected quiet"


# -- (e) the committed tree ----------------------------------------------------------------------------

def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_committed_grafana_tree_is_what_the_generators_produce(tmp_path: Path) -> None:
    grafana.grafana_tree(tmp_path)
    committed, generated = _tree(ROOT / "grafana"), _tree(tmp_path)
    hint = "grafana/ is out of date: run `make grafana` and commit the result"
    assert sorted(committed) == sorted(generated), f"{hint} (files differ)"
    stale = [name for name in generated if committed[name] != generated[name]]
    assert not stale, f"{hint} (changed: {', '.join(stale)})"


def _datasources(node: Any, path: str = "") -> list[tuple[str, Any]]:
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource":
                found.append((path, v))
            found += _datasources(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _datasources(v, f"{path}[{i}]")
    return found


def test_dashboards_use_the_provisioned_datasource_uid() -> None:
    files = sorted((ROOT / "grafana").rglob("*"))
    for f in files:
        if f.is_file():
            assert "${DS_" not in f.read_text(), f"{f}: file provisioning cannot fill ${{DS_...}} inputs"
    provisioned = (ROOT / "grafana/provisioning/datasources/trainmon.yaml").read_text()
    assert f"uid: {grafana.DATASOURCE_UID}" in provisioned
    uids = []
    for f in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        uids.append(d["uid"])
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{f.name}: duplicate panel ids"
        for p in d["panels"]:
            assert p["datasource"] == {"type": "prometheus", "uid": grafana.DATASOURCE_UID}, (f.name, p["title"])
            assert p["targets"] and all(t["datasource"]["uid"] == grafana.DATASOURCE_UID for t in p["targets"])
        for where, ds in _datasources(d):
            if where.startswith(".annotations.list[0]"):  # Grafana's built-in annotations
                continue
            assert ds == {"type": "prometheus", "uid": grafana.DATASOURCE_UID}, (f.name, where, ds)
        assert d["schemaVersion"] == grafana.SCHEMA_VERSION
    assert sorted(uids) == ["trainmon-alerts", "trainmon-attention", "trainmon-ddp", "trainmon-overview"]


@pytest.mark.slow
def test_a_run_started_later_is_discovered_without_touching_prometheus(stack: Prometheus, runs_root: Path) -> None:
    """file_sd over <runs>/.trainmon-targets/*.json: Prometheus picks up a new run by itself."""
    registry = CollectorRegistry()
    metrics = TrainMetrics(registry, "late-run", 0)
    metrics.observe(StepRecord(step=0, loss=3.0, lr=[1e-3]))
    server = serve(registry, port=0)
    rd = RunDir(runs_root / "late-run", 0)
    try:
        rd.add_endpoint(Endpoint(rank=0, host=server.host, port=server.port, url=server.url), "late-run")
        assert rd.shared_targets_path.exists()
        wait_until(lambda: stack.query('trainmon_loss{run="late-run"}'), 30, "the late run scraped")
    finally:
        rd.remove_endpoint(0)
        server.close()
    assert not rd.shared_targets_path.exists()
