"""Prometheus exposition of one training process (one rank).

Metric names and labels are a contract: dashboards, alert rules and users' queries select
them. A fresh CollectorRegistry is passed in, so the user's default registry is untouched and
tests use their own. Global statistics (LR, grad norms, loss scale) come from rank 0 only:
after the all-reduce they are identical on every rank.

Per-step values are latest-value gauges, which a scrape every 15 s samples: a one-step spike between
two scrapes would never reach Prometheus. The `_max`/`_min` gauges (loss, grad norm, loss scale) hold
the extreme of the steps of the last `metrics.extremes_window_seconds` (by the steps' own end times),
so every scrape interval shorter than the window sees every spike, for any number of scrapers.

The HTTP endpoint serving a registry is monitor.exporters.endpoint.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections import deque
from functools import partial
from operator import attrgetter, is_not
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from monitor.schema import PHASES, Alert, Severity, StepRecord

if TYPE_CHECKING:
    pass

# No `<counter>_created` series: they double the series count (the daemon serves every run's) and no
# dashboard or rule reads them. prometheus_client's switch is process-wide: the user's own counters
# in the training process lose theirs too (PROMETHEUS_DISABLE_CREATED_SERIES does the same).
disable_created_metrics()

log = logging.getLogger("trainmon")

RUN_LABELS = ("run", "rank")
# Step times from a few ms (small models on GPUs) to minutes (huge ones).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


_not_none = partial(is_not, None)


def _latest(recs: list[StepRecord], field: str) -> Any:
    """The last non-None value of `field` in `recs`, or None. In C (map, count): a field that no record
    has (common: the run does not produce it) is looked up in every record of the batch."""
    last = getattr(recs[-1], field)
    if last is not None:
        return last
    values = list(map(attrgetter(field), recs))
    if values.count(None) == len(values):
        return None
    return next(filter(_not_none, reversed(values)))


def observe_all(child: Any, values: list[float]) -> None:
    """`child.observe(v)` for each of `values` (finite), a batch at once: the daemon reads thousands of
    records a poll, and Histogram.observe scans the bounds and updates two locked values per call.
    Bucket counts are added per bucket and the sum accumulates value by value from its current
    total, so the exposition is exactly what observing one by one gives. Falls back to that where
    the client's internals differ."""
    if len(values) < 8:
        for v in values:
            child.observe(v)
        return
    try:
        bounds, buckets, total = child._upper_bounds, child._buckets, child._sum
        counts = [0] * len(bounds)
        s = total.get()
        for v in values:
            counts[bisect_left(bounds, v)] += 1  # the first bucket whose bound is >= v (the last is +Inf)
            s += v
        total.set(s)
    except AttributeError:
        for v in values:
            child.observe(v)
        return
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


