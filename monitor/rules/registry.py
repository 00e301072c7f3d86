"""The rule registry: every rule class by id; duplicate ids are rejected.

Built-in rules register when `monitor.rules` is imported. A user adds their own:

    from monitor.rules import Rule, RuleConfig, Finding, register

    @register
    class MyRule(Rule):
        '''One line.

        Symptom: ...
        Why: ...
        Fix: ...
        '''
        id = "custom.my_rule"; family = "custom"; severity = Severity.warning
        def observe(self, record): ...
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import ValidationError

from monitor.rules.base import Rule, parse_doc_sections

_ID_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


class RuleRegistry:
    def __init__(self) -> None:
        self._rules: dict[str, type[Rule]] = {}

    def register(self, cls: type[Rule]) -> type[Rule]:
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise TypeError(f"register() takes a Rule subclass, got {cls!r}")
        for attr in ("id", "family", "severity"):
            if not hasattr(cls, attr):
                raise TypeError(f"rule class {cls.__name__} must set `{attr}`")
        if not _ID_RE.match(cls.id):
            raise ValueError(f"rule id {cls.id!r} must look like 'family.name' (lowercase, dots, underscores)")
        if cls.id in self._rules and self._rules[cls.id] is not cls:
            raise ValueError(f"duplicate rule id {cls.id!r}: already registered by {self._rules[cls.id].__qualname__}")
        parse_doc_sections(cls)  # raises when Symptom / Why / Fix is missing
        self._rules[cls.id] = cls
        return cls

    def unregister(self, rule_id: str) -> None:
        self._rules.pop(rule_id, None)

    def get(self, rule_id: str) -> type[Rule]:
        try:
            return self._rules[rule_id]
        except KeyError:
            raise KeyError(f"unknown rule id {rule_id!r}") from None

    def __contains__(self, rule_id: object) -> bool:
        return rule_id in self._rules

    def __iter__(self) -> Iterator[type[Rule]]:
        return iter(sorted(self._rules.values(), key=lambda c: c.id))

    def __len__(self) -> int:
        return len(self._rules)

    def ids(self) -> list[str]:
        return sorted(self._rules)

    def validate_options(self, options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Validate `rules:` config against each rule's Config; errors name the dotted key."""
        errors: list[str] = []
        parsed: dict[str, Any] = {}
        for rule_id, opts in options.items():
            if rule_id not in self._rules:
                close = [i for i in self.ids() if i.split(".")[0] == str(rule_id).split(".")[0]]
                known = ", ".join(close or self.ids())
                errors.append(f"rules.{rule_id}: unknown rule id (known: {known})")
                continue
            try:
                parsed[rule_id] = self._rules[rule_id].Config.model_validate(dict(opts))
            except ValidationError as e:
                for err in e.errors():
                    key = ".".join(str(p) for p in err["loc"])
                    msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
                    if err["type"] == "extra_forbidden":
                        msg += f" (options: {', '.join(self._rules[rule_id].Config.model_fields)})"
                    errors.append(f"rules.{rule_id}.{key}: {msg}")
        if errors:
            raise ValueError("\n".join(errors))
        return parsed


REGISTRY = RuleRegistry()


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: add a rule to the default registry."""
    return REGISTRY.register(cls)


def validate_rule_options(options: Mapping[str, Mapping[str, Any]], registry: RuleRegistry | None = None) -> dict:
    _load_builtins()
    return (registry or REGISTRY).validate_options(options)


def rule_id_from_env(name: str) -> str:
    """TRAINMON_RULES__LOSS_SPIKE__... -> 'loss.spike' (the family is the part before the first underscore
    that names a registered rule)."""
    _load_builtins()
    for rule_id in REGISTRY.ids():
        if rule_id.replace(".", "_") == name:
            return rule_id
    return name


def _load_builtins() -> None:
    import monitor.rules.builtin  # noqa: F401  (registers the built-in rules)
