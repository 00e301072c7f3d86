"""Rule base class and the small value types rules return.

A rule is declarative: an id (a contract: configs, alerts and dashboards name it), a
family, a default severity, a pydantic config model whose fields are documented (and
whose defaults other modules read: `REGISTRY.get(id).Config().<option>`), and a
docstring in Symptom / Why / Fix shape from which `monitor rules` and the docs are
generated. One instance per (run, rank); `observe` sees each StepRecord once and
must do O(1) amortized work.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from monitor.schema import RunInfo, Severity, StepRecord, no_bool_for_a_number


class RuleConfig(BaseModel):
    """Options every rule has. Rules subclass this to add their thresholds."""

    model_config = ConfigDict(extra="forbid")
    _numbers = field_validator("*", mode="before")(classmethod(no_bool_for_a_number))

    enabled: bool = Field(True, description="Evaluate this rule.")
    severity: Severity | None = Field(None, description="Override the rule's default severity.")
    resolve_after: int = Field(
        50, ge=1, description="Steps without the condition before a firing alert is marked resolved.",
    )
    cooldown_steps: int = Field(
        200, ge=0, description="After an alert resolves, steps during which the same rule stays quiet.",
    )


@dataclass
class Finding:
    """What a rule reports for one record; the engine turns it into an Alert (or not, if already active)."""

    message: str
    hint: str
    evidence: dict[str, Any] = field(default_factory=dict)
    severity: Severity | None = None  # None: the rule's (configured) severity
    step: int | None = None  # None: the record's step


class Ongoing(Finding):
    """A condition that still holds while its rule's alert is active at this severity or above: the
    engine keeps that alert as it is, so the rule composes no message or evidence for it (`ongoing`)."""


_ONGOING = {s: Ongoing(message="", hint="", severity=s) for s in Severity}


def ongoing(severity: Severity) -> Finding:
    """The finding a rule returns, instead of composing one, when `severity` is no worse than `firing`."""
    return _ONGOING[severity]


_DOC_SECTIONS = ("Symptom", "Why", "Fix")


class Rule:
    """Base class of every rule. Subclasses set the class attributes and implement `observe`."""

    id: ClassVar[str]
    family: ClassVar[str]
    severity: ClassVar[Severity]
    Config: ClassVar[type[RuleConfig]] = RuleConfig
    once: ClassVar[bool] = False  # at most one alert per (run, rank), e.g. a setup mistake
    # "global": judged on rank 0's records only (gradients, LR, loss scale and attention are the same on
    # every rank after the all-reduce); "rank": judged on every rank's own records (loss, stalls).
    scope: ClassVar[str] = "global"
    # A StepRecord field without which `observe` does nothing (returns None and changes no state): the
    # engine skips the call for records where that field is empty (the daemon's hot path).
    needs: ClassVar[str | None] = None

    # True once the rule has nothing more to say (a warmup verdict, a preflight check): the engine reads
    # it after every `observe` and stops feeding the rule that rank's records. An alert it raised stays
    # active. A class default, so that a subclass whose __init__ skips super().__init__ still has it.
    retired: bool = False
    # The severity of this rule's alert active on the rank it judges (None: none), kept by the engine. A
    # rule whose condition holds on many records in a row (a saturated clip) reads it to skip composing
    # a finding nobody would read: at or below it, `ongoing(severity)` says the same, for nothing.
    firing: Severity | None = None

    def __init__(self, config: RuleConfig, run: RunInfo) -> None:
        self.config = config
        self.run = run
        self.retired = False

    def observe(self, record: StepRecord) -> Finding | None:  # pragma: no cover - abstract
        """A finding for this record, or None. Called once per record, in step order per rank, for every
        record the daemon reads: return early on records that are quiet for this rule, and read the
        options that test needs from plain attributes set in __init__ (a pydantic model's attributes
        are several times slower to read)."""
        raise NotImplementedError

    def on_start(self) -> Finding | None:
        """A finding from the run's facts alone (RunInfo), before any step: preflight checks."""
        return None

    def on_tick(self, now: float) -> Finding | None:
        """A finding from the clock alone (a run that stopped): called by the daemon and the watchdog."""
        return None

    # -- declarative metadata -------------------------------------------------

    @classmethod
    def default_severity(cls, config: RuleConfig | None = None) -> Severity:
        if config is not None and config.severity is not None:
            return config.severity
        return cls.severity

    @classmethod
    def doc_sections(cls) -> dict[str, str]:
        """The docstring's Symptom / Why / Fix paragraphs (validated at registration)."""
        return parse_doc_sections(cls)

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.split("\n\n", 1)[0].strip()

    @classmethod
    def config_fields(cls) -> list[tuple[str, Any, str]]:
        """(name, default, description) of every option, for `monitor rules` and the docs."""
        out = []
        for name, f in cls.Config.model_fields.items():
            out.append((name, f.get_default(call_default_factory=True), f.description or ""))
        return out


_SECTION_RE = re.compile(r"^(Symptom|Why|Fix):\s*(.*)$")


def parse_doc_sections(cls: type) -> dict[str, str]:
    doc = inspect.getdoc(cls) or ""
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in doc.splitlines():
        m = _SECTION_RE.match(line.strip())
        if m:
            current = m.group(1)
            sections[current] = [m.group(2)] if m.group(2) else []
        elif current is not None:
            if not line.strip() and sections[current]:
                current = None if current == "Fix" else current
                continue
            sections[current].append(line.strip())
    missing = [s for s in _DOC_SECTIONS if not " ".join(sections.get(s, [])).strip()]
    if missing:
        raise TypeError(f"rule {getattr(cls, 'id', cls.__name__)}: docstring lacks section(s) {', '.join(missing)}")
    return {k: " ".join(x for x in sections[k] if x).strip() for k in _DOC_SECTIONS}
