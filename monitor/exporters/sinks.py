"""Alert sinks built from the config's `sinks:` section (shared by attach and the daemon)."""

from __future__ import annotations

from typing import Any

from monitor.config import MonitorConfig


def build_http_sinks(cfg: MonitorConfig) -> list[Any]:
    out: list[Any] = []
    wh = cfg.sinks.webhook
    if wh is not None:
        from monitor.exporters.webhook import WebhookSink

        out.append(WebhookSink(wh.url, min_severity=wh.min_severity, timeout=wh.timeout, retries=wh.retries,
                               backoff=wh.backoff, queue_size=wh.queue_size))
    am = cfg.sinks.alertmanager
    if am is not None:
        from monitor.exporters.alertmanager import AlertmanagerSink

        out.append(AlertmanagerSink(am.url, min_severity=am.min_severity, resend_seconds=am.resend_seconds,
                                    labels=am.labels, timeout=am.timeout, retries=am.retries, backoff=am.backoff,
                                    queue_size=am.queue_size))
    return out


def close_sinks(sinks: list[Any]) -> None:
    for s in sinks:
        close = getattr(s, "close", None)
        if callable(close):
            close()
