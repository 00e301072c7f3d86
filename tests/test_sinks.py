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
from servers import ScriptedEndpoint, alertmanager, alerts_in, wait_until, webhook  # noqa: F401  (fixtures)
from typer.testing import CliRunner

import monitor.exporters
from monitor.exporters.alertmanager import AlertmanagerSink
from monitor.exporters.console import ConsoleSink
from monitor.exporters.delivery import HttpDelivery, redact
from monitor.exporters.prometheus import TrainMetrics
from monitor.exporters.sinks import Sink, build_http_sinks
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


# -- delivery never dies silently; secrets never reach disk or logs ----------------------------------

def _deliveries(registry, sink, outcome):
    return registry.get_sample_value("trainmon_alert_deliveries_total", {"sink": sink, "outcome": outcome})


def _errors(registry, sink):
    """{reason: failed attempts} of one sink, from the registry."""
    return {s.labels["reason"]: s.value for m in registry.collect() if m.name == "trainmon_alert_delivery_errors"
            for s in m.samples if s.name.endswith("_total") and s.labels["sink"] == sink}


def _http_sinks(registry, **sections):
    from monitor.config import load_config

    return build_http_sinks(load_config({"sinks": sections}, environ={}), registry=registry)


def test_a_reply_that_is_not_http_kills_nothing_the_next_alerts_are_delivered_and_failures_counted(caplog, fault_row):
    caplog.set_level(logging.WARNING, logger="trainmon.sinks")
    registry = CollectorRegistry()
    with ScriptedEndpoint(["garbage", "close", "reset"]) as hook:
        url = hook.url + "services/T000/B000/TOPSECRET?token=hunter2"
        [sink] = _http_sinks(registry, webhook={"url": url, "retries": 0, "min_severity": "info"})
        for outcome in ("sent", "failed", "dropped"):  # every outcome exists from the first scrape
            assert _deliveries(registry, "webhook", outcome) == 0
        for step in range(4):
            sink.emit(_alert(step=step))
        got = hook.wait_requests(4)
        assert sink.delivery.flush(10) and sink.delivery._thread.is_alive()
        sink.close()
    assert [r["action"] for r in got] == ["garbage", "close", "reset", "ok"]
    assert json.loads(got[3]["body"])["text"].startswith("[CRITICAL] loss.nonfinite (run r1, rank 0, step 3)")
    assert (sink.delivery.sent, sink.delivery.failed, sink.delivery.dropped) == (1, 3, 0)
    assert _deliveries(registry, "webhook", "sent") == 1 and _deliveries(registry, "webhook", "failed") == 3
    errors = _errors(registry, "webhook")
    assert errors["protocol"] >= 2 and sum(errors.values()) == 3, errors  # a reset reads as either
    assert "BadStatusLine" in caplog.text and "127.0.0.1" in caplog.text
    assert "TOPSECRET" not in caplog.text and "hunter2" not in caplog.text
    fault_row("sink: replies that are not HTTP (garbage, closed, reset)", "the delivery thread went on; the next "
              "alert delivered", "those alerts (retries 0): counted as failed, by reason; the URL never logged")


def test_failed_attempts_are_retried_per_policy_and_counted_per_sink():
    registry = CollectorRegistry()
    with ScriptedEndpoint(["garbage", "close"]) as hook, ScriptedEndpoint(["reset"]) as am:
        sinks = _http_sinks(registry, webhook={"url": hook.url, "retries": 2, "backoff": 0.01},
                            alertmanager={"url": am.url, "retries": 1, "backoff": 0.01, "resend_seconds": 3600})
        for sink in sinks:
            sink.emit(_alert())
        assert [r["action"] for r in hook.wait_requests(3)] == ["garbage", "close", "ok"]
        [*_, posted] = am.wait_requests(2)
        for sink in sinks:
            sink.close()
    assert posted["path"] == "/api/v2/alerts" and json.loads(posted["body"])[0]["labels"]["alertname"] == "loss.nonfinite"
    for name in ("webhook", "alertmanager"):
        assert _deliveries(registry, name, "sent") == 1 and _deliveries(registry, name, "failed") == 0
    assert _errors(registry, "webhook") == {"protocol": 2}
    assert sum(_errors(registry, "alertmanager").values()) == 1
    # A second set of sinks on the same registry (a second Monitor's, the daemon's) counts on.
    more = _http_sinks(registry, webhook={"url": "http://127.0.0.1:1/"})
    more[0].close()
    assert _deliveries(registry, "webhook", "sent") == 1


def test_a_full_queue_and_what_is_left_at_close_are_counted_as_dropped():
    registry = CollectorRegistry()
    with ScriptedEndpoint(["hang"]) as hook:
        [sink] = _http_sinks(registry, webhook={"url": hook.url, "queue_size": 1, "timeout": 30})
        sink.emit(_alert(step=1))
        hook.wait_requests(1)  # the worker is busy with it
        for step in (2, 3, 4):  # one waits in the queue, two find it full
            sink.emit(_alert(step=step))
        assert _deliveries(registry, "webhook", "dropped") == 2
        hook.release()
        sink.close()
        assert [r["action"] for r in hook.wait_requests(2)] == ["hang", "ok"]
    assert _deliveries(registry, "webhook", "sent") == 2
    # still queued when close gives up: dropped, counted
    with ScriptedEndpoint(["hang"]) as hook:
        delivery = HttpDelivery("webhook", timeout=30, retries=0, queue_size=4)
        delivery.submit(hook.url, {"n": 1})
        hook.wait_requests(1)
        delivery.submit(hook.url, {"n": 2})
        delivery.submit(hook.url, {"n": 3})
        delivery.close(timeout=0.2)
        assert delivery.dropped == 2
        assert not delivery.submit(hook.url, {"n": 4}) and delivery.dropped == 3  # after close


