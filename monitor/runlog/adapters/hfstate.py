"""A Source over Hugging Face Trainer's trainer_state.json (the run's `log_history`), for runs logged with
`report_to="none"` (the default since transformers 5): the state file is then the only record of the run.

`transformers.Trainer` writes trainer_state.json into every `checkpoint-N/` it saves (N = global step) and,
through `save_state()`, into `output_dir` at the end. A path to the file reads that file; a directory (an
output_dir or a checkpoint dir) reads its own trainer_state.json, or the newest checkpoint's when that one
is further on (its N beyond the top-level file's global_step, or no top-level file): one run, not one per
checkpoint.

Each `log_history` entry is turned into the TensorBoard tags HF's TensorBoardCallback would write for it
(`rewrite_logs`: `eval_x` -> `eval/x`, `test_x` -> `test/x`, else `train/x`) and mapped by the same
`frameworks.HUGGINGFACE` table (and `--map`, with those tag names) as a TensorBoard logdir: `train/loss`,
`train/learning_rate`, `train/grad_norm`, `eval/loss` -> scalars["val_loss"]. Entries of one step are
merged; a step with no training entry (an evaluation only, or the end-of-training summary's
`train_loss`/`train_runtime`/...) yields no record. Non-numeric values are ignored; NaN stays NaN.

Steps: StepRecord.step is HF's `step` as written, i.e. `global_step` after the optimizer step (the first
optimizer step is logged at 1). The TensorBoard source keeps it the same way (TensorBoardCallback logs at
`state.global_step`), so a run read from either gives the same steps, and an alert names the step of HF's
own logs and `checkpoint-N` directories. Records carry the file's modification time (the file has none).

Tailing: the file is rewritten whole, not atomically, at each save. poll() parses it again only when its
(inode, size, mtime) changed or the last parse failed, and returns the steps after the last one read. A file
that does not parse (caught mid-rewrite, or damaged) is reported in `problems` and tried again at the next
poll (`monitor check` fails on a file that never parsed: `unrecognized`). When the history no longer
continues what was read (it ends before the last step read, or its first entry at that step differs: a run
resumed from an earlier checkpoint, or a new run in the same directory), that is reported and reading goes
on after the last step the new history shares with the previous version of the file (a resumed run's new
steps come out, not the history it kept), or from its start (another run; or after a daemon restart, when
the previous version is not known). Only `json` is used to read it.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any

from monitor import jsontext
from monitor.runlog.adapters.frameworks import HUGGINGFACE, TagMap, validate_mapping
from monitor.runlog.sources import ProblemLog
from monitor.schema import MAX_STEP, RunInfo, StepRecord

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def newest_checkpoint(directory: Path) -> tuple[int, Path] | None:
    """(N, path) of the highest `checkpoint-N/trainer_state.json` in `directory`, or None.
    Raises OSError when the directory is unreadable."""
    best: tuple[int, Path] | None = None
    with os.scandir(directory) as it:
        for e in it:
            m = CHECKPOINT_DIR.match(e.name)
            if m is None or (best is not None and int(m.group(1)) <= best[0]):
                continue
            state = Path(e.path) / TRAINER_STATE
            if state.is_file():
                best = (int(m.group(1)), state)
    return best


def is_hf_output(directory: Path) -> bool:
    """Whether `directory` holds a trainer_state.json or a checkpoint-N/ with one (never raises)."""
    try:
        return (directory / TRAINER_STATE).is_file() or newest_checkpoint(directory) is not None
    except OSError:
        return False


def tags_of(entry: dict[str, Any]) -> dict[str, float]:
    """A log_history entry's numeric values under the tags TensorBoardCallback gives them (`rewrite_logs`)."""
    out: dict[str, float] = {}
    for k, v in entry.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        try:
            x = float(v)
        except OverflowError:  # an int beyond float's range
            x = math.inf if v > 0 else -math.inf
        if k.startswith("eval_"):
            out["eval/" + k[5:]] = x
        elif k.startswith("test_"):
            out["test/" + k[5:]] = x
        else:
            out["train/" + k] = x
    return out


