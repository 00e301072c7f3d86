"""Webhook alert sink: Slack-compatible JSON (`text` plus one attachment), POSTed off the engine's thread."""

from __future__ import annotations

from monitor.exporters.delivery import DeliveryMetrics, HttpDelivery
from monitor.schema import Alert, Severity

COLORS = {Severity.info: "#439FE0", Severity.warning: "#ECB22E", Severity.critical: "#E01E5A"}


def slack_payload(alert: Alert) -> dict:
    where = f"run {alert.run or '?'}, rank {alert.rank}, step {alert.step}"
    if alert.status == "resolved":
        text = f"[RESOLVED] {alert.rule} ({where})"
        return {"text": text, "attachments": [{"color": "#2EB67D", "title": alert.rule, "text": text,
                                               "footer": "trainmon"}]}
    text = f"[{alert.severity.value.upper()}] {alert.rule} ({where}): {alert.message}"
    fields = [{"title": "Fix", "value": alert.hint, "short": False},
              {"title": "Run", "value": alert.run or "?", "short": True},
              {"title": "Step", "value": str(alert.step), "short": True}]
    return {"text": text, "attachments": [{"color": COLORS[alert.severity], "title": alert.rule,
                                           "text": alert.message, "fields": fields, "footer": "trainmon"}]}


class WebhookSink:
    """Alerts at or above `min_severity` POSTed to a webhook URL (a `Sink`)."""

    def __init__(self, url: str, *, min_severity: Severity | str = Severity.warning, timeout: float = 5.0,
                 retries: int = 3, backoff: float = 1.0, queue_size: int = 256,
                 metrics: DeliveryMetrics | None = None) -> None:
        self.url = url
        self.min_severity = Severity(min_severity)
        self.delivery = HttpDelivery("webhook", timeout=timeout, retries=retries, backoff=backoff,
                                     queue_size=queue_size, metrics=metrics)

    def emit(self, alert: Alert) -> None:
        if alert.severity.at_least(self.min_severity):
            self.delivery.submit(self.url, slack_payload(alert))

    def restore(self, alert: Alert) -> None:
        """Nothing to re-establish: a chat message, once posted, stays; posting it again would
        notify the channel a second time."""

    def close(self) -> None:
        self.delivery.close()
