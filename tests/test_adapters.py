"""Other frameworks' logs as Sources: real TensorBoard files written by torch's SummaryWriter with each
framework's tag names, hand-built TF2 tensor summaries, Megatron-LM and llm.c text logs, and the real
llm.c GPT-2 124M log (tests/data/README.md)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from torch.utils.tensorboard import SummaryWriter

from monitor.cli.check import check_run
from monitor.config import load_config
from monitor.runlog.adapters import (
    MappingError,
    SourceError,
    TensorBoardSource,
    TextLogSource,
    TrainmonSource,
    discover,
    open_source,
)
from monitor.runlog.adapters.frameworks import detect
from monitor.runlog.adapters.tbtail import TensorBoardTail
from monitor.runlog.events import EventWriter
from monitor.runlog.reader import RunReadError
from monitor.runlog.rundir import RunDir
from monitor.runlog.tfrecord import encode_record
from monitor.schema import ModelInfo, RunInfo, StepRecord

DATA = Path(__file__).parent / "data"
LLMC_LOG = DATA / "llmc-gpt2-124m.log"
CONFIG = load_config(None, environ={})


def everything(source) -> list[StepRecord]:
    return source.poll() + source.flush()


def steps(records) -> list[int]:
    return [r.step for r in records]


# -- writers with each framework's real tags and logging pattern ---------------------------------


def lr_at(step: int, warmup: int = 30, peak: float = 3e-4) -> float:
    return peak * min(1.0, (step + 1) / warmup)


def write_hf(writer: SummaryWriter, first: int, last: int, every: int = 10, nan_at: int | None = None,
             eval_every: int = 50) -> None:
    """Hugging Face Trainer's TensorBoardCallback.on_log: one add_scalar per logged key, then flush."""
    for step in range(first, last + 1, every):
        loss = float("nan") if step == nan_at else 4.0 - step / 1000
        logs = {"train/loss": loss, "train/grad_norm": 1.0 + step / 1000, "train/learning_rate": lr_at(step),
                "train/epoch": step / 100}
        for tag, v in logs.items():
            writer.add_scalar(tag, v, step)
        writer.flush()
        if step % eval_every == 0:
            writer.add_scalar("eval/loss", 4.5 - step / 1000, step)
            writer.add_scalar("eval/runtime", 1.5, step)
            writer.flush()


def hf_run(d: Path, last: int = 200, nan_at: int | None = None) -> Path:
    with SummaryWriter(str(d)) as w:
        write_hf(w, 10, last, nan_at=nan_at)
        for tag, v in {"train/train_runtime": 12.0, "train/train_loss": 3.9, "train/total_flos": 1e12}.items():
            w.add_scalar(tag, v, last)  # the end-of-training summary, at the last step
    return d


def lightning_run(d: Path, n: int = 40, every: int = 5) -> Path:
    """LearningRateMonitor (lr-AdamW/pg1, pg2, momentum) at batch start, then the module's self.log
    values (train_loss, grad norms) with Lightning's `epoch`, every `every` steps."""
    with SummaryWriter(str(d)) as w:
        for step in range(every - 1, n, every):
            w.add_scalar("lr-AdamW/pg1", lr_at(step), step)
            w.add_scalar("lr-AdamW/pg2", lr_at(step) / 10, step)
            w.add_scalar("lr-AdamW/pg1-momentum", 0.9, step)
            w.add_scalar("lr-AdamW/pg2-momentum", 0.9, step)
            w.add_scalar("train_loss", 3.0 - step / 100, step)
            w.add_scalar("grad_2.0_norm/layer.weight", 0.5, step)
            w.add_scalar("grad_2.0_norm/layer.bias", 0.1, step)
            w.add_scalar("grad_2.0_norm_total", 0.51, step)
            w.add_scalar("epoch", 0, step)
            w.flush()
        w.add_scalar("val_loss", 2.9, n - 1)
    return d


def megatron_tb_run(d: Path, iters: int = 300, interval: int = 10) -> Path:
    """Megatron-LM training_log: every scalar also as a '... vs samples' twin at the sample count."""
    with SummaryWriter(str(d)) as w:
        for it in range(interval, iters + 1, interval):
            samples = it * 512
            for tag, v in (("learning-rate", lr_at(it, 100)), ("batch-size", 512.0), ("lm loss", 8.0 - it / 100),
                           ("loss-scale", 65536.0 if it < 200 else 32768.0), ("grad-norm", 2.0),
                           ("params-norm", 300.0)):
                w.add_scalar(tag, v, it)
                w.add_scalar(tag + " vs samples", v, samples)
            w.add_scalar("iteration-time", 1.25, it)
    return d