class MetricFamilies:
    """Every trainmon_* metric family, registered once in one registry.

    A training process holds one run and rank; the `monitor watch` daemon holds many, each a
    TrainMetrics view on the same families (label values tell them apart).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        lab = RUN_LABELS
        r = registry
        self.loss = Gauge("trainmon_loss", "Training loss of the last optimizer step (mean over micro-batches).", lab, registry=r)
        self.lr = Gauge("trainmon_learning_rate", "Learning rate per param group used by the last step.", (*lab, "group"), registry=r)
        self.grad_norm = Gauge("trainmon_grad_norm", "Global L2 norm of the gradients before clipping.", lab, registry=r)
        self.grad_norm_clipped = Gauge("trainmon_grad_norm_clipped", "Global L2 norm of the gradients after clipping.", lab, registry=r)
        self.clip_coef = Gauge("trainmon_clip_coefficient", "Factor gradient clipping applied (1 when it did not clip).", lab, registry=r)
        self.loss_scale = Gauge("trainmon_loss_scale", "GradScaler loss scale used by the last step.", lab, registry=r)
        self.loss_max = Gauge("trainmon_loss_max", "Largest training loss of the steps in the last "
                              "metrics.extremes_window_seconds (a one-step spike between two scrapes).", lab, registry=r)
        self.grad_norm_max = Gauge("trainmon_grad_norm_max", "Largest pre-clip global gradient norm of the steps in "
                                   "the last metrics.extremes_window_seconds.", lab, registry=r)
        self.loss_scale_min = Gauge("trainmon_loss_scale_min", "Smallest GradScaler loss scale of the steps in the "
                                    "last metrics.extremes_window_seconds.", lab, registry=r)
        self.run_info = Gauge("trainmon_run_info", "1 for each run, labelled with the trainmon version that writes "
                              "it and its world size (rank 0 of the training process).",
                              ("run", "version", "world_size"), registry=r)
        self.steps = Counter("trainmon_optimizer_steps", "Optimizer steps (including GradScaler-skipped ones).", lab, registry=r)
        self.skipped = Counter("trainmon_skipped_steps", "Optimizer steps GradScaler skipped for inf/NaN gradients.", lab, registry=r)
        self.step_duration = Histogram("trainmon_step_duration_seconds", "Wall time per optimizer step.", lab,
                                       buckets=STEP_BUCKETS, registry=r)
        self.tokens = Counter("trainmon_tokens", "Tokens (input elements) processed.", lab, registry=r)
        self.attn_entropy = Gauge("trainmon_attention_entropy_ratio", "Attention entropy / log(visible keys), mean over heads.",
                                  (*lab, "layer"), registry=r)
        self.attn_max_logit = Gauge("trainmon_attention_max_logit", "Largest attention logit.", (*lab, "layer"), registry=r)
        self.last_step = Gauge("trainmon_last_step_timestamp_seconds", "Unix time the last optimizer step ended.", lab, registry=r)
        self.alerts_total = Counter("trainmon_alerts", "Alerts raised.", (*lab, "rule", "severity"), registry=r)
        self.alert_active = Gauge("trainmon_alert_active", "1 while an alert of this rule and severity is firing.",
                                  (*lab, "rule", "severity"), registry=r)
        self.local_grad_norm = Gauge("trainmon_local_grad_norm", "This rank's gradient norm before the DDP all-reduce.",
                                     lab, registry=r)
        self.busy = Gauge("trainmon_busy_seconds", "Seconds of the last step spent outside collectives (data loading "
                          "and forwards): a straggler's is higher.", lab, registry=r)
        self.phase = Gauge("trainmon_step_phase_seconds", "Seconds of the last step per phase: input (previous step's "
                           "end to the forward: data loading), compute (the forward inside the DDP wrapper) and "
                           "collective_wait (DDP's buffer broadcast and the gradient all-reduce left after the "
                           "backward). A straggler's input or compute is higher; the ranks waiting for it have "
                           "the higher collective_wait.", (*lab, "phase"), registry=r)
        self.memory = Gauge("trainmon_memory_allocated_bytes", "Peak device memory allocated by this rank so far.",
                            lab, registry=r)
        self.probe_seconds = Gauge("trainmon_attention_probe_seconds", "What the last attention probe cost the "
                                   "training thread (rank 0).", lab, registry=r)
        self.probe_interval = Gauge("trainmon_attention_probe_interval_steps", "Optimizer steps between attention "
                                    "probes, as the overhead budget keeps it (rank 0).", lab, registry=r)
        self.attempt = Gauge("trainmon_attempt", "The run directory's attempt this rank's records come from (1, 2, ...: "
                             "each resume or restart into the directory is one more).", lab, registry=r)
        self.attempt_start = Gauge("trainmon_attempt_start_step", "The step the current attempt started at (a resume's "
                                   "checkpoint step; 0 for a restart from scratch).", lab, registry=r)
        self.dropped = Counter("trainmon_dropped_records", "Step records dropped because the publisher queue was full.", lab, registry=r)
        self.errors = Counter("trainmon_internal_errors", "Errors caught inside the monitor (never raised into training).",
                              lab, registry=r)

    def all(self) -> list:
        return [v for v in vars(self).values() if hasattr(v, "_labelnames")]

    def forget(self, run: str) -> None:
        """Drop every series of a run (a deleted run must not stay in /metrics forever)."""
        for family in self.all():
            with family._lock:
                for key in [k for k in family._metrics if k and k[0] == run]:
                    del family._metrics[key]


def attention_risk(stats: dict[str, float]) -> float:
    """How close a layer's attention is to collapse: 1 - entropy ratio, or max logit / 100 (the healthy
    ceiling), whichever is larger; a non-finite statistic is the highest risk."""
    ent, logit = stats.get("entropy_ratio"), stats.get("max_logit")
    risk = 0.0
    for v in (None if ent is None else 1.0 - ent, None if logit is None else logit / 100.0):
        if v is not None:
            if not math.isfinite(v):
                return math.inf
            risk = max(risk, v)
    return risk


EXTREMES_WINDOW_SECONDS = 60.0  # metrics.extremes_window_seconds' default: 4 scrapes at Prometheus's usual 15 s


class Extreme:
    """The largest value (`lowest`: the smallest) of the steps whose time is within `seconds` of the
    newest step's, as a monotonic deque (O(1) amortised per step). NaN counts as the most extreme; a
    record without the value adds nothing. Keyed by the steps' own times, not the clock: the daemon
    reading a backlog gets what the training process had, and a stalled run keeps its last window."""

    __slots__ = ("lowest", "seconds", "_q")

    def __init__(self, seconds: float, lowest: bool = False) -> None:
        self.seconds, self.lowest = seconds, lowest
        self._q: deque[tuple[float, float, float]] = deque()  # (time, key, value), keys decreasing

    def add(self, recs: list[StepRecord], field: str) -> float | None:
        """Take in a batch of one rank's records (in step order); the extreme now, or None (no value yet)."""
        start = recs[-1].time - self.seconds
        i = len(recs)
        while i > 0 and recs[i - 1].time > start:  # older records of a backlog cannot be in the window
            i -= 1
        q = self._q
        for r in recs[i:]:
            v = getattr(r, field)
            if v is None:
                continue
            key = -v if self.lowest else v
            if key != key:  # NaN
                key = math.inf
            while q and q[-1][1] <= key:
                q.pop()
            q.append((r.time, key, v))
        while q and q[0][0] <= start:
            q.popleft()
        return q[0][2] if q else None


