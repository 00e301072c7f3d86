"""One rule's alert lifecycle on one rank, so rules only say "the condition holds now".

A finding opens an alert (firing) unless that rule's alert is already active; a more severe finding
escalates it; `resolve_after` quiet records resolve it; `cooldown_steps` then keep the rule quiet, so
one problem is one alert (a finding more severe than the resolved alert still gets through). A rule
marked `once` fires at most once and never resolves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from monitor.rules.base import Finding, Ongoing, Rule
from monitor.schema import Alert, StepRecord


@dataclass
class RuleState:
    rule: Rule
    active: Alert | None = None
    quiet: int = 0
    fired: bool = False
    cooldown_until: int = -1
    cooldown_severity: int = -1  # Severity.rank of the alert the cooldown follows: only worse gets through

    def set_active(self, alert: Alert | None) -> None:
        """The rule's active alert on this rank (None: none); the rule sees its severity (`Rule.firing`)."""
        self.active = alert
        self.rule.firing = alert.severity if alert is not None else None

    def transition(self, record: StepRecord, finding: Finding | None, run_id: str) -> Alert | None:
        """What `finding` (None: the condition does not hold) at `record` changes: the alert that fires or
        resolves, or None when nothing is to be said."""
        rule = self.rule
        cfg = rule.config
        if finding is None:
            if self.active is None or rule.once:
                return None
            self.quiet += 1
            if self.quiet < cfg.resolve_after:
                return None
            resolved = self.active.model_copy(update={"status": "resolved", "step": record.step, "time": time.time()})
            self.set_active(None)
            self.cooldown_until = record.step + cfg.cooldown_steps
            self.cooldown_severity = resolved.severity.rank
            return resolved
        severity = finding.severity or rule.default_severity(cfg)
        if cfg.severity is not None:  # a configured severity overrides what the rule chose
            severity = cfg.severity
        self.quiet = 0
        if self.active is not None:
            if severity.rank <= self.active.severity.rank:
                return None  # still the same problem: one alert, not one per step
        else:
            if rule.once and self.fired:
                return None
            if record.step < self.cooldown_until and severity.rank <= self.cooldown_severity:
                return None
        if isinstance(finding, Ongoing):  # said only while an alert at least as severe is active: never one of its own
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
            run=run_id,
            attempt=record.attempt,
        )
        self.set_active(alert)
        self.fired = True
        return alert
