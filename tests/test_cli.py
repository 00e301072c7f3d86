"""The `monitor` CLI through typer's CliRunner, on run directories made by real training steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyLM, batches
from typer.testing import CliRunner

import monitor
from monitor.cli.app import app
from monitor.rules import REGISTRY

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run with no warmup (warning) and a NaN loss at step 30 (critical)."""
    run_dir = tmp_path_factory.mktemp("runs") / "nan-run"
    class Poisoned(TinyLM):
        poison = False

        def forward(self, idx, targets=None):
            logits, loss = super().forward(idx, targets)
            return logits, loss * float("nan") if self.poison else loss

    torch.manual_seed(0)
    model = Poisoned()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with monitor.attach(model, opt, run_dir=run_dir, config={"metrics": {"enabled": False},
                                                             "console": {"enabled": False}}) as mon:
        for step, (x, y) in enumerate(batches(40)):
            model.poison = step == 30
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        mon.flush()
        in_process = [(a.rule, a.severity.value, a.step) for a in mon.alerts]
    return run_dir, in_process


def test_check_reproduces_in_process_alerts(finished_run):
    run_dir, in_process = finished_run
    result = runner.invoke(app, ["check", str(run_dir), "--json"])
    assert result.exit_code == 1, result.output
    alerts = json.loads(result.stdout)
    assert [(a["rule"], a["severity"], a["step"]) for a in alerts] == in_process
    assert {"warmup.missing", "loss.nonfinite"} <= {a["rule"] for a in alerts}
    for a in alerts:
        assert set(a) == {"rule", "severity", "step", "rank", "message", "hint", "evidence", "attempt"}
    nan = next(a for a in alerts if a["rule"] == "loss.nonfinite")
    assert nan["step"] == 30 and nan["evidence"]["loss"] == "NaN"


@pytest.mark.parametrize("fail_on, code", [("info", 1), ("warning", 1), ("critical", 1)])
def test_check_exit_codes(finished_run, fail_on, code):
    result = runner.invoke(app, ["check", str(finished_run[0]), "--fail-on", fail_on])
    assert result.exit_code == code
    assert "loss.nonfinite" in result.stdout and "Fix:" in result.stdout


