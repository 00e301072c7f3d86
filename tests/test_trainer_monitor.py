"""The reference trainer with the monitor attached: healthy runs stay quiet, planted faults are caught."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from monitor.cli.app import app
from monitor.cli.check import check_run
from monitor.config import load_config
from monitor.runlog.reader import read_run
from monitor.trainer import TrainConfig, train

QUIET = {"metrics": {"port": 0}, "console": {"enabled": False}}
runner = CliRunner()


def _loud(alerts):
    return [a.line() for a in alerts if a.severity.value in ("warning", "critical")]


@pytest.mark.parametrize("overrides", [
    {},
    {"precision": "bf16", "max_steps": 80},
    {"grad_accum": 2, "batch_size": 4, "max_steps": 80},
    {"post_ln": True, "max_steps": 80},
    {"data": "text", "max_steps": 60},
], ids=["fp32", "bf16", "accumulation", "post-ln", "text"])
@pytest.mark.slow
def test_healthy_runs_raise_no_warning(tmp_path, overrides):
    res = train(TrainConfig.from_preset("tiny", **overrides), run_dir=tmp_path / "run", monitor_config=QUIET,
                progress=False)
    assert _loud(res.alerts) == []
    records = read_run(tmp_path / "run").records[0]
    assert [r.step for r in records] == list(range(res.steps))
    assert records[-1].loss == pytest.approx(res.losses[-1], rel=1e-5)


@pytest.mark.parametrize("faults, overrides, rule, severity, max_step", [
    (["no-warmup"], {"max_steps": 40}, "warmup.missing", "warning", 6),
    (["nan-at:30"], {"max_steps": 40}, "loss.nonfinite", "critical", 30),
    (["fp16-overflow:10"], {"max_steps": 30}, "amp.overflow", "critical", 14),
], ids=["no-warmup", "nan", "fp16-overflow"])
@pytest.mark.slow
def test_planted_faults_are_detected(tmp_path, faults, overrides, rule, severity, max_step):
    res = train(TrainConfig.from_preset("tiny", faults=faults, **overrides), run_dir=tmp_path / "run",
                monitor_config=QUIET, progress=False)
    hits = [a for a in res.alerts if a.rule == rule and a.severity.value == severity]
    assert hits, [a.line() for a in res.alerts]
    assert hits[0].evidence.get("detected_at", hits[0].step) <= max_step
    # `monitor check` on the run dir finds the same
    _, replayed = check_run(tmp_path / "run", load_config(None, environ={}))
    assert (rule, hits[0].step) in {(a.rule, a.step) for a in replayed}


@pytest.mark.slow
def test_monitor_demo_end_to_end(tmp_path):
    result = runner.invoke(app, ["demo", "--run-dir", str(tmp_path / "demo"), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "WARNING warmup.missing" in out and "CRITICAL loss.nonfinite at step 150" in out
    assert "Training halted by trainmon" in out
    for where in ("run dir", "alerts.jsonl", "/metrics", "tensorboard --logdir"):
        assert where in out
    check = runner.invoke(app, ["check", str(tmp_path / "demo"), "--json"])
    assert check.exit_code == 1
    assert [a["rule"] for a in json.loads(check.stdout)] == ["warmup.missing", "loss.nonfinite"]


def test_monitor_train_command(tmp_path):
    result = runner.invoke(app, ["train", "--steps", "20", "--run-dir", str(tmp_path / "r"), "--no-progress",
                                 "--set", "batch_size=4", "--config", str(_cfg(tmp_path))])
    assert result.exit_code == 0, result.output
    assert len(read_run(tmp_path / "r").records[0]) == 20
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["max_steps"] == 20 and info["optimizer"]["name"] == "AdamW"


def _cfg(tmp_path):
    p = tmp_path / "mon.yaml"
    p.write_text("metrics: {port: 0}\nconsole: {enabled: false}\n")
    return p


@pytest.mark.parametrize("args, message", [
    (["--fault", "bogus"], "bogus"),
    (["--set", "batch_sise=4"], "batch_sise"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--precision", "fp8"], "precision"),
    (["--set", "novalue"], "KEY=VALUE"),
])
def test_monitor_train_bad_input_exits_2(args, message):
    result = runner.invoke(app, ["train", "--no-progress", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_list_faults_explains_each():
    from monitor.trainer import FAULTS

    out = runner.invoke(app, ["train", "--list-faults"]).stdout
    for name in FAULTS:
        assert name in out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_checkpointing_and_scheduler_faults_work_with_the_monitor_attached(tmp_path):
    """Nothing is set on the scheduler: an attribute there would land in its state_dict and break torch.save."""
    cfg = TrainConfig.from_preset("tiny", max_steps=60, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=20,
                                  faults=["resume-without-scheduler:30"])
    res = train(cfg, run_dir=tmp_path / "a", monitor_config=QUIET, progress=False)
    assert res.steps == 60 and sorted(p.name for p in (tmp_path / "ck").iterdir())
    lrs = [r.lr[0] for r in read_run(tmp_path / "a").records[0]]
    assert lrs[30] < lrs[29] / 5, "the fresh scheduler restarted warmup"

    cfg = TrainConfig.from_preset("tiny", max_steps=12, faults=["per-microbatch-scheduler"])
    train(cfg, run_dir=tmp_path / "b", monitor_config=QUIET, progress=False)
    counts = [r.scheduler_steps for r in read_run(tmp_path / "b").records[0]]
    assert counts[1:] == [4] * 11  # scheduler.step() four times per optimizer step: the data warmup.per_microbatch needs
