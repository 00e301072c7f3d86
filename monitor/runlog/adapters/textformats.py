"""The line formats `text.TextLogSource` reads: Megatron-LM iteration lines and llm.c lines (see text.py).

Each format turns one line (decoded, without its end) into a `Parsed`, or None when the line is not one
of its records. The parsers take time linear in the line's length, whatever the line holds (the reader
may be handed a line of 8 MiB): fields are found by str.split/partition, and the few regular
expressions left either start at a literal and hold no nested repetition or are applied by fullmatch
to one short token. Numbers must be ASCII numeric syntax (`strict.ascii_float`): a value of a field
that is not is left out of the record and named in `Parsed.bad`, which the reader reports; a step
that is not raises ValueError (the reader skips and reports the line).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from monitor.runlog.adapters.strict import ascii_float, ascii_int
from monitor.schema import MAX_STEP

MAX_EXTRA_SCALARS = 12


@dataclass
class Parsed:
    step: int
    fields: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    closes: bool = True  # the line completes its step
    max_steps: int | None = None
    time: float | None = None
    consumed_tokens: float | None = None
    bad: list[str] = field(default_factory=list)  # "name='value'" of values that are not numbers: left out


def _key(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _whole(s: str, what: str) -> int:
    """A step-like number: ASCII digits only ("١٢" matches the patterns' \\d, which is any script's)."""
    n = ascii_int(s)
    if n is None:
        raise ValueError(f"{what} {s[:40]!r} is not a whole number in ASCII digits")
    if not 0 <= n <= MAX_STEP:
        raise ValueError(f"{what} {s[:40]!r} is outside 0..{MAX_STEP}")
    return n


class TextFormat:
    name = ""
    description = ""

    def sniff(self, head: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def parse(self, line: str) -> Parsed | None:  # pragma: no cover - abstract
        raise NotImplementedError


_STAMP = re.compile(r"\[(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?:[.,]\d+)?\]", re.ASCII)


def _stamp(line: str, end: int) -> float | None:
    m = _STAMP.search(line, 0, end)
    if m is None:
        return None
    try:
        return time.mktime(time.strptime(m.group(1).replace("T", " "), "%Y-%m-%d %H:%M:%S"))
    except (ValueError, OverflowError):
        return None


class MegatronText(TextFormat):
    name = "megatron-text"
    description = "Megatron-LM 'iteration N/ M | ... |' lines"
    # \d is any script's digit here, and a sign is taken, so that such an iteration is found, then refused
    # by _whole (reported).
    _iter = re.compile(r"\biteration\s+([+-]?\d+)\s*/\s*([+-]?\d+)\s*\|")
    # Bounded dashes: "-{8,}" would retry every length of a long run of dashes at each of its bytes.
    _args = re.compile(r"-{8} arguments -{8}")
    # Fields whose value must be a number (the others, extras, may be text: left out without a report).
    _known = frozenset({"learning rate", "lm loss", "loss", "loss scale", "grad norm", "number of skipped iterations",
                        "number of nan iterations", "consumed tokens"})

    def sniff(self, head: str) -> bool:
        return self._iter.search(head) is not None or self._args.search(head) is not None

    def parse(self, line: str) -> Parsed | None:
        m = self._iter.search(line)
        if m is None:
            return None
        total = _whole(m.group(2), "iteration count")
        p = Parsed(step=_whole(m.group(1), "iteration"), max_steps=total or None, time=_stamp(line, m.start()))
        f = p.fields
        loss_key = None
        # "| name: value |" segments after the iteration's "|" (the last may run to the line's end).
        for segment in line[m.end():].split("|"):
            name, colon, text = segment.partition(":")
            name, text = name.strip().lower(), text.strip()
            if not colon or not name:
                continue
            value = ascii_float(text)
            if value is None:
                if name in self._known or name.startswith("elapsed time per iteration"):
                    p.bad.append(f"{name}={text[:40]!r}")
                continue
            if name == "learning rate":
                f["lr"] = [value]
            elif name in ("lm loss", "loss") and loss_key in (None, "loss"):
                f["loss"], loss_key = value, name
            elif name == "loss scale":
                f["loss_scale"] = value
            elif name == "grad norm":
                f["grad_norm"] = value
            elif name.startswith("elapsed time per iteration"):
                f["step_time"] = value / 1000.0 if "(ms)" in name else value
            elif name == "number of skipped iterations":
                f["skipped"] = value > 0
                p.scalars["skipped_iterations"] = value
            elif name == "number of nan iterations":
                p.scalars["nan_iterations"] = value
            elif name == "consumed tokens":
                p.consumed_tokens = value
            elif len(p.scalars) < MAX_EXTRA_SCALARS:
                p.scalars[_key(name)] = value
        return p


_PAIR_KEY = re.compile(r"[A-Za-z_]+")


def _is_pair(token: str) -> bool:
    """Whether a token is KEY:VALUE, KEY letters and underscores, VALUE not empty."""
    k, colon, v = token.partition(":")
    return bool(colon and v) and _PAIR_KEY.fullmatch(k) is not None


class LlmcText(TextFormat):
    name = "llmc"
    description = "llm.c 's:STEP trl:LOSS lr:LR norm:NORM' lines"
    _sniff = re.compile(r"(?:^|\s)s:\d+\s+(?:trl|tel):\S", re.M)
    _keys = {"trl": "loss", "lr": "lr", "norm": "grad_norm"}

    def sniff(self, head: str) -> bool:
        return self._sniff.search(head) is not None

    def parse(self, line: str) -> Parsed | None:
        # A record is an "s:STEP" token followed by one or more KEY:VALUE tokens up to the line's end: the
        # first such token of the line's trailing run of KEY:VALUE tokens (found backwards, once each).
        tokens = line.split()
        start = len(tokens)
        while start > 0 and _is_pair(tokens[start - 1]):
            start -= 1
        # A signed step ("s:-1") is found too, so that _whole refuses it by name (the reader reports it).
        at = next((i for i in range(start, len(tokens) - 1)
                   if tokens[i].startswith("s:") and tokens[i][2:].lstrip("+-").isdecimal()), None)
        if at is None:
            return None
        p = Parsed(step=_whole(tokens[at][2:], "step"), closes=False)
        for token in tokens[at + 1:]:
            k, _, v = token.partition(":")
            if k == "trl":
                p.closes = True  # llm.c writes the training line last in a step (a bad loss too)
            x = ascii_float(v)
            if x is None:
                p.bad.append(f"{k}={v[:40]!r}")
                continue
            field_name = self._keys.get(k)
            if field_name == "lr":
                p.fields["lr"] = [x]
            elif field_name is not None:
                p.fields[field_name] = x
            elif k == "tel":
                p.scalars["val_loss"] = x
            elif len(p.scalars) < MAX_EXTRA_SCALARS:
                p.scalars[k] = x
        return p


TEXT_FORMATS: tuple[TextFormat, ...] = (MegatronText(), LlmcText())
BY_NAME = {f.name: f for f in TEXT_FORMATS}
