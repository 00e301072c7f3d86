"""Attempts: resumes, restarts and a second writer of one run directory.

The slow tests run the reference trainer as real processes (`monitor train`, torchrun for DDP), with
a live `monitor watch` daemon (the Watcher, in a thread) following the directory, and `monitor
check` afterwards: the two must agree alert for alert.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import monitor
from monitor.cli.check import check_run
from monitor.config import MonitorConfig
from monitor.hooks.attempt import resume_point
from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.engine import RulesEngine
from monitor.rules.registry import RuleRegistry
from monitor.runlog import attempts
from monitor.runlog.reader import read_run
from monitor.schema import Alert, Attempt, RunInfo, Severity, StepRecord
from monitor.watch.daemon import Watcher
from tests.conftest import TinyLM, batches

# --- the one reading of a directory with attempts ---------------------------------------------------


def _recs(attempt: int, steps) -> list[StepRecord]:
    return [StepRecord(step=s, attempt=attempt, loss=1.0) for s in steps]


def _info(*kinds: tuple[str, int]) -> RunInfo:
    return RunInfo(run_id="r", attempts=[Attempt(id=i + 1, kind=k, start_step=s) for i, (k, s) in enumerate(kinds)])


@pytest.mark.parametrize("kinds, stream, expected", [
    # one attempt: everything counts
    ([("fresh", 0)], [(1, range(5))], [(1, range(5))]),
    # killed at 29 after a checkpoint at 20, resumed there: 20..29 of attempt 1 are superseded
    ([("fresh", 0), ("resumed", 20)], [(1, range(30)), (2, range(20, 40))], [(1, range(20)), (2, range(20, 40))]),
    # a restart from scratch keeps nothing of attempt 1
    ([("fresh", 0), ("restarted", 0)], [(1, range(30)), (2, range(10))], [(2, range(10))]),
    # resumed twice, the second time from an earlier checkpoint than the first
    ([("fresh", 0), ("resumed", 20), ("resumed", 10)], [(1, range(30)), (2, range(20, 25)), (3, range(10, 15))],
     [(1, range(10)), (3, range(10, 15))]),
    # an attempt run.json does not list (yet): inferred from its first record
    ([("fresh", 0)], [(1, range(10)), (2, range(5, 8))], [(1, range(5)), (2, range(5, 8))]),
    # a foreign log that restarted inside one attempt: a step seen again supersedes from there
    ([("fresh", 0)], [(1, [0, 1, 2, 3, 2, 3, 4])], [(1, [0, 1, 2, 3, 4])]),
])
def test_lineage_keeps_the_records_that_count(kinds, stream, expected):
    records = [r for a, steps in stream for r in _recs(a, steps)]
    got = [(r.attempt, r.step) for r in attempts.lineage(records, _info(*kinds))]
    assert got == [(a, s) for a, steps in expected for s in steps]


def test_history_is_what_a_resume_builds_on_and_nothing_for_a_restart():
    info = _info(("fresh", 0), ("resumed", 20), ("restarted", 0))
    records = _recs(1, range(30)) + _recs(2, range(20, 25)) + _recs(3, range(5))
    assert [r.step for r in attempts.history(records, info, info.attempts[1])] == list(range(20))
    assert list(attempts.history(records, info, info.attempts[2])) == []


def test_event_files_name_their_attempt_and_old_ones_are_attempt_1():
    from monitor.runlog.events import event_file_name

    assert attempts.attempt_of(event_file_name(3, 7)) == 7
    assert attempts.attempt_of("events.out.tfevents.1700000000.host.42.0.rank0") == 1
    # read attempt by attempt, whatever the clock said
    names = ["events.out.tfevents.1700000009.h.9.0.rank0.attempt1", "events.out.tfevents.1700000001.h.5.0.rank0.attempt2"]
    assert sorted(names, key=attempts.file_order) == names


# --- the step index of a resume ------------------------------------------------------------------------


def _optimizer(steps: int) -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    for _ in range(steps):
        p.grad = torch.ones(2)
        opt.step()
    return opt


def _scheduler(opt: torch.optim.Optimizer, calls: int):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for _ in range(calls):
        sched.step()
    return sched


@pytest.mark.parametrize("optimizer_steps, scheduler_calls, skipped, per_step, resume_step, expected", [
    (0, 0, [], 1, None, (0, "none")),  # a fresh run
    (7, 0, [], 1, 5, (5, "resume_step")),  # told
    (30, 30, [], 1, None, (30, "scheduler")),  # the scheduler counts loop steps
    (25, 30, [0, 1, 2, 3, 13], 1, None, (30, "scheduler")),  # GradScaler skipped 5: the optimizer lags
    (30, 120, [], 4, None, (30, "scheduler")),  # the scheduler stepped per micro-batch (4 per step)
    (25, 0, [0, 1, 2, 3, 13], 1, None, (30, "optimizer")),  # no scheduler state: the skips on record map it
    (12, 0, [], 1, None, (12, "optimizer")),  # no records to map through: the optimizer's count
])
def test_resume_point(optimizer_steps, scheduler_calls, skipped, per_step, resume_step, expected):
    opt = _optimizer(optimizer_steps)
    sched = _scheduler(opt, scheduler_calls)
    earlier = [] if expected == (12, "optimizer") else [
        StepRecord(step=s, skipped=s in skipped, scheduler_steps=per_step) for s in range(40)]
    assert resume_point(opt, sched, resume_step, earlier) == expected


# --- who may write a directory ---------------------------------------------------------------------


def test_alive_by_pid_on_this_host_and_by_heartbeat_elsewhere():
    here, now = socket.gethostname(), time.time()
    me = Attempt(id=1, host=here, pid=os.getpid(), pid_start=attempts.process_start(os.getpid()))
    assert attempts.alive(me)
    assert not attempts.alive(me.model_copy(update={"ended": now}))
    assert not attempts.alive(me.model_copy(update={"pid_start": (me.pid_start or 0) + 1}))  # a reused pid
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert not attempts.alive(Attempt(id=1, host=here, pid=done.pid))
    far = Attempt(id=1, host="elsewhere.invalid", pid=1, heartbeat=now - 10)
    assert attempts.alive(far, now=now, stale_after=120)
    assert not attempts.alive(far, now=now + 200, stale_after=120)


def _attach(run_dir: Path, **kw) -> monitor.Monitor:
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return monitor.attach(model, opt, run_dir=run_dir, config={"metrics": {"enabled": False}}, **kw)


def _write_attempt(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": "r", "attempts": [
        {"id": 1, "kind": "fresh", "started": time.time(), **fields}]}))


def test_a_live_attempt_on_another_host_refuses_a_second_writer(tmp_path):
    _write_attempt(tmp_path / "run", host="node7.invalid", pid=4242, heartbeat=time.time())
    with pytest.raises(monitor.RunDirError, match=r"pid 4242 on node7.invalid") as e:
        _attach(tmp_path / "run")
    assert isinstance(e.value, attempts.RunDirBusy)
    assert len(json.loads((tmp_path / "run" / "run.json").read_text())["attempts"]) == 1  # nothing registered


def test_a_stale_heartbeat_or_an_ended_attempt_lets_a_new_one_start(tmp_path):
    _write_attempt(tmp_path / "a", host="node7.invalid", pid=4242, heartbeat=time.time() - 3600)
    _write_attempt(tmp_path / "b", host=socket.gethostname(), pid=os.getpid(), ended=time.time())
    for name in ("a", "b"):
        with _attach(tmp_path / name) as mon:
            assert (mon.attempt.id, mon.attempt.kind) == (2, "restarted")


def test_the_same_job_is_not_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    _write_attempt(tmp_path / "run", host="node7.invalid", pid=4242, heartbeat=time.time(), job="job-1")
    with _attach(tmp_path / "run") as mon:
        assert mon.attempt.id == 2 and mon.attempt.job == "job-1"


def test_a_second_attach_in_one_process_replaces_the_first(tmp_path, caplog):
    first = _attach(tmp_path / "run")
    second = _attach(tmp_path / "run")
    try:
        assert first._closed and "already writes" in caplog.text
        info = json.loads((tmp_path / "run" / "run.json").read_text())
        assert [a["id"] for a in info["attempts"]] == [1, 2] and info["attempts"][0]["ended"]
    finally:
        second.close()


def test_resume_step_is_checked():
    with pytest.raises(ValueError, match="resume_step"):
        _attach(Path("unused"), resume_step=-1)


# --- the engine crossing attempts ------------------------------------------------------------------------


class _HighLoss(Rule):
    """Test rule.

    Symptom: the loss is above 5.
    Why: a test needs a condition it controls.
    Fix: lower it.
    """

    id = "test.high_loss"
    family = "custom"
    severity = Severity.warning
    scope = "rank"

    class Config(RuleConfig):
        resolve_after: int = 1

    def observe(self, r: StepRecord) -> Finding | None:
        if r.loss is not None and r.loss > 5:
            return Finding(message="high", hint="lower it")
        return None


def _engine(info: RunInfo, stream: dict[int, list[StepRecord]], sink: list[Alert]) -> RulesEngine:
    reg = RuleRegistry()
    reg.register(_HighLoss)
    return RulesEngine(info, {}, registry=reg, sinks=[_Sink(sink)], attempts=attempts.Recorded(info, stream))


class _Sink:
    def __init__(self, out: list[Alert]) -> None:
        self.out = out

    def emit(self, alert: Alert) -> None:
        self.out.append(alert)


def test_an_alert_active_when_an_attempt_ends_is_carried_or_resolved_deliberately():
    # Attempt 1: high loss from step 5 on, still high at 29 when it dies; attempt 2 resumes at 20.
    info = _info(("fresh", 0), ("resumed", 20))
    a1 = [StepRecord(step=s, attempt=1, loss=9.0 if s >= 5 else 1.0) for s in range(30)]
    carried = [StepRecord(step=s, attempt=2, loss=9.0) for s in range(20, 25)]
    out: list[Alert] = []
    engine = _engine(info, {0: a1 + carried}, out)
    engine.observe_many(a1 + carried)
    # the problem began before the resume step and goes on: one alert, never re-sent
    assert [(a.status, a.step, a.attempt) for a in out] == [("firing", 5, 1)]
    assert engine.active()[0] is out[0]

    # The same attempt 1, but attempt 2 resumes at 3, before the problem began: it is resolved there.
    info = _info(("fresh", 0), ("resumed", 3))
    fixed = [StepRecord(step=s, attempt=2, loss=1.0) for s in range(3, 10)]
    out = []
    engine = _engine(info, {0: a1 + fixed}, out)
    engine.observe_many(a1 + fixed)
    assert [(a.status, a.step) for a in out] == [("firing", 5), ("resolved", 3)]
    assert out[1].attempt == 2 and "attempt 2 resumed at step 3" in out[1].evidence["resolved_by"]


def test_batch_and_record_by_record_delivery_cross_attempts_alike():
    info = _info(("fresh", 0), ("resumed", 10), ("restarted", 0))
    stream = ([StepRecord(step=s, attempt=1, loss=9.0 if 8 <= s < 12 else 1.0) for s in range(15)]
              + [StepRecord(step=s, attempt=2, loss=9.0 if s == 14 else 1.0) for s in range(10, 20)]
              + [StepRecord(step=s, attempt=3, loss=9.0 if s == 2 else 1.0) for s in range(5)])
    batch: list[Alert] = []
    _engine(info, {0: stream}, batch).observe_many(stream)
    single: list[Alert] = []
    engine = _engine(info, {0: stream}, single)
    for r in stream:
        engine.observe(r)
    key = [(a.status, a.step, a.attempt) for a in batch]
    assert key == [(a.status, a.step, a.attempt) for a in single]
    assert ("firing", 14, 2) in key and ("firing", 2, 3) in key


# --- real processes: a live daemon, then monitor check ----------------------------------------------------

MONITOR_CONFIG = {"tensorboard": {"flush_secs": 0.2}, "metrics": {"enabled": False}}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(tmp: Path, *args: str, nproc: int = 1) -> list[str]:
    config = tmp / "monitor.json"
    config.write_text(json.dumps(MONITOR_CONFIG))
    cmd = [sys.executable, "-m", "monitor.cli.app", "train", "--preset", "tiny", "--no-progress",
           "--run-dir", str(tmp / "runs" / "run"), "--checkpoint-dir", str(tmp / "ckpt"), "--config", str(config), *args]
    return cmd + (["--nproc", str(nproc)] if nproc > 1 else [])


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _wait(cond, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


class _Daemon:
    """`monitor watch` over tmp/runs, in a thread, its delivered alerts kept."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.alerts: list[Alert] = []
        self.watcher = Watcher([root], MonitorConfig(), state_dir=None, sinks=[self])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.watcher.run, args=(self._stop,),
                                        kwargs={"poll_every": 0.05, "discover_every": 0.1})

    def emit(self, alert: Alert) -> None:
        self.alerts.append(alert)

    def restore(self, alert: Alert) -> None:
        self.alerts.append(alert)

    def close(self) -> None:
        pass

    def __enter__(self) -> _Daemon:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def caught_up(self, run_dir: Path) -> bool:
        """Every record of the directory judged."""
        want = {rank: len(rs) for rank, rs in read_run(run_dir).stream.items()}
        runs = list(self.watcher.runs.values())
        return bool(runs) and runs[0].judged == want