def tf2_event(step: int, values: dict[str, float], *, first: bool, double: bool = False) -> bytes:
    """A TF2 tf.summary.scalar event: a rank-0 tensor, plugin metadata only with a tag's first value."""
    out = []
    for tag, v in values.items():
        if double:
            t = tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE, tensor_shape={}, tensor_content=
                                       __import__("struct").pack("<d", v))
        else:
            t = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape={}, float_val=[v])
        val = summary_pb2.Summary.Value(tag=tag, tensor=t)
        if first:
            val.metadata.plugin_data.plugin_name = "scalars"
        out.append(val)
    ev = event_pb2.Event(wall_time=1_700_000_000.0 + step, step=step, summary=summary_pb2.Summary(value=out))
    return encode_record(ev.SerializeToString())


def tf2_run(d: Path, tags: tuple[str, str], n: int = 20, double: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    head = encode_record(event_pb2.Event(wall_time=1_700_000_000.0, file_version="brain.Event:2").SerializeToString())
    body = b"".join(tf2_event(s, {tags[0]: 5.0 - s / 10, tags[1]: 1e-4 * (s + 1)}, first=s == 0, double=double)
                    for s in range(n))
    (d / "events.out.tfevents.1700000000.host.1.v2").write_bytes(head + body)
    return d


MEGATRON_LINES = [
    " [2024-05-01 10:00:00] iteration       10/     500 | consumed samples:         5120 | elapsed time per iteration "
    "(ms): 1234.5 | learning rate: 1.500E-05 | global batch size:   512 | lm loss: 1.071461E+01 | loss scale: "
    "65536.0 | grad norm: 12.345 | number of skipped iterations:   0 | number of nan iterations:   0 |",
    " [2024-05-01 10:00:12] iteration       20/     500 | consumed samples:        10240 | consumed tokens:     "
    "20971520 | learning rate: 3.000E-05 | elapsed time per iteration (ms): 1100.0 | global batch size:   512 | "
    "lm loss: 9.500000E+00 | loss scale: 32768.0 | number of skipped iterations:   2 | number of nan iterations:   0 |",
    " [2024-05-01 10:00:23] iteration       30/     500 | consumed samples:        15360 | consumed tokens:     "
    "31457280 | elapsed time per iteration (ms): 1000.0 | learning rate: 4.500E-05 | global batch size:   512 | "
    "lm loss: 8.250000E+00 | loss scale: 32768.0 | grad norm: 3.000 | number of skipped iterations:   0 | "
    "number of nan iterations:   0 |",
]
MEGATRON_PREAMBLE = [
    "using world size: 8, data-parallel size: 8, context-parallel size: 1 tensor-model-parallel size: 1",
    "------------------------ arguments ------------------------",
    "  accumulate_allreduce_grads_in_fp32 .............. False",
    "-------------------- end of arguments ---------------------",
    "> building GPT model ...",
    "[Rank 0] (after 10 iterations) memory (MB) | allocated: 1234.5 | max allocated: 2345.6 |",
]

LLMC_LINES = ["s:0 tel:11.0092", "s:0 trl:11.0091 lr:0.000001 norm:15.37", "s:1 trl:10.9598 lr:0.000002 norm:15.24",
              "s:2 tel:10.9", "s:2 eval:0.2500", "s:2 trl:10.8556 lr:0.000003 norm:14.84", "s:3 trl:nan lr:0.000003 norm:nan",
              "s:4 tel:10.5"]


def write_lines(path: Path, lines: list[str], mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


# -- detection and assembly ------------------------------------------------------------------------


def test_huggingface_logdir(tmp_path):
    src = open_source(hf_run(tmp_path / "hf"))
    recs = everything(src)
    assert isinstance(src, TensorBoardSource) and src.info.source == "huggingface"
    assert src.info.run_id == "hf" and src.info.optimizer.name == ""
    assert steps(recs) == list(range(10, 201, 10))  # eval and the end-of-training summary add no records
    r = recs[4]
    assert (r.step, r.loss, r.grad_norm) == (50, pytest.approx(3.95), pytest.approx(1.05))
    assert r.scalars == {"val_loss": pytest.approx(4.45)} and recs[3].scalars == {}
    assert recs[1].lr == [2.1e-4]  # float32 as stored, read back as its shortest decimal
    assert 1e9 < r.time < time.time() + 1 and src.info.created <= r.time
    assert src.problems == []


def test_lightning_logdir_lr_groups_and_param_norms(tmp_path):
    src = open_source(lightning_run(tmp_path / "version_0"))
    recs = everything(src)
    assert src.info.source == "lightning"
    assert steps(recs) == list(range(4, 40, 5))
    r = recs[1]
    assert r.lr == [pytest.approx(lr_at(9)), pytest.approx(lr_at(9) / 10)]  # pg1, pg2; momentum ignored
    assert r.loss == pytest.approx(2.91) and r.grad_norm == pytest.approx(0.51)
    assert r.param_norms == {"layer.weight": 0.5, "layer.bias": pytest.approx(0.1)}
    assert recs[-1].scalars == {"val_loss": pytest.approx(2.9)}


def test_megatron_tensorboard_ignores_the_vs_samples_twins(tmp_path):
    src = open_source(megatron_tb_run(tmp_path / "tb"))
    recs = everything(src)
    assert src.info.source == "megatron"
    assert steps(recs) == list(range(10, 301, 10))  # the twins (logged at the sample count) split nothing
    r = recs[19]
    assert (r.step, r.loss, r.grad_norm, r.loss_scale, r.step_time) == (200, pytest.approx(6.0), 2.0, 32768.0, 1.25)
    assert r.lr == [pytest.approx(lr_at(200, 100))] and r.scalars == {"params_norm": 300.0, "batch_size": 512.0}


@pytest.mark.parametrize("tags, expected", [
    ({"train/loss", "train/learning_rate", "train/epoch"}, "huggingface"),
    ({"lr-AdamW", "train_loss_step", "epoch"}, "lightning"),
    ({"loss", "epoch"}, "lightning"),
    ({"loss"}, None),  # a bare "loss" is any hand-written loop's: only a mapping says what it is
    ({"lm loss", "learning-rate", "lm loss vs samples"}, "megatron"),
    ({"lm loss", "train/loss", "learning-rate"}, "megatron"),  # more signals resolved wins
    ({"train/loss", "lr-SGD"}, "huggingface"),  # a tie goes to the more specific scheme
    ({"lr-AdamW-momentum", "Loss/train"}, None),
])
def test_detection_precedence(tags, expected):
    fw = detect(tags)
    assert (fw.name if fw else None) == expected


def test_tf2_tensor_summaries_and_mapping(tmp_path):
    # TF2 writes rank-0 tensors whose plugin name comes only with each tag's first value
    src = open_source(tf2_run(tmp_path / "hf2", ("train/loss", "train/learning_rate")))
    recs = everything(src)
    assert src.info.source == "huggingface" and len(recs) == 20
    assert recs[5].loss == pytest.approx(4.5) and recs[5].lr == [pytest.approx(6e-4)]
    # unknown tags, DT_DOUBLE: the mapping names them; other signals stay None
    d = tf2_run(tmp_path / "keras", ("epoch_loss", "opt/lr"), double=True)
    src = open_source(d, {"loss": "epoch_loss", "lr": "opt/lr", "scalars.my_lr": "opt/*"})
    recs = everything(src)
    assert src.info.source == "tensorboard"
    assert recs[3].loss == 4.7 and recs[3].lr == [4e-4] and recs[3].scalars == {"my_lr": 4e-4}
    assert recs[3].grad_norm is None


def test_mapping_overrides_and_extends_detection(tmp_path):
    d = tmp_path / "hf"
    with SummaryWriter(str(d)) as w:
        for step in (1, 2, 3):
            w.add_scalar("train/loss", 2.0, step)
            w.add_scalar("train/learning_rate", 1e-4, step)
            w.add_scalar("custom/gn", 0.5 * step, step)
            w.add_scalar("custom/scale", 1024.0, step)
            w.add_scalar("custom/skip", float(step == 2), step)
            w.add_scalar("custom/tokens", 4096.0, step)
    src = open_source(d, {"grad_norm": "custom/gn", "loss_scale": "custom/scale", "skipped": "custom/skip",
                          "tokens": "custom/tokens", "loss": "train/loss"})
    recs = everything(src)
    assert src.info.source == "huggingface"
    assert [(r.grad_norm, r.loss_scale, r.skipped, r.tokens, r.loss) for r in recs] == [
        (0.5, 1024.0, False, 4096, 2.0), (1.0, 1024.0, True, 4096, 2.0), (1.5, 1024.0, False, 4096, 2.0)]
    with pytest.raises(MappingError, match="unknown signal 'los'"):
        open_source(d, {"los": "train/loss"})


def test_unknown_tags_without_mapping_say_what_to_map(tmp_path):
    d = tmp_path / "mine"
    with SummaryWriter(str(d)) as w:
        for step in range(3):
            w.add_scalar("Loss/train", 1.0, step)
    src = open_source(d)
    assert everything(src) == []
    with pytest.raises(RunReadError, match=r"Loss/train.*--map loss=TAG"):
        check_run(d, CONFIG)
    data, _ = check_run(d, CONFIG, mapping={"loss": "Loss/train"})
    assert data.info.source == "tensorboard" and [len(v) for v in data.records.values()] == [3]


def test_a_source_with_only_a_loss_still_yields_records(tmp_path):
    d = tmp_path / "hf"
    with SummaryWriter(str(d)) as w:
        for step in range(5, 30, 5):
            w.add_scalar("train/loss", 1.0, step)
    recs = everything(open_source(d))
    assert steps(recs) == [5, 10, 15, 20, 25] and all(r.lr == [] and r.grad_norm is None for r in recs)


# -- incremental tailing -------------------------------------------------------------------------


def test_tensorboard_tailing_is_incremental_and_resumable(tmp_path):
    d = tmp_path / "hf"
    w = SummaryWriter(str(d))
    write_hf(w, 10, 50)
    src = open_source(d)
    assert steps(src.poll()) == [10, 20, 30, 40]  # 50 is held back: more of its scalars may come
    assert src.poll() == []
    write_hf(w, 60, 80)
    assert steps(src.poll()) == [50, 60, 70]
    saved = json.loads(json.dumps(src.state()))  # strict JSON
    write_hf(w, 90, 100)
    w.close()
    w2 = SummaryWriter(str(d))  # a restarted Trainer's writer: a new file, picked up by the next poll
    write_hf(w2, 110, 120)
    w2.close()
    assert steps(src.poll()) == [80, 90, 100, 110]
    assert steps(src.flush()) == [120]
    fresh = open_source(d)
    fresh.restore(saved)  # a daemon restart from the state saved before the last appends
    assert steps(fresh.poll() + fresh.flush()) == [80, 90, 100, 110, 120]
    assert fresh.poll() == [] and fresh.flush() == []


def test_a_settled_step_is_released_without_waiting_for_the_next(tmp_path):
    d = tmp_path / "hf"
    w = SummaryWriter(str(d))
    write_hf(w, 10, 20)
    src = open_source(d, settle_s=0.0)
    assert steps(src.poll()) == [10, 20]  # nothing more arrived for step 20: it is complete
    w.add_scalar("train/grad_norm", 9.0, 20)  # a straggler of step 20: a second record with just that
    w.flush()
    late = src.poll()
    assert [(r.step, r.grad_norm, r.loss) for r in late] == [(20, 9.0, None)]
    w.close()


def test_truncated_last_record_is_waited_for(tmp_path):
    full = hf_run(tmp_path / "full", last=50)
    (name,) = [p.name for p in full.iterdir()]
    data = (full / name).read_bytes()
    d = tmp_path / "cut"
    d.mkdir()
    (d / name).write_bytes(data[:-7])  # the writer is in the middle of its last record
    src = open_source(d)
    first = src.poll()
    assert steps(first) == [10, 20, 30, 40] and src.problems == []
    with open(d / name, "ab") as f:
        f.write(data[-7:])
    assert steps(src.poll() + src.flush()) == [50]
    assert src.problems == []


def test_corrupt_or_vanished_files_are_reported_not_raised(tmp_path):
    d = hf_run(tmp_path / "hf", last=100)
    (path,) = list(d.iterdir())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a bit in the middle: a checksum fails
    path.write_bytes(bytes(data))
    src = open_source(d)
    recs = everything(src)
    assert 0 < len(recs) < 10 and steps(recs) == sorted(steps(recs))
    assert len(src.problems) == 1 and "corrupt record" in src.problems[0] and str(path) in src.problems[0]
    assert src.poll() == [] and len(src.problems) == 1  # reported once, the rest of the file skipped
    path.unlink()
    assert src.poll() == []
    assert len(src.problems) == 2 and "vanished" in src.problems[1]
    shutil.rmtree(d)
    assert src.poll() == [] and "vanished" in src.problems[-1]


def test_tail_reads_new_files_and_keeps_offsets(tmp_path):
    d = tmp_path / "tb"
    tail = TensorBoardTail(d)
    assert tail.poll() == [] and "vanished" in tail.problems[0]  # reported, not raised
    d.mkdir()
    with SummaryWriter(str(d)) as w:
        w.add_scalar("a", 1.0, 0)
    assert [(p.step, p.tag, p.value) for p in tail.poll()] == [(0, "a", 1.0)]
    assert tail.poll() == [] and set(tail.state()["offsets"].values()) == {(next(d.iterdir())).stat().st_size}


# -- text logs -----------------------------------------------------------------------------------


def test_megatron_text_log(tmp_path):
    log = tmp_path / "slurm-1234.out"
    write_lines(log, MEGATRON_PREAMBLE + MEGATRON_LINES[:1])  # sniffed by its arguments header
    src = open_source(log)
    assert isinstance(src, TextLogSource) and src.info.source == "megatron-text"
    assert src.info.run_id == "slurm-1234.out"
    first = src.poll()
    assert [(r.step, r.loss, r.lr, r.grad_norm, r.loss_scale, r.step_time, r.skipped) for r in first] == [
        (10, pytest.approx(10.71461), [1.5e-5], 12.345, 65536.0, pytest.approx(1.2345), False)]
    assert first[0].time == time.mktime((2024, 5, 1, 10, 0, 0, 0, 0, -1))
    assert first[0].scalars["nan_iterations"] == 0 and first[0].scalars["consumed_samples"] == 5120
    assert src.info.max_steps == 500
    # the next line arrives in two pieces: the partial one is waited for
    with open(log, "a") as f:
        f.write(MEGATRON_LINES[1][:80])
    assert src.poll() == []
    saved = src.state()
    with open(log, "a") as f:
        f.write(MEGATRON_LINES[1][80:] + "\n" + MEGATRON_LINES[2] + "\n")
    recs = src.poll()
    r20, r30 = recs
    assert (r20.step, r20.skipped, r20.grad_norm, r20.lr, r20.loss_scale) == (20, True, None, [3e-5], 32768.0)
    assert r30.tokens == 1048576  # (31457280 - 20971520) tokens over 10 iterations
    fresh = TextLogSource(log)
    fresh.restore(json.loads(json.dumps(saved)))
    assert steps(fresh.poll() + fresh.flush()) == [20, 30]


def test_llmc_text_log(tmp_path):
    log = tmp_path / "main.log"
    write_lines(log, LLMC_LINES[:2])
    src = open_source(log)
    assert src.info.source == "llmc"
    r0 = src.poll()
    assert [(r.step, r.loss, r.lr, r.grad_norm, r.scalars) for r in r0] == [
        (0, 11.0091, [1e-6], 15.37, {"val_loss": 11.0092})]
    with open(log, "a") as f:
        f.write("\n".join(LLMC_LINES[2:]) + "\n" + "s:4 trl:10.4")  # the last line is still being written
    recs = src.poll()
    assert steps(recs) == [1, 2, 3]
    assert recs[1].scalars == {"val_loss": 10.9, "eval": 0.25}
    assert math.isnan(recs[2].loss) and math.isnan(recs[2].grad_norm)
    assert src.flush() == []  # step 4 has only a validation line so far: no optimizer step yet
    with open(log, "a") as f:
        f.write("235 lr:0.000004 norm:9.0\n")
    assert [(r.step, r.loss, r.scalars) for r in src.poll()] == [(4, 10.4235, {})]


def test_text_log_truncated_or_replaced_is_read_again(tmp_path):
    log = tmp_path / "train.log"
    write_lines(log, LLMC_LINES[:3])
    src = open_source(log)
    assert steps(src.poll()) == [0, 1]
    write_lines(log, ["s:0 trl:5.0 lr:0.1 norm:1.0"])  # rewritten from the start (shorter)
    assert steps(src.poll()) == [0] and "truncated or replaced" in src.problems[0]


def test_unknown_paths_raise_source_error_naming_what_was_looked_for(tmp_path):
    with pytest.raises(SourceError, match="no such directory"):
        open_source(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(SourceError, match=r"notes.txt: not a log of a known format .*Megatron.*llm.c"):
        open_source(tmp_path / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=r"not a trainmon run directory \(no run.json\) nor a TensorBoard logdir"):
        open_source(empty)
    hf_run(empty / "runs" / "Jan01", last=20)
    with pytest.raises(SourceError, match=r"runs below it: .*Jan01 \(pass one of them\)"):
        open_source(empty)


# -- trainmon's own runs -----------------------------------------------------------------------------


def test_trainmon_source_is_incremental_over_ranks(tmp_path):
    run = tmp_path / "run"
    names = ["w", "b"]
    rd = RunDir(run)
    rd.write_run_info(RunInfo(run_id="run", world_size=2, model=ModelInfo(param_names=names)))
    writers = {rank: EventWriter(RunDir(run, rank).events_dir, rank, param_names=names) for rank in (0, 1)}

    def write(rank, lo, hi):
        for s in range(lo, hi):
            writers[rank].write(StepRecord(step=s, rank=rank, loss=1.0, lr=[1e-3], param_norms={"w": 0.5, "b": 0.1}))
        writers[rank].flush()

    write(0, 0, 5)
    src = open_source(run)
    assert isinstance(src, TrainmonSource) and src.info.source == "trainmon"
    got = src.poll()
    assert [(r.rank, r.step) for r in got] == [(0, s) for s in range(5)]
    assert got[0].param_norms == {"w": 0.5, "b": pytest.approx(0.1)}
    write(1, 0, 3)  # rank 1 appears later
    write(0, 5, 7)
    saved = json.loads(json.dumps(src.state()))
    assert [(r.rank, r.step) for r in src.poll()] == [(0, 5), (0, 6), (1, 0), (1, 1), (1, 2)]
    RunDir(run).update_json("run.json", lambda old: {**old, "ended": 1.0}, {})
    assert src.poll() == [] and src.info.model_extra["ended"] == 1.0  # run.json re-read when it changes
    fresh = open_source(run)
    fresh.restore(saved)
    assert [(r.rank, r.step) for r in fresh.poll()] == [(0, 5), (0, 6), (1, 0), (1, 1), (1, 2)]
    for w in writers.values():
        w.close()


# -- discovery -----------------------------------------------------------------------------------------


def test_discover_a_tree_mixing_all_kinds(tmp_path):
    root = tmp_path / "exp"
    run = root / "trainmon-run"
    RunDir(run).write_run_info(RunInfo(run_id="trainmon-run"))
    EventWriter(RunDir(run, 1).events_dir, 1).close()  # rank1/ holds event files: part of the run
    hf = hf_run(root / "hf-out" / "runs" / "May01_10-00-00_host", last=20)
    pl = lightning_run(root / "lightning_logs" / "version_0", n=10)
    meg = root / "megatron" / "train.log"
    meg.parent.mkdir()
    write_lines(meg, MEGATRON_LINES)
    llmc = root / "llmc" / "main.txt"
    llmc.parent.mkdir()
    write_lines(llmc, LLMC_LINES)
    (root / "megatron" / "notes.log").write_text("nothing to see\n")
    (root / "megatron" / "empty.log").write_text("")
    hf_run(root / ".hidden" / "x", last=20)
    found = discover([root])
    assert sorted(found) == sorted([run, hf, pl, meg, llmc])
    assert discover([meg, run / "run.json", tmp_path / "missing"]) == [meg, run]
    # a log that starts empty is listed once it sniffs as a known format
    write_lines(root / "megatron" / "empty.log", MEGATRON_LINES[:1])
    assert root / "megatron" / "empty.log" in discover([root])
    for p in found:
        assert open_source(p).info.run_id == p.name


def test_discover_finds_every_run_among_many(tmp_path):
    # How long a scan takes is a benchmark's business; here: all 600 found, twice (the second from the
    # sniffing cache).
    template = hf_run(tmp_path / "template", last=20)
    for i in range(300):
        shutil.copytree(template, tmp_path / "runs" / f"run{i:03d}")
        write_lines(tmp_path / "runs" / f"run{i:03d}" / "stdout.log", LLMC_LINES)
    assert len(discover([tmp_path / "runs"])) == 600
    assert len(discover([tmp_path / "runs"])) == 600


# -- the rules on foreign runs -----------------------------------------------------------------------


def test_rules_fire_on_a_foreign_run(tmp_path):
    d = hf_run(tmp_path / "hf", last=300, nan_at=150)
    data, alerts = check_run(d, CONFIG)
    assert data.info.source == "huggingface" and len(data.records[0]) == 30
    nan = [a for a in alerts if a.rule == "loss.nonfinite"]
    assert [(a.step, a.severity.value) for a in nan] == [(150, "critical")]
    assert not [a for a in alerts if a.rule.startswith("preflight.")]  # nothing known about the optimizer


def test_megatron_text_log_through_check(tmp_path):
    log = tmp_path / "train.log"
    lines = []
    for it in range(10, 1001, 10):
        loss = "nan" if it == 700 else f"{8.0 - it / 500:.6E}"
        lines.append(f" iteration {it:8d}/    1000 | consumed samples: {it * 512:12d} | elapsed time per iteration "
                     f"(ms): 1000.0 | learning rate: {lr_at(it, 100):.3E} | global batch size:   512 | lm loss: "
                     f"{loss} | loss scale: 65536.0 | grad norm: 1.000 | number of skipped iterations:   0 | "
                     "number of nan iterations:   0 |")
    write_lines(log, lines)
    data, alerts = check_run(log, CONFIG)
    assert data.info.source == "megatron-text" and len(data.records[0]) == 100 and data.info.max_steps == 1000
    assert ("loss.nonfinite", 700) in {(a.rule, a.step) for a in alerts}


def test_real_llmc_gpt2_124m_log():
    """llm.c GPT-2 124M (tests/data/README.md): 19,560 steps, spikes at 7435 and 9025, 700-step warmup."""
    data, alerts = check_run(LLMC_LOG, CONFIG)
    recs = data.records[0]
    assert data.info.source == "llmc" and data.problems == []
    assert len(recs) == 19_560 and steps(recs) == list(range(19_560))
    assert recs[0].lr == [1e-6] and recs[0].grad_norm == 15.37 and recs[0].scalars == {"val_loss": 11.0092}
    assert sum("val_loss" in r.scalars for r in recs) == 79  # every 250 steps; the last (19560) has no step
    fired = {(a.rule, a.step): a.severity.value for a in alerts}
    # the two known spikes, and nothing else above info: gradient-norm spikes of 5.3x and 7.5x the median,
    # and at 7435 a loss spike that the gradient norm corroborates
    assert {k: v for k, v in fired.items() if v != "info"} == {
        ("grad_norm.spike", 7435): "warning", ("grad_norm.spike", 9025): "warning", ("loss.spike", 7435): "critical"}
    # other one-step loss outliers with normal gradients are hard batches of real text: info
    assert sum(rule == "loss.spike" for rule, _ in fired) > 1
    # a 700-step linear warmup and a schedule that decays to 0: no warmup or LR finding
    assert not [a for a in alerts if a.rule.startswith(("warmup.", "lr.", "grad_norm.growth", "loss.divergence",
                                                         "loss.nonfinite", "preflight."))]
    # every other grad_norm.spike is info: a few x the median, as hard batches of real text do
    assert all(sev == "info" for (rule, step), sev in fired.items() if rule == "grad_norm.spike"
               and step not in (7435, 9025))


@pytest.mark.slow
def test_adapters_import_no_torch(tmp_path):
    hf_run(tmp_path / "hf", last=30)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from monitor.runlog.adapters import discover, open_source, read_all\n"
        "from monitor.cli.check import check_run\n"
        "from monitor.config import load_config\n"
        f"paths = discover([{str(tmp_path)!r}, {str(LLMC_LOG)!r}])\n"
        "assert len(paths) == 2, paths\n"
        "for p in paths:\n"
        "    assert read_all(open_source(p))[0]\n"
        "check_run(paths[0], load_config(None, environ={}))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
