"""The exported Prometheus rules, scrape config and Grafana dashboards, against real servers.

A monitored training loop (kept stepping in a thread) and a second endpoint serving two DDP
ranks with attention statistics, a NaN loss and an alert are discovered by a real Prometheus
through their targets.json (file_sd); every dashboard query must return data there; exported
alert rules fire and reach a real Alertmanager, which delivers them to a local webhook. promtool
checks the exported files, and the committed grafana/ tree must be what the generators produce.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TinyLM, batches
from prometheus_client import CollectorRegistry
from servers import Prometheus, alertmanager, alerts_in, binary, prometheus_factory, wait_until, webhook  # noqa: F401

import monitor
from monitor.exporters import grafana, promrules
from monitor.exporters.endpoint import serve
from monitor.exporters.generated import dump_yaml
from monitor.exporters.prometheus import TrainMetrics
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
    """Each query variable's label_values against Prometheus (in order: later ones use earlier ones); a
    custom variable (ranks per panel) takes its current value; the datasource variable is this Prometheus."""
    filled: dict[str, str] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            assert var["query"] == "prometheus"
            continue
        if var["type"] == "custom":
            assert var["current"]["value"] in var["query"].split(",")
            filled[f"${var['name']}"] = var["current"]["value"]
            continue
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
                found = stack.query(_fill(ann["expr"], variables))
            except AssertionError as e:
                failures.append(f"{dashboard['uid']} annotation {ann['name']!r}: {e}")
                continue
            if ann["name"] == "Alerts firing":  # rank 1 of the DDP run raised loss.nonfinite: drawn, once per run
                marks = [(s["metric"]["run"], s["metric"]["rule"]) for s in found]
                if marks.count((DDP, "loss.nonfinite")) != 1:
                    failures.append(f"{dashboard['uid']} annotation 'Alerts firing': {marks}")
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
        assert alert["annotations"]["runbook_url"] == f"{promrules.RUNBOOK_BASE}#lossnonfinite", name
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


def test_committed_dashboards_select_the_provisioned_datasource() -> None:
    """File provisioning fills no ${DS_...} inputs: the committed dashboards carry the import input only as
    the $datasource variable's current value, whose text, the provisioned datasource's name, is what
    Grafana selects it by there (the import test in test_export resolves both ways)."""
    provisioned = yaml.safe_load((ROOT / "grafana/provisioning/datasources/trainmon.yaml").read_text())
    (ds,) = provisioned["datasources"]
    assert (ds["name"], ds["uid"], ds["type"]) == (grafana.DATASOURCE_NAME, grafana.DATASOURCE_UID, "prometheus")
    for f in sorted((ROOT / "grafana").rglob("*")):
        if f.is_file() and f.parent.name != "dashboards":
            assert "${DS_" not in f.read_text(), f
    uids = []
    for f in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        text = f.read_text()
        d = json.loads(text)
        uids.append(d["uid"])
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), f"{f.name}: duplicate panel ids"
        (ds_var,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
        assert ds_var["current"] == {"selected": False, "text": ds["name"], "value": f"${{{grafana.DS_INPUT}}}"}
        assert text.count("${DS_") == 1, f"{f.name}: the import input is used only by the $datasource variable"
        ref = {"type": "prometheus", "uid": f"${{{ds_var['name']}}}"}
        for p in d["panels"]:
            assert p["datasource"] == ref and p["targets"] and all(t["datasource"] == ref for t in p["targets"])
        for where, v in _datasources(d):
            if where.startswith(".annotations.list[0]"):  # Grafana's built-in annotations
                continue
            assert v == ref, (f.name, where, v)
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


# -- (f) spikes between scrapes, run info, no _created series ------------------------------------------

def _at(expr: str, prom: Prometheus) -> float:
    [s] = prom.query(expr)
    return float(s["value"][1])


@pytest.mark.slow
def test_a_one_step_spike_between_two_scrapes_reaches_prometheus(stack: Prometheus, runs_root: Path) -> None:
    """Latest-value gauges miss a spike that comes and goes between two scrapes; the _max/_min series keep it."""
    run, sel = "spiky", '{run="spiky"}'
    registry = CollectorRegistry()
    metrics = TrainMetrics(registry, run, 0)

    def rec(step: int, loss: float, grad_norm: float, scale: float) -> StepRecord:
        return StepRecord(step=step, time=time.time(), loss=loss, grad_norm=grad_norm, loss_scale=scale, lr=[1e-3])

    metrics.observe(rec(0, 2.0, 1.0, 65536.0))
    server = serve(registry, port=0)
    rd = RunDir(runs_root / run, 0)
    scraped_at = f"timestamp(trainmon_loss{sel})"
    try:
        rd.add_endpoint(Endpoint(rank=0, host=server.host, port=server.port, url=server.url), run)
        wait_until(lambda: stack.query(scraped_at), 30, "the first scrape of the run")
        # One step spikes, the next is back to normal: written together, so no scrape sees the spike in
        # the latest-value gauges.
        metrics.observe_many([rec(1, 50.0, 80.0, 1024.0), rec(2, 2.0, 1.0, 65536.0)])
        written = time.time()
        wait_until(lambda: _at(scraped_at, stack) > written, 10, "a scrape after the spike")
        assert _at(f"max_over_time(trainmon_loss{sel}[5m])", stack) == 2.0  # the gauge never showed it
        assert _at(f"max_over_time(trainmon_loss_max{sel}[5m])", stack) == 50.0
        assert _at(f"max_over_time(trainmon_grad_norm{sel}[5m])", stack) == 1.0
        assert _at(f"max_over_time(trainmon_grad_norm_max{sel}[5m])", stack) == 80.0
        assert _at(f"min_over_time(trainmon_loss_scale{sel}[5m])", stack) == 65536.0
        assert _at(f"min_over_time(trainmon_loss_scale_min{sel}[5m])", stack) == 1024.0
    finally:
        rd.remove_endpoint(0)
        server.close()


def test_extremes_span_the_window_of_step_times() -> None:
    from monitor.exporters.prometheus import Extreme

    def recs(*pairs: tuple[float, float | None]) -> list[StepRecord]:
        return [StepRecord(step=i, time=t, loss=v) for i, (t, v) in enumerate(pairs)]

    top = Extreme(60.0)
    assert top.add(recs((0, 1.0), (1, 9.0), (2, 3.0)), "loss") == 9.0
    assert top.add(recs((30, 2.0)), "loss") == 9.0          # still within 60 s of the newest step
    assert top.add(recs((61, 2.5)), "loss") == 3.0          # the spike at t=1 left the window
    assert top.add(recs((62, None)), "loss") == 2.5         # (2, 62]: a step without a loss adds nothing
    assert math.isnan(top.add(recs((63, float("nan"))), "loss"))  # NaN is the most extreme
    assert top.add(recs((200, 1.0)), "loss") == 1.0
    # A backlog (the daemon's): only the steps of the window matter.
    assert Extreme(10.0).add(recs(*[(t, 100.0 - t) for t in range(100)]), "loss") == 10.0
    low = Extreme(60.0, lowest=True)
    assert low.add(recs((0, 65536.0), (1, 1024.0), (2, 2048.0)), "loss") == 1024.0
    assert low.add(recs((100, 4096.0)), "loss") == 4096.0

    registry = CollectorRegistry()
    m = TrainMetrics(registry, "r", 1, extremes_window=60.0)  # rank 1: its own loss, no global statistics
    m.observe_many([StepRecord(step=0, time=0, rank=1, loss=7.0, grad_norm=5.0, loss_scale=8.0),
                    StepRecord(step=1, time=1, rank=1, loss=1.0, grad_norm=1.0, loss_scale=16.0)])
    assert registry.get_sample_value("trainmon_loss_max", {"run": "r", "rank": "1"}) == 7.0
    assert registry.get_sample_value("trainmon_grad_norm_max", {"run": "r", "rank": "1"}) is None


@pytest.mark.slow
def test_run_info_is_scraped_and_no_created_series(stack: Prometheus) -> None:
    [info] = stack.query(f'trainmon_run_info{{run="{LIVE}"}}')
    assert info["metric"]["version"] == monitor.__version__ and info["metric"]["world_size"] == "1"
    assert info["value"][1] == "1"
    assert stack.query(f'count({{__name__=~".+_created", job="{JOB}"}})') == []
    assert stack.query(f'trainmon_optimizer_steps_total{{run="{LIVE}"}}')  # the counters are there, without them


# -- (g) TLS and basic auth ------------------------------------------------------------------------------

def _self_signed(where: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    cert, key = where / f"{name}.crt", where / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True, timeout=60)
    return cert, key


def _get(url: str, ctx: Any = None, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    import base64
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.slow
def test_tls_and_basic_auth_endpoint_is_scraped_with_the_exported_config(tmp_path: Path, prometheus_factory) -> None:  # noqa: F811
    import ssl

    from monitor.cli.export import export_scrape_config
    from monitor.config import load_config
    from monitor.exporters.endpoint import hash_password, metrics_endpoint

    cert, key = _self_signed(tmp_path, "server")
    password_file = tmp_path / "scrape-password"
    password_file.write_text("s3cret-pw")
    cfg = load_config({"metrics": {"port": 0, "tls_cert_file": str(cert), "tls_key_file": str(key),
                                   "basic_auth_user": "prometheus",
                                   "basic_auth_password_hash": hash_password("s3cret-pw", iterations=1000)}})
    registry = CollectorRegistry()
    TrainMetrics(registry, "secure", 0).observe(StepRecord(step=0, loss=3.0, lr=[1e-3]))
    server, [ep] = metrics_endpoint(registry, cfg.metrics, 0, 0)
    assert server is not None and ep.url == f"https://127.0.0.1:{server.port}/metrics" == server.url
    runs = tmp_path / "runs"
    rd = RunDir(runs / "secure", 0)
    try:
        rd.add_endpoint(ep, "secure")
        ctx = ssl.create_default_context(cafile=str(cert))
        assert _get(server.url, ctx)[0] == 401
        assert _get(server.url, ctx, ("prometheus", "wrong"))[0] == 401
        status, body = _get(server.url, ctx, ("prometheus", "s3cret-pw"))
        assert status == 200 and b'trainmon_loss{rank="0",run="secure"} 3.0' in body
        with pytest.raises(OSError):  # plain HTTP on the TLS port gets nothing
            _get(server.url.replace("https://", "http://"))

        prom_dir = tmp_path / "prometheus-config"
        text = export_scrape_config(prom_dir / "prometheus.yml", [runs], interval="1s", config=cfg,
                                    password_file=str(password_file))
        config = yaml.safe_load(text)
        [scrape_job] = config["scrape_configs"]
        assert scrape_job["scheme"] == "https" and scrape_job["tls_config"] == {"ca_file": str(cert)}
        assert scrape_job["basic_auth"] == {"username": "prometheus", "password_file": str(password_file)}
        assert "s3cret" not in text
        _promtool("check", "config", "prometheus.yml", cwd=prom_dir)
        prom = prometheus_factory(config)
        wait_until(lambda: prom.query('trainmon_loss{run="secure"} == 3'), 30, "the HTTPS endpoint scraped")
        assert prom.query('up{trainmon_run="secure"}')[0]["value"][1] == "1"
    finally:
        rd.remove_endpoint(0)
        server.close()


@pytest.mark.slow
def test_client_certificates_are_required_with_a_client_ca(tmp_path: Path) -> None:
    import socket
    import ssl

    from monitor.exporters.endpoint import BasicAuth

    cert, key = _self_signed(tmp_path, "server")
    client_cert, client_key = _self_signed(tmp_path, "client")
    registry = CollectorRegistry()
    TrainMetrics(registry, "mtls", 0).observe(StepRecord(step=0, loss=1.0))
    server = serve(registry, port=0, certfile=str(cert), keyfile=str(key), client_cafile=str(client_cert),
                   auth=BasicAuth("u", "p"))
    try:
        # A client that connects and never starts the handshake does not block the endpoint.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            anonymous = ssl.create_default_context(cafile=str(cert))
            with pytest.raises(OSError):  # no client certificate: refused in the handshake
                _get(server.url, anonymous, ("u", "p"))
            mutual = ssl.create_default_context(cafile=str(cert))
            mutual.load_cert_chain(str(client_cert), str(client_key))
            assert _get(server.url, mutual, ("u", "p"))[0] == 200
            assert _get(server.url, mutual)[0] == 401
    finally:
        server.close()


def test_the_scrape_config_needs_what_prometheus_must_present(tmp_path: Path) -> None:
    from monitor.cli.export import endpoint_security
    from monitor.config import ConfigError, MetricsConfig, load_config

    plain = MetricsConfig()
    assert endpoint_security(plain) == {}
    hashed = MetricsConfig(basic_auth_user="u", basic_auth_password_hash="pbkdf2_sha256$1000$salt$AAAA")
    with pytest.raises(ValueError, match="password_file"):
        endpoint_security(hashed)
    assert endpoint_security(hashed, password_file="/etc/p") == {"basic_auth": {"username": "u", "password_file": "/etc/p"}}
    secret = load_config({"metrics": {"basic_auth_user": "u", "basic_auth_password": "pw"}})
    assert endpoint_security(secret.metrics)["basic_auth"] == {"username": "u", "password": "pw"}
    assert secret.model_dump(mode="json")["metrics"]["basic_auth_password"] == "**********"  # run.json
    mtls = MetricsConfig(tls_cert_file="s.crt", tls_key_file="s.key", tls_client_ca_file="ca.crt", tls_ca_file="root.crt")
    with pytest.raises(ValueError, match="client"):
        endpoint_security(mtls)
    assert endpoint_security(mtls, client_cert_file="c.crt", client_key_file="c.key") == {
        "scheme": "https", "tls_config": {"ca_file": "root.crt", "cert_file": "c.crt", "key_file": "c.key"}}
    # Pairs and formats are checked at load time, naming the key; a numeric password from the environment is text.
    for bad, where in (({"tls_cert_file": "s.crt"}, "tls_key_file"), ({"basic_auth_user": "u"}, "basic_auth_password"),
                       ({"basic_auth_user": "u", "basic_auth_password_hash": "md5$x"}, "basic_auth_password_hash"),
                       ({"advertise": "host:0"}, "advertise")):
        with pytest.raises(ConfigError, match=where):
            load_config({"metrics": bad})
    env = load_config(None, environ={"TRAINMON_METRICS__BASIC_AUTH_USER": "u",
                                     "TRAINMON_METRICS__BASIC_AUTH_PASSWORD": "12345"})
    assert env.metrics.basic_auth_password.get_secret_value() == "12345"
