"""Alert delivery to a local webhook receiver and to a real Alertmanager: payloads, retries, never blocking."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pkgutil
import socket
import time

import pytest
from prometheus_client import CollectorRegistry
from servers import alertmanager, alerts_in, wait_until, webhook  # noqa: F401  (fixtures)
from typer.testing import CliRunner

import monitor.exporters
from monitor.exporters.alertmanager import AlertmanagerSink
from monitor.exporters.console import ConsoleSink
from monitor.exporters.delivery import redact
from monitor.exporters.prometheus import TrainMetrics
from monitor.exporters.sinks import Sink
from monitor.exporters.webhook import WebhookSink
from monitor.schema import Alert, Severity


def _alert(rule="loss.nonfinite", severity=Severity.critical, status="firing", run="r1", rank=0, step=150,
           evidence=None):
    return Alert(rule=rule, severity=severity, step=step, rank=rank, run=run, status=status,
                 message=f"the loss is nan at step {step}.", hint="Restart from the last good checkpoint.",
                 evidence={"loss": float("nan")} if evidence is None else evidence)


# Every sink class in monitor/exporters, built for a test: a new sink class must be added here.
SINKS = {
    ConsoleSink: lambda url: ConsoleSink(),
    WebhookSink: lambda url: WebhookSink(url, min_severity="info", retries=0),
    AlertmanagerSink: lambda url: AlertmanagerSink(url, retries=0),
    TrainMetrics: lambda url: TrainMetrics(CollectorRegistry(), "r1", 0),
}


def _exporter_sink_classes() -> set[type]:
    """Classes defined in monitor/exporters with an `emit` method of their own (logging handlers, and
    YAML dumpers whose `emit` comes from PyYAML, aside)."""
    found = set()
    for info in pkgutil.iter_modules(monitor.exporters.__path__):
        module = importlib.import_module(f"monitor.exporters.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            emit = getattr(cls, "emit", None)
            if (cls.__module__ == module.__name__ and cls is not Sink and not issubclass(cls, logging.Handler)
                    and getattr(emit, "__module__", "").startswith("monitor.")):
                found.add(cls)
    return found


def test_every_sink_class_implements_the_protocol(webhook):  # noqa: F811
    assert _exporter_sink_classes() == set(SINKS)
    for cls, build in SINKS.items():
        sink = build(webhook.url)
        try:
            assert isinstance(sink, Sink), cls
            for name in ("emit", "restore", "close"):
                assert callable(getattr(cls, name, None)), (cls, name)
        finally:
            sink.close()


def test_sinks_never_change_the_alert_they_are_given(webhook):  # noqa: F811
    """One alert object goes to every sink of an engine: no sink may change it, so order does not matter."""
    evidence = {"loss": 7.5, "top_params": [{"param": "h.0.w", "ratio": 40.0}], "layers": ["h.0", "h.1"]}
    alerts = [_alert(rule="run.stalled", evidence=evidence), _alert(severity=Severity.warning),
              _alert(status="resolved"), _alert(rule="run.stalled", status="resolved", evidence=evidence)]
    for cls, build in SINKS.items():
        sink = build(webhook.url)
        before = [a.model_dump() for a in alerts]
        try:
            for a in alerts[:2]:
                sink.restore(a)
            for a in alerts:
                sink.emit(a)
        finally:
            sink.close()
        assert [a.model_dump() for a in alerts] == before, cls


def test_restore_shows_an_alert_again_without_notifying(webhook):  # noqa: F811
    webhook.clear()
    firing = _alert(run="restored")
    hook = WebhookSink(webhook.url, min_severity="info")
    hook.restore(firing)
    hook.close()
    am = AlertmanagerSink(webhook.url, resend_seconds=3600)
    am.restore(firing)
    am.close()
    assert webhook.bodies() == [] and hook.delivery.sent == am.delivery.sent == 0
    assert list(am._active.values()) == [firing]  # the periodic re-post includes it
    registry = CollectorRegistry()
    TrainMetrics(registry, "restored", 0).restore(firing)
    labels = {"run": "restored", "rank": "0", "rule": "loss.nonfinite", "severity": "critical"}
    assert registry.get_sample_value("trainmon_alert_active", labels) == 1
    assert not registry.get_sample_value("trainmon_alerts_total", labels)  # shown again, not counted again


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


@pytest.mark.slow
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


@pytest.mark.slow
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
    # idle: the sink re-posts the active alert so Alertmanager keeps it
    deadline = time.monotonic() + 30
    while sink.delivery.sent < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.delivery.sent >= 2
    sink.emit(_alert(run="am-run", status="resolved"))
    webhook.wait_for(lambda b: [a for a in alerts_in(b) if a["labels"].get("run") == "am-run"
                                and a["status"] == "resolved"])
    sink.close()


@pytest.mark.slow
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
