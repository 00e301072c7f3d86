"""What the generated exports read from the rule catalogue: each rule's config, fix and severity.

Thresholds written into the alert rules and drawn on the dashboards come from the rules' own
config classes (their field defaults, or the options of a MonitorConfig), and hints from the
Fix sections of the rules' docstrings, so each default and each fix is stated once: in the rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monitor.rules.base import RuleConfig
from monitor.rules.registry import REGISTRY, _load_builtins


def rule_options(options: Any) -> dict[str, dict[str, Any]]:
    """Per-rule options from a MonitorConfig, a mapping of rule id to options, or None."""
    if options is None:
        return {}
    rules = getattr(options, "rules", options)
    if not isinstance(rules, Mapping):
        raise TypeError(f"options must be a MonitorConfig or a mapping of rule id to options, got {type(options)}")
    return {k: dict(v or {}) for k, v in rules.items()}


def rule_config(rule_id: str, options: Any = None) -> RuleConfig:
    """A registered rule's validated config: its options in `options` (see rule_options) over the
    defaults of its config class. Raises KeyError for an id no rule registered."""
    _load_builtins()
    return REGISTRY.get(rule_id).Config.model_validate(rule_options(options).get(rule_id, {}))


def rule_fix(rule_id: str) -> str:
    """A registered rule's Fix paragraph as a sentence (capitalised, ending with a full stop)."""
    _load_builtins()
    fix = REGISTRY.get(rule_id).doc_sections()["Fix"].strip()
    fix = fix[:1].upper() + fix[1:]
    return fix if fix.endswith(".") else fix + "."


def rule_severity(rule_id: str, config: RuleConfig) -> str:
    """The severity a registered rule raises under `config` (a rule's options may choose it)."""
    return REGISTRY.get(rule_id).default_severity(config).value
