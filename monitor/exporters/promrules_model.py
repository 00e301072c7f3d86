"""An exported Prometheus alert as data: its rule, and the promtool test cases it carries.

Each `AlertDef` renders its alerting rule (`rule()`) and, for every `Case`, what promtool must
see (`expected()`): the alert's labels and its annotations rendered as Prometheus renders them.
Keeping the cases beside the definition makes the generated alerts.test.yml cover every alert,
firing and not firing, and change with it.

Every alert carries a `runbook_url`: the section of docs/rules.md (the rule catalogue, `monitor
rules --markdown`) of the rule it exports, `<base>#<anchor>` with the anchor GitHub generates for
the section's heading (`## <rule id>`). The base is where docs/rules.md is read: by default the
repository-relative `docs/rules.md`; pass a URL (e.g. `https://github.com/ORG/REPO/blob/main/docs/rules.md`)
for links that open from a notification.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

RUNBOOK_BASE = "docs/rules.md"


def check_job(job: str) -> str:
    """`job`, the scrape job's name, which goes into every exported PromQL selector (job="..."); ValueError
    naming it when a quote, a backslash or a control character in it would break, or rewrite, them."""
    if not isinstance(job, str) or not job or any(c in job for c in '"\\') or not job.isprintable():
        raise ValueError(f"job {job!r}: a Prometheus job name without quotes, backslashes or control characters")
    return job


def heading_anchor(heading: str) -> str:
    """The anchor GitHub generates for a Markdown heading: lower case, punctuation other than '-' and '_'
    dropped, spaces as '-' ("## grad_norm.spike" -> "grad_normspike"). Headings are unique here."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_url(rule_id: str | None, base: str = RUNBOOK_BASE) -> str:
    """The runbook of a rule: its section of docs/rules.md under `base`; None: the catalogue itself."""
    return f"{base}#{heading_anchor(rule_id)}" if rule_id else base


def _choose(by_rule: Mapping[str, str], default: str) -> str:
    """A template choosing by the alert's `rule` label among by_rule's entries, else default."""
    lines = []
    for i, (rule_id, text) in enumerate(sorted(by_rule.items())):
        lines += [f'{{{{- {"if" if i == 0 else "else if"} eq $labels.rule "{rule_id}" -}}}}', text]
    return "\n".join([*lines, "{{- else -}}", default, "{{- end -}}"])


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    values: str

    def text(self) -> str:
        inner = ", ".join(f'{k}="{v}"' for k, v in self.labels.items())
        return f"{self.name}{{{inner}}}"


@dataclass
class Expect:
    """One expected alert: the labels of the expression's result, and its value (for $value)."""

    labels: dict[str, str]
    value: float = 1.0


@dataclass
class Case:
    """A promtool test: input series, and at each eval time the alerts expected (empty: none fires)."""

    series: list[Series]
    checks: list[tuple[str, list[Expect]]]
    interval: str = "1m"


@dataclass
class AlertDef:
    name: str
    expr: str
    for_: str
    severity: str  # a severity, or a template ({{ $labels.severity }})
    summary: str  # template: {{ $labels.X }} and {{ $value | printf "FMT" }} only
    hint: str | Mapping[str, str]  # a sentence, or rule id -> sentence (chosen by the alert's `rule` label)
    hint_default: str = ""  # with a mapping: for rules it does not list ({{ $labels.X }} allowed)
    labels: dict[str, str] = field(default_factory=dict)
    cases: list[Case] = field(default_factory=list)
    # The rule whose section of docs/rules.md is the runbook: by default the `rule` label; with a hint
    # mapping, chosen by the alert's `rule` label among the mapping's rules (the catalogue for others).
    runbook: str | None = None

    def hint_template(self) -> str:
        if isinstance(self.hint, str):
            return self.hint
        return _choose(self.hint, self.hint_default)

    def runbook_template(self, base: str = RUNBOOK_BASE) -> str:
        if isinstance(self.hint, str):
            return runbook_url(self.runbook or self.labels.get("rule"), base)
        return _choose({rule_id: runbook_url(rule_id, base) for rule_id in self.hint}, runbook_url(None, base))

    def rule(self, runbook_base: str = RUNBOOK_BASE) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity, **self.labels},
            "annotations": {"summary": self.summary, "hint": self.hint_template(),
                            "runbook_url": self.runbook_template(runbook_base)},
        }

    def expected(self, e: Expect, runbook_base: str = RUNBOOK_BASE) -> dict[str, Any]:
        """What promtool must see: labels (rule labels over the series'), annotations rendered."""
        labels = {**e.labels, **{k: _render(v, e.labels, e.value) for k, v in self.labels.items()},
                  "severity": _render(self.severity, e.labels, e.value)}
        if isinstance(self.hint, str):
            hint, runbook = self.hint, runbook_url(self.runbook or self.labels.get("rule"), runbook_base)
        else:
            rule_id = e.labels.get("rule", "")
            hint = self.hint.get(rule_id, self.hint_default)
            runbook = runbook_url(rule_id if rule_id in self.hint else None, runbook_base)
        return {"exp_labels": dict(sorted(labels.items())),
                "exp_annotations": {"summary": _render(self.summary, e.labels, e.value),
                                    "hint": _render(hint, e.labels, e.value), "runbook_url": runbook}}


_TEMPLATE_RE = re.compile(r'\{\{\s*\$(labels\.(\w+)|value\s*\|\s*printf\s+"([^"]+)")\s*\}\}')


def _render(template: str, labels: Mapping[str, str], value: float) -> str:
    """Expand the two template forms the definitions use, as Prometheus does."""
    def sub(m: re.Match) -> str:
        return labels.get(m.group(2), "") if m.group(2) else m.group(3) % value

    return _TEMPLATE_RE.sub(sub, template)
