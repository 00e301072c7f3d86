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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitor.config import MonitorConfig
from monitor.exporters.prometheus import MetricFamilies, TrainMetrics
from monitor.exporters.ruleconfig import rule_config
from monitor.rules.engine import RulesEngine
from monitor.runlog.attempts import describe
from monitor.runlog.sources import Source
from monitor.schema import Alert, StepRecord
from monitor.watch.run import WatchedRun
from monitor.watch.state import SavedRun, WatchState

POLL_SLICE = 8192  # records of a run read, judged and freed at a time (memory stays bounded)

log = logging.getLogger("trainmon.watch")


class WatchHealth:
    """The daemon's own metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Gauge("trainmon_watch_runs", "Runs being watched, by state.", ["state"], registry=registry)
        self.records = Counter("trainmon_watch_records", "Step records ingested.", registry=registry)
        self.alerts = Counter("trainmon_watch_alerts", "Alerts raised by the daemon's rules.", ["severity"], registry=registry)
        self.problems = Counter("trainmon_watch_source_problems", "Damaged or unreadable inputs reported.", registry=registry)
        self.errors = Counter("trainmon_watch_errors", "Errors caught in the daemon (never fatal).", registry=registry)
        self.poll = Histogram("trainmon_watch_poll_seconds", "Time of one pass over all runs.", registry=registry,
                              buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))


def tune_gc() -> None:
    """For the daemon process: records are freed by reference counting (they hold no cycles), yet every
    700 allocations the cyclic collector walks the young objects, a batch of live records among them.
    Collect far less often. Process-wide, so the CLI calls it, not the Watcher."""
    gc.set_threshold(50_000, 10, 10)


class _RunAlertSink:
    """The run's only sink in its engine: the daemon's own state (metrics, the view's alert log, health
    counters), then every delivery sink, unless the alert replays what was judged before a restart."""

    def __init__(self, watcher: Watcher, run: WatchedRun) -> None:
        self.watcher, self.run = watcher, run

    def emit(self, alert: Alert) -> None:
        w, run = self.watcher, self.run
        w._metrics(run, alert.rank).emit(alert)
        w.alert_log.append(alert)
        saved = run.saved
        if saved is not None and alert.status == "resolved" and not run.replaying:
            run.resolved.add((alert.rule, alert.rank))  # resolved anew in the first pass: not again after it
        if run.replaying or (saved is not None and alert.status == "firing" and any(
                (a.rule, a.rank, a.step, a.attempt) == (alert.rule, alert.rank, alert.step, alert.attempt)
                for a in saved.active)):
            run.muted.append(alert)
            return
        self.deliver(alert)

    def deliver(self, alert: Alert) -> None:
        w = self.watcher
        if alert.status == "firing":
            w.health.alerts.labels(alert.severity.value).inc()
        for sink in w.sinks:
            try:
                sink.emit(alert)
            except Exception as e:
                w._error(f"sink {type(sink).__name__}", e)

    def restore(self, alert: Alert) -> None:
        """Not called: the daemon restores alerts to its delivery sinks itself."""

    def close(self) -> None:
        """The delivery sinks are closed by Watcher.close()."""


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
        self.health.errors.inc()
        log.warning("trainmon watch: error in %s: %r", where, exc)

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
        run.sink = _RunAlertSink(self, run)
        engine.attach([run.sink], on_error=self._error)
        with self._lock:
            self.runs[key] = run
        self._event(f"watching {run_id} ({source.info.source}) at {key}" + (" (replaying what was judged before)"
                                                                            if saved else ""))

    def _restored(self, run: WatchedRun, sink: _RunAlertSink) -> None:
        """The end of a restarted run's first pass: the muted alerts still active are restored to the
        delivery sinks (they were delivered before the restart); alerts active then that no longer are
        (a stall the run recovered from) are sent as resolved."""
        active = run.engine.active()
        ids = {id(a) for a in active}
        for alert in run.muted:
            if id(alert) in ids:
                for s in self.sinks:
                    try:
                        s.restore(alert)
                    except Exception as e:
                        self._error(f"restoring an alert to {type(s).__name__}", e)
        now_active = {(a.rule, a.rank) for a in active}
        gone = [a for a in run.saved.active if (a.rule, a.rank) not in now_active | run.resolved]
        run.saved, run.muted, run.resolved = None, [], set()
        for a in gone:
            step = run.view.step if run.view.step is not None else a.step
            sink.emit(a.model_copy(update={"status": "resolved", "step": step, "time": self.clock()}))

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
        self.health.records.inc(total)
        self.health.poll.observe(time.perf_counter() - t0)
        self._count_states(now)
        return total

    def _poll_run(self, run: WatchedRun, now: float) -> int:
        source = run.source
        # A long backlog is read, judged and freed a slice at a time: memory stays bounded.
        total = 0
        while True:
            records = source.poll(limit=POLL_SLICE)
            self._ingest(run, records, now)
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

    def _count_states(self, now: float) -> None:
        counts = {"live": 0, "finished": 0, "idle": 0}
        for run in self.runs.values():
            state = "finished" if run.finished else "live" if run.live else "idle"
            counts[state] += 1
        for state, n in counts.items():
            self.health.runs.labels(state).set(n)

    # -- state ----------------------------------------------------------------------------------

    def save(self) -> None:
        if self.state is None:
            return
        with self._lock:
            runs = {k: SavedRun(judged=dict(r.judged), active=r.engine.active(), live=r.live, seen=self.clock())
                    for k, r in self.runs.items()}
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
