"""Alert delivery to a local webhook receiver and to a real Alertmanager: payloads, retries, never blocking."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest
from servers import alertmanager, alerts_in, wait_until, webhook  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from monitor.exporters.alertmanager import AlertmanagerSink
from monitor.exporters.delivery import redact
from monitor.exporters.webhook import WebhookSink
from monitor.schema import Alert, Severity


def _alert(rule="loss.nonfinite", severity=Severity.critical, status="firing", run="r1", rank=0, step=150):
    return Alert(rule=rule, severity=severity, step=step, rank=rank, run=run, status=status,
                 message=f"the loss is nan at step {step}.", hint="Restart from the last good checkpoint.",
                 evidence={"loss": float("nan")})


def test_webhook_posts_slack_compatible_json(webhook):  # noqa: F811
    webhook.clear()
    sink = WebhookSink(webhook.url + "services/T000/B000/SECRET", min_severity="warning")
    sink.emit(_alert())
    sink.emit(_alert(rule="preflight.no_clipping", severity=Severity.info))  # below min_severity
    sink.emit(_alert(status="resolved"))
    sink.close()
    bodies = webhook.bodies()
    assert len(bodies) == 2
    first = bodies[0]
    assert first["text"].startswith("[CRITICAL] loss.nonfinite (run r1, rank 0, step 150)")
    att = first["attachments"][0]
    assert att["title"] == "loss.nonfinite" and {"title": "Fix", "value": "Restart from the last good checkpoint.",
                                                   "short": False} in att["fields"]
    assert bodies[1]["text"].startswith("[RESOLVED] loss.nonfinite")
    assert sink.delivery.sent == 2 and sink.delivery.failed == 0


def test_webhook_retries_with_backoff_then_delivers(webhook):  # noqa: F811
    webhook.clear()
    webhook.fail_next = 2
    attempts_before = webhook.attempts
    sink = WebhookSink(webhook.url, retries=3, backoff=0.05)
    sink.emit(_alert())
    sink.close()
    assert webhook.attempts - attempts_before == 3 and len(webhook.bodies()) == 1
    assert sink.delivery.sent == 1 and sink.delivery.failed == 0


def test_a_hanging_endpoint_never_blocks_and_its_secret_is_never_logged(caplog):
    # A socket that accepts connections but never answers.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/services/T000/B000/TOPSECRET?token=hunter2"
        caplog.set_level(logging.WARNING, logger="trainmon.sinks")
        sink = WebhookSink(url, timeout=0.2, retries=1, backoff=0.05, queue_size=4)
        for i in range(50):  # the engine's thread: every emit returns at once, the overflow is counted
            sink.emit(_alert(step=i))
        assert sink.delivery.dropped >= 40
        sink.close()
    assert sink.delivery.failed >= 1
    text = caplog.text
    assert "delivery" in text and "127.0.0.1" in text
    assert "TOPSECRET" not in text and "hunter2" not in text and "services" not in text
    assert redact(url).endswith("/***")


def test_alertmanager_sink_fires_and_resolves_in_a_real_alertmanager(alertmanager, webhook):  # noqa: F811
    webhook.clear()
    sink = AlertmanagerSink(alertmanager.url, labels={"cluster": "test"}, resend_seconds=0.5)
    sink.emit(_alert(run="am-run"))
    held = wait_until(lambda: [a for a in alertmanager.alerts() if a["labels"].get("run") == "am-run"], 20,
                      "the alert in Alertmanager")
    labels = held[0]["labels"]
    assert labels == {"alertname": "loss.nonfinite", "severity": "critical", "run": "am-run", "rank": "0",
                      "cluster": "test"}
    assert held[0]["annotations"]["hint"] == "Restart from the last good checkpoint."
    # Alertmanager routes it to its receiver
    notified = webhook.wait_for(lambda b: [a for a in alerts_in(b) if a["labels"].get("run") == "am-run"])
    assert notified[0]["status"] == "firing"
    time.sleep(1.5)  # idle: the sink re-posts the active alert so Alertmanager keeps it
    assert sink.delivery.sent >= 2
    sink.emit(_alert(run="am-run", status="resolved"))
    webhook.wait_for(lambda b: [a for a in alerts_in(b) if a["labels"].get("run") == "am-run"
                                and a["status"] == "resolved"])
    sink.close()


def test_the_daemon_delivers_to_alertmanager_directly(tmp_path, alertmanager, webhook):  # noqa: F811
    from monitor.cli.app import app
    from monitor.trainer import TrainConfig, train

    train(TrainConfig.from_preset("tiny", max_steps=20, faults=["nan-at:12"]), run_dir=tmp_path / "runs" / "d-run",
          monitor_config={"metrics": {"enabled": False}, "console": {"enabled": False}}, progress=False)
    cfg = tmp_path / "watch.yaml"
    cfg.write_text(json.dumps({"sinks": {"alertmanager": {"url": alertmanager.url}}}))
    result = CliRunner().invoke(app, ["watch", str(tmp_path / "runs"), "--once", "--metrics-port", "-1",
                                      "--state-dir", str(tmp_path / "s"), "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    got = wait_until(lambda: [a for a in alertmanager.alerts() if a["labels"].get("run") == "d-run"
                              and a["labels"]["alertname"] == "loss.nonfinite"], 20, "the daemon's alert")
    assert got[0]["labels"]["severity"] == "critical" and got[0]["annotations"]["step"] == "12"


@pytest.mark.parametrize("url", ["ftp://x", "hooks.slack.com/x"])
def test_sink_urls_are_validated_at_load(url):
    from monitor.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"sinks\.webhook\.url"):
        load_config({"sinks": {"webhook": {"url": url}}}, environ={})
