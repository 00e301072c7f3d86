"""Exports generated from the rule catalogue (no servers): options flow into rules and panels,
scrape configs stay within what Prometheus's file_sd accepts, the CLI functions write files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from monitor.cli.export import export_grafana, export_prometheus_rules, export_scrape_config
from monitor.config import load_config
from monitor.exporters import grafana, promrules
from monitor.exporters.scrape import file_sd_files, scrape_config
from monitor.rules import REGISTRY


def _rules(options=None) -> dict[str, dict]:
    return {r["alert"]: r for g in promrules.prometheus_rules(options)["groups"] for r in g["rules"]}


def test_thresholds_come_from_the_rule_configs() -> None:
    defaults = _rules()
    stalled = REGISTRY.get("run.stalled").Config()
    assert f", {stalled.floor_seconds:g})" in defaults["TrainmonRunStalled"]["expr"]
    assert f"clamp_min({stalled.factor:g} * " in defaults["TrainmonRunStalled"]["expr"]
    overflow = REGISTRY.get("amp.overflow").Config()
    assert f") > {overflow.max_rate}\n" in defaults["TrainmonSkippedStepRate"]["expr"]

    cfg = load_config({"rules": {"run.stalled": {"floor_seconds": 300, "factor": 4},
                                 "amp.overflow": {"max_rate": 0.05, "severity": "critical"}}})
    custom = _rules(cfg)
    assert ", 300)" in custom["TrainmonRunStalled"]["expr"] and "clamp_min(4 * " in custom["TrainmonRunStalled"]["expr"]
    assert ") > 0.05\n" in custom["TrainmonSkippedStepRate"]["expr"]
    assert custom["TrainmonSkippedStepRate"]["labels"]["severity"] == "critical"
    # A mapping of rule options works as well as a MonitorConfig.
    assert _rules({"amp.overflow": {"max_rate": 0.05}})["TrainmonSkippedStepRate"]["expr"] == \
        custom["TrainmonSkippedStepRate"]["expr"]


def test_disabled_rules_export_no_alert() -> None:
    names = set(_rules({"amp.overflow": {"enabled": False}, "loss.nonfinite": {"enabled": False}}))
    assert names == {"TrainmonRunStalled", "TrainmonAlertActive", "TrainmonTargetDown"}


def test_every_alert_has_for_severity_summary_and_hint() -> None:
    for name, rule in _rules().items():
        assert rule["for"] and rule["labels"]["severity"], name
        assert rule["annotations"]["summary"] and rule["annotations"]["hint"], name
    assert _rules()["TrainmonLossNonFinite"]["annotations"]["hint"] == promrules.rule_fix("loss.nonfinite")
    active_hint = _rules()["TrainmonAlertActive"]["annotations"]["hint"]
    for rule_id in REGISTRY.ids():  # the active-alert rule carries every rule's fix, chosen by its label
        assert f'eq $labels.rule "{rule_id}"' in active_hint and promrules.rule_fix(rule_id) in active_hint


def test_panel_thresholds_follow_the_rule_configs() -> None:
    def steps(dashboard: dict, title: str) -> list:
        panel = next(p for p in dashboard["panels"] if p["title"] == title)
        return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]

    assert steps(grafana.attention(), "Max attention logit") == [None, 100.0, 1000.0]
    custom = grafana.attention({"attention.logit_growth": {"warning": 50, "critical": 500}})
    assert steps(custom, "Max attention logit") == [None, 50.0, 500.0]
    assert steps(grafana.overview({"run.stalled": {"floor_seconds": 600}}), "Since the last step") == [None, 300, 600]


def test_defaults_are_read_from_the_rule_config_classes(monkeypatch) -> None:
    """No exporter repeats a rule's default: a changed default reaches the alert rules and the panels."""
    from pydantic import create_model

    for rule_id, name, value in (("run.stalled", "floor_seconds", 900.0), ("amp.scale_collapse", "floor", 4.0),
                                 ("attention.entropy_collapse", "floor", 0.2),
                                 ("attention.logit_growth", "warning", 70.0)):
        rule = REGISTRY.get(rule_id)
        monkeypatch.setattr(rule, "Config", create_model("Changed", __base__=rule.Config, **{name: (float, value)}))

    def steps(dashboard: dict, title: str) -> list:
        panel = next(p for p in dashboard["panels"] if p["title"] == title)
        return [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]

    assert steps(grafana.overview(), "Since the last step") == [None, 450, 900]
    assert steps(grafana.overview(), "Loss scale and skipped steps") == [None, 4.0]
    assert steps(grafana.attention(), "Attention entropy ratio") == [None, 0.2]
    assert steps(grafana.attention(), "Max attention logit") == [None, 70.0, 1000.0]
    assert ", 900)" in _rules()["TrainmonRunStalled"]["expr"]


def test_dashboards_are_deterministic() -> None:
    assert json.dumps(grafana.dashboards(), sort_keys=True) == json.dumps(grafana.dashboards(), sort_keys=True)
    for d in grafana.dashboards().values():
        assert [p["id"] for p in d["panels"]] == list(range(1, len(d["panels"]) + 1))


