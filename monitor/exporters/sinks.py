"""The alert sink protocol, and the HTTP sinks built from the config's `sinks:` section.

Every sink implements all of `Sink` (a no-op where a method has nothing to do), so the engine,
attach and the daemon call the methods directly. One alert object is shared by all the sinks of
an engine: a sink never changes it, so the order of the sinks does not matter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from monitor.schema import Alert

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from monitor.config import MonitorConfig


@runtime_checkable
class Sink(Protocol):
    def emit(self, alert: Alert) -> None:
        """Deliver a firing or resolved alert. Must not modify `alert`."""

    def restore(self, alert: Alert) -> None:
        """Re-establish an alert this sink delivered before (a daemon restart that resumes its
        state): show it as active again without notifying anyone a second time."""

    def close(self) -> None:
        """Flush what is pending and release threads, files and sockets."""


def build_http_sinks(cfg: MonitorConfig, registry: CollectorRegistry | None = None) -> list[Sink]:
    """The webhook and Alertmanager sinks the config asks for; each delivers on a thread of its own.

    With `registry`, each counts its deliveries there (`trainmon_alert_deliveries_total{sink, outcome}`,
    `trainmon_alert_delivery_errors_total{sink, reason}`; see monitor/exporters/delivery.py); without
    one they count only on their `delivery` object. The URLs are secrets: revealed here, to the sinks only.
    """
    from monitor.exporters.delivery import delivery_metrics

    metrics = delivery_metrics(registry)
    out: list[Sink] = []
    wh = cfg.sinks.webhook
    if wh is not None:
        from monitor.exporters.webhook import WebhookSink

        out.append(WebhookSink(wh.url.get_secret_value(), min_severity=wh.min_severity, timeout=wh.timeout,
                               retries=wh.retries, backoff=wh.backoff, queue_size=wh.queue_size, metrics=metrics))
    am = cfg.sinks.alertmanager
    if am is not None:
        from monitor.exporters.alertmanager import AlertmanagerSink

        out.append(AlertmanagerSink(am.url.get_secret_value(), min_severity=am.min_severity,
                                    resend_seconds=am.resend_seconds, labels=am.labels, timeout=am.timeout,
                                    retries=am.retries, backoff=am.backoff, queue_size=am.queue_size, metrics=metrics,
                                    runbook_base=am.runbook_base))
    return out


def close_sinks(sinks: list[Sink]) -> None:
    for s in sinks:
        s.close()
