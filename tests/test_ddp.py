"""Real torchrun with two gloo ranks: per-rank records and files, desync, stragglers, hangs, and silence when healthy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monitor.cli.check import check_run
from monitor.config import load_config
from monitor.runlog.reader import read_alerts, read_run

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "ddp_loop.py"


def torchrun(out: Path, *args: str, timeout: float = 180.0, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER),
           str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def rules(alerts: list[dict], prefix: str = "") -> list[tuple]:
    return [(a["rule"], a["severity"], a["step"], a["rank"]) for a in alerts if a["rule"].startswith(prefix)]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    plain = torchrun(base / "plain", "--steps", "40")
    watched = torchrun(base / "watched", "--steps", "40", "--with-monitor")
    return base / "watched", plain, watched


def test_a_monitored_ddp_run_is_bitwise_identical_and_raises_no_ddp_alert(healthy):
    run_root, plain, watched = healthy
    assert {r["hash"] for r in plain} == {r["hash"] for r in watched} and len({r["hash"] for r in plain}) == 1
    assert rules(watched[0]["alerts"] + watched[1]["alerts"], "ddp.") == []
    # global rules run once, on rank 0; rank 1 checks only its own loss and progress
    assert all(a["rank"] == 0 for a in watched[0]["alerts"]) and watched[1]["alerts"] == []


def test_per_rank_files_records_and_facts(healthy):
    run_root, _, _ = healthy
    run = run_root / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and [e["rank"] for e in info["endpoints"]] == [0, 1]
    assert info["micro_batches_per_step"] == 2 and info["effective_batch_size"] == 4 * 2 * 2
    assert list(run.glob("events.out.tfevents.*rank0")) and list((run / "rank1").glob("events.out.tfevents.*rank1"))
    data = read_run(run)
    r0, r1 = data.records[0], data.records[1]
    assert [r.step for r in r0] == [r.step for r in r1] == list(range(40))
    # global statistics from rank 0 only; each rank its own loss and its gradient norm before the all-reduce
    assert r0[5].grad_norm is not None and r1[5].grad_norm is None and r1[5].lr == []
    assert r0[5].local_grad_norm != r1[5].local_grad_norm and r0[5].loss != r1[5].loss
    assert all(r.busy_time is not None and r.busy_time >= 0 for r in r0 + r1)
    compared = [r.ddp for r in r0 if r.ddp]
    assert compared and all(c["reported"] == [0, 1] and c["desync"] == [] for c in compared)


def test_a_desync_on_one_rank_is_named_within_50_steps(tmp_path):
    ranks = torchrun(tmp_path, "--steps", "80", "--with-monitor", "--fault", "desync:20")
    hits = [a for a in ranks[0]["alerts"] if a["rule"] == "ddp.desync"]
    assert hits, rules(ranks[0]["alerts"])
    a = hits[0]
    assert a["severity"] == "critical" and a["evidence"]["ranks"] == [1] and "head.weight" in a["evidence"]["params"]
    assert 20 <= a["step"] <= 20 + 50
    # `monitor check` replays rank 0's comparison from its event file
    _, replayed = check_run(tmp_path / "run", load_config(None, environ={}))
    assert ("ddp.desync", a["step"]) in {(x.rule, x.step) for x in replayed}


def test_a_slow_rank_is_named_as_the_straggler_within_50_steps(tmp_path):
    ranks = torchrun(tmp_path, "--steps", "60", "--with-monitor", "--fault", "straggler")
    hits = [a for a in ranks[0]["alerts"] if a["rule"] == "ddp.straggler"]
    assert hits, rules(ranks[0]["alerts"])
    assert hits[0]["evidence"]["rank"] == 1 and hits[0]["evidence"].get("detected_at", hits[0]["step"]) <= 50


def test_a_hang_raises_run_stalled_on_every_rank_with_a_stack_dump(tmp_path):
    cfg = json.dumps({"watchdog": {"interval_seconds": 0.5}, "rules": {"run.stalled": {"floor_seconds": 2}}})
    proc = torchrun(tmp_path, "--steps", "60", "--with-monitor", "--fault", "hang:15", "--config", cfg, wait=False)
    try:
        deadline = time.monotonic() + 120
        stalled: list = []
        while time.monotonic() < deadline and len(stalled) < 2:
            time.sleep(0.5)
            if (tmp_path / "run").exists():
                stalled = [a for a in read_alerts(tmp_path / "run") if a.rule == "run.stalled"]
        assert proc.poll() is None, "the run should still be hanging"
    finally:
        proc.send_signal(signal.SIGTERM)  # torchrun stops its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid_file in tmp_path.glob("pid*"):  # and in case a worker outlived its launcher
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    assert sorted(a.rank for a in stalled) == [0, 1]
    for a in stalled:
        assert a.severity.value == "critical" and a.step == 14
        stacks = Path(a.evidence["stacks"]).read_text()
        assert "Current thread" in stacks or "Thread" in stacks
    rank0 = next(a for a in stalled if a.rank == 0)
    assert "backward" in Path(rank0.evidence["stacks"]).read_text()  # rank 0 waits in the all-reduce


def test_per_rank_metrics_through_the_daemon(healthy):
    """The daemon reads both ranks of the DDP run and serves their series, labelled by rank."""
    from prometheus_client.parser import text_string_to_metric_families

    from monitor.config import MonitorConfig
    from monitor.watch.daemon import Watcher

    run_root, _, _ = healthy
    watcher = Watcher([run_root / "run"], MonitorConfig(), state_dir=None)
    watcher.scan()
    while watcher.poll():
        pass
    from prometheus_client import generate_latest

    samples = {(s.name, s.labels.get("rank")): s.value
               for fam in text_string_to_metric_families(generate_latest(watcher.registry).decode()) for s in fam.samples
               if s.labels.get("run") == "run"}
    for rank in ("0", "1"):
        assert samples[("trainmon_optimizer_steps_total", rank)] == 40
        assert samples[("trainmon_local_grad_norm", rank)] > 0 and ("trainmon_busy_seconds", rank) in samples
        assert ("trainmon_loss", rank) in samples
    assert ("trainmon_grad_norm", "0") in samples and ("trainmon_grad_norm", "1") not in samples


def test_only_some_ranks_monitoring_never_blocks_the_run(tmp_path):
    """Rank 1 does not attach: rank 0 neither waits for it nor compares with it beyond the exchange timeout."""
    cfg = json.dumps({"ddp": {"exchange_every": 5, "exchange_timeout": 0.05}})
    ranks = torchrun(tmp_path, "--steps", "30", "--with-monitor", "--monitor-ranks", "0", "--config", cfg)
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert rules(ranks[0]["alerts"], "ddp.") == [] and ranks[1]["alerts"] == []
    data = read_run(tmp_path / "run")
    assert list(data.records) == [0] and len(data.records[0]) == 30
    compared = [r.ddp for r in data.records[0] if r.ddp]
    assert compared and all(c["reported"] == [0] for c in compared)


def test_halt_on_stops_every_rank_at_the_same_step(tmp_path):
    """Only rank 1 sees the critical alert; both ranks raise TrainingHalted at one agreed step and
    exit (a rank halting alone would leave the other blocked in its next all-reduce)."""
    cfg = json.dumps({"halt_on": "critical", "ddp": {"halt_margin_seconds": 1.0}})
    # torchrun's own timeout (120 s) bounds the run: a rank left in an all-reduce would exceed it.
    ranks = torchrun(tmp_path, "--steps", "3000", "--with-monitor", "--fault", "nanlog:10", "--config", cfg,
                     timeout=120)
    h0, h1 = ranks[0]["halted"], ranks[1]["halted"]
    assert h0 is not None and h1 is not None, ranks
    assert h0["step"] == h1["step"] > 10  # the same step, after the alert
    assert h1["step"] < 3000
    assert "rank 1 raised" in h0["message"] and "loss.nonfinite" in h0["message"]
    assert "loss.nonfinite" in h1["message"] and "with every rank" in h1["message"]
    assert [a["rule"] for a in ranks[1]["alerts"] if a["severity"] == "critical"] == ["loss.nonfinite"]
