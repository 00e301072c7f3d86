"""Alertmanager sink: alerts POSTed to Alertmanager's v2 API (`/api/v2/alerts`).

alertname = rule id; labels severity, run, rank (plus configured extras); annotations summary,
hint, step and the run directory's attempt. Active alerts are re-posted every `resend_seconds` (Alertmanager resolves an alert it
stops hearing about after its resolve_timeout); a resolved alert is posted once with endsAt.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

from monitor.exporters.delivery import DeliveryMetrics, HttpDelivery
from monitor.exporters.promrules_model import runbook_url
from monitor.schema import Alert, Severity


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def am_alert(alert: Alert, extra_labels: dict[str, str] | None = None, ends: float | None = None,
             runbook_base: str | None = None) -> dict:
    labels = {"alertname": alert.rule, "severity": alert.severity.value, "run": alert.run or "", "rank": str(alert.rank),
              **(extra_labels or {})}
    out = {
        "labels": labels,
        "annotations": {"summary": alert.message, "hint": alert.hint, "step": str(alert.step)},
        "startsAt": _iso(alert.time),
    }
    if alert.attempt is not None:  # an annotation, not a label: a carried-over alert stays the same alert
        out["annotations"]["attempt"] = str(alert.attempt)
    if runbook_base:  # the rule's section of docs/rules.md, as the exported Prometheus rules link it
        out["annotations"]["runbook_url"] = runbook_url(alert.rule, runbook_base)
    if ends is not None:
        out["endsAt"] = _iso(ends)
    return out


def api_endpoint(url: str) -> str:
    """The v2 alerts API under the base `url`, its query (a proxy's token, say) kept after the path."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL: the delivery counts it as failed, naming it invalid (never quoting it)
        return url
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/api/v2/alerts"))


class AlertmanagerSink:
    """Alerts at or above `min_severity` POSTed to Alertmanager, active ones re-posted (a `Sink`)."""

    def __init__(self, url: str, *, min_severity: Severity | str = Severity.info, resend_seconds: float = 60.0,
                 labels: dict[str, str] | None = None, timeout: float = 5.0, retries: int = 3, backoff: float = 1.0,
                 queue_size: int = 256, metrics: DeliveryMetrics | None = None,
                 runbook_base: str | None = None) -> None:
        self.endpoint = api_endpoint(url)
        self.runbook_base = runbook_base
        self.min_severity = Severity(min_severity)
        self.resend_seconds = resend_seconds
        self.labels = dict(labels or {})
        self._active: dict[tuple[str, str, int], Alert] = {}
        self._lock = threading.Lock()
        self._last_send = time.monotonic()
        self.delivery = HttpDelivery("alertmanager", timeout=timeout, retries=retries, backoff=backoff,
                                     queue_size=queue_size, on_idle=self._resend, metrics=metrics)

    def emit(self, alert: Alert) -> None:
        if not alert.severity.at_least(self.min_severity):
            return
        key = (alert.run, alert.rule, alert.rank)
        with self._lock:
            if alert.status == "resolved":
                # Resolve whatever severity is active for this rule (an escalated alert has new labels).
                firing = self._active.pop(key, alert)
                payload = [am_alert(firing, self.labels, runbook_base=self.runbook_base, ends=time.time())]
            else:
                previous = self._active.get(key)
                self._active[key] = alert
                payload = [am_alert(alert, self.labels, runbook_base=self.runbook_base)]
                if previous is not None and previous.severity != alert.severity:
                    payload.append(am_alert(previous, self.labels, runbook_base=self.runbook_base, ends=time.time()))
        self.delivery.submit(self.endpoint, payload)
        self._last_send = time.monotonic()

    def restore(self, alert: Alert) -> None:
        """Count a still-firing alert as active again without posting it: the periodic re-post
        (every `resend_seconds`) re-establishes it in Alertmanager, which deduplicates it against
        the copy delivered before."""
        if alert.status != "firing" or not alert.severity.at_least(self.min_severity):
            return
        with self._lock:
            self._active[(alert.run, alert.rule, alert.rank)] = alert

    def _resend(self) -> None:
        if time.monotonic() - self._last_send < self.resend_seconds:
            return
        with self._lock:
            payload = [am_alert(a, self.labels, runbook_base=self.runbook_base) for a in self._active.values()]
        self._last_send = time.monotonic()
        if payload:
            self.delivery.submit(self.endpoint, payload)

    def close(self) -> None:
        self.delivery.close()
