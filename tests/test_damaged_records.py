"""Values read from a damaged or crafted run directory: rank 0's comparison of the ranks is checked when it
is decoded (the rules read it as it is), and a finding no alert can be made of costs a counted error, not
the records after it."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from monitor.cli.app import app
from monitor.hooks.ddp import compare, pack_floats
from monitor.rules import RulesEngine
from monitor.runlog.events import wire
from monitor.runlog.events.decode import rank_comparison
from monitor.runlog.events.encode import encode_step
from monitor.runlog.events.tags import DDP_TAG, HAS_MORE, STEP_VECTOR_TAG
from monitor.runlog.tfrecord import encode_record
from monitor.schema import ModelInfo, OptimizerInfo, ParamGroupInfo, RunInfo, StepRecord

RUN = RunInfo(run_id="t", model=ModelInfo(param_names=["a", "b"]),
              optimizer=OptimizerInfo(name="AdamW", groups=[ParamGroupInfo(lr=1e-3, betas=[0.9, 0.95])]))

WRITTEN = compare(40, {0: {"fp": pack_floats([1.0, 2.0]), "busy": 0.25, "phases": {"input": 0.01, "compute": 0.2}},
                       1: {"fp": pack_floats([1.0, 2.5]), "busy": 0.5, "phases": {"input": 0.02, "compute": None}}},
                  world=2)


def test_what_the_monitor_writes_is_read_back_as_it_is():
    assert rank_comparison([json.dumps(WRITTEN).encode()]) == WRITTEN
    assert WRITTEN["desync"] == [{"rank": 1, "params": [1], "count": 1}]
    older = {"step": 10, "reported": [0, 1], "busy": {"0": 0.1, "1": 0.2}}  # before phase times were recorded
    assert rank_comparison([json.dumps(older).encode()]) == older
    assert rank_comparison([]) is None


BAD = [
    ("a list", [1, 2], "is a list"),
    ("a string", "x", "is a str"),
    ("a step that is text", {**WRITTEN, "step": "abc"}, "'step'"),
    ("a step past any float", {**WRITTEN, "step": 1e400}, "'step'"),
    ("a negative step", {**WRITTEN, "step": -3}, "'step'"),
    ("a step that is a bool", {**WRITTEN, "step": True}, "'step'"),
    ("params that are text", {**WRITTEN, "desync": [{"rank": 1, "params": "xyz", "count": 1}]}, "'desync'"),
    ("a desync entry without its rank", {**WRITTEN, "desync": [{"params": [0], "count": 1}]}, "'desync'"),
    ("phase times that are text", {**WRITTEN, "phases": {"input": {"0": "slow"}}}, "'phases'"),
    ("busy times per rank as a list", {**WRITTEN, "busy": [0.1, 0.2]}, "'busy'"),
    ("a rank key that is not a number", {**WRITTEN, "busy": {"zero": 0.1}}, "'busy'"),
    ("an infinite time", {**WRITTEN, "busy": {"0": math.inf}}, "'busy'"),
    ("reported ranks that are text", {**WRITTEN, "reported": "0,1"}, "'reported'"),
]


@pytest.mark.parametrize("name, value, named", BAD, ids=[b[0] for b in BAD])
def test_a_comparison_of_another_shape_is_named(name, value, named):
    with pytest.raises(ValueError, match=named):
        rank_comparison([json.dumps(value).encode()])


def test_a_finding_that_makes_no_alert_is_counted_and_the_records_after_it_are_judged():
    """A comparison that reached the rules unchecked (its step text): the alert cannot be made, the error
    is counted, and the NaN loss after it is still raised."""
    engine = RulesEngine(RUN, {})
    bad = {"step": "abc", "desync": [{"rank": 1, "params": [0], "count": 1}]}
    records = [StepRecord(step=i, loss=math.nan if i == 5 else 3.0, lr=[1e-3], ddp=bad if i == 3 else None)
               for i in range(8)]
    alerts = engine.observe_many(records)
    assert engine.errors == 1
    assert ("loss.nonfinite", 5) in [(a.rule, a.step) for a in alerts]


def test_monitor_check_skips_a_damaged_comparison_and_reports_it(tmp_path, fault_row):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(RUN.model_dump_json())
    events = [encode_step(StepRecord(step=i, time=1.8e9 + i, loss=math.nan if i == 15 else 3.0, lr=[1e-4]))
              for i in range(20)]
    events[10] = wire.event(1.8e9 + 10, 10, summary=wire.vector_value(
        STEP_VECTOR_TAG, [float(1 | HAS_MORE), 3.0, 1e-4], double=True) + wire.string_value(
        DDP_TAG, json.dumps({"desync": [{"rank": 1, "params": [0], "count": 1}], "step": "abc"}).encode()))
    (run / "events.out.tfevents.1.vm.1.0.rank0.attempt1").write_bytes(b"".join(map(encode_record, events)))
    done = CliRunner().invoke(app, ["check", str(run)])
    out = done.output
    assert "failed unexpectedly" not in out and done.exit_code in (1, 3), out
    assert "rank comparison (trainmon/ddp) has a 'step' of the wrong shape" in out
    assert "loss.nonfinite at step 15" in out and "19 step records" in out
    fault_row("monitor check: a step event whose rank comparison (trainmon/ddp) has another shape (crafted)",
              "the event skipped and reported; the records after it judged", "that step's values")


def test_a_negative_step_in_a_foreign_tensorboard_log_is_skipped_not_taken_as_a_restart(tmp_path, fault_row):
    from torch.utils.tensorboard import SummaryWriter

    from monitor.runlog.reader import read_run

    w = SummaryWriter(str(tmp_path / "tb"))
    for step in range(1, 21):
        w.add_scalar("train/loss", 3.0 - step / 100, step)
        w.add_scalar("train/learning_rate", 1e-4, step)
    w.add_scalar("train/loss", 9.0, -1)  # a step no trainer writes: as a restart, it would supersede them all
    w.add_scalar("train/loss", 2.0, 21)
    w.add_scalar("train/learning_rate", 1e-4, 21)
    w.close()
    data = read_run(tmp_path / "tb")
    assert [r.step for r in data.records[0]] == list(range(1, 22))
    assert any("step -1" in p and "never negative" in p for p in data.problems), data.problems
    fault_row("monitor check: a point at a negative step in a TensorBoard log",
              "the point skipped and reported; the steps before and after it read", "that point")


def test_a_negative_step_in_a_run_directory_is_skipped_and_reported(tmp_path):
    from monitor.runlog.reader import read_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(RUN.model_dump_json())
    events = [encode_step(StepRecord(step=s, time=1.8e9 + s, loss=3.0, lr=[1e-4])) for s in range(10)]
    events.insert(5, encode_step(StepRecord(step=-1, time=1.8e9 + 5, loss=3.0, lr=[1e-4])))
    (run / "events.out.tfevents.1.vm.1.0.rank0.attempt1").write_bytes(b"".join(map(encode_record, events)))
    data = read_run(run)
    assert [r.step for r in data.records[0]] == list(range(10))
    assert any("step -1: steps are never negative" in p for p in data.problems), data.problems


def test_a_step_past_what_tensorboard_can_store_is_skipped_and_the_report_still_renders(tmp_path):
    state = {"log_history": [{"step": s, "loss": 3.0, "learning_rate": 1e-4} for s in range(1, 6)]
             + [{"step": 10**33, "loss": 3.0, "learning_rate": 1e-4}]}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "trainer_state.json").write_text(json.dumps(state))
    done = CliRunner().invoke(app, ["check", str(tmp_path / "hf"), "--report", str(tmp_path / "r.html")])
    assert done.exit_code == 3 and "failed unexpectedly" not in done.output, done.output
    assert "5 step records" in done.output and "log_history[5] is not an entry with a step from 0 to" in done.output
    assert (tmp_path / "r.html").stat().st_size > 0


VECTORS = [
    ("a negative mask", [-1.0, 3.0, 1e-4], "presence mask"),
    ("a mask past every field", [1e300, 3.0, 1e-4], "presence mask"),
    ("a NaN mask", [math.nan, 3.0, 1e-4], "presence mask"),
    ("a fractional mask", [1.5, 3.0, 1e-4], "presence mask"),
    ("a bit no field has", [float(1 | 1 << 19), 3.0, 1e-4], "presence mask"),
    ("an empty vector", [], "presence mask"),
    ("fewer values than the mask announces", [float(1 | 2 | 4), 3.0], "fewer than the 4"),
]


@pytest.mark.parametrize("name, vector, named", VECTORS, ids=[v[0] for v in VECTORS])
def test_a_step_vector_that_does_not_fit_its_mask_is_named(name, vector, named):
    from monitor.runlog.events import StepDecoder

    data = wire.event(1.8e9, 3, summary=wire.vector_value(STEP_VECTOR_TAG, vector, double=True))
    with pytest.raises(ValueError, match=named):
        StepDecoder().decode(data)
    good = StepDecoder().decode(wire.event(1.8e9, 3, summary=wire.vector_value(STEP_VECTOR_TAG, [1.0, 3.0, 1e-4],
                                                                               double=True)))
    assert (good.step, good.loss, good.lr) == (3, 3.0, [1e-4])


@pytest.mark.parametrize("key, value", [("first_multiplier", "x"), ("peak_multiplier", None), ("warmup_steps", -2),
                                        ("warmup_steps", 2.5), ("source", 3)])
def test_a_schedule_in_run_json_of_the_wrong_types_is_named(tmp_path, key, value):
    """The warmup rules compute with these at the run's start: a wrong type is damaged input, named."""
    schedule = {"source": "LambdaLR", "steps_previewed": 100, "first_multiplier": 0.01, "peak_multiplier": 1.0,
                "warmup_steps": 10}
    assert RunInfo.model_validate({"run_id": "t", "schedule": schedule}).schedule == schedule
    assert RunInfo(run_id="t", schedule={**schedule, "first_multiplier": math.nan}).schedule  # a lambda's NaN
    with pytest.raises(ValueError, match=f"schedule.{key} is"):
        RunInfo.model_validate({"run_id": "t", "schedule": {**schedule, key: value}})
