"""Bad input to the text-log and Lightning CSV readers (a fuzzing pass's findings), in real files.

1. Lines are split and parsed in time linear in their length: an unterminated last line of megabytes
   (a log being written), or a long line built to make a regex backtrack, is read at once; a partial
   last line still waits for its end, and a line over CHUNK_BYTES is skipped and reported once.
2. A number must be ASCII numeric syntax ("1_000", "١٢", " 13 " are what float()/int() take but no
   logger writes): a bad value is left out and reported, a bad step skips its line or row, reported.
3. A negative step in a Lightning CSV skips its row, reported.
4. A CSV saved with a UTF-8 byte order mark is read; columns sharing a name: the first is read, reported.
5. A FIFO (or another non-regular file) is refused with SourceError before it is opened (it would block).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from monitor.cli.app import app
from monitor.runlog.adapters import LightningCSVSource, SourceError, TextLogSource, open_source
from monitor.runlog.adapters.text import CHUNK_BYTES, line_ends

MiB = 1024 * 1024
runner = CliRunner()


def llmc(step: int, loss: float = 2.0) -> bytes:
    return f"s:{step} trl:{loss} lr:0.001 norm:0.5\n".encode()


def megatron(step: int) -> bytes:
    return f" iteration {step:>8}/ 1000 | learning rate: 1.000E-03 | lm loss: {2.0 - step / 100:.6E} |\n".encode()


def drain(src, limit: int | None) -> list:
    """poll() until it has nothing more (with a limit, call after call)."""
    out: list = []
    while True:
        got = src.poll(limit)
        out += got
        if limit is None or len(got) < limit:
            return out


# -- 1. linear time --------------------------------------------------------------------------------


@pytest.mark.parametrize("buf, ends", [
    (b"", []),
    (b"no end yet", []),
    (b"a\n", [2]),
    (b"a\r\nb\rc\n", [3, 5, 7]),  # \r\n is one end; a lone \r (progress output) is one too
    (b"\r\n\n\r\r", [2, 3, 4, 5]),
    (b"a\nb", [2]),  # "b" is a partial last line
    (b"a\r", [2]),  # a \r at the end of a read ends its line (a \n read next is an empty line)
])
def test_line_ends(buf, ends):
    assert list(line_ends(buf)) == ends


class CountedFinds(bytes):
    """bytes whose find() calls are recorded: the work line_ends does, counted whatever the machine."""

    def find(self, sub, start=0, *rest):  # type: ignore[override]
        self.finds.append((sub, start))
        return super().find(sub, start, *rest)


@pytest.mark.parametrize("tail", [b"\n", b"\r"])
def test_line_ends_looks_at_each_byte_once_however_long_the_unterminated_tail(tail):
    """The same number of find() calls for a 1 MiB and a 4 MiB last line without an end, and each call
    starts past the one before for that end character: every byte is looked at once per end character
    (a regex retried at each byte of the tail did len(tail)**2 / 2 steps)."""
    counts = []
    for size in (MiB, 4 * MiB):
        buf = CountedFinds(b"s:1 trl:1 lr:0.1 norm:1" + tail) * 3
        buf = CountedFinds(buf + b"x" * size)
        buf.finds = []
        assert list(line_ends(buf)) == [24, 48, 72]
        for sub in (b"\n", b"\r"):
            starts = [s for c, s in buf.finds if c == sub]
            assert starts == sorted(set(starts)), starts  # never back over bytes already looked at
        counts.append(len(buf.finds))
    assert counts[0] == counts[1] <= 2 + 3


READ = """
import json, sys
from monitor.runlog.adapters import open_source
path, append, limit = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]) or None
def drain(src):
    out = []
    while True:
        got = src.poll(limit)
        out += got
        if limit is None or len(got) < limit:
            return out
src = open_source(path)
first = [r.step for r in drain(src)]
with open(path, "ab") as f:
    f.write(append)