class TrainMetrics:
    """The trainmon_* series of one (run, rank), updated from StepRecords and Alerts."""

    def __init__(self, registry: CollectorRegistry | MetricFamilies, run: str, rank: int, *,
                 global_stats: bool | None = None, attention_layers: int = 8,
                 extremes_window: float = EXTREMES_WINDOW_SECONDS) -> None:
        self.run, self.rank = run, str(rank)
        self.extremes_window = extremes_window  # seconds of steps the _max/_min gauges span (before the first step)
        self._extremes: dict[str, Extreme] = {}
        self.attention_layers = attention_layers  # per-layer series: the riskiest this many (0: all)
        self._attn_exported: set[str] = set()
        self.global_stats = rank == 0 if global_stats is None else global_stats
        f = registry if isinstance(registry, MetricFamilies) else MetricFamilies(registry)
        self.families = f
        (self.loss, self.lr, self.grad_norm, self.grad_norm_clipped, self.clip_coef, self.loss_scale, self.steps,
         self.skipped, self.step_duration, self.tokens, self.attn_entropy, self.attn_max_logit, self.last_step,
         self.alerts_total, self.alert_active, self.dropped, self.errors, self.local_grad_norm, self.busy,
         self.memory) = (
            f.loss, f.lr, f.grad_norm, f.grad_norm_clipped, f.clip_coef, f.loss_scale, f.steps, f.skipped,
            f.step_duration, f.tokens, f.attn_entropy, f.attn_max_logit, f.last_step, f.alerts_total,
            f.alert_active, f.dropped, f.errors, f.local_grad_norm, f.busy, f.memory)
        self.probe_seconds, self.probe_interval = f.probe_seconds, f.probe_interval
        self.phase = f.phase
        self._attempt_gauge, self._attempt_start = f.attempt.labels(run, self.rank), f.attempt_start.labels(run, self.rank)
        self._attempt: int | None = None
        # Children that exist from the first scrape, so rate() and alert rules see a 0, not an absence.
        self._steps = self.steps.labels(run, self.rank)
        self._skipped = self.skipped.labels(run, self.rank)
        self._tokens = self.tokens.labels(run, self.rank)
        self._dropped = self.dropped.labels(run, self.rank)
        self._errors = self.errors.labels(run, self.rank)
        self._duration = self.step_duration.labels(run, self.rank)
        self._children: dict[tuple, Any] = {}
        # Gauges appear with the first step: a loss or timestamp of 0 before it would be a lie.

    def _g(self, gauge: Gauge, value: float | None, *extra: str) -> None:
        if value is not None:
            key = (gauge._name, *extra)
            child = self._children.get(key)
            if child is None:  # label lookups cost more than the set: keep the children
                child = self._children[key] = gauge.labels(self.run, self.rank, *extra)
            child.set(value)

    def observe(self, rec: StepRecord) -> None:
        self.observe_many([rec])

    def observe_many(self, recs: list[StepRecord]) -> None:
        """A batch of one rank's records (the daemon reads many at once): counters and the step-time
        histogram see every record, the gauges only the last value each has."""
        if not recs:
            return
        skipped = tokens = 0
        times = []
        for r in recs:
            skipped += r.skipped
            tokens += r.tokens or 0
            t = r.step_time
            if t is not None and math.isfinite(t):
                times.append(t)
        observe_all(self._duration, times)
        self._steps.inc(len(recs))
        if skipped:
            self._skipped.inc(skipped)
        if tokens:
            self._tokens.inc(tokens)
        last = recs[-1]
        if last.attempt != self._attempt:  # a new attempt's records: where it started
            first = next(r for r in recs if r.attempt == last.attempt)
            self._set_attempt(last.attempt, first.step)
        # Per-rank gauges: the latest value each has in the batch.
        for gauge, field in ((self.loss, "loss"), (self.local_grad_norm, "local_grad_norm"), (self.busy, "busy_time"),
                             (self.memory, "memory")):
            self._g(gauge, _latest(recs, field))
        for phase, field in PHASES.items():
            self._g(self.phase, _latest(recs, field), phase)
        self._g(self.last_step, last.time)
        f = self.families
        self._g(f.loss_max, self._extreme("loss", recs))
        if not self.global_stats:
            return
        for i, lr in enumerate(last.lr):
            self._g(self.lr, lr, str(i))
        for gauge, field in ((self.grad_norm, "grad_norm"), (self.grad_norm_clipped, "grad_norm_clipped"),
                             (self.clip_coef, "clip_coef"), (self.loss_scale, "loss_scale")):
            self._g(gauge, _latest(recs, field))
        self._g(f.grad_norm_max, self._extreme("grad_norm", recs))
        self._g(f.loss_scale_min, self._extreme("loss_scale", recs, lowest=True))
        sampled = next((r.attention for r in reversed(recs) if r.attention), None)
        if sampled:
            self._attention(sampled)

    def _extreme(self, field: str, recs: list[StepRecord], lowest: bool = False) -> float | None:
        window = self._extremes.get(field)
        if window is None:
            window = self._extremes[field] = Extreme(self.extremes_window, lowest)
        return window.add(recs, field)

    def run_info(self, world_size: int, version: str | None = None) -> None:
        """trainmon_run_info{run, version, world_size} = 1 (one series per run: rank 0 sets it)."""
        if version is None:
            import monitor

            version = monitor.__version__
        self.families.run_info.labels(self.run, version, str(world_size)).set(1)

    def _attention(self, sampled: dict[str, dict[str, float]]) -> None:
        """Per-layer gauges of the latest sample, bounded: the `attention_layers` riskiest layers (lowest
        entropy ratio, largest logit); series of layers that drop out of them are removed."""
        layers = list(sampled)
        if self.attention_layers and len(layers) > self.attention_layers:
            layers = sorted(layers, key=lambda name: -attention_risk(sampled[name]))[:self.attention_layers]
        for layer in self._attn_exported.difference(layers):
            for gauge in (self.attn_entropy, self.attn_max_logit):
                self._children.pop((gauge._name, layer), None)
                try:
                    gauge.remove(self.run, self.rank, layer)
                except KeyError:
                    pass
        for layer in layers:
            self._g(self.attn_entropy, sampled[layer].get("entropy_ratio"), layer)
            self._g(self.attn_max_logit, sampled[layer].get("max_logit"), layer)
        self._attn_exported = set(layers)

    def _set_attempt(self, attempt: int, start_step: int) -> None:
        self._attempt = attempt
        self._attempt_gauge.set(attempt)
        self._attempt_start.set(start_step)

    def attempt(self, attempt: Any) -> None:
        """The training process's own attempt (a monitor.schema.Attempt), from attach on."""
        self._set_attempt(attempt.id, attempt.start_step)

    def probe(self, seconds: float | None, interval: int | None) -> None:
        """The attention probe's own cost and interval (training process, rank 0)."""
        self._g(self.probe_seconds, seconds)
        self._g(self.probe_interval, interval)

    def emit(self, alert: Alert) -> None:
        """As a `Sink`: counters and the active gauge (one active severity per rule)."""
        rank = str(alert.rank)
        if alert.status == "resolved":
            self.alert_active.labels(self.run, rank, alert.rule, alert.severity.value).set(0)
            return
        self.alerts_total.labels(self.run, rank, alert.rule, alert.severity.value).inc()
        for sev in Severity:
            self.alert_active.labels(self.run, rank, alert.rule, sev.value).set(1 if sev == alert.severity else 0)

    def restore(self, alert: Alert) -> None:
        """After a daemon restart: show an alert that is still active, without counting it again."""
        self.alert_active.labels(self.run, str(alert.rank), alert.rule, alert.severity.value).set(1)

    def close(self) -> None:
        """Nothing to release: the series stay in the registry, whose owner serves or drops them."""

    def count_dropped(self, n: int = 1) -> None:
        self._dropped.inc(n)

    def count_error(self, n: int = 1) -> None:
        self._errors.inc(n)
