"""Runs of any kind as Sources: trainmon run dirs, other frameworks' TensorBoard logdirs, state and CSV
files, text logs.

`open_source(path, mapping)` opens one run:

- a directory with run.json: trainmon's own run (`TrainmonSource`, every rank);
- a directory with `*tfevents*` files: a TensorBoard logdir of Hugging Face Trainer, PyTorch
  Lightning, Megatron-LM, or any other writer whose tags `mapping` names (`TensorBoardSource`);
- a directory with trainer_state.json, or with `checkpoint-N/trainer_state.json`: a Hugging Face
  Trainer output_dir (or one checkpoint), read from its newest state file (`HFStateSource`);
- a directory with metrics.csv: a PyTorch Lightning CSVLogger `version_N/` (`LightningCSVSource`);
- a text file: a Megatron-LM iteration log or an llm.c log, sniffed from its head (`TextLogSource`).
  (A path to run.json or to an event file opens its directory; a path to trainer_state.json or to a
  `.csv` file opens that file.)

`discover(paths)` lists the runs under some paths, cheaply enough to call every few seconds.
Nothing here imports torch.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from monitor.runlog.adapters.frameworks import SIGNALS, MappingError, validate_mapping
from monitor.runlog.adapters.hfstate import CHECKPOINT_DIR, TRAINER_STATE, HFStateSource, is_hf_output
from monitor.runlog.adapters.lightningcsv import HPARAMS_YAML, METRICS_CSV, LightningCSVSource
from monitor.runlog.adapters.strict import not_regular
from monitor.runlog.adapters.tbtail import TensorBoardTail, event_file_names, is_event_file
from monitor.runlog.adapters.tensorboard import TensorBoardSource
from monitor.runlog.adapters.text import HEAD_BYTES, TextLogSource, sniff_file
from monitor.runlog.adapters.trainmon import TrainmonSource
from monitor.runlog.rundir import INTEGRATION_RUNS, RUN_JSON
from monitor.runlog.sources import Source, SourceError
from monitor.schema import StepRecord

__all__ = [
    "SIGNALS", "HFStateSource", "LightningCSVSource", "MappingError", "Source", "SourceError", "TensorBoardSource",
    "TensorBoardTail", "TextLogSource", "TrainmonSource", "discover", "open_source", "read_all", "validate_mapping",
]

TEXT_SUFFIXES = (".log", ".txt", ".out")
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})


def _not_a_file(path: Path) -> None:
    """SourceError when `path` exists but is not a regular file (a directory, a FIFO that a read would
    block on): named for what it is, rather than said to be missing."""
    try:
        kind = not_regular(path.stat().st_mode)
    except OSError:
        return
    if kind is not None:
        raise SourceError(f"{path} is {kind}, not a file: unreadable")


def open_source(path: str | os.PathLike[str], mapping: dict[str, str] | None = None, *,
                settle_s: float | None = None) -> Source:
    """The run at `path` as a Source; raises SourceError naming the path and what was looked for.

    `mapping` ({signal: tag}, see `frameworks`) applies to TensorBoard logdirs, Hugging Face state files
    (their keys as TensorBoard tags: `train/loss`, `eval/accuracy`) and Lightning CSVs (column names);
    `settle_s` is how long a TensorBoard or CSV source waits for more scalars of its newest step before
    poll() releases it.
    """
    p = Path(path)
    mapping = validate_mapping(mapping)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise SourceError(f"{p}: no such directory or log file") from None
    except OSError as e:
        raise SourceError(f"{p}: unreadable: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        if (p / RUN_JSON).is_file():
            return TrainmonSource(p)
        try:
            names = event_file_names(p)
        except OSError as e:
            raise SourceError(f"{p}: unreadable directory: {e.strerror or e}") from None
        if names:
            return TensorBoardSource(p, mapping, settle_s=settle_s)
        if is_hf_output(p):
            return HFStateSource(p, mapping)
        if (p / METRICS_CSV).is_file():
            return LightningCSVSource(p, mapping, settle_s=settle_s)
        _not_a_file(p / RUN_JSON)
        below = [q for q in discover([p], max_depth=3) if q != p]
        hint = ""
        if below:
            shown = ", ".join(str(q) for q in below[:5]) + (f" and {len(below) - 5} more" if len(below) > 5 else "")
            hint = f"; runs below it: {shown} (pass one of them)"
        raise SourceError(f"{p}: not a trainmon run directory (no {RUN_JSON}) nor a TensorBoard logdir (no "
                          f"*tfevents* files in it), nor a Hugging Face output_dir (no {TRAINER_STATE}, no "
                          f"checkpoint-N/{TRAINER_STATE}) nor a Lightning CSVLogger directory (no {METRICS_CSV}){hint}")
    if p.name == RUN_JSON:
        return TrainmonSource(p.parent)
    if is_event_file(p.name):
        return open_source(p.parent, mapping, settle_s=settle_s)
    if p.name == TRAINER_STATE:
        return HFStateSource(p, mapping)
    if p.suffix == ".csv":
        return LightningCSVSource(p, mapping, settle_s=settle_s)
    return TextLogSource(p)


def read_all(source: Source) -> dict[int, list[StepRecord]]:
    """Every record of a source, by rank in reading order (attempt after attempt: see
    `monitor.runlog.attempts.lineage` for the ones that count).

    Raises SourceError when a TensorBoard logdir (or a CSV) has no tags of a known framework and no mapping.
    """
    records = source.poll()
    records += source.flush()
    why = getattr(source, "unrecognized", None)
    if why:
        raise SourceError(why)
    by_rank: dict[int, list[StepRecord]] = {}
    for r in records:
        by_rank.setdefault(r.rank, []).append(r)
    return dict(sorted(by_rank.items()))


# -- discovery -------------------------------------------------------------------------------------

# path -> (st_dev, st_ino, bytes seen when sniffed, format name or None): each text file's head is
# read once (again only while a negative file is still shorter than the sniffed head).
_SNIFFED: dict[str, tuple[int, int, int, str | None]] = {}
_SNIFF_CACHE_MAX = 50_000


def _sniffs(path: str, st: os.stat_result) -> bool:
    hit = _SNIFFED.get(path)
    if hit is not None and hit[0] == st.st_dev and hit[1] == st.st_ino:
        if hit[3] is not None:
            return True
        if hit[2] >= HEAD_BYTES or hit[2] == st.st_size:
            return False
    if st.st_size == 0:
        return False
    fmt = sniff_file(Path(path))
    if len(_SNIFFED) >= _SNIFF_CACHE_MAX:
        _SNIFFED.clear()
    _SNIFFED[path] = (st.st_dev, st.st_ino, min(st.st_size, HEAD_BYTES), fmt.name if fmt else None)
    return fmt is not None


def _holds_run(d: Path) -> bool:
    try:
        with os.scandir(d) as it:
            return any(e.is_dir() and os.path.isfile(os.path.join(e.path, RUN_JSON)) for e in it)
    except OSError:
        return False


def discover(paths: Iterable[str | os.PathLike[str]], *, max_depth: int = 12) -> list[Path]:
    """Runs under `paths`: trainmon run dirs (not their rank<N>/ subdirs), other directories holding
    tfevents files (but a directory holding trainmon/<run>/, where a framework callback of ours wrote,
    is that run only: the framework's own logs beside it are the same training), Hugging Face output_dirs (trainer_state.json in them or in a checkpoint-N/: one run,
    its checkpoint dirs are not looked into), Lightning CSVLogger dirs (metrics.csv next to hparams.yaml),
    and *.log / *.txt / *.out files that sniff as a known text log (a file named directly is sniffed
    whatever its suffix). Hidden directories and __pycache__/node_modules/site-packages are skipped,
    symlink loops are not followed, and text heads are read once per file.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    visited: set[tuple[int, int]] = set()

    def add(p: Path) -> None:
        if p not in seen:
            seen.add(p)
            found.append(p)

    def walk(d: Path, depth: int) -> None:
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in visited:
                return
            visited.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            return
        subdirs: list[Path] = []
        checkpoints: list[Path] = []
        texts: list[os.DirEntry[str]] = []
        has_events = False
        names: set[str] = set()
        for e in entries:
            name = e.name
            try:
                if e.is_dir():
                    if CHECKPOINT_DIR.match(name):
                        checkpoints.append(Path(e.path))
                    elif not name.startswith(".") and name not in SKIP_DIRS:
                        subdirs.append(Path(e.path))
                elif name == RUN_JSON:
                    add(d)
                    return  # a trainmon run: its rank<N>/ subdirs are part of it
                elif is_event_file(name):
                    has_events = True
                elif name.endswith(TEXT_SUFFIXES):
                    texts.append(e)
                elif name in (TRAINER_STATE, METRICS_CSV, HPARAMS_YAML):
                    names.add(name)
            except OSError:
                continue
        ours = next((s for s in subdirs if s.name == INTEGRATION_RUNS), None)
        if ours is not None and _holds_run(ours):
            # A framework directory a trainmon callback wrote into (<output_dir>/trainmon/<run>): the
            # framework's own logs beside it are the same training, read less fully. Ours only.
            walk(ours, depth + 1)
            return
        if has_events:
            add(d)
        if TRAINER_STATE in names or any((c / TRAINER_STATE).is_file() for c in checkpoints):
            add(d)  # a Hugging Face output_dir: its checkpoint-N/ are states of this one run
        else:
            subdirs += checkpoints
        if METRICS_CSV in names and HPARAMS_YAML in names:
            add(d)
        for e in sorted(texts, key=lambda e: e.name):
            try:
                if e.is_file() and _sniffs(e.path, e.stat()):
                    add(Path(e.path))
            except OSError:
                continue
        if depth < max_depth:
            for sub in sorted(subdirs):
                walk(sub, depth + 1)

    for path in paths:
        p = Path(path)
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            walk(p, 0)
        elif p.name in (RUN_JSON, TRAINER_STATE, METRICS_CSV) or is_event_file(p.name):
            add(p.parent)
        elif stat.S_ISREG(st.st_mode) and _sniffs(str(p), st):
            add(p)
    return found
