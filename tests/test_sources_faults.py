"""A bad record never wedges a source (issue 14, item 2), shown with crafted bad input in real files.

1. Every source skips and reports an undecodable record and reads on; its read position is past the
   record, so later polls never meet it again.
2. A TFRecord length beyond `tfrecord.MAX_RECORD_BYTES` is corruption: reported once, the file is not
   read further (not re-read, growing, on every poll).
3. Problems are one message per (file, kind), counted in `problem_counts`, and at most
   `sources.MAX_PROBLEMS` messages per source.
4. `poll(limit=...)` reads a bounded slice from text logs and TensorBoard logdirs too.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2

from monitor.runlog.adapters import (
    HFStateSource,
    LightningCSVSource,
    TensorBoardSource,
    TensorBoardTail,
    TextLogSource,
    TrainmonSource,
)
from monitor.runlog.adapters.tbtail import natural_key
from monitor.runlog.events import encode_step, event_file_name
from monitor.runlog.events.tags import DDP_TAG
from monitor.runlog.rundir import RunDir
from monitor.runlog.sources import MAX_PROBLEMS
from monitor.runlog.tfrecord import (
    MAX_RECORD_BYTES,
    CorruptRecord,
    encode_record,
    frames,
    masked_crc32c,
    read_records,
)
from monitor.schema import RunInfo, StepRecord

HUGE = "9" * 5000  # more digits than int() converts (sys.int_info.default_max_str_digits)


def never() -> float:
    """A clock under which nothing settles: a step is released by the next step, or by flush()."""
    return 0.0


def steps(records) -> list[int]:
    return [r.step for r in records]


def values(records) -> list[tuple]:
    return [(r.step, r.loss, r.lr, r.grad_norm, r.scalars) for r in records]


# -- writers ---------------------------------------------------------------------------------------


def rec(step: int, **kw) -> StepRecord:
    return StepRecord(step=step, time=1000.0 + step, loss=2.0 - step / 100, lr=[1e-3], grad_norm=0.5, **kw)


def ddp_event(step: int, payload: bytes) -> bytes:
    """A trainmon step event whose `trainmon/ddp` string tensor holds `payload` instead of JSON."""
    ev = event_pb2.Event.FromString(encode_step(rec(step, ddp={"ranks": 2})))
    next(v for v in ev.summary.value if v.tag == DDP_TAG).tensor.string_val[0] = payload
    return ev.SerializeToString()


def trainmon_run(tmp: Path, bad: list[bytes], n: int = 6, framed: bool = True) -> tuple[TrainmonSource, Callable]:
    """A run directory whose rank 0 wrote steps 0..n-1 with the records `bad` (or, not `framed`, these
    bytes) in place of step 3; the callback appends steps n and n+1."""
    rd = RunDir(tmp / "run")
    rd.write_run_info(RunInfo(run_id="run"))
    path = rd.events_dir / event_file_name(0)
    head = event_pb2.Event(wall_time=1000.0, file_version="brain.Event:2").SerializeToString()

    def step(s: int) -> bytes:
        return encode_record(encode_step(rec(s)))

    path.write_bytes(encode_record(head) + b"".join(
        b"".join(encode_record(b) if framed else b for b in bad) if s == 3 else step(s) for s in range(n)))

    def append() -> None:
        with open(path, "ab") as f:
            f.write(step(n) + step(n + 1))
    return TrainmonSource(tmp / "run"), append


def scalar_event(step: int, tags: dict[str, float]) -> bytes:
    return event_pb2.Event(wall_time=1000.0 + step, step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in tags.items()])).SerializeToString()


def hf_event(step: int) -> bytes:
    """Hugging Face TensorBoardCallback's tags, all in one event (what matters here is the framing)."""
    return scalar_event(step, {"train/loss": 2.0 - step / 100, "train/learning_rate": 1e-3, "train/grad_norm": 0.5})


