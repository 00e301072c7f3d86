"""The rules engine and built-in rules: pure Python, no torch."""

from monitor.rules import builtin as _builtin  # noqa: F401,E402  (registers built-ins)
from monitor.rules.base import Finding, Rule, RuleConfig, ongoing
from monitor.rules.engine import AlertSink, RulesEngine
from monitor.rules.registry import REGISTRY, RuleRegistry, register

__all__ = ["AlertSink", "Finding", "REGISTRY", "Rule", "RuleConfig", "RuleRegistry", "RulesEngine", "ongoing", "register"]