def test_check_passes_when_nothing_reaches_fail_on(finished_run, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rules:\n  loss.nonfinite: {enabled: false}\n")
    result = runner.invoke(app, ["check", str(finished_run[0]), "--fail-on", "critical", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "warmup.missing" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["check", "/nonexistent/run"], "no such directory"),
    (["check", "."], "not a trainmon run directory"),
    (["check", ".", "--fail-on", "fatal"], "fatal"),
])
def test_check_bad_input_exits_2(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


def _copy_run(finished_run, dest: Path, *, cut: int = 0, ended: bool = True, host: str | None = None) -> Path:
    """A copy of the finished run; `cut` bytes off its last event file; `ended=False`: run.json as a run
    that never closed left it, its process on `host` (another: a stale heartbeat) or this one (alive)."""
    import shutil

    run_dir = shutil.copytree(finished_run[0], dest)
    if cut:
        last = max(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)
        with open(last, "r+b") as f:
            f.truncate(last.stat().st_size - cut)
    if not ended:
        info = json.loads((run_dir / "run.json").read_text())
        info.pop("ended", None)
        info["attempts"][-1].update(ended=None, steps=None)
        if host is not None:
            info["attempts"][-1].update(host=host, heartbeat=0.0, started=0.0)
        (run_dir / "run.json").write_text(json.dumps(info))
    return run_dir


@pytest.fixture
def quiet_config(tmp_path):
    """With --fail-on critical: no finding in the finished run reaches it."""
    cfg = tmp_path / "quiet.yaml"
    cfg.write_text("rules:\n  loss.nonfinite: {enabled: false}\n")
    return ["--fail-on", "critical", "--config", str(cfg)]


def test_check_reports_an_incomplete_last_event_and_exits_3(finished_run, tmp_path, quiet_config):
    run_dir = _copy_run(finished_run, tmp_path / "cut", cut=7)
    result = runner.invoke(app, ["check", str(run_dir), *quiet_config])
    assert result.exit_code == 3, result.output
    assert "incomplete last event: " in result.stderr and "the records before it were read" in result.stderr
    assert "1 reading problem(s)" in result.stdout and "39 step records" in result.stdout
    assert "did not close" not in result.stderr  # run.json has its end summary
    # Findings win over damage: what was found in the records read stands.
    findings = runner.invoke(app, ["check", str(run_dir), "--json"])
    assert findings.exit_code == 1 and "incomplete last event" in findings.stderr
    assert "loss.nonfinite" in {a["rule"] for a in json.loads(findings.stdout)}
    report = tmp_path / "r.html"
    runner.invoke(app, ["check", str(run_dir), "--report", str(report), *quiet_config])
    assert "incomplete last event" in report.read_text()
    # The intact run: 0, nothing on stderr about damage.
    clean = runner.invoke(app, ["check", str(finished_run[0]), *quiet_config])
    assert clean.exit_code == 0 and "warning:" not in clean.stderr and "note:" not in clean.stderr


def test_check_notes_a_run_that_did_not_close(finished_run, tmp_path, quiet_config):
    crashed = _copy_run(finished_run, tmp_path / "crashed", ended=False, host="another-host")
    result = runner.invoke(app, ["check", str(crashed), *quiet_config])
    assert result.exit_code == 0, result.output  # whole records, nothing damaged: reported, not an exit code
    assert 'run.json has no end summary ("ended"): the run did not close' in result.stderr
    # Killed mid-write: the cut event is damage.
    killed = _copy_run(finished_run, tmp_path / "killed", cut=7, ended=False, host="another-host")
    result = runner.invoke(app, ["check", str(killed), *quiet_config])
    assert result.exit_code == 3 and "did not close" in result.stderr and "incomplete last event" in result.stderr
    # Still running (its process, this one, is alive): a last event being written is no damage.
    live = _copy_run(finished_run, tmp_path / "live", cut=7, ended=False)
    result = runner.invoke(app, ["check", str(live), *quiet_config])
    assert result.exit_code == 0, result.output
    assert "the run is still running" in result.stderr and "still being written" in result.stderr


def test_check_crash_exits_4_with_one_line(finished_run, monkeypatch, fault_row):
    import monitor.cli.check

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(monitor.cli.check, "examine_run", boom)
    result = runner.invoke(app, ["check", str(finished_run[0])])
    assert result.exit_code == 4, result.output
    assert result.stderr.strip().splitlines() == [
        "error: monitor check failed unexpectedly: RuntimeError: boom second line (a trainmon bug, not a finding; "
        "please report it)"]
    fault_row("monitor check: an unexpected exception", "exit 4 with one line naming it (never 1, the findings code)",
              "the check's verdict")


def test_stray_environment_variables_never_stop_training_or_the_cli(finished_run, tmp_path, monkeypatch, fault_row):
    """Kubernetes injects MONITOR_PORT & co. for a Service named `monitor`: attach and every command go on."""
    for name, value in {"MONITOR_PORT": "tcp://10.0.0.1:9740", "MONITOR_SERVICE_HOST": "10.0.0.1",
                        "MONITOR_PORT_9740_TCP": "tcp://10.0.0.1:9740", "TRAINMON_NOT_A_KEY": "1",
                        "TRAINMON_ATTENTION__EVERY": "3"}.items():
        monkeypatch.setenv(name, value)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with monitor.attach(model, opt, run_dir=tmp_path / "run", config={"metrics": {"enabled": False},
                                                                      "console": {"enabled": False}}) as mon:
        assert mon.config.attention.every == 3
        for x, y in batches(2):
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad()
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert "# ignored environment variables (no config key of that name): TRAINMON_NOT_A_KEY" in result.stderr
    assert "MONITOR_" not in result.stderr  # not config variables, old or new: nothing to say about them
    assert "every: 3" in result.stdout
    assert runner.invoke(app, ["check", str(finished_run[0])]).exit_code == 1  # its findings, as ever
    assert runner.invoke(app, ["rules", "--config", str(tmp_path / "missing.yaml")]).exit_code == 2
    fault_row("environment: MONITOR_PORT & co. (a Kubernetes Service named monitor), an unknown TRAINMON_ name",
              "attach and every command went on", "nothing; monitor config lists the unknown TRAINMON_ name")


def test_a_known_variable_with_a_bad_value_exits_2_naming_it(finished_run):
    env = {"TRAINMON_METRICS__PORT": "tcp://10.0.0.1:9740", "MONITOR_METRICS__PORT": "9800"}
    result = runner.invoke(app, ["config"], env=env)
    assert result.exit_code == 2 and "metrics.port (from TRAINMON_METRICS__PORT): Input should be" in result.stderr
    result = runner.invoke(app, ["check", str(finished_run[0])], env=env)
    assert result.exit_code == 2 and "TRAINMON_METRICS__PORT" in result.stderr
    old = runner.invoke(app, ["config"], env={"MONITOR_METRICS__PORT": "9800"})
    assert old.exit_code == 0 and "port: 9740" in old.stdout
    assert "# not read: MONITOR_METRICS__PORT (configuration variables now use the TRAINMON_ prefix)" in old.stderr


def test_check_bad_config_exits_2_naming_the_key(finished_run, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[rules."loss.spike"]\nz_warning = "six"\n')
    result = runner.invoke(app, ["check", str(finished_run[0]), "--config", str(cfg)])
    assert result.exit_code == 2 and "rules.loss.spike.z_warning" in result.output


def test_rules_lists_the_catalogue():
    result = runner.invoke(app, ["rules"])
    assert result.exit_code == 0
    for rule_id in REGISTRY.ids():
        assert rule_id in result.stdout
    assert result.stdout.count("Symptom:") == len(REGISTRY)
    rows = json.loads(runner.invoke(app, ["rules", "--json"]).stdout)
    spike = next(r for r in rows if r["id"] == "loss.spike")
    assert {o["name"]: o["default"] for o in spike["options"]}["z_critical"] == 8.0


def test_rules_validates_a_config_file(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("rules: {loss.spike: {z_critical: 9}, amp.overflow: {enabled: false}}\n")
    bad.write_text("rules: {loss.spike: {z_critical: 9, windw: 5}}\n")
    assert runner.invoke(app, ["rules", "--config", str(good)]).exit_code == 0
    result = runner.invoke(app, ["rules", "--config", str(bad)])
    assert result.exit_code == 2 and "rules.loss.spike.windw: unknown option" in result.output


def test_committed_config_docs_are_generated():
    result = runner.invoke(app, ["config", "--markdown"])
    assert result.stdout == (ROOT / "docs" / "config.md").read_text(), "run `make docs` and commit docs/config.md"
    for key in ("`attention.budget`", "`ddp.halt_margin_seconds`", "`sinks.alertmanager.url` | required",
                "`watchdog.interval_seconds`"):
        assert key in result.stdout


def test_config_prints_the_effective_configuration_or_names_the_bad_key(tmp_path):
    import yaml

    good = tmp_path / "good.toml"
    good.write_text('halt_on = "critical"\n[attention]\nevery = 20\n[rules."loss.spike"]\nz_critical = 9\n')
    result = runner.invoke(app, ["config", "--config", str(good)], env={"TRAINMON_METRICS__PORT": "9800"})
    assert result.exit_code == 0, result.output
    effective = yaml.safe_load(result.stdout)
    assert effective["halt_on"] == "critical" and effective["attention"]["every"] == 20
    assert effective["attention"]["budget"] == 0.0025  # a default, filled in
    assert effective["metrics"]["port"] == 9800  # the environment wins over the file
    assert effective["rules"] == {"loss.spike": {"z_critical": 9}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("attention: {evry: 3}\n")
    result = runner.invoke(app, ["config", "--config", str(bad)])
    assert result.exit_code == 2 and "attention.evry: unknown key" in result.output


def test_committed_rule_docs_are_generated():
    result = runner.invoke(app, ["rules", "--markdown"])
    assert result.stdout == (ROOT / "docs" / "rules.md").read_text(), "run `make docs` and commit docs/rules.md"


@pytest.mark.slow
def test_check_rules_and_config_do_not_import_torch(finished_run):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from monitor.cli.app import app\n"
        f"r = CliRunner().invoke(app, ['check', {str(finished_run[0])!r}])\n"
        "assert r.exit_code == 1, r.output\n"
        "assert CliRunner().invoke(app, ['rules']).exit_code == 0\n"
        "assert CliRunner().invoke(app, ['config']).exit_code == 0\n"
        "assert CliRunner().invoke(app, ['config', '--markdown']).exit_code == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_readme_custom_rule_example_runs():
    """The README's own-rule example registers, validates its options and fires."""
    import re

    from monitor.rules import RulesEngine
    from monitor.schema import RunInfo, StepRecord

    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "@register" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    try:
        engine = RulesEngine(RunInfo(run_id="r"), {"custom.loss_above_target": {"after": 2}})
        engine.observe_many(StepRecord(step=s, loss=3.0) for s in range(4))
        assert [a.rule for a in engine.alerts if a.rule.startswith("custom.")] == ["custom.loss_above_target"]
    finally:
        REGISTRY.unregister("custom.loss_above_target")


def test_check_reads_other_frameworks_and_maps_tags(tmp_path):
    """`monitor check` on a plain TensorBoard logdir with its own tag names, through --map."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tb"))
    for step in range(60):
        w.add_scalar("my/loss", float("nan") if step == 50 else 3.0 - step / 100, step)
        w.add_scalar("my/lr", 1e-3 * min(1.0, (step + 1) / 20), step)
    w.close()
    unmapped = runner.invoke(app, ["check", str(tmp_path / "tb")])
    assert unmapped.exit_code == 2 and "--map" in unmapped.output and "my/loss" in unmapped.output
    result = runner.invoke(app, ["check", str(tmp_path / "tb"), "--json", "--map", "loss=my/loss", "--map", "lr=my/lr"])
    assert result.exit_code == 1, result.output
    assert [(a["rule"], a["step"]) for a in json.loads(result.stdout)] == [("loss.nonfinite", 50)]
    bad = runner.invoke(app, ["check", str(tmp_path / "tb"), "--map", "los=my/loss"])
    assert bad.exit_code == 2 and "unknown signal 'los'" in bad.output
    assert runner.invoke(app, ["watch", str(tmp_path), "--once", "--map", "nonsense"]).exit_code == 2


def test_version_and_shell_completion():
    """`monitor --version` prints the package's version (pyproject.toml's, as installed); --help lists
    typer's shell completion options, and --show-completion prints a script for the shell named."""
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"trainmon {monitor.__version__}\n"
    assert monitor.__version__ == version("trainmon")
    help_text = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert all(opt in help_text for opt in ("--version", "--install-completion", "--show-completion"))
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="monitor")
    assert script.exit_code == 0 and "_MONITOR_COMPLETE" in script.output and "complete " in script.output