def test_dashboards_with_a_run_variable_mark_new_attempts() -> None:
    marked = []
    for name, d in grafana.dashboards().items():
        if not any(v["name"] == "run" for v in d["templating"]["list"]):
            continue
        (ann,) = [a for a in d["annotations"]["list"] if a["name"] == "Attempts (resume/restart)"]
        assert "changes(trainmon_attempt{" in ann["expr"] and 'run=~"$run"' in ann["expr"], name
        assert ann["enable"] and "filter" not in ann  # shown, on every panel
        marked.append(name)
    assert sorted(marked) == ["alerts", "attention", "ddp", "overview"]


def _run(root: Path, name: str) -> Path:
    from monitor.runlog.rundir import RunDir
    from monitor.schema import Endpoint

    rd = RunDir(root / name)
    rd.add_endpoint(Endpoint(rank=0, host="127.0.0.1", port=9740, url="http://127.0.0.1:9740/metrics"), name)
    return rd.path


def test_scrape_config_lists_each_runs_targets_json(tmp_path: Path) -> None:
    a, b = _run(tmp_path / "runs", "a"), _run(tmp_path / "runs", "b")
    (tmp_path / "runs" / "not-a-run").mkdir()
    expected = [str(a.resolve() / "targets.json"), str(b.resolve() / "targets.json")]
    shared = [str((tmp_path / "runs").resolve() / ".trainmon-targets" / "*.json")]
    assert file_sd_files(tmp_path / "runs") == shared  # a directory holding runs: later runs are found too
    assert sorted(p.name for p in (tmp_path / "runs" / ".trainmon-targets").iterdir()) == ["a.json", "b.json"]
    assert file_sd_files(str(tmp_path / "runs" / "*")) == expected  # a glob of run directories
    assert file_sd_files([a, a / "targets.json"]) == [expected[0]]  # the same file once
    assert file_sd_files("sd/*.json") == ["sd/*.json"]  # a file_sd glob Prometheus accepts: kept
    with pytest.raises(ValueError, match="only in the file name"):
        file_sd_files("runs/*/targets.json")  # Prometheus rejects a '*' in a directory

    cfg = scrape_config(tmp_path / "runs", interval="5s", daemon="127.0.0.1:9739", rule_files=["alerts.yml"],
                        alertmanagers=["127.0.0.1:9093"])
    assert cfg["global"] == {"scrape_interval": "5s", "evaluation_interval": "5s"}
    assert cfg["scrape_configs"][0] == {"job_name": "trainmon", "scrape_interval": "5s",
                                        "file_sd_configs": [{"files": shared}]}
    assert cfg["scrape_configs"][1]["job_name"] == "trainmon-watch"
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    with pytest.raises(ValueError, match="no such directory"):
        scrape_config(tmp_path / "missing")


def test_cli_export_functions_write_files(tmp_path: Path) -> None:
    out = tmp_path / "rules" / "trainmon.yml"
    text = export_prometheus_rules(out, load_config({"rules": {"amp.overflow": {"max_rate": 0.03}}}))
    assert yaml.safe_load(out.read_text()) == yaml.safe_load(text)
    tests = yaml.safe_load((tmp_path / "rules" / "trainmon.test.yml").read_text())
    assert tests["rule_files"] == ["trainmon.yml"] and tests["tests"]
    buf = io.StringIO()
    export_prometheus_rules(buf)
    assert yaml.safe_load(buf.getvalue()) == promrules.prometheus_rules()

    run = _run(tmp_path / "runs", "r")
    cfg = yaml.safe_load(export_scrape_config(tmp_path / "prometheus.yml", [run], interval="2s"))
    assert cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(run.resolve() / "targets.json")]

    paths = export_grafana(tmp_path / "g", prometheus_url="http://prom:9090", run_dirs=[run])
    assert {p.relative_to(tmp_path / "g").as_posix() for p in paths} >= {
        "dashboards/overview.json", "provisioning/datasources/trainmon.yaml", "prometheus/prometheus.yml"}
    ds = yaml.safe_load((tmp_path / "g/provisioning/datasources/trainmon.yaml").read_text())["datasources"][0]
    assert ds["uid"] == "trainmon-prometheus" and ds["url"] == "http://prom:9090"


def test_export_commands(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from monitor.cli.app import app

    runner = CliRunner()
    rules = runner.invoke(app, ["export", "prometheus-rules"])
    assert rules.exit_code == 0 and {r["alert"] for r in yaml.safe_load(rules.stdout)["groups"][0]["rules"]} >= {
        "TrainmonRunStalled", "TrainmonAlertActive", "TrainmonLossNonFinite"}
    out = tmp_path / "alerts.yml"
    assert runner.invoke(app, ["export", "prometheus-rules", "--out", str(out)]).exit_code == 0
    assert (tmp_path / "alerts.test.yml").exists()
    _run(tmp_path / "runs", "a")
    sc = runner.invoke(app, ["export", "scrape-config", str(tmp_path / "runs"), "--daemon", "127.0.0.1:9739"])
    assert sc.exit_code == 0, sc.output
    assert yaml.safe_load(sc.stdout)["scrape_configs"][0]["file_sd_configs"][0]["files"][0].endswith(
        ".trainmon-targets/*.json")
    bad = runner.invoke(app, ["export", "scrape-config", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "no such directory" in bad.output
    gf = runner.invoke(app, ["export", "grafana", str(tmp_path / "gf")])
    assert gf.exit_code == 0 and (tmp_path / "gf" / "dashboards" / "overview.json").exists()
