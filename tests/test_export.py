"""Exports generated from the rule catalogue (no servers): options flow into rules and panels,
scrape configs stay within what Prometheus's file_sd accepts, the CLI functions write files."""

from __future__ import annotations

import io
import json
import re
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
                                        "file_sd_configs": [{"files": shared, "refresh_interval": "30s"}]}
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


# -- dashboards that import anywhere, alerts with runbooks ---------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
DS_REF = {"type": "prometheus", "uid": "${datasource}"}


def _datasource_refs(node, path: str = "") -> list[tuple[str, object]]:
    """Every `datasource` value in a dashboard, with where it is."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource":
                found.append((path, v))
            found += _datasource_refs(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _datasource_refs(v, f"{path}[{i}]")
    return found


def _committed_dashboards() -> dict[str, str]:
    files = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
    assert [f.stem for f in files] == sorted(grafana.DASHBOARDS)
    return {f.stem: f.read_text() for f in files}


def test_every_dashboard_has_a_datasource_variable_and_import_inputs() -> None:
    for name, d in grafana.dashboards().items():
        ds_var, *others = d["templating"]["list"]
        assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus" and ds_var["name"] == "datasource"
        assert not ds_var["multi"] and not ds_var["includeAll"], name
        assert all(v["type"] != "datasource" for v in others), name
        (inp,) = d["__inputs"]
        assert inp == {**inp, "name": grafana.DS_INPUT, "type": "datasource", "pluginId": "prometheus"}, name
        assert ds_var["current"]["value"] == f"${{{grafana.DS_INPUT}}}", name
        requires = {(r["type"], r["id"]) for r in d["__requires"]}
        assert {("grafana", "grafana"), ("datasource", "prometheus")} <= requires, name
        assert {("panel", p["type"]) for p in d["panels"]} <= requires, name
        # No fixed uid anywhere: every panel, target, annotation and query variable goes through $datasource.
        assert grafana.DATASOURCE_UID not in json.dumps(d), name
        refs = dict(_datasource_refs(d))
        assert refs.pop(".annotations.list[0]") == {"type": "grafana", "uid": "-- Grafana --"}  # Grafana's built-in
        assert refs and all(ref == DS_REF for ref in refs.values()), (name, refs)
        assert all(p["datasource"] == DS_REF and all(t["datasource"] == DS_REF for t in p["targets"])
                   for p in d["panels"]), name
        assert all(v["datasource"] == DS_REF for v in others if v["type"] == "query"), name
        assert all(a["datasource"] == DS_REF for a in d["annotations"]["list"][1:]), name


_INPUT_REF = re.compile(r"\$\{([^}]+)\}")


def _grafana_import(text: str, chosen: dict[str, str]) -> dict:
    """What Grafana's "Import dashboard" stores: every ${INPUT} of the dashboard's __inputs replaced in every
    string by the value chosen in the import form (for a datasource input, the datasource's uid), other
    ${...} (the dashboard's own variables) left as they are, __inputs dropped."""
    names = {i["name"] for i in json.loads(text)["__inputs"]}
    assert names == set(chosen), "the import form asks for exactly these inputs"

    def evaluate(node):
        if isinstance(node, str):
            return _INPUT_REF.sub(lambda m: chosen[m.group(1)] if m.group(1) in names else m.group(0), node)
        if isinstance(node, list):
            return [evaluate(v) for v in node]
        if isinstance(node, dict):
            return {k: evaluate(v) for k, v in node.items() if k != "__inputs"}
        return node

    return evaluate(json.loads(text))


def _select_datasource(variable: dict, datasources: list[dict[str, str]]) -> str:
    """The uid a datasource variable starts on: the current value among the datasources' uids, else the
    current text among their names (Grafana matches the value, then the text), else the first one."""
    current = variable["current"]
    for key, field in (("value", "uid"), ("text", "name")):
        for ds in datasources:
            if ds[field] == current[key]:
                return ds["uid"]
    return datasources[0]["uid"]


def _resolved_uids(d: dict, datasources: list[dict[str, str]]) -> dict[str, str]:
    """Where every datasource reference of dashboard d points, $datasource resolved as Grafana starts it."""
    (ds_var,) = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    selected = _select_datasource(ds_var, datasources)
    out = {}
    for where, ref in _datasource_refs(d):
        if where == ".annotations.list[0]":
            continue
        uid = ref["uid"]
        out[where] = selected if uid == f"${{{ds_var['name']}}}" else uid
    return out


def test_import_points_every_panel_annotation_and_variable_at_the_chosen_datasource() -> None:
    other = {"name": "Prometheus (prod)", "uid": "P1809F7CD0C75ACF3"}
    provisioned = yaml.safe_load((ROOT / "grafana/provisioning/datasources/trainmon.yaml").read_text())
    ours = {"name": provisioned["datasources"][0]["name"], "uid": provisioned["datasources"][0]["uid"]}
    for name, text in _committed_dashboards().items():
        # Imported into a Grafana whose Prometheus has another uid (and a name the dashboards never heard of),
        # next to a second Prometheus listed first: everything points at the one chosen in the import form.
        imported = _grafana_import(text, {grafana.DS_INPUT: other["uid"]})
        assert "__inputs" not in imported and "${DS_" not in json.dumps(imported), name
        (ds_var,) = [v for v in imported["templating"]["list"] if v["type"] == "datasource"]
        assert ds_var["current"]["value"] == other["uid"], name
        uids = _resolved_uids(imported, [{"name": "a-first-prometheus", "uid": "first"}, other])
        assert any(w.startswith(".panels") for w in uids) and any(w.startswith(".annotations") for w in uids)
        assert any(w.startswith(".templating") for w in uids), name
        assert set(uids.values()) == {other["uid"]}, (name, uids)
        # Provisioned as is (file provisioning fills no inputs): the provisioned datasource, found by its name.
        d = json.loads(text)
        assert set(_resolved_uids(d, [{"name": "a-first-prometheus", "uid": "first"}, ours]).values()) == \
            {grafana.DATASOURCE_UID}, name


def test_dashboards_draw_the_alerts_per_run() -> None:
    for name, d in grafana.dashboards().items():
        anns = {a["name"]: a for a in d["annotations"]["list"][1:]}
        firing = anns["Alerts firing"]
        assert firing["enable"] and firing["expr"].startswith("max by (run, rule, severity) (trainmon_alert_active{")
        assert 'run=~"$run"' in firing["expr"] and firing["expr"].endswith("== 1)"), name
        raised = anns["Alerts raised"]
        assert "increase(trainmon_alerts_total{" in raised["expr"] and "unless" in raised["expr"], name
        assert "Attempts (resume/restart)" in anns, name  # kept


def test_selectors_and_panels_scale_to_hundreds_of_ranks() -> None:
    for name, d in grafana.dashboards().items():
        queries = [v for v in d["templating"]["list"] if v["type"] == "query"]
        assert [v["name"] for v in queries][:2] == ["job", "run"], name
        for v in queries:
            assert v["query"]["query"].startswith("label_values("), (name, v["name"])
            assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", (name, v["name"])
        exprs = [t["expr"] for p in d["panels"] for t in p["targets"]] + [a["expr"] for a in d["annotations"]["list"][1:]]
        for var in ("job", "run", "rank", "layer"):  # multi-value: regex matchers only
            assert not any(f'{var}="${var}"' in e for e in exprs), (name, var)
    # The Overview aggregates over ranks; the DDP dashboard's per-rank panels draw the top $topk ranks per run.
    overview = grafana.overview()
    assert not [t for p in overview["panels"] for t in p["targets"] if "{{rank}}" in t["legendFormat"]]
    ddp = grafana.ddp()
    assert "topk" in [v["name"] for v in ddp["templating"]["list"]]
    per_rank = [t for p in ddp["panels"] for t in p["targets"] if "{{rank}}" in t["legendFormat"]]
    assert len(per_rank) >= 6
    for t in per_rank:
        assert re.match(r"(topk|bottomk) by \(run(, phase)?\) \(\$topk,", t["expr"]), t["expr"]
        assert 'rank=~"$rank"' in t["expr"], t["expr"]


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings (github-slugger: lower case, punctuation but '-' and '_'
    removed, each space a '-'; a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_alert_rule_has_a_runbook_url_into_docs_rules_md() -> None:
    anchors = _github_anchors((ROOT / "docs" / "rules.md").read_text())
    assert {"runstalled", "lossnonfinite", "grad_normspike"} <= anchors
    for base in (promrules.RUNBOOK_BASE, "https://github.com/example/trainmon/blob/main/docs/rules.md"):
        rules = promrules.prometheus_rules(runbook_base=base)["groups"][0]["rules"]
        for rule in rules:
            url = rule["annotations"]["runbook_url"]
            links = re.findall(re.escape(base) + r"(?:#([\w-]+))?", url)
            assert links, (rule["alert"], url)
            for anchor in links:
                assert anchor == "" or anchor in anchors, (rule["alert"], anchor)
            if "rule" in rule["labels"]:  # its own rule's section
                assert url == f"{base}#{rule['labels']['rule'].replace('.', '')}", rule["alert"]
        by_name = {r["alert"]: r["annotations"]["runbook_url"] for r in rules}
        assert by_name["TrainmonTargetDown"] == f"{base}#runstalled"
        # The active-alert rule links the section of the rule in its `rule` label, the catalogue for others.
        active = by_name["TrainmonAlertActive"]
        for rule_id in REGISTRY.ids():
            assert f'eq $labels.rule "{rule_id}" -}}}}\n{base}#{rule_id.replace(".", "")}\n' in active, rule_id
        assert active.endswith(f"{{{{- else -}}}}\n{base}\n{{{{- end -}}}}")


def test_promtool_tests_expect_the_runbook_urls() -> None:
    base = "https://example.com/docs/rules.md"
    tests = promrules.promtool_tests(runbook_base=base)["tests"]
    expected = [a for t in tests for c in t["alert_rule_test"] for a in c["exp_alerts"]]
    assert expected and all(a["exp_annotations"]["runbook_url"].startswith(base) for a in expected)
    custom = [a for a in expected if a["exp_labels"].get("rule") == "custom.my_rule"]
    assert custom and all(a["exp_annotations"]["runbook_url"] == base for a in custom)


def test_export_functions_take_the_runbook_base(tmp_path: Path) -> None:
    base = "https://github.com/example/trainmon/blob/v1/docs/rules.md"
    rules = yaml.safe_load(export_prometheus_rules(tmp_path / "alerts.yml", runbook_base=base))
    urls = [r["annotations"]["runbook_url"] for r in rules["groups"][0]["rules"]]
    assert all(base in u and u.count("rules.md") == u.count(base) for u in urls)
    tests = yaml.safe_load((tmp_path / "alerts.test.yml").read_text())
    assert all(a["exp_annotations"]["runbook_url"].startswith(base)
               for t in tests["tests"] for c in t["alert_rule_test"] for a in c["exp_alerts"])
    export_grafana(tmp_path / "g", runbook_base=base)
    assert f"runbook_url: {base}#runstalled" in (tmp_path / "g/prometheus/alerts.yml").read_text()
    assert f"runbook_url: {base}#runstalled" in (tmp_path / "g/prometheus/alerts.test.yml").read_text()
