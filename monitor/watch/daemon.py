"""`monitor watch`: many runs, one rules engine each, one /metrics, alerts to every sink.

The loop: every `discover_every` seconds look for new runs under the watched paths (and forget
deleted ones); every `poll_every` seconds read what each run appended since the last poll, run
it through that run's rules engine and metrics, and let time-based rules (run.stalled) look at
the clock. Nothing a run does (a corrupt file, a vanished directory) stops the loop: problems
are reported once per run and counted. No torch here.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from monitor.config import MonitorConfig
from monitor.exporters.prometheus import MetricFamilies, TrainMetrics
from monitor.exporters.ruleconfig import rule_config
from monitor.rules.engine import RulesEngine
from monitor.runlog.attempts import describe
from monitor.runlog.sources import Source
from monitor.schema import Alert, RunInfo, StepRecord
from monitor.watch.health import WatchHealth
from monitor.watch.run import RunAlertSink, WatchedRun
from monitor.watch.state import REPLAY_STEPS, SavedRun, WatchState

POLL_SLICE = 8192  # records of a run read, judged and freed at a time (memory stays bounded)
ERROR_LOG_SECONDS = 60.0  # the same error, in the same place, is logged at most this often

log = logging.getLogger("trainmon.watch")


class Watcher:
    def __init__(
        self,
        paths: Iterable[str | Path],
        config: MonitorConfig,
        *,
        state_dir: Path | None = None,
        mapping: dict[str, str] | None = None,
        registry: CollectorRegistry | None = None,
        sinks: Iterable[Any] = (),
        on_event: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.config = config
        self.mapping = mapping
        self.registry = registry or CollectorRegistry()
        self.families = MetricFamilies(self.registry)
        self.health = WatchHealth(self.registry)
        self.sinks = list(sinks)
        self.on_event = on_event or (lambda line: None)
        self.clock = clock
        self.runs: dict[str, WatchedRun] = {}
        self.alert_log: deque[Alert] = deque(maxlen=200)
        self.state = WatchState(state_dir) if state_dir is not None else None
        self._saved: dict[str, SavedRun] = {}
        self._first_scan = True
        self.stall_floor = float(rule_config("run.stalled", config).floor_seconds)  # only runs seen since can stall
        self._unreadable: set[str] = set()
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None  # run()'s: a long backlog stops reading when it is set
        self._logged: dict[str, float] = {}  # where -> when its error was last logged
        self._quiet: dict[str, int] = {}  # where -> errors counted since, not logged
        if self.state is not None:
            for problem in self.state.load():
                self._event(f"warning: {problem}")
            self._saved = dict(self.state.runs)

    # -- events ----------------------------------------------------------------------------

    def _event(self, line: str) -> None:
        try:
            self.on_event(line)
        except Exception:  # a broken view must not stop the daemon
            self.health.errors.inc()

    def _error(self, where: str, exc: BaseException) -> None:
        """Counted every time; logged at most once per ERROR_LOG_SECONDS per place (a run that fails on
        every pass would otherwise log twice a second, forever)."""
        self.health.errors.inc()
        now = time.monotonic()
        last = self._logged.get(where)
        if last is not None and now - last < ERROR_LOG_SECONDS:
            self._quiet[where] = self._quiet.get(where, 0) + 1
            return
        self._logged[where] = now
        more = self._quiet.pop(where, 0)
        log.warning("trainmon watch: error in %s: %r%s", where, exc,
                    f" ({more} more since, counted in trainmon_watch_errors_total)" if more else "")

    # -- discovery ---------------------------------------------------------------------------

    def scan(self) -> None:
        """Find new runs, forget deleted ones."""
        from monitor.runlog.adapters import discover, open_source

        try:
            found = {str(p.resolve()): p for p in discover(self.paths)}
        except Exception as e:
            self._error("discovery", e)
            return
        for key in [k for k in self.runs if k not in found and not Path(k).exists()]:
            self._forget(key)
        self._unreadable &= set(found)  # paths gone are not remembered
        for key, path in sorted(found.items()):
            if key in self.runs:
                continue
            try:
                source = open_source(path, self.mapping)
            except Exception as e:  # not (yet) a readable run: try again next scan
                if key not in self._unreadable:
                    self._unreadable.add(key)
                    self._event(f"skipped {path}: {e}")
                continue
            self._unreadable.discard(key)
            self._add(key, source)
        self._first_scan = False

    def _unique_id(self, run_id: str, path: Path) -> str:
        taken = {r.run_id for r in self.runs.values()}
        if run_id not in taken:
            return run_id
        candidate = f"{path.parent.name}/{run_id}"
        n = 2
        while candidate in taken:
            candidate, n = f"{path.parent.name}/{run_id}#{n}", n + 1
        return candidate

    def _add(self, key: str, source: Source) -> None:
        run_id = self._unique_id(source.info.run_id, Path(key))
        saved = self._saved.pop(key, None)
        if saved is None and self._first_scan and self.state is not None and self.state.unreadable:
            saved = SavedRun(everything=True)
        # A trainmon run directory tells the engine about its attempts (their facts and history).
        attempts = source if callable(getattr(source, "history", None)) else None
        engine = RulesEngine(source.info.model_copy(update={"run_id": run_id}), self.config.rules, attempts=attempts)
        run = WatchedRun(key, source, run_id, engine, saved)
        run.live = saved is not None and saved.live
        if saved is not None and saved.positions is not None:
            try:  # replay from the saved position, not from the start
                source.restore(saved.positions)
                run.judged = dict(saved.judged_at)
                run.replay_from = (saved.positions, dict(saved.judged_at))
            except Exception as e:  # positions that do not fit this run any more: replay it all
                self._event(f"warning: {key}: saved read positions unusable ({e}); reading it again from the start")
                run.judged = {}
                self._unreadable.discard(key)
                return self._add_fresh(key, run_id, saved)
        run.sink = RunAlertSink(self, run)
        engine.attach([run.sink], on_error=self._error)
        with self._lock:
            self.runs[key] = run
        self._event(f"watching {run_id} ({source.info.source}) at {key}" + (" (replaying what was judged before)"
                                                                            if saved else ""))

    def _add_fresh(self, key: str, run_id: str, saved: SavedRun) -> None:
        """_add again with a newly opened source and no saved positions."""
        from monitor.runlog.adapters import open_source

        try:
            source = open_source(Path(key), self.mapping)
        except Exception as e:
            self._event(f"skipped {key}: {e}")
            return
        saved.positions, saved.judged_at = None, {}
        self._saved[key] = saved
        self._add(key, source)

    def _mark(self, run: WatchedRun) -> None:
        """After a slice is judged: every REPLAY_STEPS records per rank, the Source's read position."""
        total = sum(run.judged.values())
        last = sum((run.marks[-1] if run.marks else run.replay_from or ({}, {}))[1].values())
        if total - last >= REPLAY_STEPS * max(1, len(run.judged)):
            try:
                run.marks = [*run.marks[-1:], (run.source.state(), dict(run.judged))]
            except Exception as e:
                self._error(f"read positions of {run.key}", e)

    def _restored(self, run: WatchedRun, sink: RunAlertSink) -> None:
        """The end of a restarted run's first pass. Each alert active at the save (delivered before the
        restart) whose rule finds the problem again after the replay, or whose step lies before the
        replayed records (the replay cannot tell), goes on as that rule's active alert and is restored to
        the delivery sinks, not re-sent; the others (a stall the run recovered from) are sent as
        resolved. Alerts only the replay raised were never sent: dropped (unless the state was unreadable,
        when every run found is taken as judged: then they are restored)."""
        engine = run.engine
        muted = {id(a) for a in run.muted}
        saved = run.saved
        gone: list[Alert] = []
        for a in saved.active:
            if (a.rule, a.rank) in run.resolved:  # resolved anew in this pass, and delivered
                continue
            before_replay = run.replay_from is not None and a.step < run.first_step.get(a.rank, a.step + 1)
            if engine.adopt(a, force=before_replay):
                self._restore_to_sinks(a)
            else:
                gone.append(a)
        for a in engine.active():
            if id(a) not in muted:
                continue
            if saved.everything:  # the state was unreadable: what the replay finds active was sent before
                self._restore_to_sinks(a)
            else:
                engine.drop(a)
        run.saved, run.muted, run.resolved = None, [], set()
        for a in gone:
            step = run.view.step if run.view.step is not None else a.step
            sink.emit(a.model_copy(update={"status": "resolved", "step": step, "time": self.clock()}))

    def _restore_to_sinks(self, alert: Alert) -> None:
        for s in self.sinks:
            try:
                s.restore(alert)
            except Exception as e:
                self._error(f"restoring an alert to {type(s).__name__}", e)

    def _forget(self, key: str) -> None:
        """A run whose directory is gone: its alerts still active are resolved at every sink (else they
        would stay firing in Alertmanager forever) and its series dropped."""
        with self._lock:
            run = self.runs.pop(key, None)
        if run is None:
            return
        now = self.clock()
        for alert in run.engine.active():
            step = run.view.step if run.view.step is not None else alert.step
            run.sink.deliver(alert.model_copy(update={
                "status": "resolved", "step": step, "time": now,
                "evidence": {**alert.evidence, "resolved_by": "the run is gone (its directory was removed)"}}))
        self.families.forget(run.run_id)
        self._event(f"run {run.run_id} is gone ({key}); its alerts were resolved and its series dropped")

    def _metrics(self, run: WatchedRun, rank: int) -> TrainMetrics:
        m = run.metrics.get(rank)
        if m is None:
            m = run.metrics[rank] = TrainMetrics(self.families, run.run_id, rank)
            info = getattr(run.source, "info", None)
            if rank == 0 and isinstance(info, RunInfo) and info.source == "trainmon":
                # As the training process exports it, from run.json (a writer older than the field: unknown).
                m.run_info(info.world_size, info.trainmon_version or "unknown")
        return m

    # -- polling ------------------------------------------------------------------------------

    def poll(self) -> int:
        """One pass over every run; returns the number of records ingested."""
        t0 = time.perf_counter()
        now = self.clock()
        total = 0
        with self._lock:
            runs = list(self.runs.values())
        # A poll allocates tens of thousands of records, freed by reference counting (they hold no
        # cycles): the cyclic collector, which would walk them again and again, waits until it is over.
        paused = gc.isenabled()
        gc.disable()
        try:
            for run in runs:
                if self._stop is not None and self._stop.is_set():
                    break
                try:
                    total += self._poll_run(run, now)
                except Exception as e:
                    self._error(f"polling {run.key}", e)
        finally:
            if paused:
                gc.enable()
        self.health.poll.observe(time.perf_counter() - t0)
        self.health.count_runs(self.runs.values())
        return total

    def _poll_run(self, run: WatchedRun, now: float) -> int:
        source = run.source
        # A long backlog is read, judged and freed a slice at a time: memory stays bounded.
        total = 0
        while True:
            records = source.poll(limit=POLL_SLICE)
            self.health.records.inc(len(records))  # before they are judged: counted when their alerts appear
            self._ingest(run, records, now)
            if run.saved is None:  # (during a restart's replay the judged counts are not yet the run's)
                self._mark(run)
            total += len(records)
            if len(records) < POLL_SLICE or (self._stop is not None and self._stop.is_set()):
                break  # caught up, or asked to stop: the rest waits (positions are kept)
        seen = getattr(source.info, "attempts", None) or []
        for a in seen[run.attempts_seen:] if len(seen) > 1 else ():  # says so when a run resumes or restarts
            self._event(f"{run.run_id}: {describe(a)}")
        run.attempts_seen = max(run.attempts_seen, len(seen))
        info_ended = getattr(source.info, "model_extra", None) or {}
        run.finished = bool(info_ended.get("ended"))
        if run.live and not run.finished:
            run.engine.tick(now)
        if run.saved is not None:
            self._restored(run, run.sink)
        return total

    def _ingest(self, run: WatchedRun, records: list[StepRecord], now: float) -> None:
        source = run.source
        for problem in source.problems:
            if problem not in run.reported:
                run.reported.add(problem)
                self.health.problems.inc()
                self._event(f"warning: {run.run_id}: {problem}")
        stall_floor = self.stall_floor
        by_rank: dict[int, list[StepRecord]] = {}
        for r in records:
            recs = by_rank.get(r.rank)
            if recs is None:
                recs = by_rank[r.rank] = []
            recs.append(r)
        # Metrics first, then rules: when an alert shows up, /metrics already has the step behind it.
        for rank, recs in by_rank.items():
            run.first_step.setdefault(rank, recs[0].step)
            self._metrics(run, rank).observe_many(recs)
            for r in recs[-run.view.losses.maxlen:]:
                run.view.update(r)
            run.view.attention(recs)
            t = recs[-1].time
            if run.last_time is None or t > run.last_time:
                run.last_time = t
            # Only a run seen moving recently can stall: an old, finished log is not a stalled run.
            if now - t <= stall_floor:
                run.live = True
        engine = run.engine
        i, n = 0, len(records)
        while i < n:  # runs of consecutive records of one rank, fed at once
            rank = records[i].rank
            j = i + 1
            while j < n and records[j].rank == rank:
                j += 1
            # After a restart, the records judged before are fed with the sinks muted.
            done = run.judged.get(rank, 0)
            before = (j - i if run.saved.everything else max(0, min(run.saved.judged.get(rank, 0) - done, j - i))
                      ) if run.saved is not None else 0
            run.judged[rank] = done + j - i
            if rank not in run.started:  # preflight checks just before the rank's first step
                run.started.add(rank)
                run.replaying = before > 0
                engine.begin(records[i])
            if before:
                run.replaying = True
                engine.observe_many(records[i:i + before])
            run.replaying = False
            if before < j - i:
                engine.observe_many(records[i + before:j])
            i = j

    # -- state ----------------------------------------------------------------------------------

    def save(self) -> None:
        if self.state is None:
            return
        with self._lock:
            runs = {k: r.saved_state(self.clock()) for k, r in self.runs.items()}
        # Runs not seen this time (unmounted filesystem, slow discovery) keep their saved state.
        for k, saved in self._saved.items():
            runs.setdefault(k, saved)
        try:
            self.state.save(runs)
        except Exception as e:
            self._error("saving state", e)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, poll_every: float = 0.5, discover_every: float = 5.0,
            save_every: float = 5.0, on_pass: Callable[[], None] | None = None) -> None:
        next_scan = next_save = 0.0
        self._stop = stop
        while not stop.is_set():
            t = time.monotonic()
            if t >= next_scan:
                self.scan()
                next_scan = t + discover_every
            self.poll()
            if on_pass is not None:
                on_pass()
            if t >= next_save:
                self.save()
                next_save = t + save_every
            stop.wait(poll_every)
        self.save()

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                self._error("closing a sink", e)
