"""MonitorConfig from dicts, YAML, TOML, JSON and TRAINMON_* variables; errors name the key."""

from __future__ import annotations

import logging

import pytest

from monitor.config import ConfigError, MonitorConfig, load_config
from monitor.config_load import env_overrides, ignored_env, legacy_env


def test_defaults_are_safe():
    cfg = load_config(None, environ={})
    assert cfg.metrics.host == "127.0.0.1" and cfg.halt_on is None and cfg.rules == {}


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "metrics:\n  port: 9801\nrules:\n  loss.spike: {z_critical: 9}\n  amp.overflow: {enabled: false}\n"),
    (".toml", '[metrics]\nport = 9801\n[rules."loss.spike"]\nz_critical = 9\n[rules."amp.overflow"]\nenabled = false\n'),
    (".json", '{"metrics": {"port": 9801}, "rules": {"loss.spike": {"z_critical": 9}, "amp.overflow": {"enabled": false}}}'),
    (".yml", "monitor:\n  metrics: {port: 9801}\n  rules: {loss.spike: {z_critical: 9}, amp.overflow: {enabled: false}}\n"),
])
def test_files(tmp_path, suffix, text):
    p = tmp_path / f"c{suffix}"
    p.write_text(text)
    cfg = load_config(p, environ={})
    assert cfg.metrics.port == 9801
    assert cfg.rules == {"loss.spike": {"z_critical": 9}, "amp.overflow": {"enabled": False}}


def test_environment_overrides_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("metrics: {port: 9801}\n")
    env = {"TRAINMON_METRICS__PORT": "9900", "TRAINMON_RULES__LOSS_SPIKE__Z_CRITICAL": "12", "MONITOR_RUN_DIR": "x",
           "TRAINMON_HALT_ON": "critical", "TRAINMON_SINKS__ALERTMANAGER__URL": "http://am:9093",
           "TRAINMON_SINKS__ALERTMANAGER__LABELS__CLUSTER": "pod-3", "TRAINMON_RULES__AMP_OVERFLOW": '{"enabled": false}'}
    cfg = load_config(p, environ=env)
    assert cfg.metrics.port == 9900 and cfg.rules["loss.spike"]["z_critical"] == 12 and cfg.halt_on == "critical"
    assert cfg.sinks.alertmanager.labels == {"cluster": "pod-3"} and cfg.rules["amp.overflow"] == {"enabled": False}
    assert load_config(None, environ={"TRAINMON_CONFIG": str(p)}).metrics.port == 9801


def test_stray_variables_are_ignored_never_fatal(caplog):
    """Kubernetes injects MONITOR_PORT & co. for a Service named `monitor` (TRAINMON_PORT & co. for one named
    `trainmon`): none of them may stop training. Typos under the prefix are ignored too, with a warning."""
    env = {"MONITOR_PORT": "tcp://10.0.0.1:9740", "MONITOR_SERVICE_HOST": "10.0.0.1",
           "MONITOR_PORT_9740_TCP_ADDR": "10.0.0.1", "MONITOR_RUN_DIR": "runs/x",
           "TRAINMON_PORT": "tcp://10.0.0.2:9740", "TRAINMON_SERVICE_PORT_METRICS": "9740",
           "TRAINMON_NOT_A_KEY": "1", "TRAINMON_METRICS__PROT": "9800", "TRAINMON_RULES__LOSS_SPIKES__Z_CRITICAL": "1",
           "TRAINMON_RULES__LOSS_SPIKE__Z_CRITCAL": "1", "TRAINMON_METRICS__PORT__X": "1", "TRAINMON_ON_ALERT": "print",
           "TRAINMON_ATTENTION__EVERY": "4"}
    with caplog.at_level(logging.WARNING, logger="trainmon"):
        cfg = load_config(None, environ=env)
    assert cfg.attention.every == 4 and cfg.metrics.port == 9740 and cfg.rules == {}
    assert env_overrides(env) == {"attention": {"every": 4}}
    assert ignored_env(env) == sorted(n for n in env if n.startswith("TRAINMON_") and n != "TRAINMON_ATTENTION__EVERY")
    assert legacy_env(env) == []  # MONITOR_PORT & co. name no config key: nothing to migrate
    warned = caplog.text
    assert "TRAINMON_NOT_A_KEY" in warned and "TRAINMON_METRICS__PROT" in warned
    assert "TRAINMON_PORT" not in warned and "SERVICE" not in warned  # Service links: listed, not warned of


