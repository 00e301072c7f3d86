"""MonitorConfig from dicts, YAML, TOML, JSON and MONITOR_* variables; errors name the key."""

from __future__ import annotations

import pytest

from monitor.config import ConfigError, MonitorConfig, load_config


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
    env = {"MONITOR_METRICS__PORT": "9900", "MONITOR_RULES__LOSS_SPIKE__Z_CRITICAL": "12", "MONITOR_RUN_DIR": "x",
           "MONITOR_HALT_ON": "critical"}
    cfg = load_config(p, environ=env)
    assert cfg.metrics.port == 9900 and cfg.rules["loss.spike"]["z_critical"] == 12 and cfg.halt_on == "critical"
    assert load_config(None, environ={"MONITOR_CONFIG": str(p)}).metrics.port == 9801


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