def hf_logdir(tmp: Path, bad: list[bytes], n: int = 6) -> tuple[TensorBoardSource, Callable[[], None]]:
    d = tmp / "hf"
    d.mkdir()
    path = d / "events.out.tfevents.1700000000.host.1.0"
    path.write_bytes(b"".join(b"".join(encode_record(b) for b in bad) if s == 3 else encode_record(hf_event(s))
                              for s in range(n)))

    def append() -> None:
        with open(path, "ab") as f:
            f.write(encode_record(hf_event(n)) + encode_record(hf_event(n + 1)))
    return TensorBoardSource(d, settle_s=0.0), append


def megatron_line(step: int | str, total: int | str = 1000) -> str:
    loss = 1.0 if step == HUGE else 2.0 - int(step) / 100
    return f" iteration {step:>8}/ {total} | learning rate: 1.000E-03 | lm loss: {loss:.6E} | grad norm: 0.500 |\n"


def llmc_line(step: int | str) -> str:
    loss = 1.0 if step == HUGE else 2.0 - int(step) / 100
    return f"s:{step} trl:{loss} lr:0.001 norm:0.5\n"


def text_log(tmp: Path, line: Callable[[int], str], bad: list[str], n: int = 6) -> tuple[TextLogSource, Callable]:
    path = tmp / "train.log"
    path.write_text("".join("".join(bad) if s == 3 else line(s) for s in range(n)))

    def append() -> None:
        with open(path, "a") as f:
            f.write(line(n) + line(n + 1))
    return TextLogSource(path), append


def csv_log(tmp: Path, bad: list[str], n: int = 6) -> tuple[LightningCSVSource, Callable[[], None]]:
    path = tmp / "version_0" / "metrics.csv"
    path.parent.mkdir()

    def row(s: int) -> str:
        return f"0,{s},{2.0 - s / 100},0.001\n"

    path.write_text("epoch,step,train_loss,lr-Adam\n" + "".join("".join(bad) if s == 3 else row(s) for s in range(n)))

    def append() -> None:
        with open(path, "a") as f:
            f.write(row(n) + row(n + 1))
    return LightningCSVSource(path.parent, settle_s=0.0), append


def hf_state(tmp: Path, bad: list, n: int = 6) -> tuple[HFStateSource, Callable[[], None]]:
    path = tmp / "out" / "trainer_state.json"
    path.parent.mkdir()

    def write(k: int) -> None:
        entry = [{"step": s, "loss": 2.0 - s / 100, "learning_rate": 1e-3, "grad_norm": 0.5} for s in range(k)]
        history = [e for s in range(k) for e in (bad if s == 3 else [entry[s]])]
        path.write_text(json.dumps({"global_step": k - 1, "log_history": history}))

    write(n)
    return HFStateSource(path.parent), lambda: write(n + 2)


# -- 1. a bad record is skipped, reported once, and never met again --------------------------------

