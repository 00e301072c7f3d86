"""Run directory: event encoding round trip, damaged files, concurrent ranks updating shared files."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import multiprocessing as mp
from collections.abc import Mapping

import numpy
import pytest
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
    assert "trainmon_attention/entropy_ratio/blocks.0.attn" in acc.Tags()["scalars"]


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


@pytest.mark.slow
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


# -- reading step events back: the decoder and the byte framing -----------------------------------

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: E402

from monitor.runlog.events import StepDecoder, encode_step, record_values, step_vector  # noqa: E402
from monitor.runlog.events.tags import DDP_TAG, NO_GRAD, PARAM_VECTOR_TAG, STEP_VECTOR_TAG  # noqa: E402
from monitor.runlog.tfrecord import CorruptRecord, encode_record, frames, read_records  # noqa: E402

NAMES = [f"blocks.{i}.w" for i in range(5)]


def _varied(n=400):
    """Records of every shape a run writes: sampled parameter vectors, AMP fields, skipped steps,
    non-finite values, attention and scalars (extras), steps that need 1 to 4 varint bytes."""
    out = []
    for i in range(n):
        step = [i, 127 + i, 16383 + i, 2_000_000 + i][i % 4]
        out.append(StepRecord(
            step=step, time=1.7e9 + i * 0.25, loss=math.nan if i == 37 else 2.0 + math.sin(i), lr=[1e-3 * (i % 7), 5e-4],
            grad_norm=math.inf if i == 51 else 0.5 + i / 1000, grad_norm_clipped=0.5, clip_coef=1.0, max_norm=1.0,
            loss_scale=2.0 ** (i % 5) if i % 3 else None, skipped=i % 11 == 0 and i % 3 != 0,
            step_time=0.1, tokens=None if i % 13 == 0 else 4096, micro_batches=1, scheduler_steps=1,
            autocast="float16" if i % 3 else None, grad_norm_unknown=i % 23 == 0,
            param_norms={n: (i + 1) / (k + 1) for k, n in enumerate(NAMES) if not (i % 17 == 0 and k == 2)}
            if i % 2 else None,
            attention={"blocks.0.attn": {"entropy_ratio": 0.5 + i / 1e4}} if i % 29 == 0 else None,
            ddp={"step": i, "reported": [0, 1], "busy": {"0": 0.1, "1": 0.2}} if i % 37 == 0 else None,
            scalars={"acc": 0.5 + i / 1e4} if i % 31 == 0 else {}))
    return out


def _vector(tag: str, values: list[float], dtype: int, fmt: str) -> summary_pb2.Summary.Value:
    """A vector value built through the protobuf runtime."""
    return summary_pb2.Summary.Value(tag=tag, tensor=tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(values))]),
        tensor_content=_packed(values, fmt)))


def _packed(values: list[float], fmt: str) -> bytes:
    with numpy.errstate(over="ignore"):  # a double beyond float32 is an infinity, as a C cast makes it
        return numpy.asarray(values, dtype="<f8" if fmt == "d" else "<f4").tobytes()


def _runtime_step_event(r: StepRecord, *, param_norms: bool = True, param_names: list[str] | None = None) -> bytes:
    """The step event as the protobuf runtime serialises it: what encode_step's direct bytes must equal."""
    vector = bool(r.param_norms and param_names)
    values = [_vector(STEP_VECTOR_TAG, step_vector(r, more=bool(r.param_norms and param_norms and not vector)),
                      types_pb2.DT_DOUBLE, "d")]
    if vector:
        values.append(_vector(PARAM_VECTOR_TAG, [r.param_norms.get(n, NO_GRAD) for n in param_names],
                              types_pb2.DT_FLOAT, "f"))
    values += [summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in record_values(r, param_norms=param_norms)]
    if r.ddp:
        values.append(summary_pb2.Summary.Value(tag=DDP_TAG, tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
            string_val=[json.dumps(r.ddp).encode()])))
    return event_pb2.Event(wall_time=r.time, step=r.step, summary=summary_pb2.Summary(value=values)).SerializeToString()


@pytest.mark.parametrize("extreme", [None, "huge", "zeros", "empty"])
def test_step_events_are_the_bytes_the_protobuf_runtime_writes(extreme):
    """encode_step writes the protocol-buffer bytes directly (runlog/events/wire.py): byte for byte the
    runtime's serialisation of the same message, for every shape a run writes and values at the edges
    (beyond float32, zero steps and times that proto3 leaves out, no values at all)."""
    records = _varied(160)
    if extreme == "huge":
        records = [dataclasses.replace(r, loss=-1e300, grad_norm=3.4028235e38 * 1.0000001, step_time=5e-324,
                                       param_norms={n: 1e39 for n in NAMES}, scalars={"x": 1e300}) for r in records]
    elif extreme == "zeros":
        records = [dataclasses.replace(r, step=0, time=0.0, loss=-0.0, lr=[0.0]) for r in records]
    elif extreme == "empty":
        records = [StepRecord(step=i, time=-1.0 * i, lr=[]) for i in range(3)]
    for r in records:
        for every, names in ((True, NAMES), (False, NAMES), (True, None), (False, None)):
            assert encode_step(r, param_norms=every, param_names=names) == _runtime_step_event(
                r, param_norms=every, param_names=names), r