def _canonical(entry: Any) -> str:
    return json.dumps(entry, sort_keys=True, default=str)


def _fingerprint(entry: Any) -> int:
    return zlib.crc32(_canonical(entry).encode())


class HFStateSource:
    """A Source over one Hugging Face run's trainer_state.json (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], mapping: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.is_file = self.path.name == TRAINER_STATE and not self.path.is_dir()
        d = self.path.parent if self.is_file else self.path
        name = d.name or d.resolve().name
        if CHECKPOINT_DIR.match(name):  # a checkpoint of run X is run X
            name = d.resolve().parent.name or name
        self.info = RunInfo(run_id=name, source="huggingface", created=0.0)
        self.tagmap = TagMap(HUGGINGFACE, validate_mapping(mapping))
        self.problems: list[str] = []
        self.file: Path | None = None  # the file read last
        self.last_step: int | None = None  # the newest step read
        self.fingerprint: int | None = None  # CRC of the first log_history entry at last_step (canonical JSON)
        self._previous: dict[int, int] = {}  # {step: fingerprint} of the file's previous version (this process)
        self._failure: str | None = None  # why the last parse failed
        self._parsed = False  # a file parsed once
        self._seen: tuple[str, int, int, int] | None = None  # (file, inode, size, mtime) last parsed whole
        self._top: tuple[tuple[int, int, int], int | None] | None = None  # the top-level file's key, global_step
        self._problems = ProblemLog(self.problems)  # one message per file and kind, at most MAX_PROBLEMS

    def _report(self, key: str, message: str) -> None:
        self._problems.report(key, message)

    @property
    def problem_counts(self) -> dict[str, int]:
        return self._problems.counts

    # -- which file -------------------------------------------------------------------------------

    def _choose(self) -> tuple[Path, dict[str, Any] | None, os.stat_result] | None:
        """The file that is the run now, with its parsed content when it already had to be parsed."""
        if self.is_file:
            st = self._stat(self.path)
            return None if st is None else (self.path, None, st)
        try:
            ckpt = newest_checkpoint(self.path)
        except FileNotFoundError:
            self._report("dir-gone", f"{self.path}: the directory vanished")
            return None
        except OSError as e:
            self._report("dir", f"{self.path}: unreadable: {e.strerror or e}")
            return None
        top = self.path / TRAINER_STATE
        st = self._stat(top, quiet=ckpt is not None)
        if st is None:
            if ckpt is None:
                return None
            st = self._stat(ckpt[1])
            return None if st is None else (ckpt[1], None, st)
        if ckpt is None:
            return top, None, st
        state = None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._top is None or self._top[0] != key:
            state = self._parse(top, st)
            if state is None:
                return None  # reported; tried again next poll
            gs = state.get("global_step")
            self._top = (key, gs if isinstance(gs, int) and not isinstance(gs, bool) else None)
        gs = self._top[1]
        if gs is not None and gs < ckpt[0]:
            st2 = self._stat(ckpt[1])  # a top-level file left from before: the checkpoint is further on
            return None if st2 is None else (ckpt[1], None, st2)
        return top, state, st

    def _stat(self, path: Path, quiet: bool = False) -> os.stat_result | None:
        try:
            return os.stat(path)
        except FileNotFoundError:
            if not quiet:
                what = "vanished" if self.last_step is not None else "does not exist"
                self._report(f"gone:{path}", f"{path}: the file {what}")
            return None
        except OSError as e:
            self._report(f"stat:{path}", f"{path}: unreadable: {e.strerror or e}")
            return None

    def _parse(self, path: Path, st: os.stat_result) -> dict[str, Any] | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return self._fail(f"read:{path}:{st.st_mtime_ns}", f"{path}: unreadable: {e.strerror or e}")
        try:
            state = jsontext.loads(data)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return self._fail(f"json:{path}:{st.st_mtime_ns}:{len(data)}",
                              f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:120]}; caught mid-rewrite, or "
                              "damaged); reading it again at the next poll")
        if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
            return self._fail(f"shape:{path}:{st.st_mtime_ns}:{len(data)}",
                              f"{path}: not a Trainer state (no log_history list); reading it again at the next poll")
        self._failure = None
        return state

    def _fail(self, key: str, message: str) -> None:
        self._failure = message
        self._report(key, message)

    @property
    def unrecognized(self) -> str | None:
        """Why no records can come from this run (no state file has parsed yet), else None."""
        return None if self._parsed else self._failure

    # -- reading ----------------------------------------------------------------------------------

    def poll(self, limit: int | None = None) -> list[StepRecord]:
        """The records of the steps logged since the last call. The file is one JSON document, parsed
        whole; with `limit`, at most that many records a call: the next call parses it again and goes
        on after the last step given."""
        out: list[StepRecord] = []
        chosen = self._choose()
        if chosen is None:
            return out
        path, state, st = chosen
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if key == self._seen:
            return out
        if state is None:
            state = self._parse(path, st)
            if state is None:
                self._seen = None
                return out
        self._seen, self.file, self._parsed = key, path, True
        if not self.info.created:
            self.info.created = st.st_mtime
        ms = state.get("max_steps")
        if isinstance(ms, int) and not isinstance(ms, bool) and ms > 0:
            self.info.max_steps = ms
        steps, firsts = self._group(path, state["log_history"])
        last = self.last_step
        if last is not None and firsts.get(last) != self.fingerprint:
            end = max(steps, default=None)
            how = "is empty" if end is None else f"ends at step {end}" if end < last else f"differs at step {last}"
            shared = None  # the last step of the history this version shares with the previous one
            for step in sorted(firsts):
                if self._previous.get(step) != firsts[step]:
                    break
                shared = step
            where = f"after step {shared}" if shared is not None else "from its start"
            self._report(f"restart:{key}", f"{path}: the log history no longer continues the steps read (it {how}, "
                         f"after step {last} was read: a resumed or new run?); reading it again {where}")
            self.last_step, self.fingerprint = shared, None if shared is None else firsts[shared]
        self._previous = firsts
        for step in sorted(s for s in steps if self.last_step is None or s > self.last_step):
            if limit is not None and len(out) >= limit:
                self._seen = None  # steps left in this version of the file
                break
            r = self.tagmap.record(step, st.st_mtime, steps[step])
            if r is not None:
                out.append(r)
            self.last_step, self.fingerprint = step, firsts[step]
        return out

    def _group(self, path: Path, history: list[Any]) -> tuple[dict[int, dict[str, float]], dict[int, int]]:
        """{step: merged tag values} and {step: fingerprint of its first entry} of a log_history."""
        steps: dict[int, dict[str, float]] = {}
        firsts: dict[int, int] = {}
        for i, entry in enumerate(history):
            step = entry.get("step") if isinstance(entry, dict) else None
            if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
                self._report(f"entry:{path}", f"{path}: log_history[{i}] is not an entry with a step from 0 to "
                             f"{MAX_STEP} ({_canonical(entry)[:80]}); skipped such entries")
                continue
            values = steps.get(step)
            if values is None:
                steps[step], firsts[step] = tags_of(entry), _fingerprint(entry)
            else:
                values.update(tags_of(entry))
        return steps, firsts

    def flush(self) -> list[StepRecord]:
        return []  # each saved file holds whole steps: nothing is held back

    # -- positions --------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"kind": "huggingface", "last_step": self.last_step, "fingerprint": self.fingerprint,
                "created": self.info.created, "max_steps": self.info.max_steps}

    def restore(self, state: dict[str, Any]) -> None:
        last = state.get("last_step")
        self.last_step = int(last) if last is not None else None
        fp = state.get("fingerprint")
        self.fingerprint = int(fp) if fp is not None else None
        if state.get("created"):
            self.info.created = float(state["created"])
        if state.get("max_steps"):
            self.info.max_steps = int(state["max_steps"])
        self._seen, self._previous = None, {}  # parsed again at the next poll: steps after last_step come out
