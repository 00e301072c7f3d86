"""Prometheus alerting rules, and their promtool unit tests, generated from the rule catalogue.

The rule catalogue is the one source of truth: thresholds come from the rules' pydantic configs
(defaults, or the options of a MonitorConfig; see ruleconfig), hints from their docstrings' Fix
sections. Each exported alert is one `AlertDef` (promrules_model) that carries its own promtool
test cases, so `alerts.test.yml` covers every alert, firing and not firing, and changes with it;
the builders are in promrules_alerts.

Exported alerts (job "trainmon" = the per-rank /metrics endpoints found through targets.json):

- TrainmonRunStalled: no optimizer step for max(floor_seconds, factor x median step time),
  for ranks still listed as targets and up (`run.stalled`'s options).
- TrainmonAlertActive: a rule of the in-process engine or of `monitor watch` is firing
  (`trainmon_alert_active == 1` at warning or critical; info stays on the dashboards), its
  severity passed through, its fix as the hint; the same alert from both sources is one alert.
- TrainmonSkippedStepRate: GradScaler skipped more than `amp.overflow.max_rate` of the steps
  in the last 10 minutes, once calibration is behind.
- TrainmonLossNonFinite: `trainmon_loss` is NaN or infinite.
- TrainmonTargetDown: a listed endpoint does not answer (a crashed or frozen rank).

Every alert's `runbook_url` is its rule's section of docs/rules.md (TrainmonAlertActive: the section
of the rule in its `rule` label; TrainmonTargetDown: run.stalled's), under `runbook_base`
(promrules_model.RUNBOOK_BASE, the repository-relative docs/rules.md, unless given a URL).

`python -m monitor.exporters.promrules DIR [RUNBOOK_BASE]` writes DIR/alerts.yml and DIR/alerts.test.yml.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from monitor.exporters.generated import dump_yaml, write
from monitor.exporters.promrules_alerts import BUILDERS
from monitor.exporters.promrules_model import RUNBOOK_BASE, AlertDef, check_job, heading_anchor, runbook_url
from monitor.exporters.ruleconfig import rule_config, rule_fix

__all__ = ["JOB", "RULES_FILE", "RUNBOOK_BASE", "TESTS_FILE", "AlertDef", "alert_definitions", "heading_anchor",
           "prometheus_rules", "promtool_tests", "rule_config", "rule_fix", "runbook_url", "write_rules"]

JOB = "trainmon"
RULES_FILE = "alerts.yml"
TESTS_FILE = "alerts.test.yml"
GROUP = "trainmon"


def alert_definitions(options: Any = None, job: str = JOB) -> list[AlertDef]:
    """Every exported alert (those of disabled rules left out), thresholds from the rules' configs.
    ValueError naming a `job` that cannot go into a PromQL selector."""
    check_job(job)
    return [d for d in (build(options, job) for build in BUILDERS) if d is not None]


def prometheus_rules(options: Any = None, job: str = JOB, runbook_base: str = RUNBOOK_BASE) -> dict[str, Any]:
    """Alerting rules (a Prometheus rule file as a dict, YAML-able).

    `options`: a MonitorConfig, or a mapping of rule id to options ({"amp.overflow": {"max_rate": 0.02}});
    `job`: the scrape job of the per-rank endpoints (scrape_config's `job`); `runbook_base`: where
    docs/rules.md is read (a path or URL), which the alerts' runbook_url annotations point into.
    """
    return {"groups": [{"name": GROUP, "rules": [d.rule(runbook_base) for d in alert_definitions(options, job)]}]}


def promtool_tests(options: Any = None, job: str = JOB, rule_file: str = RULES_FILE,
                   runbook_base: str = RUNBOOK_BASE) -> dict[str, Any]:
    """A promtool unit-test file for prometheus_rules(options, job, runbook_base): every alert, firing and not.

    `rule_file` is the path of the rule file relative to the test file (promtool's rule_files).
    """
    tests = []
    for d in alert_definitions(options, job):
        for case in d.cases:
            tests.append({
                "name": d.name,
                "interval": case.interval,
                "input_series": [{"series": s.text(), "values": s.values} for s in case.series],
                "alert_rule_test": [
                    {"eval_time": t, "alertname": d.name, "exp_alerts": [d.expected(e, runbook_base) for e in exp]}
                    for t, exp in case.checks
                ],
            })
    return {"rule_files": [rule_file], "evaluation_interval": "1m", "tests": tests}


def write_rules(out_dir: str | Path, options: Any = None, job: str = JOB,
                runbook_base: str = RUNBOOK_BASE) -> list[Path]:
    """Write alerts.yml and alerts.test.yml into out_dir."""
    out = Path(out_dir)
    src = "monitor.exporters.promrules"
    return [write(out / RULES_FILE, dump_yaml(prometheus_rules(options, job, runbook_base), src)),
            write(out / TESTS_FILE, dump_yaml(promtool_tests(options, job, runbook_base=runbook_base), src))]


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m monitor.exporters.promrules OUT_DIR [RUNBOOK_BASE]  (writes alerts.yml and "
                 f"alerts.test.yml; RUNBOOK_BASE: where docs/rules.md is read, default {RUNBOOK_BASE})")
    for p in write_rules(sys.argv[1], runbook_base=sys.argv[2] if len(sys.argv) == 3 else RUNBOOK_BASE):
        print(p)
