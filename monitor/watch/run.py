"""A run as the daemon watches it: its source, engine and metrics, what the live view shows of it,
and how far its rules got (for a restart)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from monitor.rules.engine import RulesEngine
from monitor.runlog.sources import Source
from monitor.schema import Alert, StepRecord
from monitor.watch.state import SavedRun

if TYPE_CHECKING:
    from monitor.exporters.prometheus import TrainMetrics


@dataclass
class RunView:
    """What the live view shows of a run (kept small: bounded history)."""

    step: int | None = None
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    loss_scale: float | None = None
    losses: deque = field(default_factory=lambda: deque(maxlen=40))
    times: deque = field(default_factory=lambda: deque(maxlen=50))
    ranks: set = field(default_factory=set)
    attn_entropy: float | None = None  # latest attention sample: the lowest layer's entropy ratio
    attn_logit: float | None = None  # ... and the largest max logit over layers

    def attention(self, recs: list[StepRecord]) -> None:
        """The latest attention sample in a batch of one rank's records (sampled steps are sparse)."""
        r = next((r for r in reversed(recs) if r.attention), None)
        if r is None or (r.rank != 0 and 0 in self.ranks):
            return
        ents = [st["entropy_ratio"] for st in r.attention.values() if st.get("entropy_ratio") is not None]
        logits = [st["max_logit"] for st in r.attention.values() if st.get("max_logit") is not None]
        self.attn_entropy = min(ents) if ents else None
        self.attn_logit = max(logits) if logits else None

    def update(self, r: StepRecord) -> None:
        self.ranks.add(r.rank)
        if r.rank != 0 and 0 in self.ranks:
            return
        self.step, self.lr, self.grad_norm, self.loss_scale = r.step, r.max_lr, r.grad_norm, r.loss_scale
        if r.loss is not None:
            self.loss = r.loss
            self.losses.append(r.loss)
        self.times.append(r.time)

    @property
    def steps_per_second(self) -> float | None:
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


class WatchedRun:
    def __init__(self, key: str, source: Source, run_id: str, engine: RulesEngine, saved: SavedRun | None = None) -> None:
        self.key = key
        self.source = source
        self.run_id = run_id
        self.engine = engine
        self.metrics: dict[int, TrainMetrics] = {}
        self.view = RunView()
        self.live = False  # a step arrived while we watched: only then can the run stall
        self.last_time: float | None = None
        self.started: set[int] = set()
        self.reported: set[str] = set()
        self.finished = False
        self.attempts_seen = 0  # run.json attempts already announced
        self.judged: dict[int, int] = {}  # rank -> records fed to the rules
        # Read positions to replay from after a restart: the Source's state() and the judged counts then,
        # taken every REPLAY_STEPS records per rank; the older of the last two is saved.
        self.marks: list[tuple[dict[str, Any], dict[int, int]]] = []
        self.replay_from: tuple[dict[str, Any], dict[int, int]] | None = None  # the saved position restored
        self.first_step: dict[int, int] = {}  # rank -> the step of the first record this daemon read
        # After a daemon restart, until the first pass over the run is done: what was judged before.
        self.saved = saved
        self.replaying = False  # the records being fed were judged before the restart: sinks muted
        self.muted: list[Alert] = []  # alerts raised while muted, restored to the sinks after the first pass
        self.resolved: set[tuple[str, int]] = set()  # (rule, rank) resolved and delivered during that pass
        self.sink: Any = None  # its only sink in the engine (a RunAlertSink, set by Watcher._add)

    def saved_state(self, now: float) -> SavedRun:
        """What the state file keeps of this run, `now` being when it was last seen."""
        if self.saved is not None:  # still replaying after a restart: what was saved then still holds
            s = self.saved
            return SavedRun(judged=dict(s.judged), active=list(s.active), live=s.live, seen=now,
                            positions=s.positions, judged_at=dict(s.judged_at))
        # The older of the last two marks (REPLAY_STEPS records per rank lie after it), else the position
        # this daemon started from, else none (replay from the start).
        positions, judged_at = self.marks[0] if len(self.marks) == 2 else self.replay_from or (None, {})
        return SavedRun(judged=dict(self.judged), active=self.engine.active(), live=self.live, seen=now,
                        positions=positions, judged_at=dict(judged_at))


class RunAlertSink:
    """The run's only sink in its engine: the daemon's own state (metrics, the view's alert log, health
    counters), then every delivery sink, unless the alert replays what was judged before a restart."""

    def __init__(self, watcher: Any, run: WatchedRun) -> None:
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
