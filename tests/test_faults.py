"""Environment faults in the training process (issue 14): the monitor degrades, training goes on.

Every fault is real: ports bound by the test, a file size limit (RLIMIT_FSIZE) in a subprocess, a run
directory removed, a lock held by another process, SIGTERM, os.fork. Tests wait on events (a line on
a pipe, a step of the loop), never on sleeps. Each records its row of benchmarks/faults.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TinyLM, batches, sample, scrape

import monitor
from monitor.runlog import rundir as rundir_mod
from monitor.runlog.events.decode import decode_records
from monitor.runlog.reader import read_alerts
from monitor.runlog.tfrecord import read_records

TESTS = Path(__file__).resolve().parent
QUIET = {"console": {"enabled": False}}


def _train(steps: int = 10, run_dir=None, config=None, at_step=None):
    """A small loop (AdamW at a constant LR: warmup.missing fires at step 5); `at_step(step, mon)` runs
    before each step: where a test injects its fault. The parameters and the monitor (closed)."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = monitor.attach(model, opt, run_dir=run_dir, config=config) if run_dir is not None else None
    try:
        for step, (x, y) in enumerate(batches(steps, seed=3)):
            if at_step is not None:
                at_step(step, mon)
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        if mon is not None:
            mon.close()
    return model.state_dict(), mon


def _assert_bitwise(params: dict) -> None:
    plain, _ = _train()
    assert plain.keys() == params.keys()
    for k in plain:
        assert torch.equal(plain[k], params[k]), k


def _places(mon) -> set[str]:
    """Where the monitor counted errors (the places it reported once)."""
    return set(mon.guard._reported)


def _record_steps(run_dir: Path) -> list[int]:
    """The steps of rank 0's event files, read strictly: every byte in a whole record with good checksums."""
    steps = []
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        with open(path, "rb") as f:
            found = list(read_records(f))
        assert found and found[-1][0] == path.stat().st_size, f"{path}: bytes after the last whole record"
        steps += [r.step for r in decode_records(data for _, data in found)]
    return steps