BAD_RECORDS = {
    "trainmon: DDP JSON nested beyond the recursion limit": (
        lambda t: trainmon_run(t, [ddp_event(3, b"[" * 100_000 + b"]" * 100_000)]), "RecursionError"),
    "trainmon: DDP JSON that is not UTF-8": (lambda t: trainmon_run(t, [ddp_event(3, b'{"\xff": 1}')]), "step event"),
    "trainmon: not an Event": (lambda t: trainmon_run(t, [b"\xff" * 40]), "not a TensorBoard event"),
    "tensorboard: not an Event": (lambda t: hf_logdir(t, [b"\xff" * 40]), "not a TensorBoard event"),
    "megatron-text: an iteration int() refuses": (lambda t: text_log(t, megatron_line, [megatron_line(HUGE)]),
                                                  "ValueError"),
    "megatron-text: a step count int() refuses": (lambda t: text_log(t, megatron_line, [megatron_line(3, HUGE)]),
                                                  "ValueError"),
    "llmc: a step int() refuses": (lambda t: text_log(t, llmc_line, [llmc_line(HUGE)]), "ValueError"),
    "lightning-csv: a step int() refuses": (lambda t: csv_log(t, [f"0,{HUGE},1.0,0.001\n"]), "whole-number step"),
    "huggingface: an entry without a step": (lambda t: hf_state(t, [{"step": "3", "loss": 1.0}]), "with a step"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_bad_record_is_skipped_reported_once_and_never_met_again(tmp_path, case, fault_row):
    build, problem = BAD_RECORDS[case]
    source, append = build(tmp_path)
    assert steps(source.poll()) == [0, 1, 2, 4, 5]  # the records after it too (in the same chunk)
    assert len(source.problems) == 1 and problem in source.problems[0], source.problems
    assert source.poll() == [] and len(source.problems) == 1  # the read position is past it
    append()
    assert steps(source.poll() + source.flush()) == [6, 7] and len(source.problems) == 1
    fault_row(f"source: {case}", "the record skipped, the ones after it read; later polls never meet it again",
              "that record; one problem reported")


def test_a_text_line_whose_token_count_makes_no_number_still_gives_its_record(tmp_path):
    """`consumed tokens: inf` twice: the per-step rise is not a number (it raised out of poll); the lines'
    other values are fine, so their records come, and the count is taken as not printed."""
    path = tmp_path / "train.log"
    path.write_text("".join(megatron_line(s).replace(" |\n", f" | consumed tokens: {tokens} |\n")
                            for s, tokens in ((1, 1000), (2, "inf"), (3, "inf"), (4, 4000))))
    src = TextLogSource(path)
    got = src.poll()
    assert steps(got) == [1, 2, 3, 4] and [r.tokens for r in got] == [None, None, None, 1000]
    assert src.problems == []


def test_names_and_tags_with_numbers_int_refuses_still_sort(tmp_path):
    """File names and tags are sorted naturally (pg2 before pg10); a digit run int() refuses (too long, or
    a superscript that str.isdigit calls a digit) must not raise out of poll on every call."""
    assert sorted(["pg10", "pg2", "pg" + HUGE, "pg1²"], key=natural_key) == ["pg1²", "pg2", "pg10", "pg" + HUGE]
    d = tmp_path / "lightning"
    d.mkdir()
    (d / "events.out.tfevents.1²").write_bytes(b"".join(encode_record(scalar_event(s, {
        "train_loss": 1.0, "epoch": 0.0, "lr-Adam/pg2": 2e-3, "lr-Adam/pg" + HUGE: 1e-3})) for s in range(3)))
    src = TensorBoardSource(d, settle_s=0.0)
    got = src.poll()
    assert steps(got) == [0, 1, 2] and got[0].lr == [2e-3, 1e-3] and src.problems == []


# -- 2. an impossible record length is corruption ---------------------------------------------------


def header(length: int) -> bytes:
    """A TFRecord header whose length checksum is right: only the length itself is impossible."""
    raw = length.to_bytes(8, "little")
    return raw + masked_crc32c(raw).to_bytes(4, "little")


@pytest.mark.parametrize("length", [MAX_RECORD_BYTES + 1, 1 << 40, (1 << 64) - 1])
def test_an_impossible_record_length_is_corruption(tmp_path, length, fault_row):
    good = encode_record(b"x" * 10)
    buf = good + header(length) + good * 3
    with pytest.raises(CorruptRecord, match="length"):
        list(frames(buf, [0, 0]))
    with pytest.raises(CorruptRecord, match="length"):
        list(read_records(io.BytesIO(buf)))
    # In a run directory: the records before it are read, the damage reported once, and the file is not
    # read again (before, each poll re-read the rest of the file in ever larger chunks, holding it all).
    source, append = trainmon_run(tmp_path, [header(length)], framed=False)
    assert steps(source.poll()) == [0, 1, 2]
    assert len(source.problems) == 1 and "corrupt record" in source.problems[0] and "length" in source.problems[0]
    tail = source.state()["ranks"]["0"]
    (name,) = tail["dead"]
    at = tail["offsets"][name]
    assert f"length {length} at byte {at} " in source.problems[0]  # where it lies in the file
    append()
    assert source.poll() == [] and len(source.problems) == 1
    assert source.state()["ranks"]["0"]["offsets"][name] == at  # not read further: left at the last good record
    if length == 1 << 40:
        fault_row("source: a checksum-valid TFRecord length of 1 TiB", "the records before it read; the file not "
                  "read further (no re-reading, no memory growth)", "the rest of that file; one problem reported")


def test_a_record_larger_than_a_read_chunk_is_read_whole_once_complete(tmp_path):
    """A long record (within the bound) is waited for while incomplete and read once it is whole."""
    big = os.urandom(17 << 20)  # more than the tail's 16 MiB read chunk
    path = tmp_path / "events.out.tfevents.1"
    whole = encode_record(b"a" * 10) + encode_record(big) + encode_record(b"c" * 10)
    path.write_bytes(whole[: 30 + (8 << 20)])  # the first record and half of the big one
    tail = TensorBoardTail(tmp_path)

    def sizes() -> list[int]:
        return tail.poll_decoded(lambda name: len)

    assert sizes() == [10] and tail.offsets[path.name] == 26
    assert sizes() == [] and tail.offsets[path.name] == 26
    path.write_bytes(whole)
    assert sizes() == [len(big), 10] and tail.offsets[path.name] == len(whole) and tail.problems == []


# -- 3. problems are deduplicated and bounded -------------------------------------------------------

MANY = 500
MANY_BAD = {  # MANY bad records in one file
    "tensorboard": lambda t: hf_logdir(t, [b"\xff" * 40] * MANY),
    "megatron-text": lambda t: text_log(t, megatron_line, [megatron_line(HUGE)] * MANY),
    "llmc": lambda t: text_log(t, llmc_line, [llmc_line(HUGE)] * MANY),
}


@pytest.mark.parametrize("case", list(MANY_BAD))
def test_many_bad_records_of_one_file_are_one_counted_problem(tmp_path, case):
    source, _ = MANY_BAD[case](tmp_path)
    assert steps(source.poll()) == [0, 1, 2, 4, 5]
    assert len(source.problems) == 1 and "counted" in source.problems[0]
    assert sorted(source.problem_counts.values()) == [MANY]


def test_a_source_lists_at_most_max_problems(tmp_path):
    """Many damaged files (here a logdir of MAX_PROBLEMS + 50, each with a corrupt record): the list stops at
    MAX_PROBLEMS messages, the last saying that more were counted and not listed."""
    d = tmp_path / "hf"
    d.mkdir()
    n = MAX_PROBLEMS + 50
    for i in range(n):
        (d / f"events.out.tfevents.{i:04d}").write_bytes(encode_record(hf_event(i)) + encode_record(b"x")[:-1] + b"!")
    source = TensorBoardSource(d, settle_s=0.0)
    assert steps(source.poll()) == list(range(n))
    assert len(source.problems) == MAX_PROBLEMS and "not listed" in source.problems[-1]
    assert all("corrupt record" in p for p in source.problems[:-1])
    assert sum(source.problem_counts.values()) == n
    assert source.poll() == [] and len(source.problems) == MAX_PROBLEMS


def test_a_text_log_replaced_again_and_again_is_one_counted_problem(tmp_path):
    path = tmp_path / "train.log"
    path.write_text(megatron_line(0))
    source = TextLogSource(path)
    for k in range(1, 30):
        source.poll()
        tmp = tmp_path / "next.log"
        tmp.write_text("".join(megatron_line(s) for s in range(k + 1)))
        os.replace(tmp, path)  # a new file (inode) each time: a restart, reported once, counted
    assert steps(source.poll()) == list(range(30))
    assert len(source.problems) == 1 and "replaced" in source.problems[0]
    assert sorted(source.problem_counts.values()) == [29]


# -- 4. poll(limit) reads a bounded slice -----------------------------------------------------------

N = 300


def lightning_late_epoch(tmp: Path) -> TensorBoardSource:
    """A logdir whose framework is known only at step N/2 (Lightning's bare `loss` counts next to `epoch`):
    the first N/2 steps are held undecided and come out all at once when `epoch` appears."""
    d = tmp / "lightning"
    d.mkdir()
    (d / "events.out.tfevents.1").write_bytes(b"".join(
        encode_record(scalar_event(s, {"loss": 2.0 - s / 1000}))
        + (encode_record(scalar_event(s, {"epoch": 0.0})) if s >= N // 2 else b"") for s in range(N)))
    return TensorBoardSource(d, clock=never)


def hf_split_logdir(tmp: Path) -> TensorBoardSource:
    """Hugging Face's pattern: one event per add_scalar call, three per step."""
    d = tmp / "hf"
    d.mkdir()
    events = []
    for s in range(N):
        for part in event_pb2.Event.FromString(hf_event(s)).summary.value:
            events.append(event_pb2.Event(wall_time=1000.0 + s, step=s, summary=summary_pb2.Summary(value=[part])))
    (d / "events.out.tfevents.1").write_bytes(b"".join(encode_record(e.SerializeToString()) for e in events))
    return TensorBoardSource(d, clock=never)


def llmc_with_evals(tmp: Path) -> TextLogSource:
    """llm.c: a validation line before the training line of every 5th step (a step of two lines)."""
    path = tmp / "train.log"
    path.write_text("".join((f"s:{s} tel:{3.0 - s / 1000}\n" if s % 5 == 0 else "") + llmc_line(s) for s in range(N)))
    return TextLogSource(path)


BACKLOGS = {  # name: (the source over a backlog of N steps, whether a slice reads only about its records)
    "megatron-text": (lambda t: text_log(t, megatron_line, [megatron_line(3)], n=N)[0], True),
    "llmc": (llmc_with_evals, True),
    "tensorboard: huggingface": (hf_split_logdir, True),
    "tensorboard: undecided until late": (lightning_late_epoch, False),  # N/2 steps are read to decide
}


def read_position(source) -> int:
    s = source.state()
    return s["offset"] if s["kind"] == "text" else sum(s["tail"]["offsets"].values())


@pytest.mark.parametrize("limit", [1, 7, 64])
@pytest.mark.parametrize("case", list(BACKLOGS))
def test_poll_with_a_limit_reads_a_bounded_slice(tmp_path, case, limit):
    """The daemon's loop (poll(limit) until a poll returns fewer) reads what one poll() reads, a slice at a
    time: each poll returns at most `limit` and has read only part of the file; a restart from state()
    half-way neither repeats nor loses a step."""
    make, tight = BACKLOGS[case]
    for d in ("whole", "sliced", "restarted"):
        (tmp_path / d).mkdir()
    whole_source = make(tmp_path / "whole")
    whole = whole_source.poll() + whole_source.flush()
    assert len(whole) == N
    size = read_position(whole_source)
    source = make(tmp_path / "sliced")
    got, polls = [], 0
    while True:
        part = source.poll(limit=limit)
        assert len(part) <= limit
        got += part
        polls += 1
        if polls == 1:  # a slice, not the whole file: about the bytes of its records
            assert read_position(source) <= size * (limit + 2) // N if tight else read_position(source) < size
        if polls == 2:  # a daemon restart after the second slice
            state = json.loads(json.dumps(source.state()))
            source = make(tmp_path / "restarted")
            source.restore(state)
        if len(part) < limit:
            break  # caught up: what the daemon takes a short slice to mean
    assert source.poll(limit=limit) == []
    got += source.flush()
    assert values(got) == values(whole) and read_position(source) == size
    assert polls >= N // limit and source.problems == []