def _key(alerts: list[Alert]) -> list[tuple]:
    return sorted((a.rule, a.severity.value, a.step, a.rank, a.attempt) for a in alerts if a.status == "firing")


def _agree(daemon: _Daemon, run_dir: Path) -> list[Alert]:
    """The daemon has judged everything and `monitor check` finds the same alerts; returns them."""
    assert _wait(lambda: daemon.caught_up(run_dir)), "the daemon did not read the whole directory"
    _, offline = check_run(run_dir, MonitorConfig())
    assert _key(daemon.alerts) == _key(offline)
    return offline


def _serious(alerts: list[Alert]) -> list[str]:
    return [a.line() for a in alerts if a.severity.value in ("warning", "critical") and a.status == "firing"]


@pytest.mark.slow
def test_killed_after_a_checkpoint_then_resumed_into_the_same_directory(tmp_path):
    run_dir = tmp_path / "runs" / "run"
    with _Daemon(tmp_path / "runs") as daemon:
        # Attempt 1 checkpoints at 20 and hangs at step 30; killed once steps 0..29 are on disk.
        first = subprocess.Popen(_train(tmp_path, "--steps", "60", "--fault", "hang:30", "--set", "checkpoint_every=20"),
                                 env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def written() -> bool:
                try:
                    return max(r.step for r in read_run(run_dir).stream.get(0, [])) == 29
                except Exception:
                    return False
            assert _wait(written)
            assert (tmp_path / "ckpt" / "ckpt_0000020.pt").exists()
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        # Attempt 2: resumed from the checkpoint at step 20, to the end.
        _run(_train(tmp_path, "--steps", "60", "--resume"))
        alerts = _agree(daemon, run_dir)
    assert _serious(alerts) == []
    info = json.loads((run_dir / "run.json").read_text())
    a1, a2 = info["attempts"]
    assert (a1["kind"], a1["ended"]) == ("fresh", None)  # killed: no end was written
    assert (a2["kind"], a2["start_step"], a2["how"], a2["steps"]) == ("resumed", 20, "scheduler", 60)
    data = read_run(run_dir)
    assert [(r.attempt, r.step) for r in data.records[0]] == [(1, s) for s in range(20)] + [(2, s) for s in range(20, 60)]
    assert len(data.stream[0]) == 30 + 40  # steps 20..29 of attempt 1 were read, and superseded


@pytest.mark.slow
def test_a_restart_from_scratch_into_a_used_directory(tmp_path):
    run_dir = tmp_path / "runs" / "run"
    with _Daemon(tmp_path / "runs") as daemon:
        _run(_train(tmp_path, "--steps", "40"))
        assert _wait(lambda: daemon.caught_up(run_dir))
        _run(_train(tmp_path, "--steps", "40", "--seed", "3"))
        alerts = _agree(daemon, run_dir)
    assert _serious(alerts) == []
    kinds = [(a["kind"], a["start_step"]) for a in json.loads((run_dir / "run.json").read_text())["attempts"]]
    assert kinds == [("fresh", 0), ("restarted", 0)]
    assert {r.attempt for r in read_run(run_dir).records[0]} == {2}


@pytest.mark.slow
def test_a_resume_without_scheduler_state_is_a_warmup_restart(tmp_path):
    run_dir = tmp_path / "runs" / "run"
    with _Daemon(tmp_path / "runs") as daemon:
        _run(_train(tmp_path, "--steps", "40"))
        _run(_train(tmp_path, "--steps", "70", "--resume", "--set", "resume_scheduler=false"))
        alerts = _agree(daemon, run_dir)
    restarts = [a for a in alerts if a.rule == "warmup.restart"]
    assert [(a.step, a.attempt, a.evidence["attempt"]) for a in restarts] == [(40, 2, 2)]
    # the resumed process judged it too, from its warm start (it never saw the LR peak itself)
    in_process = [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    assert [(a["rule"], a["step"], a["attempt"]) for a in in_process if a["status"] == "firing"] == [
        ("warmup.restart", 40, 2)]


@pytest.mark.slow
def test_a_second_process_writing_the_same_directory_is_refused(tmp_path):
    run_dir = tmp_path / "runs" / "run"
    first = subprocess.Popen(_train(tmp_path, "--steps", "60", "--fault", "hang:5"), env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait(lambda: (run_dir / "run.json").exists() and "attempts" in (run_dir / "run.json").read_text())
        second = subprocess.run(_train(tmp_path, "--steps", "60"), env=_env(), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2
        assert f"pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert "is being written by another process" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    info = json.loads((run_dir / "run.json").read_text())
    assert [a["pid"] for a in info["attempts"]] == [first.pid]
    assert all(name.endswith("attempt1") for name in os.listdir(run_dir) if "tfevents" in name)


@pytest.mark.slow
def test_ddp_under_torchrun_resumes_with_two_ranks(tmp_path):
    run_dir = tmp_path / "runs" / "run"
    with _Daemon(tmp_path / "runs") as daemon:
        _run(_train(tmp_path, "--steps", "30", "--set", "checkpoint_every=15", nproc=2))
        _run(_train(tmp_path, "--steps", "50", "--resume", nproc=2))
        alerts = _agree(daemon, run_dir)
    assert _serious(alerts) == []
    attempts_ = json.loads((run_dir / "run.json").read_text())["attempts"]
    assert [(a["kind"], a["start_step"]) for a in attempts_] == [("fresh", 0), ("resumed", 30)]
    data = read_run(run_dir)
    for rank in (0, 1):
        assert [(r.attempt, r.step) for r in data.records[rank]] == [(1, s) for s in range(30)] + [
            (2, s) for s in range(30, 50)]
    assert sorted(p.name.rsplit(".", 2)[-2:][1] for p in (run_dir / "rank1").glob("*tfevents*")) == ["attempt1",
                                                                                                     "attempt2"]


@pytest.mark.slow
@pytest.mark.parametrize("restore_scheduler", [True, False])
def test_a_gradscaler_run_with_skipped_steps_resumes_at_the_loops_step(tmp_path, restore_scheduler):
    run_dir = tmp_path / "runs" / "run"
    fp16 = ["--precision", "fp16", "--set", f"scaler_init_scale={2.0 ** 22}"]  # the first steps overflow
    _run(_train(tmp_path, "--steps", "30", "--set", "checkpoint_every=15", *fp16))
    skipped = [r.step for r in read_run(run_dir).records[0] if r.skipped]
    assert skipped, "the fp16 run was meant to skip steps"
    state = torch.load(tmp_path / "ckpt" / "ckpt_0000030.pt", weights_only=True)
    assert int(next(iter(state["optimizer"]["state"].values()))["step"]) == 30 - len(skipped)  # the optimizer lags
    _run(_train(tmp_path, "--steps", "40", "--resume", *fp16, "--set", f"resume_scheduler={str(restore_scheduler).lower()}"))
    a2 = json.loads((run_dir / "run.json").read_text())["attempts"][1]
    assert (a2["start_step"], a2["how"]) == (30, "scheduler" if restore_scheduler else "optimizer")
    assert [r.step for r in read_run(run_dir).records[0]] == list(range(40))


def test_tiny_lm_helpers_exist():
    # the in-process tests above build on the suite's own tiny model and batches
    assert TinyLM and batches


def test_the_process_resolves_what_an_earlier_attempt_left_firing_and_the_rules_no_longer_find(tmp_path):
    """In the process as in the daemon: an alert attempt 1 left firing (it was killed) is resolved by a
    resume whose records no longer show the problem, with the reason; nothing is re-sent."""
    run_dir = tmp_path / "run"
    with _attach(run_dir) as first:
        assert first.attempt.id == 1
    spike = Alert(rule="loss.spike", severity="warning", step=3, rank=0, message="m", hint="h", attempt=1, run="run")
    with open(run_dir / "alerts.jsonl", "a") as f:
        f.write(spike.model_dump_json() + "\n")
    with _attach(run_dir, resume_step=5) as second:
        assert (second.attempt.id, second.attempt.kind, second.attempt.start_step) == (2, "resumed", 5)
    lines = [Alert.model_validate_json(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]
    resolved = [a for a in lines if a.status == "resolved"]
    assert [(a.rule, a.step, a.attempt) for a in resolved] == [("loss.spike", 5, 2)]
    assert resolved[0].evidence["resolved_by"] == "attempt 2 resumed at step 5"
    assert [a for a in lines if a.status == "firing" and not a.rule.startswith("preflight.")] == [spike]


def test_rank_0_refreshes_its_heartbeat_and_marks_the_end(tmp_path):
    run_dir = tmp_path / "run"
    model = TinyLM()
    mon = monitor.attach(model, torch.optim.AdamW(model.parameters()), run_dir=run_dir,
                         config={"metrics": {"enabled": False}, "attempts": {"heartbeat_seconds": 0.05,
                                                                            "stale_after_seconds": 1}})

    def attempt() -> dict:
        return json.loads((run_dir / "run.json").read_text())["attempts"][0]

    first = attempt()["heartbeat"]
    try:
        assert _wait(lambda: attempt()["heartbeat"] > first, timeout=30)
        assert attempt()["ended"] is None
    finally:
        mon.close()
    assert attempt()["ended"] and attempt()["steps"] == 0


def test_the_heartbeat_must_be_shorter_than_staleness():
    from monitor.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="stale_after_seconds"):
        load_config({"attempts": {"heartbeat_seconds": 60, "stale_after_seconds": 30}})


def _loop(run_dir: Path, steps: range, nan_at: int | None = None, **kw) -> monitor.Monitor:
    """A plain loop of TinyLM steps `steps` (a resume passes resume_step), the loss NaN at `nan_at`."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    mon = monitor.attach(model, opt, scheduler=sched, run_dir=run_dir, config={**MONITOR_CONFIG, "console": {
        "enabled": False}}, resume_step=steps.start or None, **kw)
    for step, (x, y) in zip(steps, batches(len(steps), seed=steps.start)):
        _, loss = model(x, y)
        loss.backward()
        if step == nan_at:
            mon.log(loss=float("nan"))
        opt.step()
        sched.step()
        opt.zero_grad()
    mon.close()
    return mon


def test_a_daemon_restarted_between_attempts_delivers_each_alert_once_as_check_judges(tmp_path):
    run_dir = tmp_path / "runs" / "run"
    state = tmp_path / "state"

    def daemon_pass() -> list[Alert]:
        out: list[Alert] = []
        sink = _Sink(out)
        sink.restore = lambda a: None
        sink.close = lambda: None
        w = Watcher([tmp_path / "runs"], MonitorConfig(), state_dir=state, sinks=[sink])
        w.scan()
        while w.poll():
            pass
        w.save()
        return out

    _loop(run_dir, range(0, 15), nan_at=12)  # attempt 1: a NaN loss at 12, still active at its end
    first = daemon_pass()
    _loop(run_dir, range(10, 20))  # attempt 2 resumes at 10, before the NaN: superseded
    second = daemon_pass()
    _, offline = check_run(run_dir, MonitorConfig())
    assert _key(first + second) == _key(offline)
    assert ("loss.nonfinite", "critical", 12, 0, 1) in _key(offline)
    resolved = [a for a in second if a.status == "resolved" and a.rule == "loss.nonfinite"]
    assert [(a.step, a.attempt, a.evidence["resolved_by"]) for a in resolved] == [
        (10, 2, "attempt 2 resumed at step 10")]
    assert _key(second) == []  # nothing fired twice