def test_an_exception_of_the_worker_itself_is_counted_and_the_worker_goes_on():
    registry = CollectorRegistry()
    from monitor.exporters.delivery import delivery_metrics

    with ScriptedEndpoint() as hook:
        delivery = HttpDelivery("webhook", retries=0, metrics=delivery_metrics(registry))
        delivery.submit(hook.url, {"not json": object()})  # json.dumps raises in the worker
        delivery.submit("no-scheme-at-all", {"n": 1})  # urllib raises ValueError on every attempt
        delivery.submit(hook.url, {"n": 2})
        assert delivery.flush(10)
        assert delivery._thread.is_alive()
        delivery.close()
        [got] = hook.wait_requests(1)
    assert json.loads(got["body"]) == {"n": 2}
    assert (delivery.sent, delivery.failed) == (1, 2)
    assert _errors(registry, "webhook") == {"other": 2}


def test_credentials_in_a_sink_url_are_sent_as_basic_auth_and_never_logged(caplog):
    import base64

    caplog.set_level(logging.WARNING, logger="trainmon.sinks")
    with ScriptedEndpoint(["garbage"]) as hook:
        url = f"http://us%40er:s3cret%21@127.0.0.1:{hook.port}/hook?token=abc"
        [sink] = _http_sinks(None, webhook={"url": url, "retries": 1, "backoff": 0.01})
        sink.emit(_alert())
        sink.close()
        got = hook.wait_requests(2)
    assert got[1]["path"] == "/hook?token=abc"
    assert got[1]["headers"]["authorization"] == "Basic " + base64.b64encode(b"us@er:s3cret!").decode()
    assert sink.delivery.sent == 1
    assert "s3cret" not in caplog.text and "token" not in caplog.text and "us%40er" not in caplog.text


SECRET_URL = "http://user:secret@127.0.0.1:1/hook?token=abc"


def test_sink_urls_never_reach_run_json_or_the_logs(tmp_path, caplog):
    import torch
    from conftest import TinyLM, batches

    import monitor

    caplog.set_level(logging.DEBUG)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path / "run"
    mon = monitor.attach(model, opt, run_dir=run_dir, config={
        "metrics": {"enabled": False}, "console": {"enabled": False}, "tensorboard": {"enabled": False},
        "sinks": {"webhook": {"url": SECRET_URL, "min_severity": "info", "retries": 0},
                  "alertmanager": {"url": SECRET_URL, "retries": 0}}})
    try:
        assert mon.config.sinks.webhook.url.get_secret_value() == SECRET_URL  # the sinks still have it
        for x, y in batches(3):
            _, loss = model(x, y)
            (loss * float("nan")).backward()  # an alert for the sinks to deliver
            opt.step()
            opt.zero_grad()
    finally:
        mon.close()
    run_json = (run_dir / "run.json").read_text()
    assert json.loads(run_json)["config"]["sinks"]["webhook"]["url"] == "**********"
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"secret" not in data and b"token=abc" not in data, path
    assert "abc" not in run_json
    from monitor.runlog.reader import read_run

    info = read_run(run_dir).info.model_dump_json()
    assert "secret" not in info and "abc" not in info
    assert "delivery to http://127.0.0.1:1/*** failed" in caplog.text  # the sinks did try, and said so redacted
    assert "secret" not in caplog.text and "abc" not in caplog.text


def test_monitor_config_prints_sink_urls_redacted(tmp_path):
    from monitor.cli.app import app
    from monitor.config_load import ENV_PREFIX

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"sinks": {"webhook": {"url": SECRET_URL}}}))
    runner = CliRunner()
    for args, env in ((["config", "-c", str(cfg)], {}),
                      (["config"], {f"{ENV_PREFIX}SINKS__ALERTMANAGER__URL": SECRET_URL})):
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 0, result.output
        assert "secret" not in result.output and "abc" not in result.output and "**********" in result.output
    # What it printed cannot pass for a URL when fed back
    printed = tmp_path / "printed.yaml"
    printed.write_text(runner.invoke(app, ["config", "-c", str(cfg)]).output)
    result = runner.invoke(app, ["config", "-c", str(printed)])
    assert result.exit_code == 2 and "sinks.webhook.url: is redacted" in result.output


def test_alertmanager_alerts_link_their_runbook_when_a_base_is_configured():
    from monitor.exporters.alertmanager import am_alert
    from monitor.exporters.promrules_model import runbook_url

    alert = _alert(step=3)
    base = "https://example.org/trainmon/blob/main/docs/rules.md"
    assert am_alert(alert, runbook_base=base)["annotations"]["runbook_url"] == runbook_url(alert.rule, base)
    assert "runbook_url" not in am_alert(alert)["annotations"]
