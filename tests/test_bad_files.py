"""Damaged and hostile files, as a fuzzing pass wrote them: run.json nested too deeply, alerts.jsonl lines
that are not UTF-8, config files that are not UTF-8 or quote a secret in a syntax error, a run directory
whose event files are gone. Each is handled like the damage the project already knows (a corrupt run.json,
a torn alert line, a config that does not parse): a clear error naming the file, or the damage reported
and the rest read; never a traceback, never the file's content.

Everything runs for real: runs of the test model through `monitor.attach`, files written by trainmon's
own writers, the CLI through typer's CliRunner.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import monitor
from monitor.cli.app import app
from monitor.config import ConfigError, load_config
from monitor.runlog.reader import read_alerts, read_run
from monitor.runlog.rundir import ALERTS_JSONL, RUN_JSON, JsonlAlertSink, RunDir
from monitor.schema import Alert, Severity
from tests.conftest import TinyLM, batches

runner = CliRunner()
QUIET = {"metrics": {"enabled": False}, "console": {"enabled": False}}


def _train(run_dir: Path, steps: int = 8, **config) -> monitor.Monitor:
    """`steps` real steps of the test model into `run_dir`; returns the closed monitor."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with monitor.attach(model, opt, run_dir=run_dir, config={**QUIET, **config}) as mon:
        for x, y in batches(steps):
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        mon.flush()
    return mon


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A closed run of 8 steps (run.json says records_published: 8)."""
    run_dir = tmp_path_factory.mktemp("runs") / "finished"
    _train(run_dir)
    assert json.loads((run_dir / RUN_JSON).read_text())["records_published"] == 8
    return run_dir


# -- run.json nested too deeply: the damage a run.json that is not JSON is --------------------------------

DEPTH = 100_000  # far past the interpreter's recursion limit


def _damaged_run_json(run_dir: Path, how: str) -> None:
    run_dir.mkdir(parents=True)
    if how == "not JSON":
        (run_dir / RUN_JSON).write_text('{"run_id": "r", ', encoding="utf-8")
    else:  # a valid run.json with one value nested DEPTH deep
        (run_dir / RUN_JSON).write_text('{"run_id": "r", "x": ' + "[" * DEPTH + "]" * DEPTH + "}", encoding="utf-8")


@pytest.mark.parametrize("how", ["not JSON", "nested too deeply"])
def test_a_run_json_nested_too_deeply_is_read_as_damaged_like_one_that_is_not_json(tmp_path, how, caplog):
    run_dir = tmp_path / "run"
    _damaged_run_json(run_dir, how)
    assert RunDir(run_dir).read_json(RUN_JSON, "default") == "default"
    # Attach: a warning, then the attempt starts as in a new directory and run.json is written anew.
    mon = _train(run_dir, steps=3)
    assert "is unreadable" in caplog.text and "earlier attempts are not taken into account" in caplog.text
    assert mon.internal_errors == 0
    info = json.loads((run_dir / RUN_JSON).read_text())
    assert [(a["id"], a["kind"], a["steps"]) for a in info["attempts"]] == [(1, "fresh", 3)]
    assert info["attempts"][0]["ended"] is not None


@pytest.mark.parametrize("how", ["not JSON", "nested too deeply"])
def test_check_names_a_run_json_nested_too_deeply_as_unreadable(tmp_path, how):
    run_dir = tmp_path / "run"
    _damaged_run_json(run_dir, how)
    result = runner.invoke(app, ["check", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert f"{run_dir / RUN_JSON}: unreadable run.json" in result.stderr
    assert "failed unexpectedly" not in result.stderr


# -- alerts.jsonl: a line that is not UTF-8 is one bad line ---------------------------------------------


def _alert(rule: str, status: str = "firing", attempt: int = 1) -> Alert:
    return Alert(rule=rule, severity=Severity.critical, step=5, message="m", hint="h", status=status, attempt=attempt)


def test_alert_lines_that_are_not_utf8_or_torn_inside_a_character_are_skipped(tmp_path):
    sink = JsonlAlertSink(tmp_path / ALERTS_JSONL)
    sink.emit(_alert("loss.spike"))
    sink.close()
    torn = _alert("loss.nonfinite").model_copy(update={"message": "über"}).model_dump_json().encode()
    cut = torn.index("ü".encode()) + 1  # inside the two bytes of ü
    with open(tmp_path / ALERTS_JSONL, "ab") as f:
        f.write(b"\xff\xfe\n")  # not UTF-8
        f.write(_alert("lr.zero").model_dump_json().encode() + b"\n")
        f.write(torn[:cut])  # a writer that died mid-character, its line never ended
    # The next writer ends the torn line first: its own alert is not swallowed by it.
    sink = JsonlAlertSink(tmp_path / ALERTS_JSONL)
    sink.emit(_alert("loss.divergence"))
    sink.close()
    assert [a.rule for a in read_alerts(tmp_path)] == ["loss.spike", "lr.zero", "loss.divergence"]


def test_a_resume_into_a_run_whose_alerts_jsonl_holds_bytes_that_are_not_utf8(finished, tmp_path):
    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    sink = JsonlAlertSink(run_dir / ALERTS_JSONL)
    sink.emit(_alert("loss.nonfinite"))  # left firing by attempt 1
    sink.close()
    with open(run_dir / ALERTS_JSONL, "ab") as f:
        f.write(b"\xff\xfe\n" + _alert("lr.zero").model_dump_json().encode()[:-3] + "ü".encode()[:1])
    before = read_alerts(run_dir)
    assert before[-1].rule == "loss.nonfinite"  # the damaged lines skipped, nothing else
    mon = _train(run_dir, steps=3)
    assert mon.internal_errors == 0
    attempts = json.loads((run_dir / RUN_JSON).read_text())["attempts"]
    assert [(a["id"], a["kind"]) for a in attempts] == [(1, "fresh"), (2, "restarted")]
    assert all(a["ended"] is not None for a in attempts)  # no attempt left registered and never ended
    # Attempt 2 took the firing alert over (restarted: nothing to carry it, so it resolved it); the
    # resolution is read back although the line before it was torn.
    after = read_alerts(run_dir)
    assert after[:len(before)] == before
    got = [(a.rule, a.status, a.attempt) for a in after if a.rule == "loss.nonfinite"]
    assert got == [("loss.nonfinite", "firing", 1), ("loss.nonfinite", "resolved", 2)]


# -- config files: not UTF-8, or a syntax error beside a secret ----------------------------------------


def test_a_config_file_that_is_not_utf8_is_a_config_error_naming_the_file_and_line(tmp_path, finished):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"metrics:\n  port: \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"config file {cfg} is not UTF-8 text: .* at line 2, byte 9 "):
        load_config(cfg, environ={})
    for args in (["config", "-c", str(cfg)], ["rules", "-c", str(cfg)], ["check", str(finished), "-c", str(cfg)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"error: config file {cfg} is not UTF-8 text" in result.stderr


SECRET = "SECRETTOKEN123"


@pytest.mark.parametrize("name, text, where", [
    ("mapping.yaml", f"sinks:\n  webhook:\n    url: https://h.co/services/{SECRET}: x\n",
     "YAML syntax error at line 3, column 46: mapping values are not allowed here"),
    ("alias.yaml", f"sinks:\n  webhook:\n    url: *{SECRET}\n", "YAML syntax error at line 3, column 10: found undefined alias"),
    ("tag.yaml", f"sinks:\n  webhook:\n    url: !{SECRET} x\n", "line 3, column 10: could not determine a constructor"),
    ("quote.yaml", f'sinks:\n  webhook:\n    url: "https://h.co/{SECRET}\n',
     "while scanning a quoted scalar at line 3, column 10"),
    ("control.yaml", f"url: https://h.co/\x01{SECRET}\n", "YAML: unacceptable character #x0001"),
    ("string.toml", f'[sinks.webhook]\nurl = "https://h.co/{SECRET}\n', "TOML syntax error: "),
    ("key.toml", f'[sinks.webhook]\nheaders = {{ {SECRET} = "a", {SECRET} = "b" }}\n',
     "TOML syntax error: Duplicate inline table key '...' (at line 2"),
    ("comma.json", f'{{"sinks": {{"webhook": {{"url": "https://h.co/{SECRET}",}}}}}}',
     "JSON syntax error at line 1, column "),
])
def test_a_syntax_error_names_the_file_and_position_never_the_content(tmp_path, name, text, where, caplog):
    cfg = tmp_path / name
    cfg.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, environ={})
    message = str(e.value)
    assert message.startswith(f"config file {cfg} could not be parsed: ") and where in message, message
    assert SECRET not in message
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no chained parser error to print it
    # The CLI's stderr, and attach (where a bad config fails the run's start), say no more than that.
    result = runner.invoke(app, ["config", "-c", str(cfg)])
    assert result.exit_code == 2 and SECRET not in result.output
    model = TinyLM()
    with pytest.raises(ConfigError) as e:
        monitor.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run", config=cfg)
    assert SECRET not in str(e.value) and SECRET not in caplog.text


# -- a closed run whose records are all gone --------------------------------------------------------------


def _only_run_json(finished: Path, dest: Path, *, empty_event_file: bool = False, live: bool = False) -> Path:
    dest.mkdir()
    info = json.loads((finished / RUN_JSON).read_text())
    if live:  # as a run that has not closed yet (and not written a record yet) leaves it
        for key in ("ended", "steps", "records_published"):
            info.pop(key, None)
        info["attempts"][-1].update(ended=None, steps=None, heartbeat=time.time())
    (dest / RUN_JSON).write_text(json.dumps(info))
    if empty_event_file:
        for f in finished.glob("events.out.tfevents.*"):
            (dest / f.name).touch()
    return dest


@pytest.mark.parametrize("empty_event_file", [False, True])
def test_a_closed_run_whose_published_records_are_all_gone_is_damaged(finished, tmp_path, empty_event_file):
    run_dir = _only_run_json(finished, tmp_path / "run", empty_event_file=empty_event_file)
    data = read_run(run_dir)
    assert data.problems == [f"{run_dir / RUN_JSON} records 8 published step record(s) (rank 0's) and none could be "
                             "read: the event files are missing or empty"]
    result = runner.invoke(app, ["check", str(run_dir)])
    assert result.exit_code == 3, result.output
    assert "records 8 published step record(s)" in result.stderr and "0 step records" in result.stdout
    assert "1 reading problem(s)" in result.stdout


def test_a_run_that_has_not_written_yet_or_keeps_no_event_files_is_not_damaged(finished, tmp_path):
    live = _only_run_json(finished, tmp_path / "live", live=True)  # its process: this one, alive
    assert read_run(live).problems == []
    result = runner.invoke(app, ["check", str(live)])
    assert result.exit_code == 0 and "still running" in result.stderr and "warning:" not in result.stderr
    # tensorboard.enabled: false publishes records to the rules and /metrics only: no event file to miss.
    off = tmp_path / "off"
    _train(off, steps=3, tensorboard={"enabled": False})
    assert json.loads((off / RUN_JSON).read_text())["records_published"] == 3
    assert read_run(off).problems == []
    assert runner.invoke(app, ["check", str(off)]).exit_code == 0
    # The intact run: its records read, nothing reported.
    data = read_run(finished)
    assert data.problems == [] and len(data.records[0]) == 8


def test_monitor_watch_reports_a_closed_run_whose_records_are_gone_once(finished, tmp_path):
    from monitor.config import MonitorConfig
    from monitor.watch.daemon import Watcher

    (tmp_path / "runs").mkdir()
    run_dir = _only_run_json(finished, tmp_path / "runs" / "run")
    events: list[str] = []
    watcher = Watcher([tmp_path / "runs"], MonitorConfig(), on_event=events.append)
    watcher.scan()
    watcher.poll()
    watcher.poll()
    said = [e for e in events if "none could be read" in e]
    assert len(said) == 1 and said[0].startswith("warning:") and str(run_dir / RUN_JSON) in said[0], events


@pytest.mark.parametrize("config, key", [({"metrics": {"port": True}}, "metrics.port"),
                                         ({"collector": {"param_norms_every": False}}, "collector.param_norms_every"),
                                         ({"rules": {"loss.spike": {"window": True}}}, "rules.loss.spike.window")])
def test_true_or_false_where_a_number_is_wanted_is_named(config, key):
    """pydantic would take True as 1 (a port, a window of one step): a mistake, named."""
    with pytest.raises(ConfigError, match=rf"{key}: .*must be a number, not true/false"):
        load_config(config, environ={})
    assert load_config({"console": {"enabled": True}, "metrics": {"port": 9741}}, environ={}).metrics.port == 9741


def test_a_run_dir_with_a_nul_byte_is_named(tmp_path):
    model = TinyLM()
    with pytest.raises(ValueError, match="`run_dir` holds a NUL byte"):
        monitor.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=str(tmp_path / "a\0b"))


# -- lone surrogates: JSON's "\ud800" escape decodes to a str no UTF-8 writer takes ----------------------

LONE = '"x\\ud800y\\udc00"'  # JSON text: a lone high and a lone low surrogate


def test_a_lone_surrogate_in_run_json_is_replaced_where_it_is_read(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    info = json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8"))
    text = json.dumps({**info, "run_id": "PLACEHOLDER"}).replace('"PLACEHOLDER"', LONE)
    (run_dir / RUN_JSON).write_text(text, encoding="utf-8")
    data = read_run(run_dir)
    assert data.info.run_id == "x\ufffdy\ufffd" and len(data.records[0]) == 8
    # What is written from it again works: an alert naming the run, the report, the JSON output.
    sink = JsonlAlertSink(tmp_path / ALERTS_JSONL)
    sink.emit(Alert(rule="loss.spike", severity=Severity.warning, step=3, run=data.info.run_id, message="m", hint="h"))
    sink.close()
    assert read_alerts(tmp_path)[0].run == "x\ufffdy\ufffd"
    result = runner.invoke(app, ["check", str(run_dir), "--json", "--report", str(tmp_path / "r.html")])
    assert result.exit_code in (0, 1), result.output  # (1: findings)
    assert isinstance(json.loads(result.stdout), list)
    assert "x\ufffdy\ufffd" in (tmp_path / "r.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("name, text", [("c.json", '{"run_name": ' + LONE + "}"), ("c.yaml", "run_name: " + LONE)])
def test_a_lone_surrogate_in_a_config_file_is_replaced(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert load_config(path, environ={}).run_name == "x\ufffdy\ufffd"


@pytest.mark.parametrize("kind, make", [("a directory", lambda p: p.mkdir()),
                                        ("a FIFO (named pipe)", lambda p: os.mkfifo(p))])
def test_a_config_path_that_is_not_a_file_is_named_and_never_read(tmp_path, kind, make):
    """A FIFO would block the read for ever; both said to be "not found" although they exist."""
    path = tmp_path / "c.yaml"
    make(path)
    with pytest.raises(ConfigError, match=rf"config file .*c.yaml is {re.escape(kind)}, not a file"):
        load_config(path, environ={})
    result = runner.invoke(app, ["check", str(tmp_path), "-c", str(path)])
    assert result.exit_code == 2 and kind in result.output


@pytest.mark.parametrize("kind, make", [("a directory", lambda p: p.mkdir()),
                                        ("a FIFO (named pipe)", lambda p: os.mkfifo(p))])
def test_a_run_json_that_is_not_a_file_is_named_for_what_it_is(tmp_path, kind, make):
    """It was "no run.json" although one is there; a FIFO is never opened (a read would block)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    make(run_dir / RUN_JSON)
    result = runner.invoke(app, ["check", str(run_dir)])
    assert result.exit_code == 2 and f"run.json is {kind}, not a file" in result.output


def test_a_name_with_control_characters_cannot_forge_a_console_line():
    """A layer or run name read from a file, quoted in an alert: a line break in it made a second line that
    looked like another alert, a colour code recoloured the terminal."""
    alert = Alert(rule="attention.collapse", severity=Severity.warning, step=3, hint="h", run="r\n[trainmon] x",
                  message='layer "a\n[trainmon] CRITICAL loss.nan at step 3: fake\x1b[31m" collapsed.')
    line = alert.line()
    assert "\n" not in line and "\x1b" not in line and "\\n[trainmon] CRITICAL" in line and "\\x1b[31m" in line
    from monitor.schema import printable

    assert printable(alert.run) == "r\\n[trainmon] x" and printable("ok ü") == "ok ü"