def test_old_monitor_prefix_is_no_longer_read(caplog):
    env = {"MONITOR_METRICS__PORT": "9900", "MONITOR_CONFIG": "/nonexistent.yaml", "MONITOR_HALT_ON": "critical"}
    with caplog.at_level(logging.WARNING, logger="trainmon"):
        cfg = load_config(None, environ=env)
    assert cfg.metrics.port == 9740 and cfg.halt_on is None
    assert legacy_env(env) == ["MONITOR_CONFIG", "MONITOR_HALT_ON", "MONITOR_METRICS__PORT"]
    assert "now use the TRAINMON_ prefix" in caplog.text and "TRAINMON_METRICS__PORT" in caplog.text


@pytest.mark.parametrize("env, message", [
    ({"TRAINMON_METRICS__PORT": "tcp://10.0.0.1:9740"},
     r"metrics\.port \(from TRAINMON_METRICS__PORT\): Input should be a valid integer"),
    ({"TRAINMON_HALT_ON": "sometimes"}, r"halt_on \(from TRAINMON_HALT_ON\): Input should be 'warning'"),
    ({"TRAINMON_RULES__LOSS_SPIKE__Z_CRITICAL": "-1"},
     r"rules\.loss\.spike\.z_critical \(from TRAINMON_RULES__LOSS_SPIKE__Z_CRITICAL\): Input should be greater"),
    ({"TRAINMON_ATTENTION__EVERY": "5000"}, r"attention \(from TRAINMON_ATTENTION__EVERY\): max_every \(1000\)"),
    ({"TRAINMON_METRICS": '{"prot": 1}'}, r"metrics\.prot \(from TRAINMON_METRICS\): unknown key"),
    ({"TRAINMON_METRICS": "5", "TRAINMON_METRICS__PORT": "1"}, r"TRAINMON_METRICS__PORT conflicts with TRAINMON_METRICS"),
])
def test_a_known_variable_with_a_bad_value_fails_naming_it(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ=env)


def test_a_bad_secret_from_the_environment_is_named_not_shown():
    with pytest.raises(ConfigError) as e:
        load_config(None, environ={"TRAINMON_SINKS__WEBHOOK__URL": "ftp://hooks.example/T0/SECRET"})
    assert "TRAINMON_SINKS__WEBHOOK__URL" in str(e.value) and "SECRET" not in str(e.value)


@pytest.mark.parametrize("source, message", [
    ({"metrics": {"port": 70000}}, r"metrics\.port: Input should be less than or equal to 65535"),
    ({"metrix": {}}, r"metrix: unknown key"),
    ({"halt_on": "sometimes"}, r"halt_on: Input should be 'warning' or 'critical'"),
    ({"rules": {"loss.spike": {"z_critical": -1}}}, r"rules\.loss\.spike\.z_critical: Input should be greater than 0"),
    ({"rules": {"loss.spikes": {}}}, r"rules\.loss\.spikes: unknown rule id \(known: loss\.divergence, loss\.nonfinite, loss\.spike\)"),
    ({"rules": {"lr.zero": {"patience": 2, "patients": 3}}}, r"rules\.lr\.zero\.patients: unknown option"),
    ({"rules": ["loss.spike"]}, r"rules: .*mapping"),
])
def test_errors_name_the_dotted_key(source, message):
    with pytest.raises(ConfigError, match=message):
        load_config(source, environ={})


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("metrics: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad} could not be parsed"):
        load_config(bad, environ={})
    ini = tmp_path / "c.ini"
    ini.write_text("x")
    with pytest.raises(ConfigError, match="unsupported extension"):
        load_config(ini, environ={})
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("metrics: {port: abc}\n")
    with pytest.raises(ConfigError, match=rf"\({wrong}\):\n  metrics\.port"):
        load_config(wrong, environ={})


def test_config_object_keeps_callback():
    seen = []
    cfg = MonitorConfig(on_alert=seen.append, halt_on="warning")
    out = load_config(cfg, environ={})
    assert out.on_alert == seen.append and out.halt_on == "warning"


@pytest.mark.parametrize("url, why", [
    ("https://user:s3cret@[::1/hook", "is not a valid URL"),  # an IPv6 host never closed
    ("http://host:s3cret/hook", "is not a valid URL"),  # a port that is no number
    ("http:///s3cret", "has no host"),
    ("ftp://host/s3cret", "must be an http:// or https:// URL"),
])
def test_a_sink_url_delivery_could_not_use_is_refused_without_quoting_it(url, why):
    for sink in ("webhook", "alertmanager"):
        with pytest.raises(ConfigError, match=rf"sinks.{sink}.url: {why}") as e:
            load_config({"sinks": {sink: {"url": url}}}, environ={})
        assert "s3cret" not in str(e.value)
