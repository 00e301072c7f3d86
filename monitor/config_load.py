"""What `monitor.config.load_config` reads a config from besides a dict: YAML/TOML/JSON files and
TRAINMON_* environment variables, and how it names a bad key.

Configuration variables are TRAINMON_<SECTION>__<FIELD> (double underscore nests; rule ids with
underscores for dots). A name that is no config key is ignored, never fatal (`ignored_env`); the old
MONITOR_* config variables are no longer read (`legacy_env`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from monitor import jsontext
from monitor.config import ConfigError, MonitorConfig

log = logging.getLogger("trainmon")

# Configuration variables: TRAINMON_<SECTION>__<FIELD>. Not MONITOR_*: Kubernetes injects MONITOR_PORT,
# MONITOR_SERVICE_HOST, ... into every pod of a namespace with a Service named `monitor`. MONITOR_* config
# variables are no longer read (MONITOR_RUN_DIR, the run directory, is not a config variable: unchanged).
ENV_PREFIX = "TRAINMON_"
CONFIG_ENV = "TRAINMON_CONFIG"  # a config file, used when no config is given
_LEGACY_PREFIX = "MONITOR_"
# Environment variables under the prefixes that are not config overrides.
_ENV_RESERVED = {CONFIG_ENV}
_LEGACY_RESERVED = {"MONITOR_RUN_DIR"}
# Service links Kubernetes injects for a Service named trainmon(-...): listed by `monitor config`, never warned of.
_SERVICE_LINK = re.compile(r".*_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT|PORT_\d+_(TCP|UDP|SCTP)(_\w+)?)$")


def _parse_env_value(raw: str) -> Any:
    try:
        return jsontext.loads(raw)
    except ValueError:
        return raw


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a field that is a section (or an optional one), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def _env_key(parts: list[str]) -> list[str] | None:
    """The config key (path) that a variable's lowercased `__`-separated parts name, rule ids restored
    (loss_spike -> loss.spike); None when the config has no key of that name."""
    if parts[0] == "rules":
        if len(parts) == 1:
            return parts  # the whole mapping, as JSON
        from monitor.rules.registry import REGISTRY, rule_id_from_env

        rule_id = rule_id_from_env(parts[1])
        if rule_id not in REGISTRY or len(parts) > 3:
            return None
        if len(parts) == 3 and parts[2] not in REGISTRY.get(rule_id).Config.model_fields:
            return None
        return ["rules", rule_id, *parts[2:]]
    model: type[BaseModel] = MonitorConfig
    for i, p in enumerate(parts):
        field = model.model_fields.get(p)
        if field is None or field.exclude:  # excluded: Python only (on_alert)
            return None
        sub = section_model(field.annotation)
        if sub is not None:
            model = sub
            continue
        rest = parts[i + 1:]
        if not rest or (typing.get_origin(field.annotation) is dict and len(rest) == 1):  # a key of a mapping
            return parts
        return None
    return parts


def scan_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """(overrides, {dotted key: variable name}, ignored names) of the TRAINMON_* variables."""
    out: dict[str, Any] = {}
    origins: dict[str, str] = {}
    ignored: list[str] = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in _ENV_RESERVED:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__") if p]
        key = _env_key(parts) if parts else None
        if key is None:
            ignored.append(name)
            continue
        node = out
        for i, p in enumerate(key[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                other = origins.get(".".join(key[:i + 1]), f"another {ENV_PREFIX}* variable")
                raise ConfigError(f"environment variable {name} conflicts with {other} (not a mapping)")
        node[key[-1]] = _parse_env_value(raw)
        origins[".".join(key)] = name
    return out, origins, ignored


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """TRAINMON_<SECTION>__<FIELD>=value (double underscore nests), e.g. TRAINMON_METRICS__PORT=9800.

    Rule options: TRAINMON_RULES__<RULE_ID>__<OPTION>, where the rule id is written with
    underscores for dots (TRAINMON_RULES__LOSS_SPIKE__Z_CRITICAL=9 -> rules['loss.spike'].z_critical).
    Names that are no config key are left out (`ignored_env` lists them); a known key with a bad
    value fails in `load_config`, naming the variable.
    """
    return scan_env(os.environ if environ is None else environ)[0]


def ignored_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """TRAINMON_* variables that name no config key (a typo, a Service link Kubernetes injected): not read."""
    return scan_env(os.environ if environ is None else environ)[2]


def legacy_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """MONITOR_* variables that would set a config key under the old prefix: no longer read."""
    environ = os.environ if environ is None else environ
    out = []
    for name in sorted(environ):
        if not name.startswith(_LEGACY_PREFIX) or name in _LEGACY_RESERVED:
            continue
        rest = name[len(_LEGACY_PREFIX):]
        parts = [p.lower() for p in rest.split("__") if p]
        if ENV_PREFIX + rest == CONFIG_ENV or (parts and _env_key(parts) is not None):
            out.append(name)
    return out


_warned: set[tuple[str, ...]] = set()


def warn_env(ignored: list[str], legacy: list[str]) -> None:
    """Once per process and set of names: what the environment holds that is not read."""
    typos = [n for n in ignored if "__" in n or not _SERVICE_LINK.match(n)]
    if (not typos and not legacy) or (*typos, "|", *legacy) in _warned:
        return
    _warned.add((*typos, "|", *legacy))
    if typos:
        log.warning("trainmon: ignoring environment variable(s) that name no config key: %s", ", ".join(typos))
    if legacy:
        log.warning("trainmon: not reading %s: configuration variables now use the %s prefix (%s)",
                    ", ".join(legacy), ENV_PREFIX,
                    ", ".join(ENV_PREFIX + n[len(_LEGACY_PREFIX):] for n in legacy))


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if p != "__root__")


def _from_env(key: str, origins: Mapping[str, str]) -> str:
    """" (from TRAINMON_...)" when environment variables set `key`, a key inside it or a section holding it."""
    names = sorted({name for k, name in origins.items()
                    if key == k or key.startswith(k + ".") or k.startswith(key + ".")})
    return f" (from {', '.join(names)})" if names else ""


def format_validation_error(err: ValidationError, source: str, origins: Mapping[str, str] | None = None) -> str:
    """One line per problem, naming the dotted key and, for `origins` ({dotted key: variable name}), the
    environment variable that set it (never its value: it may be a secret URL)."""
    origins = origins or {}
    lines = []
    for e in err.errors():
        key = _dotted(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")  # our validators' own messages
        if not key:
            # Raised by a model validator whose message already names its keys ("rules.x.y: ...").
            for line in msg.splitlines():
                head, sep, rest = line.partition(": ")
                named = _from_env(head, origins) if sep and " " not in head else ""
                lines.append(f"  {head}{named}{sep}{rest}")
            continue
        lines.append(f"  {key}{_from_env(key, origins)}: {msg}")
    return f"invalid trainmon config ({source}):\n" + "\n".join(lines)


# A quoted part of a parser's message that may be kept: one character (a bracket, a quote: the kind
# of problem), an escape naming one, or a token's name ('<block end>'). Longer quoted parts (a key, an
# alias, a tag, a value) are the file's content, which may be a secret: left out.
_KEEP_QUOTED = re.compile(r".|\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)|<[a-z ]+>", re.DOTALL)
_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")


def _without_content(text: str) -> str:
    """A parser's message, first line only, its quoted parts that may be content replaced by '...'."""
    def keep(m: re.Match[str]) -> str:
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        return m.group(0) if _KEEP_QUOTED.fullmatch(inner) else "'...'"

    line = text.strip().splitlines()[0] if text.strip() else ""
    return _QUOTED.sub(keep, line)


