"""Real torchrun with two gloo ranks: per-rank records and files, desync, stragglers (named by the step phase
that differs, through DDP's buffer broadcast and with no_sync accumulation), hangs, and silence when healthy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from monitor.cli.check import check_run
from monitor.config import load_config
from monitor.hooks.ddp import RankExchange, pack_floats
from monitor.runlog.reader import read_alerts, read_run
from monitor.schema import PHASES, StepRecord

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


@pytest.mark.slow
def test_a_monitored_ddp_run_is_bitwise_identical_and_raises_no_ddp_alert(healthy):
    run_root, plain, watched = healthy
    assert {r["hash"] for r in plain} == {r["hash"] for r in watched} and len({r["hash"] for r in plain}) == 1
    assert rules(watched[0]["alerts"] + watched[1]["alerts"], "ddp.") == []
    # global rules run once, on rank 0; rank 1 checks only its own loss and progress
    assert all(a["rank"] == 0 for a in watched[0]["alerts"]) and watched[1]["alerts"] == []


@pytest.mark.slow
def test_per_rank_files_records_and_facts(healthy):
    run_root, _, _ = healthy
    run = run_root / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and [e["rank"] for e in info["endpoints"]] == [0, 1]
    assert info["micro_batches_per_step"] == 2 and info["effective_batch_size"] == 4 * 2 * 2
    assert list(run.glob("events.out.tfevents.*rank0.attempt1")) and list((run / "rank1").glob("events.out.tfevents.*rank1.attempt1"))
    data = read_run(run)
    r0, r1 = data.records[0], data.records[1]
    assert [r.step for r in r0] == [r.step for r in r1] == list(range(40))
    # global statistics from rank 0 only; each rank its own loss and its gradient norm before the all-reduce
    assert r0[5].grad_norm is not None and r1[5].grad_norm is None and r1[5].lr == []
    assert r0[5].local_grad_norm != r1[5].local_grad_norm and r0[5].loss != r1[5].loss
    assert all(r.busy_time is not None and r.busy_time >= 0 for r in r0 + r1)
    # every phase on every rank from the second step on (the first has no previous step end to start from)
    assert r0[0].input_time is None and r0[0].compute_time is not None
    for r in r0[1:] + r1[1:]:
        assert all(getattr(r, f) is not None and getattr(r, f) >= 0 for f in PHASES.values()), r
    compared = [r.ddp for r in r0 if r.ddp]
    assert compared and all(c["reported"] == [0, 1] and c["desync"] == [] for c in compared)
    assert all(set(c["phases"]["compute"]) == {"0", "1"} for c in compared)
    assert all(set(c["phases"]["input"]) == {"0", "1"} for c in compared[1:])


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_desync_only_the_last_exchange_sees_is_judged_as_the_run_closes(tmp_path):
    # Exchanges every 10 steps; rank 1's weight changes after step 35, so only step 40's comparison sees
    # it, and no later record of rank 0 collects that one: rank 0's close does, waiting for rank 1's post.
    ranks = torchrun(tmp_path, "--steps", "41", "--with-monitor", "--fault", "desync:35")
    hits = [a for a in ranks[0]["alerts"] if a["rule"] == "ddp.desync"]
    assert [(a["step"], a["evidence"]["ranks"]) for a in hits] == [(40, [1])], rules(ranks[0]["alerts"])
    written = [json.loads(line) for line in (tmp_path / "run" / "alerts.jsonl").read_text().splitlines()]
    assert [(a["rule"], a["step"]) for a in written if a["rule"] == "ddp.desync"] == [("ddp.desync", 40)]


def test_the_exchanges_pending_at_close_are_compared_with_whoever_reported():
    store = torch.distributed.HashStore()
    zero, one = (RankExchange(store, r, 2, every=10) for r in (0, 1))
    same, other = pack_floats([1.0, 2.0]), pack_floats([1.0, 2.5])
    one.post(10, {"fp": other, "busy": 0.1, "phases": {}})
    zero.post(10, {"fp": same, "busy": 0.1, "phases": {}})
    zero.post(20, {"fp": same, "busy": 0.1, "phases": {}})  # rank 1 never posts step 20
    first = zero.collect()  # step 10 is complete; step 20 is awaited (its timeout is far off)
    assert [(o["step"], o["reported"], [d["rank"] for d in o["desync"]]) for o in first] == [(10, [0, 1], [1])]
    assert list(zero.pending) == [20]
    assert [(o["step"], o["reported"], o["desync"]) for o in zero.finish(timeout=0.05)] == [(20, [0], [])]
    one.post(30, {"fp": same, "busy": 0.1, "phases": {}})
    zero.post(30, {"fp": same, "busy": 0.1, "phases": {}})
    assert [(o["step"], o["reported"], o["desync"]) for o in zero.finish(timeout=5.0)] == [(30, [0, 1], [])]
    assert zero.pending == {} and one.finish(timeout=0.05) == []


def test_exchanges_that_complete_together_go_one_per_record_in_order():
    store = torch.distributed.HashStore()
    zero, one = (RankExchange(store, r, 2, every=10) for r in (0, 1))
    same, other = pack_floats([1.0, 2.0]), pack_floats([1.0, 2.5])
    zero.post(10, {"fp": same, "busy": 0.1, "phases": {}})
    zero.post(20, {"fp": same, "busy": 0.1, "phases": {}})
    one.post(10, {"fp": other, "busy": 0.1, "phases": {}})  # rank 1 late: both complete on the same record
    one.post(20, {"fp": same, "busy": 0.1, "phases": {}})
    records = [StepRecord(step=s, rank=0) for s in (21, 22, 23)]
    for r in records:
        zero.observe(r, None)
    carried = [(r.step, r.ddp["step"] if r.ddp else None) for r in records]
    assert carried == [(21, 10), (22, 20), (23, None)]
    assert [d["rank"] for d in records[0].ddp["desync"]] == [1] and records[1].ddp["desync"] == []
    # completed but never carried (the run ended): handed to the close with the pending ones
    zero.post(30, {"fp": same, "busy": 0.1, "phases": {}})
    zero.post(40, {"fp": same, "busy": 0.1, "phases": {}})
    one.post(30, {"fp": same, "busy": 0.1, "phases": {}})
    one.post(40, {"fp": other, "busy": 0.1, "phases": {}})
    last = StepRecord(step=41, rank=0)
    zero.observe(last, None)
    assert last.ddp["step"] == 30
    assert [(o["step"], [d["rank"] for d in o["desync"]]) for o in zero.finish(timeout=0.05)] == [(40, [1])]
    assert zero.finish(timeout=0.05) == []


def straggler(ranks: list[dict]) -> dict:
    hits = [a for a in ranks[0]["alerts"] if a["rule"] == "ddp.straggler"]
    assert hits, rules(ranks[0]["alerts"])
    assert len(hits) == 1 and rules(ranks[1]["alerts"], "ddp.") == [], rules(ranks[0]["alerts"] + ranks[1]["alerts"])
    return hits[0]


@pytest.mark.slow
def test_a_slow_rank_is_named_as_the_straggler_within_50_steps(tmp_path):
    """A model without buffers: the fast rank waits in the gradient all-reduce."""
    hit = straggler(torchrun(tmp_path, "--steps", "60", "--with-monitor", "--fault", "straggler"))
    assert hit["evidence"]["rank"] == 1 and hit["evidence"].get("detected_at", hit["step"]) <= 50
    assert hit["evidence"]["phase"] == "input" and "rank 1 is slow in its input phase" in hit["message"]


@pytest.fixture(scope="module")
def buffered_healthy(tmp_path_factory):
    """The model with a registered buffer, default broadcast_buffers, 2 micro-batches under no_sync."""
    out = tmp_path_factory.mktemp("buffered")
    return out, torchrun(out, "--steps", "40", "--with-monitor", "--buffer")


@pytest.mark.slow
def test_a_healthy_run_of_a_model_with_a_buffer_raises_no_ddp_alert(buffered_healthy):
    out, ranks = buffered_healthy
    assert rules(ranks[0]["alerts"] + ranks[1]["alerts"], "ddp.") == []
    data = read_run(out / "run")
    compared = [r.ddp for r in data.records[0] if r.ddp]
    assert compared and all(set(c["phases"]["collective_wait"]) == {"0", "1"} for c in compared)
    # `monitor check` replays the same records: no ddp alert there either
    _, replayed = check_run(out / "run", load_config(None, environ={}))
    assert [a.rule for a in replayed if a.rule.startswith("ddp.")] == []


@pytest.mark.slow
@pytest.mark.parametrize("accum, sleep", [(1, "0.15"), (3, "0.05")], ids=["one-batch", "no_sync-accumulation"])
def test_a_slow_input_rank_is_named_through_the_buffer_broadcast(tmp_path, accum, sleep):
    """DDP broadcasts the buffer at the start of every forward: the fast rank waits for the slow one inside
    its forward, so the time before the backward is the same on both ranks. The input phase (before the
    forward; with no_sync accumulation, that of every micro-batch) still names the slow rank."""
    ranks = torchrun(tmp_path, "--steps", "40", "--accum", str(accum), "--with-monitor", "--buffer",
                     "--fault", f"slowinput:{sleep}")
    hit = straggler(ranks)
    ev = hit["evidence"]
    assert ev["rank"] == 1 and ev["phase"] == "input" and ev.get("detected_at", hit["step"]) <= 60
    # every micro-batch's sleep is in the input phase (a lower bound: a sleep never ends early)
    assert ev["phase_seconds"]["input"]["1"] >= accum * float(sleep)
    assert "rank 1 is slow in its input phase" in hit["message"] and "input pipeline" in hit["hint"]
    assert set(ev["phase_seconds"]) == set(PHASES) and set(ev["busy_seconds"]) == {"0", "1"}
    data = read_run(tmp_path / "run")
    assert [r.micro_batches for r in data.records[1]] == [accum] * 40
    # `monitor check` reads the phases back from the event files and names the same rank and phase
    _, replayed = check_run(tmp_path / "run", load_config(None, environ={}))
    again = [a for a in replayed if a.rule == "ddp.straggler"]
    assert [(a.step, a.evidence["rank"], a.evidence["phase"]) for a in again] == [(hit["step"], 1, "input")]


@pytest.mark.slow
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


@pytest.mark.slow
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
    phases = {(s.labels["rank"], s.labels["phase"]) for fam in text_string_to_metric_families(
        generate_latest(watcher.registry).decode()) for s in fam.samples
        if s.name == "trainmon_step_phase_seconds" and s.labels.get("run") == "run"}
    assert phases == {(rank, phase) for rank in ("0", "1") for phase in PHASES}


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- step phases, in process ---------------------------------------------------------------------------


def test_the_phase_clock_counts_every_micro_batch_input_and_keeps_waits_out(monkeypatch):
    """Input runs from the previous step's end (then from each backward's end) to the wrapper's forward;
    compute is the inner forward; DDP's pre-forward work and the all-reduce left after the backward are
    collective wait. A fake clock: the phases are sums of known intervals."""
    import types

    from monitor.hooks import phases

    clock = [0.0]
    monkeypatch.setattr(phases, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def at(t):
        clock[0] = t

    ph = phases.StepPhases(torch.device("cpu"), ddp=True)
    ph.comm = True
    ph.step_end(0.0)  # the previous optimizer step ended at 0
    ph.forward_begin(1.0)  # micro-batch 0: 1 s of input
    at(1.5), ph.inner_begin()  # 0.5 s of DDP pre-forward work (the buffer broadcast)
    at(2.0), ph.inner_end()  # 0.5 s of compute
    ph.forward_end(2.0)
    at(3.0), ph.backward_end()  # its backward (no_sync) ends at 3
    ph.forward_begin(3.25)  # micro-batch 1: 0.25 s of input
    at(3.25), ph.inner_begin()
    at(3.5), ph.inner_end()
    ph.forward_end(3.5)
    at(3.75), ph.bucket_ready()
    at(4.0)
    last = ph.bucket_ready()
    at(4.5), ph.bucket_done(None)
    at(5.0), ph.bucket_done(last)  # the last all-reduce completes 1 s after the last bucket was ready
    ph.backward_end()
    marks = ph.step_end(5.5)
    assert phases.resolve_phases(marks) == {"input": 1.25, "compute": 0.75, "collective_wait": 1.5}
    # the next step's input starts at the step end; a step with no training forward measures nothing
    ph.forward_begin(6.0)
    assert ph.input == 0.5
    assert phases.resolve_phases(phases.StepPhases(torch.device("cpu"), ddp=False).step_end(1.0)) == {
        "input": None, "compute": None, "collective_wait": None}


def test_cuda_event_marks_are_resolved_on_the_publisher_thread():
    """On CUDA the marks are events recorded on the training thread; only resolve_phases (the publisher
    thread) waits for them. Stand-in events with CUDA's elapsed_time (milliseconds)."""
    from monitor.hooks.phases import PhaseMarks, resolve_phases

    waited = []

    class Event:
        def __init__(self, t):
            self.t = t

        def synchronize(self):
            waited.append(self.t)

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    e = [Event(t) for t in (0.0, 0.5, 1.0, 2.0, 2.5, 4.0)]
    marks = PhaseMarks(0.25, [("pre", e[0], e[1]), ("compute", e[1], e[2])], [e[2], e[3]], [e[4], e[5]], True, True)
    assert resolve_phases(marks) == {"input": 0.25, "compute": 0.5, "collective_wait": 0.5 + 2.0}
    assert waited