second = [r.step for r in drain(src) + src.flush()]
print(json.dumps({"first": first, "second": second, "problems": src.problems, "counts": src.problem_counts}))
"""

# name: (the file, bytes appended after the first read, steps of each read, a problem reported or None).
# Each but the last took the regex-based reader from tens of minutes to days (the last, seconds: the
# sniffed head is 64 KiB); read in linear time, each takes well under a second.
ADVERSARIAL = {
    "a 4 MiB unterminated last line waits for its end": (
        llmc(0) + llmc(1) + llmc(2) + b"s:3 trl:1.5 lr:0.1 norm:1" + b" " * (4 * MiB), b"\n" + llmc(4),
        [0, 1, 2], [3, 4], None),
    "a 16 MiB line without an end is skipped, once": (
        megatron(1) + megatron(2) + b"x" * (16 * MiB), b"x\n" + megatron(4),
        [1, 2], [4], f"a line longer than {CHUNK_BYTES} bytes at byte"),
    "a 1 MiB llm.c-style line that is no record": (
        llmc(0) + b" s:1 a:1" * (MiB // 8) + b" !\n" + llmc(1), llmc(2),
        [0, 1], [2], None),
    "a 1 MiB llm.c line of pairs": (
        llmc(0) + b"s:1" + b" a:1" * (MiB // 4) + b" trl:1.5\n", llmc(2),
        [0, 1], [2], None),
    "a Megatron field padded with 1 MiB of spaces": (
        megatron(1) + b" iteration 2/ 1000 | lm loss:" + b" " * MiB + b"x |\n" + megatron(3), megatron(4),
        [1, 3], [4], "lm loss="),
    "64 KiB of dashes in the sniffed head": (
        llmc(0) + b"-" * (64 * 1024) + b"\n" + llmc(1), llmc(2),
        [0, 1], [2], None),
}


@pytest.mark.slow
@pytest.mark.parametrize("limit", [0, 3])
@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_long_lines_are_read_in_linear_time(tmp_path, case, limit):
    """In a child process with a 60 s timeout: a quadratic split or parse exceeds it by orders of
    magnitude (it cannot be interrupted in-process: the regex engine holds the interpreter)."""
    content, append, first, second, problem = ADVERSARIAL[case]
    path = tmp_path / "train.log"
    path.write_bytes(content)
    done = subprocess.run([sys.executable, "-c", READ, str(path), append.hex(), str(limit)],
                          capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(done.stdout)
    assert (got["first"], got["second"]) == (first, second)
    if problem is None:
        assert got["problems"] == []
    else:
        assert len(got["problems"]) == 1 and problem in got["problems"][0], got["problems"]
        assert list(got["counts"].values()) == [1]  # one line: one report (the 16 MiB one spans chunks)


# -- 2. numbers in ASCII syntax only ---------------------------------------------------------------

# name: (lines, (step, loss, lr) of each record, a problem reported or None)
TEXT_NUMBERS = {
    "llmc: an underscore in a loss": (
        [b"s:5 trl:1_000 lr:0.1 norm:1\n", llmc(6)], [(5, None, [0.1]), (6, 2.0, [1e-3])], "trl='1_000'"),
    "llmc: Arabic-Indic digits in a loss": (
        ["s:5 trl:١٢ lr:0.1 norm:1\n".encode(), llmc(6)], [(5, None, [0.1]), (6, 2.0, [1e-3])], "trl='١٢'"),
    "llmc: Arabic-Indic digits in a step": (
        ["s:١٢ trl:1.0 lr:0.1 norm:1\n".encode(), llmc(6)], [(6, 2.0, [1e-3])], "step '١٢' is not a whole number"),
    "llmc: printf's spellings are numbers": (
        [b"s:5 trl:-nan lr:+1.5E-04 norm:inf\n", b"s:6 trl:.5 lr:1. norm:NAN\n"],
        [(5, math.nan, [1.5e-4]), (6, 0.5, [1.0])], None),
    "megatron: Arabic-Indic digits in a learning rate": (
        [" iteration 5/ 10 | learning rate: ١٢ | lm loss: 2.0 |\n".encode(), megatron(6)],
        [(5, 2.0, []), (6, 1.94, [1e-3])], "learning rate='١٢'"),
    "megatron: Arabic-Indic digits in an iteration": (
        [" iteration ١٢/ 10 | lm loss: 2.0 |\n".encode(), megatron(6)],
        [(6, 1.94, [1e-3])], "iteration '١٢' is not a whole number"),
    "llmc: a step past int64": (
        [b"s:99999999999999999999 trl:1.0 lr:0.1 norm:1\n", llmc(6)], [(6, 2.0, [1e-3])],
        "step '99999999999999999999' is outside 0..9223372036854775807"),
    "llmc: a negative step": (
        [b"s:-1 trl:1.0 lr:0.1 norm:1\n", llmc(6)], [(6, 2.0, [1e-3])], "step '-1' is outside 0..9223372036854775807"),
    "megatron: a negative iteration": (
        [b" iteration -3/ 10 | lm loss: 2.0 |\n", megatron(6)], [(6, 1.94, [1e-3])],
        "iteration '-3' is outside 0..9223372036854775807"),
    "megatron: an extra field that is text is no problem": (
        [b" iteration 5/ 10 | lm loss: 2.0 | mode: train |\n"], [(5, 2.0, [])], None),
}


@pytest.mark.parametrize("case", list(TEXT_NUMBERS))
def test_text_log_numbers_are_ascii_syntax(tmp_path, case):
    lines, expected, problem = TEXT_NUMBERS[case]
    path = tmp_path / "train.log"
    path.write_bytes(b"".join(lines))
    src = TextLogSource(path)
    got = [(r.step, r.loss, r.lr) for r in src.poll() + src.flush()]
    assert len(got) == len(expected), got
    for (step, loss, lr), (s, x, y) in zip(got, expected):
        assert (step, lr) == (s, y)
        assert loss is None if x is None else loss == pytest.approx(x, nan_ok=True)
    if problem is None:
        assert src.problems == []
    else:
        assert len(src.problems) == 1 and problem in src.problems[0], src.problems
        assert "byte 0" in src.problems[0]  # the line is named (by its byte offset, as text logs are read)


HEAD = "epoch,step,train_loss\n"

# name: (the file, (step, loss) of each record, the problems reported)
CSV_CASES = {
    "an underscore in a loss": (HEAD + "0,1,3.0\n0,2,3_0\n0,3,2.5\n", [(1, 3.0), (3, 2.5)],
                                ["row 2: train_loss='3_0' is not a number"]),
    "Arabic-Indic digits in a loss": (HEAD + "0,1,3.0\n0,2,١٢\n", [(1, 3.0)], ["row 2: train_loss='١٢' is not"]),
    "steps int() takes but are no whole numbers": (
        HEAD + "0,1_0,3.0\n0,١٢,3.0\n0, 13 ,3.0\n0,1.0,3.0\n0,14,2.0\n", [(14, 2.0)],
        ["row 1 has no whole-number step ('1_0')"]),  # the others are counted under the same message
    "negative steps": (HEAD + "0,-5,3.0\n0,-4,3.0\n0,0,2.0\n0,1,1.5\n", [(0, 2.0), (1, 1.5)],
                       ["row 1 has a step outside 0..9223372036854775807 (-5)"]),
    "a step past int64": (HEAD + "0,0,2.0\n0,99999999999999999999,3.0\n0,1,1.5\n", [(0, 2.0), (1, 1.5)],
                          ["row 2 has a step outside 0..9223372036854775807 (99999999999999999999)"]),
    "a UTF-8 byte order mark (Excel)": ("\ufeffstep,train_loss,epoch\n0,3.0,0\n1,2.9,0\n", [(0, 3.0), (1, 2.9)], []),
    "a quoted header after a byte order mark": ('\ufeff"step","train_loss","epoch"\n0,3.0,0\n', [(0, 3.0)], []),
    "columns sharing a name: the first is read": (
        "epoch,step,train_loss,train_loss\n0,0,3.0,9.0\n0,1,2.5,9.0\n", [(0, 3.0), (1, 2.5)],
        ["the header names 'train_loss' more than once; read the first column"]),
}


@pytest.mark.parametrize("limit", [None, 1])
@pytest.mark.parametrize("case", list(CSV_CASES))
def test_lightning_csv_bad_cells_and_headers(tmp_path, case, limit):
    content, expected, problems = CSV_CASES[case]
    path = tmp_path / "version_0" / "metrics.csv"
    path.parent.mkdir()
    path.write_bytes(content.encode("utf-8"))  # "\ufeff" is written as the BOM's three bytes
    src = LightningCSVSource(path.parent, clock=lambda: 0.0)
    got = [(r.step, r.loss) for r in drain(src, limit) + src.flush()]
    assert got == [(s, pytest.approx(x)) for s, x in expected]
    assert len(src.problems) == len(problems), src.problems
    for message, wanted in zip(src.problems, problems):
        assert wanted in message


def test_check_reads_a_csv_saved_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"\xef\xbb\xbfstep,train_loss,epoch\n" + b"".join(f"{s},{3 - s / 10},0\n".encode()
                                                                          for s in range(5)))
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert "5 step records from 1 rank(s), 0 alert(s)" in result.stdout


# -- 5. only regular files --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train.log", "metrics.csv"])
def test_a_fifo_is_refused_before_it_is_opened(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match=r"FIFO \(named pipe\), not a regular file"):
        open_source(fifo)  # opening it would block until a writer came
    with pytest.raises(SourceError, match="FIFO"):
        (TextLogSource(fifo, "llmc") if name.endswith(".log") else LightningCSVSource(fifo))
    result = runner.invoke(app, ["check", str(fifo)])
    assert result.exit_code == 2 and "not a regular file" in result.output, result.output


@pytest.mark.parametrize("name", ["train.log", "metrics.csv"])
def test_a_file_replaced_by_a_fifo_is_reported_not_read(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(llmc(0) + llmc(1) if name.endswith(".log") else (HEAD + "0,0,3.0\n0,1,2.5\n").encode())
    src = open_source(path)
    assert [r.step for r in src.poll()] in ([0, 1], [0])  # the CSV holds step 1 until it settles
    path.unlink()
    os.mkfifo(path)
    assert src.poll() == [] and src.poll() == []  # returns: not blocked in open()
    assert len(src.problems) == 1 and "FIFO (named pipe) now, not a regular file" in src.problems[0], src.problems


def test_a_directory_named_like_a_log_is_refused(tmp_path):
    (tmp_path / "train.log").mkdir()
    with pytest.raises(SourceError, match="a directory, not a regular file"):
        TextLogSource(Path(tmp_path / "train.log"), "llmc")
