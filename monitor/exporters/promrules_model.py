"""An exported Prometheus alert as data: its rule, and the promtool test cases it carries.

Each `AlertDef` renders its alerting rule (`rule()`) and, for every `Case`, what promtool must
see (`expected()`): the alert's labels and its annotations rendered as Prometheus renders them.
Keeping the cases beside the definition makes the generated alerts.test.yml cover every alert,
firing and not firing, and change with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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

    def hint_template(self) -> str:
        if isinstance(self.hint, str):
            return self.hint
        lines = []
        for i, (rule_id, fix) in enumerate(sorted(self.hint.items())):
            lines += [f'{{{{- {"if" if i == 0 else "else if"} eq $labels.rule "{rule_id}" -}}}}', fix]
        return "\n".join([*lines, "{{- else -}}", self.hint_default, "{{- end -}}"])

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity, **self.labels},
            "annotations": {"summary": self.summary, "hint": self.hint_template()},
        }

    def expected(self, e: Expect) -> dict[str, Any]:
        """What promtool must see: labels (rule labels over the series'), annotations rendered."""
        labels = {**e.labels, **{k: _render(v, e.labels, e.value) for k, v in self.labels.items()},
                  "severity": _render(self.severity, e.labels, e.value)}
        if isinstance(self.hint, str):
            hint = self.hint
        else:
            hint = self.hint.get(e.labels.get("rule", ""), self.hint_default)
        return {"exp_labels": dict(sorted(labels.items())),
                "exp_annotations": {"summary": _render(self.summary, e.labels, e.value),
                                    "hint": _render(hint, e.labels, e.value)}}


_TEMPLATE_RE = re.compile(r'\{\{\s*\$(labels\.(\w+)|value\s*\|\s*printf\s+"([^"]+)")\s*\}\}')


def _render(template: str, labels: Mapping[str, str], value: float) -> str:
    """Expand the two template forms the definitions use, as Prometheus does."""
    def sub(m: re.Match) -> str:
        return labels.get(m.group(2), "") if m.group(2) else m.group(3) % value

    return _TEMPLATE_RE.sub(sub, template)