def test_cuda_phase_marks_reuse_their_events_once_the_publisher_has_read_them(monkeypatch):
    """A CUDA clock records timing events; once resolve_phases has read a step's, they go back to the clock
    and later marks record them again: a run creates a handful of events, not a few per step. Stand-in
    events and stream (this machine has no GPU), with CUDA's elapsed_time in milliseconds."""
    from monitor.hooks import phases

    now = [0.0]
    made = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None
            made.append(self)

        def record(self, stream=None):
            self.t = now[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    ph = phases.StepPhases(torch.device("cuda"), ddp=True)
    ph.comm = True
    ph.step_end(0.0)
    seen = []
    for step in range(20):
        t = 10.0 * step
        for micro in range(2):  # pre-forward work 0.5 s, compute 1 s per micro-batch
            now[0] = t + 3 * micro
            ph.forward_begin(now[0])
            now[0] += 0.5
            ph.inner_begin()
            now[0] += 1.0
            ph.inner_end()
            ph.forward_end(now[0])
        now[0] = t + 7.0
        ready = ph.bucket_ready()
        now[0] = t + 7.5
        ph.bucket_done(ready)  # the all-reduce completes 0.5 s after its bucket was ready
        marks = ph.step_end(t + 8.0)
        seen.append({id(e) for _, a, b in marks.pairs for e in (a, b)} | {id(e) for e in marks.ready + marks.done})
        assert phases.resolve_phases(marks) == {"input": 1.5 if step == 0 else 2.0 + 1.5, "compute": 2.0,
                                                "collective_wait": 1.0 + 0.5}
    # 6 events a step (pre start, pre end = compute start, compute end; twice), ready and done: 8, made once
    assert len(made) == 8 and all(s == seen[0] for s in seen) and len(seen[0]) == 8
    assert len(ph._free) == 8


def test_phases_of_an_accumulating_loop_are_recorded_and_read_back_identically(tmp_path, monkeypatch):
    """One process: input and compute per step (no collective wait without DDP); the end of a
    micro-batch's backward is seen where another micro-batch follows; the event file gives the same values back on both decoder paths."""
    from conftest import TinyLM, batches

    import monitor
    from monitor.hooks import phases
    from monitor.runlog.events import StepDecoder, encode_step

    ends = []
    real = phases.StepPhases.backward_end
    monkeypatch.setattr(phases.StepPhases, "backward_end", lambda self: (ends.append(1), real(self)))
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "run", config={"metrics": {"port": 0},
                                                                        "console": {"enabled": False}})
    data = batches(30)
    accumulation = [3, 3, 3, 3, 4, 4, 1, 1, 2]
    for k in accumulation:
        for _ in range(k):
            x, y = next(data)
            (model(x, y)[1] / k).backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    # The backward's end is watched where the step is expected to go on: every micro-batch of the first
    # step, then those before the last step's count (a loop without accumulation watches none).
    assert len(ends) == 3 + 2 + 2 + 2 + 2 + 3 + 1 + 0 + 0
    recs = read_run(tmp_path / "run").records[0]
    assert [r.micro_batches for r in recs] == accumulation
    # A micro-batch beyond the expected count has no start for its input phase: unknown, never the backward.
    known = [r.input_time is not None for r in recs]
    assert known == [False, True, True, True, False, True, True, True, False]
    assert all(r.input_time >= 0 for r in recs if r.input_time is not None)
    assert all(r.compute_time is not None and r.compute_time > 0 and r.collective_wait_time is None for r in recs)
    rec = StepRecord(step=7, loss=1.0, lr=[1e-3], input_time=0.123456789, compute_time=1 / 3,
                     collective_wait_time=2.5e-5)
    dec = StepDecoder()
    for _ in range(2):  # the first through protobuf, the second through the learned template
        back = dec.decode(encode_step(rec))
        assert [getattr(back, f) for f in PHASES.values()] == [0.123456789, 1 / 3, 2.5e-5]


