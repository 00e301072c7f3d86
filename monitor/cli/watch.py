"""`monitor watch`: wiring the daemon to the terminal, the signals and the metrics endpoint."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer

from monitor.cli.common import fail
from monitor.config import MonitorConfig
from monitor.exporters.endpoint import basic_auth_of, serve
from monitor.exporters.sinks import build_http_sinks
from monitor.runlog.rundir import JsonlAlertSink
from monitor.watch.daemon import Watcher
from monitor.watch.health import tune_gc
from monitor.watch.state import STATE_FILE, WatchStateError, check_private
from monitor.watch.view import make_view


def run_watch(paths: list[Path], cfg: MonitorConfig, *, state_dir: Path, host: str, port: int | None,
              mapping: dict[str, str] | None, plain: bool | None, poll: float, discover: float, once: bool) -> None:
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # which runs exist and where: private
    except OSError as e:
        why = "not a directory" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or str(e)
        raise fail(f"--state-dir {state_dir}: {why}") from None
    try:  # before anything is written there
        check_private(state_dir)
        check_private(state_dir / STATE_FILE)
    except WatchStateError as e:  # another user's, or writable by others: refused
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    tune_gc()
    watcher: Watcher | None = None
    server = None
    if port is not None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
        m = cfg.metrics  # the same protection as the training processes' endpoints
        server = serve(registry, host, port, certfile=m.tls_cert_file, keyfile=m.tls_key_file,
                       client_cafile=m.tls_client_ca_file, auth=basic_auth_of(m))
    else:
        registry = None
    # Deliveries are counted in the daemon's /metrics (trainmon_alert_deliveries_total).
    sinks = [JsonlAlertSink(state_dir / "alerts.jsonl"), *build_http_sinks(cfg, registry=registry)]
    view = make_view(True if once else plain, lambda: watcher, server.url if server else None)
    watcher = Watcher(paths, cfg, state_dir=state_dir, mapping=mapping, registry=registry,
                      sinks=[view, *sinks], on_event=view.event)
    if server is not None:
        view.event(f"metrics on {server.url}")
    stop = threading.Event()
    try:
        if once:
            watcher.scan()
            watcher.poll()
            watcher.save()
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        watcher.run(stop, poll_every=poll, discover_every=discover, on_pass=view.refresh)
    finally:
        view.close()
        watcher.close()
        if server is not None:
            server.close()