def _parse_error(path: Path, e: Exception) -> ConfigError:
    """Where the file could not be parsed and what kind of problem it is, never the file's content:
    PyYAML's message quotes the offending line (`url: https://...SECRET...`), so it is built from
    the error's marks and problem text instead; TOML and JSON messages name a position already."""
    import tomllib
    import yaml

    why = f"config file {path} could not be parsed"
    if isinstance(e, yaml.MarkedYAMLError):
        def at(mark: Any) -> str:
            return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

        kind = _without_content(e.problem or "") or "invalid YAML"
        if e.context:  # what the parser was in the middle of, and where that began
            kind += f" ({_without_content(e.context)}{at(e.context_mark)})"
        return ConfigError(f"{why}: YAML syntax error{at(e.problem_mark or e.context_mark)}: {kind}")
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow (a control character)
        what = f"character #x{e.character:04x}" if isinstance(e.character, int) else "character"
        return ConfigError(f"{why}: YAML: unacceptable {what} at character {e.position + 1} of the file")
    if isinstance(e, json.JSONDecodeError):
        return ConfigError(f"{why}: JSON syntax error at line {e.lineno}, column {e.colno}: "
                           f"{_without_content(e.msg).removesuffix(' at')}")  # its msg ends "at" a position
    if isinstance(e, tomllib.TOMLDecodeError):  # its message ends "(at line L, column C)"
        return ConfigError(f"{why}: TOML syntax error: {_without_content(str(e))}")
    if isinstance(e, RecursionError):
        return ConfigError(f"{why}: nested too deeply")
    return ConfigError(f"{why}: {type(e).__name__}: {_without_content(str(e))}")


