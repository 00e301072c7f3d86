"""`monitor export ...`: Prometheus alerting rules, a scrape config, the Grafana tree.

Plain functions for the typer commands in app.py; no torch. Each writes to a file (a Path), a
stream (TextIO) or stdout (None), and returns what it wrote. Bad input (an invalid glob, no runs
and no daemon to scrape, invalid rule options) raises ValueError with a message for the user.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from monitor.config import MonitorConfig
from monitor.exporters import grafana, promrules, scrape
from monitor.exporters.generated import dump_yaml


def _emit(text: str, out: TextIO | Path | None) -> str:
    if isinstance(out, Path):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    else:
        (out or sys.stdout).write(text)
    return text


def export_prometheus_rules(out: TextIO | Path | None = None, config: MonitorConfig | None = None, *,
                            job: str = promrules.JOB, tests: bool = True) -> str:
    """Write the Prometheus alerting rules (YAML) generated from the rule catalogue.

    Thresholds come from `config`'s rule options (defaults without one); `job` is the scrape job of the
    per-rank endpoints (as in export_scrape_config). When `out` is a file path and `tests` is true, the
    promtool unit tests of those rules go beside it as `<stem>.test.yml` (`promtool test rules` it).
    Returns the rules' YAML.
    """
    src = "monitor export prometheus-rules"
    text = _emit(dump_yaml(promrules.prometheus_rules(config, job), src), out)
    if isinstance(out, Path) and tests:
        test_file = out.with_name(f"{out.stem}.test{out.suffix or '.yml'}")
        test_file.write_text(dump_yaml(promrules.promtool_tests(config, job, rule_file=out.name), src), encoding="utf-8")
    return text


def export_scrape_config(out: TextIO | Path | None, run_dirs: Sequence[str | Path], *, job: str = promrules.JOB,
                         interval: str = "15s", daemon: str | None = None, rule_files: Sequence[str] | None = None,
                         alertmanagers: Sequence[str] | None = None) -> str:
    """Write a complete prometheus.yml scraping the runs' per-rank endpoints through their targets.json.

    `run_dirs`: run directories, directories holding runs (expanded to the runs there now: Prometheus's
    file_sd cannot glob directories, so re-export and reload for new runs), globs of run directories.
    `daemon` ("host:port") also scrapes `monitor watch`'s /metrics; `rule_files` (paths relative to the
    written file, e.g. the exported alerts.yml) and `alertmanagers` ("host:port") make Prometheus
    evaluate the rules and send the alerts on. Returns the YAML.
    """
    cfg = scrape.scrape_config(run_dirs, job, interval, daemon, rule_files=rule_files, alertmanagers=alertmanagers)
    return _emit(dump_yaml(cfg, "monitor export scrape-config"), out)


def export_grafana(out_dir: Path, config: MonitorConfig | None = None, *,
                   prometheus_url: str = grafana.DEFAULT_PROMETHEUS_URL, run_dirs: Sequence[str | Path] | None = None,
                   daemon: str | None = f"127.0.0.1:{scrape.DAEMON_PORT}",
                   alertmanager: str | None = f"127.0.0.1:{scrape.ALERTMANAGER_PORT}",
                   job: str = promrules.JOB) -> list[Path]:
    """Write the Grafana tree into out_dir: dashboards/*.json, provisioning/ (datasource uid
    trainmon-prometheus at `prometheus_url`, dashboard provider), prometheus/ (alerts.yml,
    alerts.test.yml, prometheus.yml scraping `daemon` and the per-rank endpoints of `run_dirs`,
    alerting to `alertmanager`), README.md. Thresholds drawn and alerted on come from `config`.
    Returns the paths written (what `make grafana` commits as grafana/, with the defaults).
    """
    return grafana.grafana_tree(out_dir, config, job=job, prometheus_url=prometheus_url,
                                run_dirs=[str(d) for d in run_dirs] if run_dirs else None, daemon=daemon,
                                alertmanager=alertmanager)
