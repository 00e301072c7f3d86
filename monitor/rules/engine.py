"""The rules engine: runs every enabled rule over a stream of StepRecords.

It owns the alert lifecycle (rules/lifecycle.py), so rules only say "the condition holds now".
State is per (rank, rule); the engine serves one run. An exception inside a
rule or a sink is caught and counted: a broken rule never breaks a run.

A run directory can hold several attempts (monitor.runlog.attempts). `start(rank, attempt, history)`
begins a rank's attempt with fresh rules that first replay, delivering nothing, the records the
attempt builds on (a resume's earlier steps; nothing after a restart from scratch); an alert active
when the previous attempt ended is carried over when the rule still finds the problem after the
replay, and resolved otherwise. When records of a later attempt arrive, the engine does this itself,
asking `attempts` (the Source) for the attempt's facts and history: the training process, `monitor
check` and `monitor watch` cross attempts the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from operator import attrgetter, length_hint
from typing import Any, Protocol

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.lifecycle import RuleState
from monitor.rules.registry import REGISTRY, RuleRegistry, _load_builtins
from monitor.schema import Alert, Attempt, RunInfo, Severity, StepRecord

log = logging.getLogger("trainmon.rules")


class AlertSink(Protocol):
    def emit(self, alert: Alert) -> None: ...


class AttemptSource(Protocol):
    """What the engine asks when records of a new attempt arrive (a trainmon Source)."""

    def attempt(self, attempt_id: int, first_step: int) -> Attempt: ...

    def history(self, rank: int, attempt: Attempt) -> Iterable[StepRecord]: ...


class RulesEngine:
    def __init__(
        self,
        run: RunInfo,
        options: Mapping[str, Any] | None = None,
        *,
        registry: RuleRegistry | None = None,
        sinks: Iterable[AlertSink] = (),
        on_error: Callable[[str, BaseException], None] | None = None,
        completions: Iterable[Callable[[Alert], dict[str, Any] | None]] = (),
        attempts: AttemptSource | None = None,
    ) -> None:
        """`completions` add evidence only the caller has (the training process's stack dump on
        run.stalled) to each alert as it is raised, before any sink sees it; its resolution keeps it.
        `attempts`: where the facts and history of a run's later attempts come from (see above)."""
        if registry is None:
            _load_builtins()
            registry = REGISTRY
        parsed = registry.validate_options(options or {})
        self.run = run
        self._specs: list[tuple[type[Rule], RuleConfig]] = []
        for cls in registry:
            cfg = parsed.get(cls.id) or cls.Config()
            if cfg.enabled:
                self._specs.append((cls, cfg))
        self.sinks: list[AlertSink] = list(sinks)
        self.completions = list(completions)
        self.alerts: list[Alert] = []
        self.errors = 0
        self._on_error = on_error
        self._reported: set[str] = set()
        self._states: dict[int, list[RuleState]] = {}  # per rank, in registry order: the rules still judging
        self._retired: dict[int, list[RuleState]] = {}  # per rank: rules that retired (their alerts stay)
        self.attempts = attempts
        self._attempt: dict[int, int] = {}  # rank -> the attempt whose records it judges
        self._run_for: dict[int, RunInfo] = {}  # rank -> the facts its rules see (the attempt's lineage start)
        self._muted = False  # replaying what an attempt builds on: nothing is delivered

    def attach(self, sinks: Iterable[AlertSink], on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self.sinks = list(sinks)
        self._on_error = on_error

    @property
    def rule_ids(self) -> list[str]:
        return [cls.id for cls, _ in self._specs]

    def ranks_started(self) -> set[int]:
        """The ranks whose rules exist: `start(rank)` ran (the preflight checks) or a record arrived."""
        return set(self._states)

    def _states_for(self, rank: int) -> list[RuleState]:
        states = self._states.get(rank)
        if states is None:
            states = []
            for cls, cfg in self._specs:
                if cls.scope == "global" and rank != 0:
                    continue  # one verdict per run, from rank 0, not one per rank
                try:
                    rule = cls(cfg, self._run_for.get(rank, self.run))
                except Exception as e:  # a rule that cannot start is skipped, not fatal
                    self._error(f"rule {cls.id} init", e)
                    continue
                states.append(RuleState(rule))
            self._states[rank] = states
        return states

    def observe(self, record: StepRecord) -> list[Alert]:
        """Feed one record; returns the alerts (firing or resolved) it caused."""
        return self._observe_run(record.rank, [record])

    def observe_field(self, record: StepRecord, field: str) -> list[Alert]:
        """Feed `record` to the rules that read `field` (their `needs`) only: a fact about a step that came
        after its record was judged (the rank exchange rank 0 completes as the run closes)."""
        return self._observe_run(record.rank, [record], only=field)

    def observe_many(self, records: Iterable[StepRecord]) -> list[Alert]:
        """Feed many records: the same alerts, in the same order, as `observe` one by one.

        Each run of consecutive records of one rank (and attempt) is fed rule by rule (a rule's loop over
        the records keeps its state and code hot), in chunks small enough to stay in the CPU's cache."""
        records = records if isinstance(records, list) else list(records)
        out: list[Alert] = []
        i, n = 0, len(records)
        while i < n:
            rank, attempt = records[i].rank, records[i].attempt
            j = i + 1
            while j < n and records[j].rank == rank and records[j].attempt == attempt:
                j += 1
            for k in range(i, j, _CHUNK):
                out.extend(self._observe_run(rank, records[k:min(k + _CHUNK, j)]))
            i = j
        return out

    def _observe_run(self, rank: int, batch: list[StepRecord], only: str | None = None) -> list[Alert]:
        """Feed consecutive records of one rank and attempt to each of its rules in turn, then deliver the
        alerts in record order, then registry order: the order of feeding the records one at a time.

        A rule sees the records in order; an exception is counted and the rule goes on with the next
        record; after a record on which the rule set `retired` it sees no more (of this rank)."""
        first = batch[0]
        current = self._attempt.get(rank)
        if current != first.attempt:
            if current is None:
                self._attempt[rank] = first.attempt
            else:
                self.begin(first)
        return self._feed(rank, batch, only)

    def begin(self, first: StepRecord) -> list[Alert]:
        """`start` the rank of `first` in its attempt, with that attempt's facts and history from
        `attempts` (a stand-in and no history without it): at a rank's first record, and when records
        of a later attempt arrive."""
        from monitor.runlog import attempts as runlog_attempts

        rank = first.rank
        try:
            if self.attempts is None:
                raise LookupError
            attempt = self.attempts.attempt(first.attempt, first.step)
            history = self.attempts.history(rank, attempt)
        except Exception as e:  # an unreadable history: the attempt starts cold, judged all the same
            if not isinstance(e, LookupError):
                self._error("reading an attempt's history", e)
            attempt, history = runlog_attempts.resolve(self.run, first.attempt, first.step), []
        return self.start(rank, attempt, history)

    def _feed(self, rank: int, batch: list[StepRecord], only: str | None = None) -> list[Alert]:
        states = self._states.get(rank)
        if states is None:
            states = self._states_for(rank)
        found: list[tuple[int, int, Alert]] = []  # (record, rule in registry order, alert)
        subsets: dict[str, list[StepRecord]] = {}  # the records that have a field
        retired = False
        for k, st in enumerate(states):
            rule = st.rule
            recs, needs = batch, rule.needs
            if only is not None and needs != only:
                continue
            if needs is not None:  # records without that field would not change the rule: skipped
                recs = subsets.get(needs)
                if recs is None:
                    recs = subsets[needs] = list(filter(attrgetter(needs), batch))
            observe, active = rule.observe, st.active
            it = iter(recs)
            for r in it:
                try:
                    finding = observe(r)
                except Exception as e:
                    self._error(f"rule {rule.id}", e)
                else:
                    if finding is not None or active is not None:  # else nothing to do: the usual case
                        alert = self._transition(st, r, finding)
                        active = st.active
                        if alert is not None:
                            # r's place in recs, from what the iterator has left: computed only here,
                            # where it is rare, instead of counting every record.
                            i = len(recs) - length_hint(it) - 1
                            if recs is not batch:  # the i-th record that has the field
                                i = [j for j, x in enumerate(batch) if getattr(x, needs)][i]
                            found.append((i, k, alert))
                if rule.retired:
                    retired = True
                    break
        if retired:
            self._retire(rank)
        if len(found) > 1:
            found.sort(key=lambda f: (f[0], f[1]))
        alerts = [alert for _, _, alert in found]
        for alert in alerts:
            self._deliver(alert)
        return alerts

    def _retire(self, rank: int) -> None:
        """Rules that have said all they will stop seeing this rank's records; an alert they raised
        stays active (`active()`)."""
        states = self._states[rank]
        self._states[rank] = [st for st in states if not st.rule.retired]
        self._retired.setdefault(rank, []).extend(st for st in states if st.rule.retired)

    def start(self, rank: int = 0, attempt: Attempt | None = None, history: Iterable[StepRecord] = (),
              active: Iterable[Alert] = ()) -> list[Alert]:
        """Begin judging `rank` (in `attempt`, building on `history`): call before its steps. Returns the
        alerts delivered: the checks that need only the run's facts (preflight), and the previous
        attempt's alerts that this one resolves.

        Fresh rules (seeing the run from the attempt's lineage start) run their preflight checks, then
        replay `history` with nothing delivered. An alert that was active on this rank (in this engine,
        or `active`: known from elsewhere, as the training process knows its earlier attempts' from
        alerts.jsonl) is carried over when its rule still finds the problem, and resolved otherwise;
        an alert the replay alone leaves active is dropped (it is raised anew if the problem goes on)."""
        before = [st.active for group in (self._states, self._retired) for st in group.pop(rank, []) if st.active]
        before += active
        if attempt is not None:
            self._attempt[rank] = attempt.id
            if attempt.lineage_start != self.run.start_step:
                self._run_for[rank] = self.run.model_copy(update={"start_step": attempt.lineage_start})
            else:
                self._run_for.pop(rank, None)
        start_step = attempt.start_step if attempt is not None else self.run.start_step
        at = StepRecord(step=start_step, rank=rank, attempt=attempt.id if attempt is not None else 1)
        found: list[Alert] = []
        self._muted = True
        try:
            for st in self._states_for(rank):
                try:
                    finding = st.rule.on_start()
                except Exception as e:
                    self._error(f"rule {st.rule.id} start", e)
                    continue
                alert = self._transition(st, at, finding) if finding is not None else None
                if alert is not None:
                    found.append(alert)
            records = iter(history)
            try:
                while chunk := list(islice(records, _CHUNK)):  # streamed: a long history is never held whole
                    self._feed(rank, chunk)
            except Exception as e:  # an unreadable history: the attempt goes on with what was replayed
                self._error("reading an attempt's history", e)
        finally:
            self._muted = False
        now_active = {st.rule.id: st for group in (self._states, self._retired) for st in group.get(rank, [])
                      if st.active is not None}
        carried: set[str] = set()
        resolved: list[Alert] = []
        for old in before:
            st = now_active.get(old.rule)
            if st is not None:
                st.set_active(old)  # the same problem: its alert goes on
                carried.add(old.rule)
            else:
                why = "the rank started again" if attempt is None else (
                    f"attempt {attempt.id} resumed at step {attempt.start_step}" if attempt.kind == "resumed"
                    else f"attempt {attempt.id} started the run again")
                resolved.append(old.model_copy(update={
                    "status": "resolved", "step": start_step, "time": time.time(), "attempt": at.attempt,
                    "evidence": {**old.evidence, "resolved_by": why}}))
        # Raised in the replay but not active before: sent by an earlier attempt and resolved on records
        # now superseded, or never sent. Not taken up: if the problem goes on, this attempt raises it anew.
        started = {id(a) for a in found}
        for rule_id, st in now_active.items():
            if rule_id not in carried and id(st.active) not in started:
                st.set_active(None)
        out = [a for a in found if a.rule not in carried] + resolved
        for alert in out:
            self._deliver(alert)
        return out

    def tick(self, now: float | None = None) -> list[Alert]:
        """Let time-based rules (run.stalled) look at the clock; a rule with nothing to say keeps its alert
        active until a step resolves it."""
        now = time.time() if now is None else now
        out: list[Alert] = []
        for rank, states in self._states.items():
            for st in states:
                try:
                    finding = st.rule.on_tick(now)
                except Exception as e:
                    self._error(f"rule {st.rule.id} tick", e)
                    continue
                if finding is None:
                    continue
                step = finding.step if finding.step is not None else self.run.start_step
                at = StepRecord(step=step, rank=rank, attempt=self._attempt.get(rank, 1))
                alert = self._transition(st, at, finding)
                if alert is not None:
                    out.append(alert)
                    self._deliver(alert)
        return out

    def emit(self, alert: Alert) -> None:
        """Deliver an alert raised outside the rules (preflight checks) through the same sinks."""
        if not alert.run:
            alert = alert.model_copy(update={"run": self.run.run_id})
        self._deliver(alert)

    def adopt(self, alert: Alert, *, force: bool = False) -> bool:
        """Take `alert` (raised before, known from elsewhere: a restarted daemon's saved state) as its rule's
        active alert on its rank: when the rule finds the same problem now (its own alert is replaced), or
        with `force` when the rule holds none (its records lie before what was replayed). Its rule then
        resolves it as usual. False when the rule is not running on that rank."""
        for group in (self._states, self._retired):
            for st in group.get(alert.rank, []):
                if st.rule.id == alert.rule and (st.active is not None or force):
                    st.set_active(alert)
                    st.fired = True
                    return True
        return False

    def drop(self, alert: Alert) -> None:
        """Forget an active alert without resolving it (raised only by a replay: it was never sent)."""
        for group in (self._states, self._retired):
            for st in group.get(alert.rank, []):
                if st.active is alert:
                    st.set_active(None)

    def active(self) -> list[Alert]:
        return [st.active for group in (self._states, self._retired) for states in group.values() for st in states
                if st.active is not None]

    # -- lifecycle --------------------------------------------------------------

    def _transition(self, st: RuleState, record: StepRecord, finding: Finding | None) -> Alert | None:
        try:
            alert = st.transition(record, finding, self.run.run_id)
        except Exception as e:  # a finding no alert can be made of (a value from a damaged file): counted,
            self._error(f"rule {st.rule.id}", e)  # and the rule and the records after it go on
            return None
        if alert is not None and alert.status == "firing":
            for complete in self.completions:  # the alert is not shared yet: completed in place
                try:
                    alert.evidence.update(complete(alert) or {})
                except Exception as e:
                    self._error(f"alert completion {type(complete).__name__}", e)
        return alert

    def _deliver(self, alert: Alert) -> None:
        if self._muted:
            return
        self.alerts.append(alert)
        for sink in self.sinks:
            try:
                sink.emit(alert)
            except Exception as e:
                self._error(f"sink {type(sink).__name__}", e)

    def _error(self, where: str, exc: BaseException) -> None:
        self.errors += 1
        if self._on_error is not None:
            self._on_error(where, exc)
        elif where not in self._reported:
            self._reported.add(where)
            log.warning("trainmon: error in %s (reported once, counted after): %r", where, exc)


_CHUNK = 256  # records of one rank fed to each rule in turn


def severity_at_least(alert: Alert, threshold: Severity | str) -> bool:
    return alert.severity.at_least(threshold)