def _read_text(path: Path) -> str:
    """The file's text (UTF-8); a ConfigError naming the file, and where a byte is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {path} could not be read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"config file {path} is not UTF-8 text: a byte that is not UTF-8 at line {line}, "
                          f"byte {column} of the line") from None


MAX_CONFIG_BYTES = 16 << 20  # far past any config; a bigger file is not one (read whole, it could fill memory)


def read_file(path: Path) -> dict[str, Any]:
    from monitor.runlog.adapters.strict import not_regular

    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:  # a loop of symlinks, a name too long, a directory it may not look into
        raise ConfigError(f"config file {path} could not be read: {e.strerror or e}") from None
    kind = not_regular(st.st_mode)
    if kind is not None:  # a FIFO would block the read for ever, a device never end it
        raise ConfigError(f"config file {path} is {kind}, not a file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} holds {st.st_size} bytes: more than a config ({MAX_CONFIG_BYTES})")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"config file {path}: unsupported extension {suffix!r} (use .yaml, .yml, .toml or .json)")
    text = _read_text(path)
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = jsontext.loads(text)
        else:
            import yaml

            data = jsontext.clean(yaml.safe_load(text))
    except Exception as e:  # parse errors of any of the three formats
        raise _parse_error(path, e) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    # A file may hold the monitor's config under a `monitor:` key beside other tools' settings.
    if set(data) == {"monitor"} and isinstance(data["monitor"], dict):
        data = data["monitor"]
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def load(source: MonitorConfig | Mapping[str, Any] | str | os.PathLike[str] | None, *,
         environ: Mapping[str, str] | None, warn: bool) -> MonitorConfig:
    """monitor.config.load_config (documented there)."""
    environ = os.environ if environ is None else environ
    if source is None and environ.get(CONFIG_ENV):
        source = environ[CONFIG_ENV]
    if isinstance(source, MonitorConfig):
        data = source.model_dump(exclude={"on_alert"})
        on_alert = source.on_alert
        where = "MonitorConfig"
    elif isinstance(source, Mapping):
        data, on_alert, where = dict(source), None, "dict"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        data, on_alert, where = read_file(path), None, str(path)
    elif source is None:
        data, on_alert, where = {}, None, "defaults"
    else:
        raise TypeError(f"config must be a MonitorConfig, a dict or a path, got {type(source).__name__}")
    overrides, origins, ignored = scan_env(environ)
    if warn:
        warn_env(ignored, legacy_env(environ))
    if overrides:
        data = _merge(data, overrides)
        where += f" + {ENV_PREFIX}* environment"
    if on_alert is not None:
        data["on_alert"] = on_alert
    try:
        return MonitorConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where, origins)) from None
