"""The rules engine: runs every enabled rule over a stream of StepRecords.

It owns the alert lifecycle, so rules only say "the condition holds now":
a finding opens an alert (firing) unless that rule's alert is already active;
a more severe finding escalates it; `resolve_after` quiet steps resolve it;
`cooldown_steps` then keep the rule quiet, so one problem is one alert (a
finding more severe than the resolved alert still gets through).
State is per (rank, rule); the engine serves one run. An exception inside a
rule or a sink is caught and counted: a broken rule never breaks a run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import REGISTRY, RuleRegistry, _load_builtins
from monitor.schema import Alert, RunInfo, Severity, StepRecord

log = logging.getLogger("trainmon.rules")


class AlertSink(Protocol):
    def emit(self, alert: Alert) -> None: ...


@dataclass
class _RuleState:
    rule: Rule
    active: Alert | None = None
    quiet: int = 0
    fired: bool = False
    cooldown_until: int = -1
    cooldown_severity: int = -1  # Severity.rank of the alert the cooldown follows: only worse gets through

    def __post_init__(self) -> None:
        self.observe = self.rule.observe  # the bound method, looked up once: this loop is the daemon's hot path
        self.batch = self.rule.observe_batch  # None, or the rule's own loop over a batch


class RulesEngine:
    def __init__(
        self,
        run: RunInfo,
        options: Mapping[str, Any] | None = None,
        *,
        registry: RuleRegistry | None = None,
        sinks: Iterable[AlertSink] = (),
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
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
        self.alerts: list[Alert] = []
        self.errors = 0
        self._on_error = on_error
        self._reported: set[str] = set()
        self._states: dict[int, list[_RuleState]] = {}
        self._retired: dict[int, list[_RuleState]] = {}
        self._retiring: list[Rule] = []  # rules that set `retired`, not yet taken out of their rank's loop
        # Per rank, the states in registry order cut into runs of equal `needs`: a run whose field the
        # record lacks is skipped whole.
        self._segments: dict[int, list[tuple[str | None, list[_RuleState]]]] = {}

    # Pickling (the daemon's state file): rule state and alert history travel; sinks and callbacks are
    # the process's own and are attached again after loading.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["sinks"] = []
        state["_on_error"] = None
        state["alerts"] = self.alerts[-200:]
        state.pop("_segments", None)  # derived from _states: rebuilt on loading
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "_retiring" not in state:  # pickled by an older version
            self._retiring = []
        self._segments = {rank: _segments(states) for rank, states in self._states.items()}
        for group in (self._states, self._retired):
            for states in group.values():
                for st in states:  # the bound methods, as of this version of the rules
                    st.observe, st.batch = st.rule.observe, st.rule.observe_batch

    def attach(self, sinks: Iterable[AlertSink], on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self.sinks = list(sinks)
        self._on_error = on_error

    @property
    def rule_ids(self) -> list[str]:
        return [cls.id for cls, _ in self._specs]

    def _states_for(self, rank: int) -> list[_RuleState]:
        states = self._states.get(rank)
        if states is None:
            states = []
            for cls, cfg in self._specs:
                if cls.scope == "global" and rank != 0:
                    continue  # one verdict per run, from rank 0, not one per rank
                try:
                    rule = cls(cfg, self.run)
                except Exception as e:  # a rule that cannot start is skipped, not fatal
                    self._error(f"rule {cls.id} init", e)
                    continue
                rule._retire_sink = self._retiring
                if rule.retired:  # retired at birth: it sees one record, like any other
                    self._retiring.append(rule)
                states.append(_RuleState(rule))
            self._states[rank] = states
            self._segments[rank] = _segments(states)
        return states

    def observe(self, record: StepRecord) -> list[Alert]:
        """Feed one record; returns the alerts (firing or resolved) it caused."""
        out: list[Alert] = []
        segments = self._segments.get(record.rank)
        if segments is None:
            self._states_for(record.rank)
            segments = self._segments[record.rank]
        for needs, states in segments:
            if needs is not None and not getattr(record, needs):
                continue
            for st in states:
                try:
                    finding = st.observe(record)
                except Exception as e:
                    self._error(f"rule {st.rule.id}", e)
                    continue
                if finding is None and st.active is None:  # the common case: nothing to do
                    continue
                alert = self._transition(st, record, finding)
                if alert is not None:
                    out.append(alert)
                    self._deliver(alert)
        if self._retiring:
            self._retire(record.rank, self._states[record.rank])
        return out

    def _retire(self, rank: int, states: list[_RuleState]) -> None:
        """Rules that have said all they will (a warmup verdict, a preflight check) stop seeing this
        rank's records; an alert they raised stays active."""
        gone = [st for st in states if st.rule.retired]
        if not gone:
            return
        for st in gone:
            if not st.rule.retires:  # observe_many has fed it the rest of its batch: say so, once
                self._error(f"rule {st.rule.id} retired without declaring `retires = True`",
                            TypeError("undeclared retirement"))
        self._states[rank] = [st for st in states if not st.rule.retired]
        self._segments[rank] = _segments(self._states[rank])
        self._retired.setdefault(rank, []).extend(gone)
        ids = {id(st.rule) for st in gone}
        self._retiring[:] = [r for r in self._retiring if id(r) not in ids]

    def start(self, rank: int = 0) -> list[Alert]:
        """Run the checks that need only the run's facts (preflight); call once per rank, before its steps."""
        out: list[Alert] = []
        at = StepRecord.fast(step=self.run.start_step, rank=rank)
        for st in self._states_for(rank):
            try:
                finding = st.rule.on_start()
            except Exception as e:
                self._error(f"rule {st.rule.id} start", e)
                continue
            alert = self._transition(st, at, finding) if finding is not None else None
            if alert is not None:
                out.append(alert)
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
                at = StepRecord.fast(step=step, rank=rank)
                alert = self._transition(st, at, finding)
                if alert is not None:
                    out.append(alert)
                    self._deliver(alert)
        return out

    def observe_many(self, records: Iterable[StepRecord]) -> list[Alert]:
        """Feed many records: the same alerts, in the same order, as `observe` one by one.

        The daemon reads thousands of records a poll. Each run of consecutive records of one rank is
        fed rule by rule: a rule is mapped over the whole run (its `observe` calls happen in C), and
        only where it found something, or has an alert open, are the records walked in Python. The
        alerts are then delivered in record order, then registry order, as one by one would."""
        records = records if isinstance(records, list) else list(records)
        out: list[Alert] = []
        i, n = 0, len(records)
        while i < n:
            rank = records[i].rank
            j = i + 1
            while j < n and records[j].rank == rank:
                j += 1
            # Chunks small enough that their records stay in the CPU's cache while every rule reads them.
            for k in range(i, j, _CHUNK):
                chunk = records[k:min(k + _CHUNK, j)]
                out.extend(self._observe_batch(rank, chunk) if len(chunk) > 1 else self.observe(chunk[0]))
            i = j
        return out

    def _observe_batch(self, rank: int, batch: list[StepRecord]) -> list[Alert]:
        states = self._states.get(rank)
        if states is None:
            states = self._states_for(rank)
        found: list[tuple[int, int, Alert]] = []  # (record, rule in registry order, alert)
        subsets: dict[str, tuple[list[int], list[StepRecord]]] = {}  # records that have a field
        for k, st in enumerate(states):
            needs = st.rule.needs
            if needs is None:
                index, recs = None, batch
            else:
                sub = subsets.get(needs)
                if sub is None:
                    index = [i for i, r in enumerate(batch) if getattr(r, needs)]
                    sub = subsets[needs] = (index, [batch[i] for i in index])
                index, recs = sub
                if not recs:
                    continue
            if st.rule.retires:
                findings = self._walk(st, recs)
            else:
                findings = self._map(st, recs)
                if st.active is None and findings.count(None) == len(findings):
                    continue  # the common case: nothing found, nothing open
            for i, finding in enumerate(findings):
                if finding is _RAISED or (finding is None and st.active is None):
                    continue
                alert = self._transition(st, recs[i], finding)
                if alert is not None:
                    found.append((i if index is None else index[i], k, alert))
        found.sort(key=lambda f: (f[0], f[1]))
        for _, _, alert in found:
            self._deliver(alert)
        if self._retiring:
            self._retire(rank, self._states[rank])
        return [alert for _, _, alert in found]

    def _map(self, st: _RuleState, recs: list[StepRecord]) -> list:
        """st.observe over recs, in C (or the rule's own batch loop); a record whose call raised gets
        _RAISED (counted, no transition)."""
        findings: list = []
        if st.batch is not None:
            while len(findings) < len(recs):
                try:
                    st.batch(recs[len(findings):] if findings else recs, findings)
                except Exception as e:
                    self._error(f"rule {st.rule.id}", e)
                    findings.append(_RAISED)
            return findings
        it = iter(recs)
        while True:
            try:
                findings.extend(map(st.observe, it))  # on an exception, what came before stays
                return findings
            except Exception as e:
                self._error(f"rule {st.rule.id}", e)
                findings.append(_RAISED)

    def _walk(self, st: _RuleState, recs: list[StepRecord]) -> list:
        """st.observe record by record, stopping after the record on which the rule retired."""
        findings: list = []
        for r in recs:
            try:
                findings.append(st.observe(r))
            except Exception as e:
                self._error(f"rule {st.rule.id}", e)
                findings.append(_RAISED)
            if st.rule.retired:
                break
        return findings

    def emit(self, alert: Alert) -> None:
        """Deliver an alert raised outside the rules (preflight checks) through the same sinks."""
        if not alert.run:
            alert = alert.model_copy(update={"run": self.run.run_id})
        self._deliver(alert)

    def active(self) -> list[Alert]:
        return [st.active for group in (self._states, self._retired) for states in group.values() for st in states
                if st.active is not None]

    # -- lifecycle --------------------------------------------------------------

    def _transition(self, st: _RuleState, record: StepRecord, finding: Finding | None) -> Alert | None:
        rule = st.rule
        cfg = rule.config
        if finding is None:
            if st.active is None or rule.once:
                return None
            st.quiet += 1
            if st.quiet < cfg.resolve_after:
                return None
            resolved = st.active.model_copy(update={"status": "resolved", "step": record.step, "time": time.time()})
            st.active = None
            st.cooldown_until = record.step + cfg.cooldown_steps
            st.cooldown_severity = resolved.severity.rank
            return resolved
        severity = finding.severity or rule.default_severity(cfg)
        if cfg.severity is not None:  # a configured severity overrides what the rule chose
            severity = cfg.severity
        st.quiet = 0
        if st.active is not None:
            if severity.rank <= st.active.severity.rank:
                return None  # still the same problem: one alert, not one per step
        else:
            if rule.once and st.fired:
                return None
            if record.step < st.cooldown_until and severity.rank <= st.cooldown_severity:
                return None
        evidence = dict(finding.evidence)
        if finding.step is not None and finding.step != record.step:
            evidence.setdefault("detected_at", record.step)  # the alert's step is where the problem began
        alert = Alert(
            rule=rule.id,
            severity=severity,
            step=finding.step if finding.step is not None else record.step,
            rank=record.rank,
            message=finding.message,
            hint=finding.hint,
            evidence=evidence,
            run=self.run.run_id,
        )
        st.active = alert
        st.fired = True
        return alert

    def _deliver(self, alert: Alert) -> None:
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


_CHUNK = 256  # records per rule-by-rule pass of observe_many
_RAISED = object()  # a record on which a rule raised: counted, no transition (as in `observe`)


def _segments(states: list[_RuleState]) -> list[tuple[str | None, list[_RuleState]]]:
    out: list[tuple[str | None, list[_RuleState]]] = []
    for st in states:
        needs = st.rule.needs
        if out and out[-1][0] == needs:
            out[-1][1].append(st)
        else:
            out.append((needs, [st]))
    return out


def severity_at_least(alert: Alert, threshold: Severity | str) -> bool:
    return alert.severity.at_least(threshold)
