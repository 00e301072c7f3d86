"""Run directory: event encoding round trip, damaged files, concurrent ranks updating shared files."""

from __future__ import annotations

import json
import math
import multiprocessing as mp

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monitor.runlog.events import EventWriter
from monitor.runlog.reader import read_alerts, read_run
from monitor.runlog.rundir import JsonlAlertSink, RunDir
from monitor.schema import Alert, Endpoint, RunInfo, Severity, StepRecord


def _records(n, rank=0):
    return [
        StepRecord(step=s, rank=rank, loss=2.0 - s / 100, lr=[1e-3, 5e-4], grad_norm=0.5, grad_norm_clipped=0.5,
                   clip_coef=1.0, max_norm=1.0, loss_scale=1024.0, skipped=s == 3, step_time=0.25, tokens=512,
                   micro_batches=2, scheduler_steps=1, param_norms={"w": 0.25, "b": 0.125},
                   attention={"blocks.0.attn": {"entropy_ratio": 0.5, "max_logit": 12.0}}, scalars={"acc": 0.75})
        for s in range(n)
    ]


def test_records_round_trip_through_event_files(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    w = EventWriter(rd.events_dir, 0, param_norms_every=2)
    src = _records(6)
    for r in src:
        w.write(r)
    w.close()
    got = read_run(tmp_path / "run").records[0]
    assert len(got) == 6
    for a, b in zip(src, got):
        assert b.step == a.step and b.skipped == a.skipped and b.lr == a.lr
        assert b.loss == a.loss and b.grad_norm == a.grad_norm  # exact: the step vector is float64
        assert b.tokens == 512 and b.micro_batches == 2 and b.attention == a.attention and b.scalars == a.scalars
    assert [r.param_norms is not None for r in got] == [True, False] * 3
    # and TensorBoard's own reader sees the same series
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("trainmon/lr/group1")] == list(range(6))
    assert "trainmon/attention/entropy_ratio/blocks.0.attn" in acc.Tags()["scalars"]


def test_truncated_and_corrupt_event_files_are_read_up_to_the_damage(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    w = EventWriter(rd.events_dir, 0)
    for r in _records(5):
        w.write(r)
    w.close()
    data = w.path.read_bytes()
    w.path.write_bytes(data[:-7])  # a writer killed mid-record
    run = read_run(tmp_path / "run")
    assert [r.step for r in run.records[0]] == [0, 1, 2, 3] and run.problems == []
    corrupt = bytearray(data)
    corrupt[-40] ^= 0xFF  # flip a byte inside the last record
    w.path.write_bytes(bytes(corrupt))
    run = read_run(tmp_path / "run")
    assert [r.step for r in run.records[0]] == [0, 1, 2, 3]
    assert "checksum" in run.problems[0]


def _register(path, rank):
    rd = RunDir(path, rank)
    rd.add_endpoint(Endpoint(rank=rank, host="127.0.0.1", port=9000 + rank, url=f"http://x:{9000 + rank}"), "run")
    if rank == 0:
        rd.write_run_info(RunInfo(run_id="run", world_size=4))


def test_ranks_register_endpoints_concurrently(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_register, args=(tmp_path / "run", r)) for r in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    targets = json.loads((tmp_path / "run" / "targets.json").read_text())
    assert [t["targets"] for t in targets] == [[f"127.0.0.1:{9000 + r}"] for r in range(4)]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["world_size"] == 4 and [e["rank"] for e in info["endpoints"]] == [0, 1, 2, 3]
    assert (tmp_path / "run" / "rank3").is_dir()


def test_alerts_jsonl_append_and_read_back(tmp_path):
    sink = JsonlAlertSink(tmp_path / "alerts.jsonl")
    a = Alert(rule="loss.nonfinite", severity=Severity.critical, step=3, message="m", hint="h",
              evidence={"loss": math.inf})
    sink.emit(a)
    sink.emit(a.model_copy(update={"status": "resolved"}))
    sink.close()
    with open(tmp_path / "alerts.jsonl", "a") as f:
        f.write('{"rule": "torn')  # a crashed writer's partial last line
    got = read_alerts(tmp_path)
    assert [x.status for x in got] == ["firing", "resolved"] and got[0].evidence["loss"] == "Infinity"


def test_param_norm_vectors_round_trip_exactly(tmp_path):
    """Every step's per-parameter norms are stored as one vector, so `monitor check` sees what the process saw."""
    names = ["w", "b", "frozen"]
    rd = RunDir(tmp_path / "run")
    rd.write_run_info(RunInfo(run_id="run", model={"param_names": names}))
    w = EventWriter(rd.events_dir, 0, param_norms_every=0, param_names=names)
    src = _records(4)
    src[2].param_norms = {"w": 0.1 + 1e-9, "b": 0.0}  # a zero gradient stays zero; "frozen" had none
    for r in src:
        w.write(r)
    w.close()
    got = read_run(tmp_path / "run").records[0]
    assert got[2].param_norms == {"w": float(__import__("numpy").float32(0.1 + 1e-9)), "b": 0.0}
    assert got[0].param_norms == {"w": 0.25, "b": 0.125}