# -- ddp.straggler on exchanges ------------------------------------------------------------------------


def _straggler_alerts(exchanges: list[dict]) -> list:
    from monitor.rules.engine import RulesEngine
    from monitor.schema import RunInfo

    engine = RulesEngine(RunInfo(run_id="r", world_size=2), {})
    engine.observe_many(StepRecord(step=10 * i, loss=2.0, lr=[1e-3], ddp={"step": 10 * i, **ex})
                        for i, ex in enumerate(exchanges))
    return [a for a in engine.alerts if a.rule == "ddp.straggler" and a.status == "firing"]


def test_straggler_names_the_phase_and_prefers_compute_when_both_are_slow():
    slow_input = {"busy": {"0": 0.2, "1": 0.2}, "phases": {
        "input": {"0": 0.001, "1": 0.15}, "compute": {"0": 0.01, "1": 0.011},
        "collective_wait": {"0": 0.15, "1": 0.002}}}
    (a,) = _straggler_alerts([slow_input] * 4)
    assert (a.evidence["rank"], a.evidence["phase"], a.step) == (1, "input", 0)
    assert "input phase" in a.message and "wait 0.15 s per step in collectives" in a.message
    both = {"phases": {"input": {"0": 0.01, "1": 0.05}, "compute": {"0": 0.1, "1": 0.3}, "collective_wait": {}}}
    (b,) = _straggler_alerts([both] * 3)
    assert (b.evidence["rank"], b.evidence["phase"]) == (1, "compute") and "forward compute" in b.message
    # only in a row: a quiet exchange in between starts the count again; equal ranks raise nothing
    quiet = {"phases": {"input": {"0": 0.01, "1": 0.012}, "compute": {"0": 0.1, "1": 0.1}}}
    assert _straggler_alerts([slow_input, slow_input, quiet, slow_input, slow_input]) == []
    assert _straggler_alerts([quiet] * 10) == []


def test_straggler_reads_exchanges_that_hold_busy_time_only():
    """An exchange outcome with busy times and no phase times is judged on the busy times."""
    (a,) = _straggler_alerts([{"busy": {"0": 0.1, "1": 0.5}, "reported": [0, 1]}] * 3)
    assert (a.evidence["rank"], a.evidence["phase"]) == (1, "busy") and "busy time" in a.message
    # this monitor's exchange with the buffer broadcast equalising busy time: phases decide, not busy
    assert _straggler_alerts([{"busy": {"0": 0.1, "1": 0.5}, "phases": {}}] * 3) == []
