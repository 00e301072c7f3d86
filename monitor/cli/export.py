"""`monitor export ...`: Prometheus alerting rules, a scrape config, the Grafana tree.

Plain functions for the typer commands in app.py; no torch. Each writes to a file (a Path), a
stream (TextIO) or stdout (None), and returns what it wrote. Bad input (an invalid glob, no runs
and no daemon to scrape, invalid rule options) raises ValueError with a message for the user.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from monitor.config import MetricsConfig, MonitorConfig
from monitor.exporters import grafana, promrules, scrape
from monitor.exporters.generated import dump_yaml
from monitor.runlog.rundir import SHARED_TARGETS_DIR


def _emit(text: str, out: TextIO | Path | None) -> str:
    if isinstance(out, Path):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    else:
        (out or sys.stdout).write(text)
    return text


def export_prometheus_rules(out: TextIO | Path | None = None, config: MonitorConfig | None = None, *,
                            job: str = promrules.JOB, tests: bool = True,
                            runbook_base: str = promrules.RUNBOOK_BASE) -> str:
    """Write the Prometheus alerting rules (YAML) generated from the rule catalogue.

    Thresholds come from `config`'s rule options (defaults without one); `job` is the scrape job of the
    per-rank endpoints (as in export_scrape_config). Each alert's `runbook_url` is its rule's section of
    docs/rules.md under `runbook_base` (default the repository-relative `docs/rules.md`; give the URL your
    copy is read at, e.g. https://github.com/ORG/REPO/blob/main/docs/rules.md, for clickable links).
    When `out` is a file path and `tests` is true, the promtool unit tests of those rules go beside it
    as `<stem>.test.yml` (`promtool test rules` it). Returns the rules' YAML.
    """
    src = "monitor export prometheus-rules"
    text = _emit(dump_yaml(promrules.prometheus_rules(config, job, runbook_base), src), out)
    if isinstance(out, Path) and tests:
        test_file = out.with_name(f"{out.stem}.test{out.suffix or '.yml'}")
        test_file.write_text(dump_yaml(promrules.promtool_tests(config, job, rule_file=out.name,
                                                                runbook_base=runbook_base), src), encoding="utf-8")
    return text


def export_scrape_config(out: TextIO | Path | None, run_dirs: Sequence[str | Path], *, job: str = promrules.JOB,
                         interval: str = "15s", daemon: str | None = None, rule_files: Sequence[str] | None = None,
                         alertmanagers: Sequence[str] | None = None, config: MonitorConfig | None = None,
                         password_file: str | None = None, client_cert_file: str | None = None,
                         client_key_file: str | None = None, refresh_interval: str = "30s") -> str:
    """Write a complete prometheus.yml scraping the runs' per-rank endpoints through their targets.json.

    `run_dirs`: run directories, directories holding runs (expanded to the runs there now: Prometheus's
    file_sd cannot glob directories, so re-export and reload for new runs), globs of run directories.
    `daemon` ("host:port") also scrapes `monitor watch`'s /metrics; `rule_files` (paths relative to the
    written file, e.g. the exported alerts.yml) and `alertmanagers` ("host:port") make Prometheus
    evaluate the rules and send the alerts on. With `config`, the per-rank job matches its `metrics`
    protection (endpoint_security): `password_file` for basic auth (required when the config holds only
    the password's hash), `client_cert_file`/`client_key_file` for mutual TLS. Returns the YAML.

    File discovery works beyond one machine: Prometheus re-reads the target files every
    `refresh_interval` (scrape.scrape_config), and each `<runs>/.trainmon-targets/` is created now,
    before any run, so that a Prometheus started first watches it from the start (not after file_sd's
    5 minutes).
    """
    cfg = scrape.scrape_config(run_dirs, job, interval, daemon, rule_files=rule_files, alertmanagers=alertmanagers,
                               refresh_interval=refresh_interval)
    extra = {} if config is None else endpoint_security(
        config.metrics, password_file=password_file, client_cert_file=client_cert_file, client_key_file=client_key_file)
    for scrape_job in cfg["scrape_configs"]:
        if scrape_job["job_name"] != job:
            continue
        scrape_job.update(extra)
        for sd in scrape_job.get("file_sd_configs", []):
            for pattern in sd["files"]:
                shared = Path(pattern).parent
                if shared.name == SHARED_TARGETS_DIR and shared.parent.is_dir():
                    with contextlib.suppress(OSError):  # a read-only tree: found when the first run makes it
                        shared.mkdir(exist_ok=True)
    return _emit(dump_yaml(cfg, "monitor export scrape-config"), out)


def endpoint_security(metrics: MetricsConfig, *, password_file: str | None = None, client_cert_file: str | None = None,
                      client_key_file: str | None = None) -> dict[str, Any]:
    """The scrape-job keys that reach endpoints served with `metrics`' TLS and basic auth: `scheme: https`
    and `tls_config` (ca_file: metrics.tls_ca_file, else the certificate itself; Prometheus's client
    certificate when the endpoints require one), `basic_auth` (username; password_file when given, else
    the config's password). ValueError naming what is missing; {} for plain endpoints."""
    out: dict[str, Any] = {}
    if metrics.tls_cert_file:
        tls: dict[str, Any] = {"ca_file": metrics.tls_ca_file or metrics.tls_cert_file}
        if metrics.tls_client_ca_file:
            if not (client_cert_file and client_key_file):
                raise ValueError("the endpoints require client certificates (metrics.tls_client_ca_file): give "
                                 "Prometheus's client certificate and key (client_cert_file, client_key_file)")
            tls.update(cert_file=client_cert_file, key_file=client_key_file)
        out.update(scheme="https", tls_config=tls)
    if metrics.basic_auth_user:
        auth: dict[str, Any] = {"username": metrics.basic_auth_user}
        if password_file:
            auth["password_file"] = password_file
        elif metrics.basic_auth_password is not None:
            auth["password"] = metrics.basic_auth_password.get_secret_value()
        else:
            raise ValueError("the config holds only the basic auth password's hash "
                             "(metrics.basic_auth_password_hash): give a password_file for Prometheus")
        out["basic_auth"] = auth
    return out


def export_grafana(out_dir: Path, config: MonitorConfig | None = None, *,
                   prometheus_url: str = grafana.DEFAULT_PROMETHEUS_URL, run_dirs: Sequence[str | Path] | None = None,
                   daemon: str | None = f"127.0.0.1:{scrape.DAEMON_PORT}",
                   alertmanager: str | None = f"127.0.0.1:{scrape.ALERTMANAGER_PORT}",
                   job: str = promrules.JOB, runbook_base: str = promrules.RUNBOOK_BASE) -> list[Path]:
    """Write the Grafana tree into out_dir: dashboards/*.json (importable into any Grafana as well),
    provisioning/ (datasource "trainmon Prometheus", uid trainmon-prometheus, at `prometheus_url`;
    dashboard provider), prometheus/ (alerts.yml with runbook_url under `runbook_base` as in
    export_prometheus_rules, alerts.test.yml, prometheus.yml scraping `daemon` and the per-rank
    endpoints of `run_dirs`, alerting to `alertmanager`), README.md. Thresholds drawn and alerted on
    come from `config`. Returns the paths written (what `make grafana` commits as grafana/, with the
    defaults).
    """
    return grafana.grafana_tree(out_dir, config, job=job, prometheus_url=prometheus_url,
                                run_dirs=[str(d) for d in run_dirs] if run_dirs else None, daemon=daemon,
                                alertmanager=alertmanager, runbook_base=runbook_base)
