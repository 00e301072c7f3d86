"""`monitor export`: Prometheus rules, a scrape config and Grafana dashboards, generated from the rules
(thin commands over monitor.cli.export)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from monitor.cli.common import ConfigOpt, config_from, fail, os_message

export_app = typer.Typer(help="Prometheus rules, a scrape config and Grafana dashboards, generated from the rules.",
                         no_args_is_help=True)
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write to this file (default: stdout).")]
JobOpt = Annotated[str, typer.Option(help="Prometheus job name of the per-rank endpoints.")]
RunbookOpt = Annotated[str, typer.Option(
    "--runbook-base", help="Where the alerts' runbook_url points: docs/rules.md as a path or URL (e.g. the "
    "repository's https://.../blob/main/docs/rules.md), each rule's section appended as an anchor.")]


# Prometheus's duration syntax (model.ParseDuration): what it refuses at config load is refused here.
_DURATION = re.compile(r"(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?")


def _job(job: str) -> str:
    from monitor.exporters.promrules_model import check_job

    try:
        return check_job(job)
    except ValueError as e:
        raise fail(f"--{e}") from None


def _duration(option: str, value: str) -> str:
    if not value or not _DURATION.fullmatch(value):
        raise fail(f"{option} {value!r}: not a Prometheus duration (e.g. 15s, 1m, 1h30m)")
    return value


def _address(option: str, value: str | None) -> str | None:
    from monitor.exporters.endpoint import split_hostport

    if not value:  # none: not scraped, not alerted to
        return value
    try:
        port = split_hostport(value)[1]
    except ValueError as e:
        raise fail(f"{option} {e}") from None
    if port is None:
        raise fail(f"{option} {value!r}: expected HOST:PORT")
    return value


@export_app.command("prometheus-rules")
def export_prometheus_rules_cmd(out: OutOpt = None, config: ConfigOpt = None, job: JobOpt = "trainmon",
                                runbook_base: RunbookOpt = "docs/rules.md") -> None:
    """Alerting rules (stalled runs, active trainmon alerts, skipped steps, NaN loss, down targets);
    with --out also their promtool unit tests beside it."""
    from monitor.cli.export import export_prometheus_rules

    cfg = config_from(config)
    try:
        export_prometheus_rules(out, cfg, job=_job(job), runbook_base=runbook_base)
    except ValueError as e:
        raise fail(str(e)) from None
    except OSError as e:  # --out a directory, or under a file
        raise fail(f"cannot write {out}: {os_message(e)}") from None


@export_app.command("scrape-config")
def export_scrape_config_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run directories, or directories holding runs "
                                                    "(later runs there are found too).")],
    out: OutOpt = None,
    job: JobOpt = "trainmon",
    interval: Annotated[str, typer.Option(help="Scrape interval.")] = "15s",
    daemon: Annotated[str | None, typer.Option(help="Also scrape `monitor watch` at HOST:PORT.")] = None,
    rule_file: Annotated[list[str] | None, typer.Option(help="Rule files to load (repeatable).")] = None,
    alertmanager: Annotated[list[str] | None, typer.Option(help="Alertmanager HOST:PORT (repeatable).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="The runs' config: its metrics TLS / basic auth make the scrape job match.")] = None,
    password_file: Annotated[str | None, typer.Option(
        help="File holding the basic-auth password, for Prometheus (needed when the config holds only a hash).")] = None,
    client_cert_file: Annotated[str | None, typer.Option(help="Client certificate, when the endpoints require one.")] = None,
    client_key_file: Annotated[str | None, typer.Option(help="Client key, with --client-cert-file.")] = None,
    refresh_interval: Annotated[str, typer.Option(
        help="How often Prometheus re-reads the target files (a shared filesystem may not notify it).")] = "30s",
) -> None:
    """A prometheus.yml that discovers the runs' endpoints through file_sd."""
    from monitor.cli.export import export_scrape_config

    cfg = config_from(config) if config is not None else None
    checked = dict(job=_job(job), interval=_duration("--interval", interval), daemon=_address("--daemon", daemon),
                   alertmanagers=[_address("--alertmanager", a) for a in alertmanager or []] or None,
                   refresh_interval=_duration("--refresh-interval", refresh_interval))
    try:
        export_scrape_config(out, runs, rule_files=rule_file, config=cfg, password_file=password_file,
                             client_cert_file=client_cert_file, client_key_file=client_key_file, **checked)
    except ValueError as e:
        raise fail(str(e)) from None
    except OSError as e:  # --out a directory, or under a file
        raise fail(f"cannot write {out}: {os_message(e)}") from None


@export_app.command("grafana")
def export_grafana_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write dashboards/, provisioning/, prometheus/ into.")],
    config: ConfigOpt = None,
    prometheus_url: Annotated[str | None, typer.Option(help="URL of the Prometheus datasource.")] = None,
    daemon: Annotated[str, typer.Option(help="`monitor watch` HOST:PORT for the bundled prometheus.yml.")] = "127.0.0.1:9739",
    alertmanager: Annotated[str, typer.Option(help="Alertmanager HOST:PORT for the bundled prometheus.yml.")] = "127.0.0.1:9093",
    job: JobOpt = "trainmon",
    runbook_base: RunbookOpt = "docs/rules.md",
) -> None:
    """Grafana dashboards (overview, alerts, attention, DDP) with file provisioning, plus the Prometheus side."""
    from monitor.cli.export import export_grafana

    cfg = config_from(config)
    kwargs = {"prometheus_url": prometheus_url} if prometheus_url else {}
    try:
        written = export_grafana(out_dir, cfg, daemon=_address("--daemon", daemon),
                                 alertmanager=_address("--alertmanager", alertmanager), job=_job(job),
                                 runbook_base=runbook_base, **kwargs)
    except ValueError as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot write under {out_dir}: {os_message(e)}") from None
    typer.echo(f"wrote {len(written)} files under {out_dir}", err=True)
