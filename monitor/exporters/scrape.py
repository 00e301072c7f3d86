"""A Prometheus configuration that scrapes trainmon runs through file_sd.

Each run directory lists its ranks' /metrics endpoints in `targets.json` (Prometheus file_sd
format, labels trainmon_run and trainmon_rank; see monitor/runlog/rundir.py): Prometheus
re-reads the file when it changes, so ranks that start or finish appear and drop out.

Prometheus's file_sd accepts a `*` only in a path's LAST segment (it watches the directory
above), so `runs/*/targets.json` is rejected at config load. Every run therefore also mirrors its
targets into `<runs>/.trainmon-targets/<run>.json` (monitor/runlog/rundir.py), and a directory
holding runs becomes the glob `<runs>/.trainmon-targets/*.json`: runs started later are found
without touching Prometheus. A single run directory becomes the literal `<run>/targets.json`, a
glob of run directories the runs it matches now. `monitor watch`, which serves every run it
watches on its own /metrics, can be scraped as well (`daemon`).

`python -m monitor.exporters.scrape RUN_OR_RUNS_DIR... > prometheus.yml` prints a complete config.
"""

from __future__ import annotations

import glob
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from monitor.exporters.generated import dump_yaml
from monitor.exporters.promrules import JOB
from monitor.exporters.promrules_model import check_job
from monitor.runlog.rundir import RUN_JSON, SHARED_TARGETS_DIR, TARGETS_JSON

DAEMON_PORT = 9739  # `monitor watch --metrics-port` default
ALERTMANAGER_PORT = 9093  # Alertmanager's default
# Prometheus's own check (discovery/file): a '*' only in the last segment, a .json/.yml/.yaml name.
_FILE_SD_NAME = re.compile(r"^[^*]*(\*[^/]*)?\.(json|yml|yaml|JSON|YML|YAML)$")


def file_sd_files(run_dirs_globs: str | Path | Iterable[str | Path]) -> list[str]:
    """file_sd `files` for run directories, directories holding runs, globs of run directories, or
    file_sd paths (.json/.yml/.yaml, kept as they are when Prometheus accepts them).

    Runs are found on disk now (absolute paths, sorted); file_sd paths stay as given (Prometheus
    resolves relative ones against the config file's directory).
    """
    entries = [run_dirs_globs] if isinstance(run_dirs_globs, (str, Path)) else list(run_dirs_globs)
    out: list[str] = []
    for entry in entries:
        e = str(entry)
        if e.lower().endswith((".json", ".yml", ".yaml")):
            if not _FILE_SD_NAME.match(e):
                raise ValueError(f"{e!r}: Prometheus file_sd allows '*' only in the file name (it watches the "
                                 "directory above); pass the directory holding the runs instead, it is expanded")
            out.append(e)
            continue
        if glob.has_magic(e):
            dirs = [Path(p) for p in glob.glob(e)]
        elif _is_run_dir(Path(e)):
            dirs = [Path(e)]
        elif Path(e).is_dir():  # a directory holding run directories: their shared mirror, new runs included
            out.append(str((Path(e) / SHARED_TARGETS_DIR).resolve() / "*.json"))
            continue
        else:
            raise ValueError(f"{e}: no such directory")
        out += sorted(str((d / TARGETS_JSON).resolve()) for d in dirs if _is_run_dir(d))
    return list(dict.fromkeys(out))


def _is_run_dir(path: Path) -> bool:
    return (path / TARGETS_JSON).is_file() or (path / RUN_JSON).is_file()


def scrape_config(
    run_dirs_globs: str | Path | Iterable[str | Path],
    job: str = JOB,
    interval: str = "15s",
    daemon: str | None = None,
    *,
    evaluation_interval: str | None = None,
    rule_files: Sequence[str] | None = None,
    alertmanagers: Sequence[str] | None = None,
    refresh_interval: str = "30s",
) -> dict[str, Any]:
    """A complete prometheus.yml (a dict, YAML-able) scraping the runs `run_dirs_globs` names.

    `run_dirs_globs`: run directories, directories holding runs, globs of run directories, or
    file_sd paths (see file_sd_files); `job` names the scrape job of the per-rank endpoints (the
    exported alert rules select it); it is left out when no run is found. `daemon` ("host:port")
    adds `monitor watch`'s own /metrics as job "<job>-watch". `rule_files` (relative to the config
    file) and `alertmanagers` ("host:port") make it a Prometheus that evaluates the exported alerts
    and sends them on. Prometheus re-reads the target files every `refresh_interval` as well as on
    change: inotify does not see files that other hosts write on NFS and most shared filesystems.
    Raises ValueError when there is nothing to scrape, or naming a `job` the exported rules could not select.
    """
    check_job(job)
    files = file_sd_files(run_dirs_globs)
    if not files and not daemon:
        raise ValueError(f"no trainmon run directory (holding {TARGETS_JSON} or {RUN_JSON}) in {run_dirs_globs!r}, "
                         "and no daemon to scrape")
    cfg: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": evaluation_interval or interval},
    }
    if rule_files:
        cfg["rule_files"] = list(rule_files)
    if alertmanagers:
        cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": list(alertmanagers)}]}]}
    jobs: list[dict[str, Any]] = []
    if files:
        jobs.append({"job_name": job, "scrape_interval": interval,
                     "file_sd_configs": [{"files": files, "refresh_interval": refresh_interval}]})
    if daemon:
        jobs.append({"job_name": f"{job}-watch", "scrape_interval": interval,
                     "static_configs": [{"targets": [daemon]}]})
    cfg["scrape_configs"] = jobs
    return cfg


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m monitor.exporters.scrape RUN_OR_RUNS_DIR... > prometheus.yml")
    sys.stdout.write(dump_yaml(scrape_config(argv), "monitor.exporters.scrape"))


if __name__ == "__main__":
    main(sys.argv[1:])