def test_the_file_header_is_the_runtimes(tmp_path):
    w = EventWriter(tmp_path, 0)
    w.close()
    first = next(read_records(open(w.path, "rb")))[1]  # noqa: SIM115
    ev = event_pb2.Event.FromString(first)
    assert ev.file_version == "brain.Event:2" and ev.wall_time > 0
    assert first == event_pb2.Event(wall_time=ev.wall_time, file_version="brain.Event:2").SerializeToString()


def _close(a, b) -> bool:
    """Equal, NaN equal to NaN, floats within float32 rounding (what scalar values store)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def _same(a: StepRecord, b: StepRecord) -> bool:
    return all(_close(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(StepRecord))


def test_decoder_reads_back_every_shape_a_run_writes():
    records = _varied(1200)
    dec = StepDecoder(0, NAMES)
    for r in records:
        got = dec.decode(encode_step(r, param_norms=r.step % 3 == 0, param_names=NAMES))
        assert _same(got, r), (got, r)
        # exact where the vectors hold the value
        assert repr(got.loss) == repr(r.loss) and got.grad_norm == r.grad_norm and got.lr == r.lr


def test_decoder_reads_events_of_other_writers_by_their_scalars():
    """Step events without the step vector (trainmon's scalars only, as another tool may rewrite
    them) are read value by value; events without trainmon tags make no record."""
    r = _varied(2)[1]
    full = event_pb2.Event.FromString(encode_step(r, param_names=NAMES))
    scalars_only = event_pb2.Event(wall_time=full.wall_time, step=full.step, summary=summary_pb2.Summary(
        value=[v for v in full.summary.value if v.HasField("simple_value")]))
    got = StepDecoder(0, NAMES).decode(scalars_only.SerializeToString())
    assert got.step == r.step and _close(got.loss, r.loss) and _close(got.lr, r.lr) and got.autocast == r.autocast
    assert _close(got.param_norms, r.param_norms)  # from the sampled per-parameter scalars
    foreign = event_pb2.Event(step=3, summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag="train/loss", simple_value=1.0)]))
    assert StepDecoder().decode(foreign.SerializeToString()) is None
    assert StepDecoder().decode(event_pb2.Event(step=1, file_version="brain.Event:2").SerializeToString()) is None


def test_param_and_attention_series_have_sections_of_their_own_and_old_tags_still_read(tmp_path):
    """New files put the per-parameter and attention chart series in TensorBoard sections of their own;
    an event file with the tags of earlier versions (under `trainmon/`) decodes to the same records."""
    from monitor.runlog.events.tags import ATTENTION_TAG, OLD_ATTENTION_TAG, OLD_PARAM_TAG, PARAM_TAG

    new_dir, old_dir = tmp_path / "new", tmp_path / "old"
    for d in (new_dir, old_dir):  # no param_names: the sampled per-parameter scalars are what is read back
        RunDir(d).write_run_info(RunInfo(run_id=d.name))
    w = EventWriter(RunDir(new_dir).events_dir, 0, param_norms_every=2)
    for r in _records(6):
        w.write(r)
    w.close()

    def old_tag(tag):  # exactly what earlier versions wrote: the same values under trainmon/...
        for new, old in ((PARAM_TAG, OLD_PARAM_TAG), (ATTENTION_TAG, OLD_ATTENTION_TAG)):
            if tag.startswith(new):
                return old + tag[len(new):]
        return tag

    old_file = RunDir(old_dir).events_dir / w.path.name
    old_file.parent.mkdir(parents=True, exist_ok=True)
    with open(old_file, "wb") as f:
        for _, data in read_records(io.BytesIO(w.path.read_bytes())):
            ev = event_pb2.Event.FromString(data)
            for v in ev.summary.value:
                v.tag = old_tag(v.tag)
            f.write(encode_record(ev.SerializeToString()))

    sections = {}
    for d in (new_dir, old_dir):
        acc = EventAccumulator(str(d))  # TensorBoard's own reader
        acc.Reload()
        sections[d.name] = {t for t in acc.Tags()["scalars"] if not t.startswith("trainmon/")}
        assert acc.Scalars("trainmon/loss")  # loss and LR stay in trainmon/
    assert sections["new"] == {"trainmon_param_grad_norm/w", "trainmon_param_grad_norm/b",
                               "trainmon_attention/entropy_ratio/blocks.0.attn",
                               "trainmon_attention/max_logit/blocks.0.attn"}
    assert sections["old"] == set()  # the old file keeps everything in trainmon/

    new, old = read_run(new_dir).records[0], read_run(old_dir).records[0]
    assert len(new) == 6 and [r.param_norms is not None for r in new] == [True, False] * 3
    assert new == old and new[0].attention == {"blocks.0.attn": {"entropy_ratio": 0.5, "max_logit": 12.0}}
    # and scalar-only events (no step vector) with either set of tags
    for tagged in (lambda t: t, old_tag):
        r = _records(1)[0]
        ev = event_pb2.Event.FromString(encode_step(r))
        scalars_only = event_pb2.Event(step=ev.step, wall_time=ev.wall_time, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tagged(v.tag), simple_value=v.simple_value)
            for v in ev.summary.value if v.HasField("simple_value")]))
        got = StepDecoder().decode(scalars_only.SerializeToString())
        assert got.attention == r.attention and got.param_norms == r.param_norms and got.scalars == r.scalars


def _framed(buf):
    """(offset after each record, its data), as read_records yields them, from `frames`."""
    at = [0, 0]
    return [(at[0], data) for data in frames(buf, at)]


def test_frames_frame_like_read_records():
    datas = [encode_step(r, param_names=NAMES) for r in _varied(20)]
    buf = b"".join(encode_record(d) for d in datas)
    assert _framed(buf) == list(read_records(io.BytesIO(buf)))
    # A record still being written is left for later; what came before is returned.
    cut = buf[:-7]
    assert [d for _, d in _framed(cut)] == datas[:-1]
    assert [d for _, d in _framed(buf[:len(buf) - len(encode_record(datas[-1])) + 5])] == datas[:-1]
    bad = bytearray(buf)
    bad[len(encode_record(datas[0])) + 20] ^= 0xFF  # inside the second record's data
    with pytest.raises(CorruptRecord):
        _framed(bytes(bad))


def test_tail_reads_across_chunk_boundaries(tmp_path, monkeypatch):
    from monitor.runlog.adapters import tbtail
    from monitor.runlog.adapters.trainmon import TrainmonSource

    monkeypatch.setattr(tbtail, "_CHUNK", 300)  # smaller than one record with extras: the chunk must grow
    rd = RunDir(tmp_path / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    src = _records(40)
    w = EventWriter(rd.events_dir, 0, param_norms_every=3)
    for r in src[:25]:
        w.write(r)
    w.flush()
    source = TrainmonSource(tmp_path / "run")
    first = source.poll()
    for r in src[25:]:
        w.write(r)
    w.close()
    second = source.poll()
    assert [r.step for r in first + second] == list(range(40)) and not source.problems
    assert all(_same(a, b) for a, b in zip(first + second, read_run(tmp_path / "run").records[0], strict=True))


def test_source_reads_in_slices_without_losing_or_repeating_records(tmp_path):
    from monitor.runlog.adapters.trainmon import TrainmonSource

    rd = RunDir(tmp_path / "run")
    rd.write_run_info(RunInfo(run_id="run", world_size=2))
    for writer_records in (_records(13), _records(30)[13:]):  # rank 0: a restarted writer's second file
        w = EventWriter(rd.events_dir, 0, param_norms_every=4)
        for r in writer_records:
            w.write(r)
        w.close()
    w1 = EventWriter(rd.events_dir / "rank1", 1)
    for r in _records(25, rank=1):
        w1.write(r)
    w1.close()
    whole = TrainmonSource(tmp_path / "run").poll()
    sliced, source = [], TrainmonSource(tmp_path / "run")
    while True:
        got = source.poll(limit=4)
        assert len(got) <= 4
        sliced += got
        if not got:
            break
    assert [(r.rank, r.step) for r in sliced] == [(r.rank, r.step) for r in whole] == \
        [(0, s) for s in range(30)] + [(1, s) for s in range(25)]
    assert all(_same(a, b) for a, b in zip(sliced, whole, strict=True)) and not source.problems


def test_a_step_event_with_impossible_values_is_skipped_not_fatal(tmp_path):
    """A record with a valid checksum whose step vector makes no record (a NaN presence mask) is
    reported once and passed over; the records after it still arrive, now and on later polls."""
    from monitor.runlog.adapters.trainmon import TrainmonSource

    rd = RunDir(tmp_path / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    w = EventWriter(rd.events_dir, 0)
    for r in _records(3):
        w.write(r)
    bad = event_pb2.Event(wall_time=1.0, step=3, summary=summary_pb2.Summary(
        value=[_vector(STEP_VECTOR_TAG, [math.nan, 2.0], types_pb2.DT_DOUBLE, "d")]))
    w._write(bad.SerializeToString())
    for r in _records(6)[4:]:
        w.write(r)
    w.flush()
    source = TrainmonSource(tmp_path / "run")
    assert [r.step for r in source.poll()] == [0, 1, 2, 4, 5]
    assert len(source.problems) == 1 and "unreadable step event" in source.problems[0]
    for r in _records(8)[6:]:
        w.write(r)
    w.close()
    assert [r.step for r in source.poll()] == [6, 7] and len(source.problems) == 1