def _taken_ports(n: int) -> list[socket.socket]:
    """n consecutive ports on 127.0.0.1, each bound and listening here."""
    for _ in range(50):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        held = [first]
        base = first.getsockname()[1]
        try:
            for p in range(base + 1, base + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            for s in held:
                s.close()
            continue
        for s in held:
            s.listen()
        return held
    pytest.skip("no run of free consecutive ports")


# -- the metrics endpoint ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["every port taken", "non-local bind address"])
def test_no_bindable_port_runs_without_an_endpoint(tmp_path, caplog, fault, fault_row):
    caplog.set_level(logging.WARNING, logger="trainmon")
    held: list[socket.socket] = []
    if fault == "every port taken":
        held = _taken_ports(3)
        metrics = {"port": held[0].getsockname()[1], "port_search": 3}
    else:
        metrics = {"host": "192.0.2.1", "port": 0}  # TEST-NET-1: never an address of this machine
        with socket.socket() as probe:
            try:
                probe.bind(("192.0.2.1", 0))
            except OSError:
                pass
            else:
                pytest.skip("this machine binds non-local addresses (net.ipv4.ip_nonlocal_bind)")
    try:
        params, mon = _train(run_dir=tmp_path / "r", config={**QUIET, "metrics": metrics})
    finally:
        for s in held:
            s.close()
    assert mon.metrics_url is None and mon.step == 10
    warned = [r for r in caplog.records if "no metrics endpoint" in r.getMessage()]
    assert len(warned) == 1 and "training goes on" in warned[0].getMessage()
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["endpoints"] == [] and info["steps"] == 10 and info["internal_errors"] == 0
    assert not (tmp_path / "r" / "targets.json").exists()
    assert _record_steps(tmp_path / "r") == list(range(10))
    _assert_bitwise(params)
    fault_row(f"metrics: {fault}", "completed, bitwise identical; /metrics off with one warning",
              "no endpoint in run.json or targets.json; records, alerts and run.json complete; no error counted")


# -- the run directory -------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_directory_deleted_mid_run(tmp_path, fault_row):
    run = tmp_path / "r"

    def delete(step, mon):
        if step == 4:
            # A file the publisher writes meanwhile (run.json's facts) can land in the directory being
            # removed, as it would under a user's rm -r: remove again until it is gone.
            for _ in range(100):
                shutil.rmtree(run, ignore_errors=True)
                if not run.exists():
                    break
            assert not run.exists()

    params, mon = _train(run_dir=run, config={**QUIET, "metrics": {"port": 0}}, at_step=delete)
    assert mon.step == 10 and not run.exists()  # not made again: someone removed it
    assert {"run.json", "targets.json", "event file close"} <= _places(mon), _places(mon)
    assert mon.internal_errors >= 3
    _assert_bitwise(params)
    fault_row("run directory deleted mid-run", "completed, bitwise identical",
              "everything after the removal (written to unlinked files); the end summary, target removal and "
              "event file counted as internal errors")


@pytest.mark.slow
def test_a_lock_held_by_another_process_is_given_up_after_the_timeout(tmp_path, monkeypatch, fault_row):
    run = tmp_path / "r"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\nsys.stdin.read()", str(run / ".trainmon.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(rundir_mod, "LOCK_TIMEOUT_SECONDS", 0.3)
        seen = {}

        def check(step, mon):
            if step == 0:
                seen["attach errors"] = mon.internal_errors
                seen["scraped"] = sample(scrape(mon.metrics_url), "trainmon_internal_errors_total",
                                         run=mon.run_id, rank=0)

        t0 = time.monotonic()
        params, mon = _train(run_dir=run, config={**QUIET, "metrics": {"port": 0}}, at_step=check)
        took = time.monotonic() - t0
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # attach: the attempt's registration, run.json, the endpoint; the first step's batch facts; close:
    # the end summary, the target
    assert seen["attach errors"] == 3 and seen["scraped"] == 3
    assert _places(mon) == {"attempt registration", "run.json", "targets.json", "run.json facts"}
    assert mon.internal_errors == 6 and mon.step == 10
    assert 6 * 0.3 <= took < 30, took  # each update waited its timeout, none hung
    assert mon.attempt.id == 1
    assert not (run / "run.json").exists()
    assert _record_steps(run) == list(range(10))  # the event file needs no lock
    _assert_bitwise(params)
    fault_row("run directory lock held by another process (hung NFS)",
              "completed, bitwise identical; each run.json/targets.json update gave up after "
              "LOCK_TIMEOUT_SECONDS (10 s)", "run.json and targets.json not written; each update counted; "
              "records and alerts complete")


_SCRIPT_HEAD = """
import json, os, resource, signal, sys
sys.path.insert(0, {tests!r})
import torch
from conftest import TinyLM, batches
import monitor

torch.set_num_threads(1)
run_dir = sys.argv[1]


def train(steps=12, run_dir=None, config=None, at_step=None):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = monitor.attach(model, opt, run_dir=run_dir, config=config) if run_dir else None
    try:
        for step, (x, y) in enumerate(batches(steps, seed=3)):
            if at_step is not None:
                at_step(step, mon)
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        if mon is not None:
            mon.close()
    return model.state_dict(), mon


def report(plain, watched, mon, **more):
    print(json.dumps({{"equal": all(torch.equal(plain[k], watched[k]) for k in plain), "steps": mon.step,
                      "errors": mon.internal_errors, "places": sorted(mon.guard._reported), **more}}))
"""


def _script(tmp_path: Path, body: str, *args: str, timeout: float = 120) -> dict:
    path = tmp_path / "script.py"
    path.write_text(_SCRIPT_HEAD.format(tests=str(TESTS)) + textwrap.dedent(body))
    done = subprocess.run([sys.executable, str(path), str(tmp_path / "r"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_file_size_limit_at_attach(tmp_path, fault_row):
    """No byte can be written (RLIMIT_FSIZE 0, SIGXFSZ ignored: writes fail with EFBIG, as ENOSPC)."""
    out = _script(tmp_path, """
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        plain, _ = train()
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        watched, mon = train(run_dir=run_dir, config={"metrics": {"port": 0}, "console": {"enabled": False}})
        report(plain, watched, mon, leftovers=sorted(n for n in os.listdir(run_dir) if n.startswith(".run.json")))
    """)
    assert out["equal"] and out["steps"] == 12
    assert {"attempt registration", "run.json", "event file", "targets.json", "sink JsonlAlertSink"} <= set(
        out["places"]), out
    assert out["errors"] >= 6  # and at close: the summary, the target
    assert out["leftovers"] == []  # no half-written temporary files
    fault_row("disk full at attach (EFBIG via RLIMIT_FSIZE)", "completed, bitwise identical",
              "run.json, targets.json, the event file (TensorBoard off for the run), alerts.jsonl lines: each "
              "counted; /metrics served")


@pytest.mark.slow
def test_file_size_limit_mid_run_then_room_again(tmp_path, fault_row):
    """At step 3 the limit falls 100 bytes past the event file's end (a write stops inside a record), at
    step 4 to nothing (the warmup.missing alert of step 5 finds no room), and is lifted at step 9: the
    held records land whole and in order; what failed meanwhile is counted."""
    out = _script(tmp_path, """
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        plain, _ = train()
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        sizes = {}

        def events_size():
            return sum(os.path.getsize(os.path.join(run_dir, f)) for f in os.listdir(run_dir)
                       if f.startswith("events.out"))

        def fault(step, mon):
            if step == 3:
                mon.flush()
                sizes["before"] = events_size()
                resource.setrlimit(resource.RLIMIT_FSIZE, (sizes["before"] + 100, hard))
            if step == 4:
                mon.flush()  # step 3's record went out in part
                sizes["partial"] = events_size() - sizes["before"]
                resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
            if step == 9:
                mon.flush()  # steps up to 8 published, their alerts delivered: all under the limit
                resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))

        cfg = {"metrics": {"port": 0}, "console": {"enabled": False}, "tensorboard": {"flush_secs": 0.001}}
        watched, mon = train(run_dir=run_dir, config=cfg, at_step=fault)
        report(plain, watched, mon, partial=sizes["partial"])
    """)
    assert out["equal"] and out["steps"] == 12
    assert out["partial"] == 100
    assert _record_steps(tmp_path / "r") == list(range(12))  # every record once, in order, the file whole
    assert {"tensorboard writer", "event file flush", "sink JsonlAlertSink"} <= set(out["places"]), out
    alerts = read_alerts(tmp_path / "r")
    assert alerts and not any(a.rule == "warmup.missing" for a in alerts)  # raised under the limit: lost
    fault_row("disk full mid-run, room again later (EFBIG via RLIMIT_FSIZE)", "completed, bitwise identical",
              "records held in memory (up to 16 MiB) and written whole, in order, once there was room; the "
              "alerts.jsonl line raised meanwhile lost; each failed write counted")


# -- exit paths --------------------------------------------------------------------------------------

_SIGTERM_BODY = """
marker = os.path.join(os.path.dirname(run_dir), "previous-handler-ran")
if sys.argv[2] == "handler":
    def previous(signum, frame):
        open(marker, "w").close()
        sys.exit(3)
    signal.signal(signal.SIGTERM, previous)
torch.manual_seed(0)
model = TinyLM()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
mon = monitor.attach(model, opt, run_dir=run_dir, config={"metrics": {"port": 0}, "console": {"enabled": False},
                                                           "tensorboard": {"flush_secs": 3600}})
for step, (x, y) in enumerate(batches(10**6)):
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    print(step, flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("previous", ["default", "handler"])
def test_sigterm_mid_run_flushes_then_hands_the_signal_on(tmp_path, previous, fault_row):
    path = tmp_path / "script.py"
    path.write_text(_SCRIPT_HEAD.format(tests=str(TESTS)) + _SIGTERM_BODY)
    run = tmp_path / "r"
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen([sys.executable, str(path), str(run), previous], stdout=subprocess.PIPE,
                                stderr=err_file, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # One reader keeps every line the child printed: lines read ahead into the pipe's buffer still count
    # (the loop may finish a few steps between the fifth line and the signal).
    printed: list[int] = []
    fifth = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            printed.append(int(line))
            if printed[-1] >= 5:
                fifth.set()
        fifth.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert fifth.wait(timeout=120) and printed and printed[-1] >= 5, err_path.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err_path.read_text()
    last = printed[-1]
    if previous == "default":
        assert proc.returncode == -signal.SIGTERM, err[-3000:]
    else:
        assert proc.returncode == 3 and (tmp_path / "previous-handler-ran").exists(), err[-3000:]
    steps = _record_steps(run)
    assert steps[:last + 1] == list(range(last + 1)) and len(steps) <= last + 2  # every step the loop finished
    info = json.loads((run / "run.json").read_text())
    # (a SIGTERM inside the hooks of a step may leave that step unrecorded)
    assert len(steps) <= info["steps"] <= len(steps) + 1 and info["attempts"][-1]["ended"]
    assert info["internal_errors"] == 0
    assert json.loads((run / "targets.json").read_text()) == []
    fault_row(f"SIGTERM mid-run ({'no handler before' if previous == 'default' else 'a Python handler before'})",
              "flushed, then " + ("ended by SIGTERM (-15)" if previous == "default" else "the earlier handler ran"),
              "nothing of the finished steps: their records, run.json's end summary and the attempt's end "
              "written, the target removed (a step the signal stops inside its hooks may go unrecorded)")


@pytest.mark.slow
def test_a_forked_child_that_exits_does_not_close_the_parents_monitor(tmp_path, fault_row):
    out = _script(tmp_path, """
        torch.manual_seed(0)
        model = TinyLM()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mon = monitor.attach(model, opt, run_dir=run_dir, config={"metrics": {"port": 0}, "console": {"enabled": False},
                                                                   "tensorboard": {"flush_secs": 3600}})
        try:
            for step, (x, y) in enumerate(batches(8, seed=3)):
                _, loss = model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if step == 4:
                    mon._publisher.flush()  # steps 0-4 published: their bytes wait in the event writer
                    pid = os.fork()
                    if pid == 0:  # a child that ends normally (finally blocks, atexit), SIGTERM as without us
                        sys.exit(0 if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else 1)
                    child = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        finally:
            mon.close()
        print(json.dumps({"child": child, "errors": mon.internal_errors}))
    """, timeout=120)
    assert out == {"child": 0, "errors": 0}
    assert _record_steps(tmp_path / "r") == list(range(8))  # once each: the child wrote none again
    fault_row("os.fork child exits normally", "child ended at once (SIGTERM's default action back in it); the "
              "parent's run completed",
              "nothing: the child neither stopped the parent's server nor wrote its buffered records again")


@pytest.mark.slow
def test_close_keeps_its_deadline_with_a_stuck_alert_callback(tmp_path, fault_row):
    import threading

    release = threading.Event()
    cfg = {**QUIET, "metrics": {"port": 0}, "exit": {"flush_seconds": 1.0},
           "on_alert": lambda alert: alert.rule == "warmup.missing" and release.wait(60)}
    t0 = None

    def close_time(step, mon):
        nonlocal t0
        if step == 9:
            t0 = time.monotonic()

    try:
        params, mon = _train(run_dir=tmp_path / "r", config=cfg, at_step=close_time)
        took = time.monotonic() - t0
    finally:
        release.set()
    assert took < 30, took  # not the 60 s the callback would hold it: close gave up on it at its deadline
    assert "publisher shutdown" in _places(mon)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["attempts"][-1]["ended"] and json.loads((tmp_path / "r" / "targets.json").read_text()) == []
    _assert_bitwise(params)
    fault_row("an on_alert callback stuck at close", "close() returned within exit.flush_seconds",
              "the steps queued behind it not written (one counted error); run.json's end and the target "
              "removal written")
