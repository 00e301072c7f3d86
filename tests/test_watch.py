"""The `monitor watch` daemon: tailing live runs, the same verdicts as the process, restarts, damage, stalls."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import sample, scrape

from monitor.config import MonitorConfig, load_config
from monitor.trainer import TrainConfig, train
from monitor.watch.daemon import Watcher

QUIET = {"metrics": {"enabled": False}, "console": {"enabled": False}}


class ListSink:
    def __init__(self) -> None:
        self.alerts = []

    def emit(self, alert) -> None:
        self.alerts.append(alert)

    def firing(self, run_id: str | None = None):
        return [(a.rule, a.severity.value, a.step) for a in self.alerts
                if a.status == "firing" and (run_id is None or a.run == run_id)]


def _wait(cond, timeout: float = 60.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


@pytest.mark.slow
def test_daemon_tails_a_live_run_and_raises_what_the_process_raised(tmp_path):
    sink = ListSink()
    watcher = Watcher([tmp_path], load_config(None, environ={}), state_dir=tmp_path / "state", sinks=[sink])
    stop = threading.Event()
    loop = threading.Thread(target=watcher.run, args=(stop,), kwargs={"poll_every": 0.1, "discover_every": 0.2})
    loop.start()
    try:
        cfg = TrainConfig.from_preset("tiny", max_steps=150, faults=["no-warmup", "attention-sharpen:60", "nan-at:120"])
        # The probe samples every 10 steps whatever this machine's load (see detection.QUIET).
        res = train(cfg, run_dir=tmp_path / "live", progress=False,
                    monitor_config={**QUIET, "tensorboard": {"flush_secs": 0.2}, "attention": {"max_every": 10}})
        assert _wait(lambda: any(r.view.step == 149 for r in watcher.runs.values()))
        # a few more passes over the finished run: it must not turn into a stalled one
        passes = lambda: watcher.registry.get_sample_value("trainmon_watch_poll_seconds_count")  # noqa: E731
        seen = passes()
        assert _wait(lambda: passes() >= seen + 5)
    finally:
        stop.set()
        loop.join()
    in_process = sorted((a.rule, a.severity.value, a.step) for a in res.alerts)
    assert sorted(sink.firing("live")) == in_process
    assert {"warmup.missing", "loss.nonfinite", "attention.logit_growth"} <= {r for r, _, _ in in_process}
    run = next(iter(watcher.runs.values()))
    assert run.finished and run.live
    assert not any(a.rule == "run.stalled" for a in sink.alerts)


def _finished_run(root: Path, name: str, faults: list[str], steps: int = 40) -> None:
    train(TrainConfig.from_preset("tiny", max_steps=steps, faults=faults), run_dir=root / name, monitor_config=QUIET,
          progress=False)


def _start_watch(root: Path, state: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "monitor.cli.app", "watch", str(root), "--plain", "--metrics-port", "0",
         "--state-dir", str(state), "--poll", "0.1", "--discover", "0.2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _read_until(proc: subprocess.Popen, pattern: str, lines: list[str], timeout: float = 60.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"{pattern!r} not seen; output:\n" + "\n".join(lines))


def _stop(proc: subprocess.Popen, lines: list[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    lines.extend(out.splitlines())
    assert proc.returncode == 0, "\n".join(lines)


@pytest.mark.slow
def test_watch_command_serves_metrics_and_survives_a_restart_without_resending(tmp_path):
    root, state = tmp_path / "runs", tmp_path / "state"
    _finished_run(root, "nan-run", ["nan-at:20"])
    lines: list[str] = []
    proc = _start_watch(root, state)
    try:
        url = _read_until(proc, r"metrics on (http://\S+)", lines).group(1)
        _read_until(proc, r"CRITICAL loss\.nonfinite at step 20", lines)
        m = scrape(url)
        assert sample(m, "trainmon_optimizer_steps_total", run="nan-run", rank=0) == 40
        assert sample(m, "trainmon_alert_active", run="nan-run", rank=0, rule="loss.nonfinite", severity="critical") == 1
        assert sample(m, "trainmon_watch_records_total") == 40
    finally:
        _stop(proc, lines)
    assert (state / "watch-state.json").exists()
    daemon_log = [json.loads(x) for x in (state / "alerts.jsonl").read_text().splitlines()]
    assert [a["rule"] for a in daemon_log if a["rule"] == "loss.nonfinite"] == ["loss.nonfinite"]

    # A second daemon on the same state: replays the old run with its sinks muted (rebuilding the
    # rules' windows from the records), sends nothing twice, still shows the alert as active.
    _finished_run(root, "second", ["no-warmup"], steps=20)
    lines2: list[str] = []
    proc = _start_watch(root, state)
    try:
        url = _read_until(proc, r"metrics on (http://\S+)", lines2).group(1)
        _read_until(proc, r"watching nan-run .*\(replaying what was judged before\)", lines2)
        _read_until(proc, r"WARNING warmup\.missing", lines2)  # the new run's alert does arrive
        assert _wait(lambda: sample(scrape(url), "trainmon_watch_records_total") == 60)  # both runs, whole
        m = scrape(url)
        assert sample(m, "trainmon_alert_active", run="nan-run", rank=0, rule="loss.nonfinite", severity="critical") == 1
    finally:
        _stop(proc, lines2)
    assert not any("loss.nonfinite" in line for line in lines2), "an old alert was sent again"
    daemon_log = [json.loads(x) for x in (state / "alerts.jsonl").read_text().splitlines()]
    assert [a["rule"] for a in daemon_log].count("loss.nonfinite") == 1


@pytest.mark.slow
def test_damaged_and_vanishing_inputs_are_reported_never_fatal(tmp_path):
    _finished_run(tmp_path, "good", [], steps=20)
    _finished_run(tmp_path, "corrupt", [], steps=20)
    _finished_run(tmp_path, "doomed", [], steps=20)
    events = next((tmp_path / "corrupt").glob("events.out.tfevents.*"))
    data = bytearray(events.read_bytes())
    data[len(data) // 2] ^= 0xFF
    events.write_bytes(bytes(data))
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "events.out.tfevents.1.host").symlink_to(tmp_path / "nowhere")
    (tmp_path / "empty.log").write_text("")
    lines: list[str] = []
    watcher = Watcher([tmp_path], load_config(None, environ={}), state_dir=None, on_event=lines.append)
    watcher.scan()
    watcher.poll()
    ids = {r.run_id for r in watcher.runs.values()}
    assert {"good", "corrupt", "doomed"} <= ids
    assert any("corrupt" in line and "checksum" in line for line in lines), lines
    good = next(r for r in watcher.runs.values() if r.run_id == "good")
    assert good.view.step == 19
    import shutil

    shutil.rmtree(tmp_path / "doomed")
    watcher.scan()
    watcher.poll()
    assert "doomed" not in {r.run_id for r in watcher.runs.values()}
    text = __import__("prometheus_client").generate_latest(watcher.registry).decode()
    assert 'run="doomed"' not in text and 'run="good"' in text
    assert any("doomed" in line and "gone" in line for line in lines)


def test_a_run_that_stops_is_stalled_once_and_resolved_by_its_next_step(tmp_path):
    from monitor.runlog.events import EventWriter
    from monitor.runlog.rundir import RunDir
    from monitor.schema import RunInfo, StepRecord

    now = [1_800_000_000.0]
    rd = RunDir(tmp_path / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    w = EventWriter(rd.events_dir, 0, flush_secs=0)
    sink = ListSink()
    cfg = MonitorConfig(rules={"run.stalled": {"floor_seconds": 60, "factor": 10}})
    watcher = Watcher([tmp_path], cfg, state_dir=None, sinks=[sink], clock=lambda: now[0])
    for s in range(30):  # a live run: one step every 2 s
        w.write(StepRecord(step=s, time=now[0], loss=2.0, lr=[1e-3]))
        w.flush()
        watcher.scan()
        watcher.poll()
        now[0] += 2.0
    now[0] += 55.0  # 57 s since the last step
    watcher.poll()
    stalls = lambda: [(a.rule, a.severity.value, a.step, a.status) for a in sink.alerts if a.rule == "run.stalled"]  # noqa: E731
    assert stalls() == []  # 10 x 2 s = 20 s, but never less than the 60 s floor
    now[0] += 5.0
    watcher.poll()
    watcher.poll()
    assert stalls() == [("run.stalled", "critical", 29, "firing")]
    w.write(StepRecord(step=30, time=now[0], loss=2.0, lr=[1e-3]))
    w.flush()
    watcher.poll()
    assert stalls() == [("run.stalled", "critical", 29, "firing"), ("run.stalled", "critical", 30, "resolved")]
    w.close()


def test_an_old_finished_log_is_idle_not_stalled(tmp_path):
    from monitor.runlog.events import EventWriter
    from monitor.runlog.rundir import RunDir
    from monitor.schema import RunInfo, StepRecord

    rd = RunDir(tmp_path / "old")
    rd.write_run_info(RunInfo(run_id="old"))
    w = EventWriter(rd.events_dir, 0, flush_secs=0)
    long_ago = time.time() - 86_400
    for s in range(10):
        w.write(StepRecord(step=s, time=long_ago + s, loss=2.0, lr=[1e-3]))
    w.close()
    sink = ListSink()
    watcher = Watcher([tmp_path], MonitorConfig(), state_dir=None, sinks=[sink])
    watcher.scan()
    watcher.poll()
    watcher.poll()
    assert not any(a.rule == "run.stalled" for a in sink.alerts)
    assert not next(iter(watcher.runs.values())).live


@pytest.mark.slow
@pytest.mark.parametrize("plain", [True])
def test_watch_once_reports_and_exits(tmp_path, plain):
    from typer.testing import CliRunner

    from monitor.cli.app import app

    _finished_run(tmp_path / "runs", "r", ["nan-at:10"], steps=15)
    result = CliRunner().invoke(app, ["watch", str(tmp_path / "runs"), "--once", "--metrics-port", "-1",
                                      "--state-dir", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "CRITICAL loss.nonfinite at step 10" in result.output
    bad = CliRunner().invoke(app, ["watch", str(tmp_path / "missing"), "--once"])
    assert bad.exit_code == 2 and "no such path" in bad.output


def test_live_view_shows_the_latest_attention_sample_of_rank_0():
    from monitor.schema import StepRecord
    from monitor.watch.run import RunView
    from monitor.watch.view import _attention

    def rec(step, rank=0, attention=None):
        return StepRecord(step=step, rank=rank, time=float(step), loss=1.0, lr=[1e-3], attention=attention)

    view = RunView()
    assert _attention(view) == "-"
    sample_ = {"blocks.0.attn": {"entropy_ratio": 0.8, "max_logit": 12.0},
               "blocks.1.attn": {"entropy_ratio": 0.3, "max_logit": 150.0}}
    batch = [rec(10, attention=sample_), *(rec(s) for s in range(11, 60))]  # the sample is far back
    for r in batch:
        view.update(r)
    view.attention(batch)
    assert (view.attn_entropy, view.attn_logit) == (0.3, 150.0)
    assert _attention(view) == "0.30 / 150"
    view.attention([rec(60, rank=1, attention={"x": {"entropy_ratio": 0.9, "max_logit": 1.0}})])
    assert view.attn_logit == 150.0  # rank 0's sample is the one shown


def test_live_view_names_the_latest_attempt_of_a_resumed_or_restarted_run():
    from monitor.schema import Attempt, RunInfo
    from monitor.watch.view import _attempt

    first = Attempt(id=1)
    assert _attempt(RunInfo(run_id="r")) == "" and _attempt(RunInfo(run_id="r", attempts=[first])) == ""
    resumed = Attempt(id=2, kind="resumed", start_step=20)
    assert _attempt(RunInfo(run_id="r", attempts=[first, resumed])) == "attempt 2 (resumed at 20)"
    restarted = Attempt(id=3, kind="restarted")
    assert _attempt(RunInfo(run_id="r", attempts=[first, resumed, restarted])) == "attempt 3 (restarted)"

    # the table's run column carries it (a view drawn without starting the live display)
    from types import SimpleNamespace

    from rich.console import Console

    from monitor.watch.run import RunView
    from monitor.watch.view import LiveView

    def row(info: RunInfo) -> str:
        run = SimpleNamespace(run_id="r", view=RunView(), engine=SimpleNamespace(active=list), finished=False,
                              live=True, source=SimpleNamespace(info=info))
        view = LiveView.__new__(LiveView)
        view._watcher_ref = lambda: SimpleNamespace(runs={"r": run}, alert_log=[])
        view._metrics_url, view._events = None, []
        console = Console(width=200, record=True)
        console.print(view._render())
        return next(line for line in console.export_text().splitlines() if " r " in line)

    assert "r · attempt 2 (resumed at 20)" in row(RunInfo(run_id="r", attempts=[first, resumed]))
    assert "attempt" not in row(RunInfo(run_id="r", attempts=[first]))


def test_histogram_batches_expose_exactly_what_one_by_one_observing_does():
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from monitor.exporters.prometheus import STEP_BUCKETS, observe_all

    rng = random.Random(3)
    values = [rng.choice([rng.random() * 0.3, 0.1, 0.005, 300.0, 1e9, 0.0, 5.0, 1e-9]) for _ in range(3000)]
    out = []
    for batched in (False, True):
        reg = CollectorRegistry()
        h = Histogram("h", "h", ["a"], buckets=STEP_BUCKETS, registry=reg).labels("x")
        h.observe(0.3)
        for i in range(0, len(values), 700):
            chunk = values[i:i + 700]
            if batched:
                observe_all(h, chunk)
            else:
                for v in chunk:
                    h.observe(v)
        out.append([line for line in generate_latest(reg).decode().splitlines() if "_created" not in line])
    assert out[0] == out[1] and any('le="0.1"' in line for line in out[1])


@pytest.mark.slow
def test_a_backlog_read_in_slices_gives_the_same_verdicts(tmp_path, monkeypatch):
    """The daemon reads a trainmon run's backlog a slice at a time (bounded memory, records judged
    while in cache); however small the slice, the verdicts are those of one pass and of the process."""
    import monitor.watch.daemon as daemon

    cfg = TrainConfig.from_preset("tiny", max_steps=160, faults=["no-warmup", "resume-without-scheduler:80", "nan-at:130"])
    res = train(cfg, run_dir=tmp_path / "runs" / "r", monitor_config=QUIET, progress=False)
    verdicts = {}
    for slice_ in (10**9, 7):
        monkeypatch.setattr(daemon, "POLL_SLICE", slice_)
        sink = ListSink()
        watcher = Watcher([tmp_path / "runs"], MonitorConfig(), state_dir=None, sinks=[sink])
        watcher.scan()
        assert watcher.poll() == 160 and watcher.poll() == 0
        run = next(iter(watcher.runs.values()))
        verdicts[slice_] = [(a.rule, a.severity.value, a.step, a.status) for a in sink.alerts]
        assert run.view.step == 159
    assert verdicts[7] == verdicts[10**9]
    assert sorted((r, s, st) for r, s, st, status in verdicts[7] if status == "firing") == sorted(
        (a.rule, a.severity.value, a.step) for a in res.alerts)
    assert {"warmup.missing", "loss.nonfinite"} <= {a.rule for a in res.alerts}


class RestoringSink(ListSink):
    def __init__(self):
        super().__init__()
        self.restored = []

    def restore(self, alert):
        self.restored.append((alert.rule, alert.step))


def test_a_restarted_daemon_replays_muted_restores_active_alerts_and_sends_only_what_is_new(tmp_path):
    """Daemon state is JSON (no code in it): per run how many records were judged and which alerts were
    active. A restart replays the records with the sinks muted, restores the active alerts (the stall
    too, which comes from the clock, not from a record) and delivers what arrived since."""
    from monitor.runlog.events import EventWriter
    from monitor.runlog.rundir import RunDir
    from monitor.schema import RunInfo, StepRecord

    now = [1_800_000_000.0]
    rd = RunDir(tmp_path / "runs" / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    w = EventWriter(rd.events_dir, 0, flush_secs=0)
    cfg = MonitorConfig(rules={"run.stalled": {"floor_seconds": 60, "factor": 10}})

    def watcher(sink):
        return Watcher([tmp_path / "runs"], cfg, state_dir=tmp_path / "state", sinks=[sink], clock=lambda: now[0])

    first = watcher(RestoringSink())
    for s in range(30):
        w.write(StepRecord(step=s, time=now[0], loss=math.nan if s == 20 else 2.0, lr=[1e-3]))
        w.flush()
        first.scan()
        first.poll()
        now[0] += 2.0
    now[0] += 70.0
    first.poll()
    assert {"loss.nonfinite", "run.stalled"} <= {r for r, *_ in first.sinks[0].firing()}
    first.save()
    saved = json.loads((tmp_path / "state" / "watch-state.json").read_text())
    assert saved["version"] == 3 and saved["runs"][str((tmp_path / "runs" / "run").resolve())]["judged"] == {"0": 30}
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0  # private

    for s in range(30, 33):  # the run goes on while no daemon watches; step 31 is NaN again
        w.write(StepRecord(step=s, time=now[0], loss=math.nan if s == 31 else 2.0, lr=[1e-3]))
    w.flush()
    sink = RestoringSink()
    second = watcher(sink)
    second.scan()
    second.poll()
    # Step 30 ended the stall (sent as resolved); the NaN at 31 belongs to the loss.nonfinite alert still
    # active since step 20 (restored, as are the others active then); nothing judged before is sent again.
    assert [(a.rule, a.step, a.status) for a in sink.alerts] == [("run.stalled", 32, "resolved")]
    assert ("loss.nonfinite", 20) in sink.restored and not any(r == "run.stalled" for r, _ in sink.restored)

    now[0] += 70.0
    second.poll()
    assert [(a.rule, a.step, a.status) for a in sink.alerts][-1] == ("run.stalled", 32, "firing")
    second.save()
    sink3 = RestoringSink()
    third = watcher(sink3)
    third.scan()
    third.poll()
    assert sink3.alerts == []  # the stall of step 32 is still on: restored with the rest
    assert ("run.stalled", 32) in sink3.restored and ("loss.nonfinite", 20) in sink3.restored
    w.close()


def test_an_unreadable_state_file_is_set_aside_and_old_alerts_are_not_sent_again(tmp_path, fault_row):
    import pickle

    from monitor.runlog.events import EventWriter
    from monitor.runlog.rundir import RunDir
    from monitor.schema import RunInfo, StepRecord

    rd = RunDir(tmp_path / "runs" / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    w = EventWriter(rd.events_dir, 0, flush_secs=0)
    for s in range(10):
        w.write(StepRecord(step=s, time=time.time() - 1000 + s, loss=math.nan if s == 5 else 2.0, lr=[1e-3]))
    w.flush()
    state = tmp_path / "state"
    state.mkdir()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (state / "watch-state.json").write_bytes(pickle.dumps(Payload()))  # crafted: would run code if unpickled
    events, sink = [], RestoringSink()
    watcher = Watcher([tmp_path / "runs"], MonitorConfig(), state_dir=state, sinks=[sink], on_event=events.append)
    watcher.scan()
    watcher.poll()
    assert not marker.exists()
    assert any("could not load the saved state" in e for e in events)
    assert list(state.glob("watch-state.json.unreadable-*"))
    assert sink.alerts == [] and ("loss.nonfinite", 5) in sink.restored
    for s in range(10, 60):  # new: the LR dropped to zero
        w.write(StepRecord(step=s, time=time.time(), loss=2.0, lr=[0.0]))
    w.flush()
    watcher.poll()
    assert [(a.rule, a.step) for a in sink.alerts if a.status == "firing"] == [("lr.zero", 10)]
    w.close()
    fault_row("daemon: a crafted state file (a pickle that would run code)", "nothing executed; the file set aside; "
              "the runs found taken as judged", "the saved positions (runs read again from the start, muted)")


def test_a_state_directory_others_can_write_or_own_is_refused(tmp_path, fault_row):
    from monitor.watch.state import WatchState, WatchStateError

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(WatchStateError, match="writable by its group or by everyone"):
        Watcher([tmp_path], MonitorConfig(), state_dir=shared)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "watch-state.json").write_text("{}")
    (private / "watch-state.json").chmod(0o666)
    with pytest.raises(WatchStateError, match="watch-state.json is writable"):
        WatchState(private)
    if os.getuid() == 0:  # root can hand a directory to another user and show the refusal
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 12345, 12345)
        with pytest.raises(WatchStateError, match="belongs to uid 12345"):
            WatchState(theirs)
    fault_row("daemon: a state directory or file writable by others, or another user's", "refused (monitor watch "
              "exits 2 naming it) before anything is written there", "nothing")


def test_the_cli_refuses_an_untrusted_state_directory_before_writing_there(tmp_path):
    from typer.testing import CliRunner

    from monitor.cli.app import app

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    (tmp_path / "runs").mkdir()
    result = CliRunner().invoke(app, ["watch", str(tmp_path / "runs"), "--state-dir", str(shared), "--once"])
    assert result.exit_code == 2 and "writable by its group" in result.output
    assert list(shared.iterdir()) == []


def test_a_vanished_run_s_active_alerts_are_resolved_and_forgotten(tmp_path):
    import shutil

    from monitor.runlog.events import EventWriter
    from monitor.runlog.rundir import RunDir
    from monitor.schema import RunInfo, StepRecord

    rd = RunDir(tmp_path / "runs" / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    w = EventWriter(rd.events_dir, 0, flush_secs=0)
    for s in range(5):
        w.write(StepRecord(step=s, time=time.time(), loss=math.nan if s == 4 else 2.0, lr=[1e-3]))
    w.close()
    sink = RestoringSink()
    events: list[str] = []
    watcher = Watcher([tmp_path / "runs"], MonitorConfig(), state_dir=tmp_path / "state", sinks=[sink],
                      on_event=events.append)
    watcher.scan()
    watcher.poll()
    assert ("loss.nonfinite", 4, "firing") in [(a.rule, a.step, a.status) for a in sink.alerts]
    shutil.rmtree(tmp_path / "runs" / "run")
    watcher.scan()
    resolved = [a for a in sink.alerts if a.status == "resolved"]
    assert [(a.rule, a.evidence["resolved_by"]) for a in resolved] == [
        ("loss.nonfinite", "the run is gone (its directory was removed)")]
    assert watcher.runs == {} and any("is gone" in e for e in events)


def test_saved_runs_not_seen_for_a_week_expire(tmp_path):
    from monitor.watch.state import FORGET_AFTER_SECONDS, SavedRun, WatchState

    state = WatchState(tmp_path / "state")
    state.save({"/old": SavedRun(judged={0: 3}, seen=time.time() - FORGET_AFTER_SECONDS - 1),
                "/recent": SavedRun(judged={0: 3})})
    again = WatchState(tmp_path / "state")
    assert again.load() == [] and set(again.runs) == {"/recent"}


def test_a_stop_request_is_honoured_in_the_middle_of_a_backlog(tmp_path):
    from monitor.runlog.events import EventWriter
    from monitor.runlog.rundir import RunDir
    from monitor.schema import RunInfo, StepRecord
    from monitor.watch import daemon

    rd = RunDir(tmp_path / "runs" / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    w = EventWriter(rd.events_dir, 0, flush_secs=3600)
    for s in range(3 * daemon.POLL_SLICE):
        w.write(StepRecord(step=s, time=1000.0 + s, loss=2.0, lr=[1e-3]))
    w.close()
    stop = threading.Event()
    watcher = Watcher([tmp_path / "runs"], MonitorConfig(), state_dir=None)
    seen: list[int] = []

    def on_pass() -> None:  # the first pass read one slice when the stop came
        seen.append(sum(r.judged.get(0, 0) for r in watcher.runs.values()))

    original = watcher._ingest

    def ingest(run, records, now):
        original(run, records, now)
        stop.set()  # asked to stop while the backlog is being read

    watcher._ingest = ingest
    watcher.run(stop, poll_every=0.01, discover_every=0.01, on_pass=on_pass)
    assert seen == [daemon.POLL_SLICE]


def test_a_restart_replays_from_a_saved_read_position_not_from_the_start(tmp_path, monkeypatch):
    from monitor.runlog.events import EventWriter
    from monitor.runlog.rundir import RunDir
    from monitor.schema import RunInfo, StepRecord
    from monitor.watch import daemon

    monkeypatch.setattr(daemon, "REPLAY_STEPS", 50)
    rd = RunDir(tmp_path / "runs" / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    w = EventWriter(rd.events_dir, 0, flush_secs=0)

    def write(steps, nan=()):
        for s in steps:
            w.write(StepRecord(step=s, time=1000.0 + s, loss=math.nan if s in nan else 2.0, lr=[1e-3]))
        w.flush()

    def watcher(sink):
        return Watcher([tmp_path / "runs"], MonitorConfig(), state_dir=tmp_path / "state", sinks=[sink])

    first = watcher(RestoringSink())
    first.scan()
    for start in range(0, 400, 40):  # slices as a live run would arrive; a NaN at 390 is active at the end
        write(range(start, start + 40), nan={390})
        first.poll()
    first.save()
    entry = next(iter(json.loads((tmp_path / "state" / "watch-state.json").read_text())["runs"].values()))
    # at least REPLAY_STEPS records lie after the saved position, and not many more
    assert entry["positions"] is not None and 50 <= 400 - entry["judged_at"]["0"] <= 2 * 50 + 40

    write(range(400, 410), nan={405})
    sink = RestoringSink()
    second = watcher(sink)
    second.scan()
    read = second.poll()
    assert read == 410 - entry["judged_at"]["0"]  # from the saved position, not from step 0
    assert sink.alerts == [] and ("loss.nonfinite", 390) in sink.restored  # NaN at 405: the same alert
    write(range(410, 440))
    write(range(440, 441), nan={440})
    second.poll()
    w.close()
    assert next(iter(second.runs.values())).judged == {0: 441}
    assert [(a.rule, a.step) for a in sink.alerts if a.status == "firing"] == []  # 440's NaN: still the one alert


def test_an_error_on_every_pass_is_counted_every_time_and_logged_once(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="trainmon.watch")
    watcher = Watcher([tmp_path], MonitorConfig(), state_dir=None)
    for _ in range(50):
        watcher._error("polling /a/run", RuntimeError("the same failure"))
    assert watcher.registry.get_sample_value("trainmon_watch_errors_total") == 50
    assert caplog.text.count("the same failure") == 1


def test_the_daemon_exports_run_info_with_the_version_run_json_names(tmp_path):
    """trainmon_run_info from the daemon, as the training process exports it: the version run.json
    records (attach writes its own), `unknown` for a directory an older trainmon wrote, none for a
    foreign log (no trainmon wrote it)."""
    import torch
    from prometheus_client.parser import text_string_to_metric_families

    import monitor
    from monitor.runlog.adapters.trainmon import read_run_info
    from monitor.runlog.events import EventWriter
    from monitor.runlog.rundir import RunDir
    from monitor.schema import RunInfo, StepRecord

    for run, version in (("new", "9.9.9"), ("old", None)):
        rd = RunDir(tmp_path / run)
        rd.write_run_info(RunInfo(run_id=run, world_size=2, trainmon_version=version))
        w = EventWriter(rd.events_dir, 0)
        w.write(StepRecord(step=0, loss=1.0, lr=[1e-3]))
        w.close()
    (tmp_path / "llmc").mkdir()
    (tmp_path / "llmc" / "main.log").write_text("s:0 trl:11.0 lr:0.000001 norm:15.3\ns:1 trl:10.9 lr:0.000002 norm:15.2\n"
                                                "s:2 trl:10.8 lr:0.000003 norm:14.8\n")
    watcher = Watcher([tmp_path], load_config(None, environ={}), state_dir=None, on_event=lambda line: None)
    watcher.scan()
    watcher.poll()
    text = __import__("prometheus_client").generate_latest(watcher.registry).decode()
    info = {s.labels["run"]: s.labels for f in text_string_to_metric_families(text) if f.name == "trainmon_run_info"
            for s in f.samples}
    assert info == {"new": {"run": "new", "version": "9.9.9", "world_size": "2"},
                    "old": {"run": "old", "version": "unknown", "world_size": "2"}}, info
    runs = set(re.findall(r'trainmon_loss\{[^}]*run="([^"]+)"', text))
    assert len(runs - {"new", "old"}) == 1, runs  # the foreign log was read, without run_info

    attached = tmp_path / "attached"
    model = torch.nn.Linear(2, 1)
    mon = monitor.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=attached,
                         config={"metrics": {"port": 0}, "console": {"enabled": False}})
    mon.close()
    assert read_run_info(attached).trainmon_version == monitor.__version__


@pytest.mark.parametrize("bad", [-100, 5, 10**9], ids=["negative", "inside a record", "past the end"])
def test_saved_read_positions_that_are_not_at_a_record_are_read_again_from_the_start(tmp_path, monkeypatch, bad,
                                                                                     fault_row):
    """A state file whose read offset cannot be where a record begins (damaged or crafted): the run is
    read again from the start, muted as after an unreadable state, so nothing is lost or sent twice."""
    from monitor.runlog.events import EventWriter
    from monitor.runlog.rundir import RunDir
    from monitor.schema import RunInfo, StepRecord
    from monitor.watch import daemon

    monkeypatch.setattr(daemon, "REPLAY_STEPS", 4)  # positions are saved every 4 records, not 5000
    rd = RunDir(tmp_path / "runs" / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    w = EventWriter(rd.events_dir, 0, flush_secs=0)
    first = Watcher([tmp_path / "runs"], MonitorConfig(), state_dir=tmp_path / "state", sinks=[RestoringSink()])
    for block in (range(5), range(5, 10)):  # two polls: the older of their two marks is what is saved
        for s in block:
            w.write(StepRecord(step=s, time=time.time() - 1000 + s, loss=math.nan if s == 5 else 2.0, lr=[1e-3]))
        w.flush()
        first.scan()
        first.poll()
    first.save()
    path = tmp_path / "state" / "watch-state.json"
    saved = json.loads(path.read_text())
    offsets = next(iter(saved["runs"].values()))["positions"]["ranks"]["0"]["offsets"]
    assert offsets and all(v > 0 for v in offsets.values())
    offsets.update({name: bad for name in offsets})
    path.write_text(json.dumps(saved))
    for s in range(10, 60):  # new: the LR dropped to zero
        w.write(StepRecord(step=s, time=time.time(), loss=2.0, lr=[0.0]))
    w.flush()
    events, sink = [], RestoringSink()
    second = Watcher([tmp_path / "runs"], MonitorConfig(), state_dir=tmp_path / "state", sinks=[sink],
                     on_event=events.append)
    second.scan()
    second.poll()
    assert any("saved read positions unusable" in e and "not where a record begins" in e for e in events), events
    # nothing sent twice: the NaN's alert, sent before the restart, is only resolved once the loss is back
    assert [(a.rule, a.step, a.status) for a in sink.alerts] == [("lr.zero", 10, "firing"),
                                                                 ("loss.nonfinite", 55, "resolved")]
    w.close()
    fault_row("daemon: saved read positions that are not at a record (a damaged or crafted state file: negative, "
              "inside a record, past the file's end)", "the run read again from the start, muted",
              "nothing: no alert lost or sent twice")
