"""Other frameworks' TensorBoard tags -> StepRecord fields, framework detection, step assembly.

Signals a foreign log can carry: loss, lr (one value per param group), grad_norm, loss_scale,
skipped, step_time (seconds) and tokens. Each framework maps them from the tags it writes:

| framework | loss | lr | grad_norm | other |
|---|---|---|---|---|
| huggingface (Trainer) | `train/loss` | `train/learning_rate` | `train/grad_norm` | `eval/loss` -> scalars["val_loss"] |
| lightning | `train_loss`, `train_loss_step` or `loss` | `lr-<Opt>`, `lr-<Opt>/pg<N>` (one group each) | `grad_2.0_norm_total` | `grad_2.0_norm/<param>` -> param_norms, `val_loss` |
| megatron (Megatron-LM) | `lm loss` | `learning-rate` | `grad-norm` | `loss-scale`, `iteration-time` (s) -> step_time |

Ignored on purpose: HF's `train/epoch` and summary tags (`train/train_loss`, ...), Lightning's
`epoch` and `-momentum`/`-weight_decay` series, Megatron's `... vs samples` twins.

Detection (`detect`): each framework scores the number of its signals the tags seen so far
resolve (Lightning's bare `loss` only counts next to its `epoch` tag, since many hand-written
loops log a `loss` too); the highest score wins, ties go to the more specific tag scheme:
megatron > huggingface > lightning. An explicit mapping (`--map signal=tag`) overrides or extends
the detected framework's tags signal by signal; with no framework detected, the mapping alone
makes a generic "tensorboard" source. Mapping keys are signal names, or `scalars.NAME` to carry
any other tag into `StepRecord.scalars`; a tag may be an fnmatch pattern (`lr=opt/lr/*`: every
match is one param group, in natural order).

Scalars of one step arrive as separate events (one per add_scalar call), so `StepBuffer` holds the
newest step until a point of another step arrives (or `release()` is called: at the end, or when
the source decides the step has settled). A step that carries none of the signals (only eval or
extra scalars) yields no record.
"""

from __future__ import annotations

import fnmatch
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from monitor.runlog.adapters.tbtail import natural_key
from monitor.runlog.sources import SourceError
from monitor.schema import StepRecord

SIGNALS = ("loss", "lr", "grad_norm", "loss_scale", "skipped", "step_time", "tokens")
SCALAR_PREFIX = "scalars."


class MappingError(SourceError):
    """A --map entry that names no known signal."""


def validate_mapping(mapping: dict[str, str] | None) -> dict[str, str]:
    """Check a {signal: tag} mapping; raises MappingError naming the bad key and the valid ones."""
    out: dict[str, str] = {}
    for key, tag in (mapping or {}).items():
        key, tag = str(key).strip(), str(tag).strip()
        if key.startswith(SCALAR_PREFIX) and len(key) > len(SCALAR_PREFIX):
            pass
        elif key not in SIGNALS:
            raise MappingError(f"--map {key}={tag}: unknown signal {key!r}; signals are {', '.join(SIGNALS)}, "
                               f"or {SCALAR_PREFIX}NAME for any other scalar")
        if not tag:
            raise MappingError(f"--map {key}=: no tag given")
        out[key] = tag
    return out


def f32_exact(x: float) -> float:
    """The shortest decimal of a float32 value (as TensorBoard stores scalars); other values unchanged."""
    try:
        packed = struct.pack("<f", x)
    except OverflowError:
        return x
    if struct.unpack("<f", packed)[0] != x or not math.isfinite(x):
        return x
    for digits in (6, 7, 8):
        y = float(f"{x:.{digits}g}")
        if struct.pack("<f", y) == packed:
            return y
    return x


@dataclass(frozen=True)
class Framework:
    name: str  # RunInfo.source
    tags: dict[str, tuple[str, ...]]  # signal -> candidate tags, the first one present in a step wins
    lr_groups: re.Pattern[str] | None = None  # tags holding one param group's LR each (natural order)
    extras: dict[str, str] = field(default_factory=dict)  # tag -> StepRecord.scalars key
    param_norm_prefix: str | None = None  # "<prefix><param name>" tags -> param_norms
    weak: frozenset[str] = frozenset()  # candidate tags that count for detection only next to `weak_with`
    weak_with: str | None = None

    def score(self, tags: set[str]) -> int:
        n = 0
        for candidates in self.tags.values():
            strong = [t for t in candidates if t not in self.weak]
            if any(t in tags for t in strong) or (
                self.weak_with in tags and any(t in tags for t in candidates if t in self.weak)
            ):
                n += 1
        if self.lr_groups is not None and "lr" not in self.tags and any(self.lr_groups.match(t) for t in tags):
            n += 1
        return n


HUGGINGFACE = Framework(
    "huggingface",
    {"loss": ("train/loss",), "lr": ("train/learning_rate",), "grad_norm": ("train/grad_norm",)},
    extras={"eval/loss": "val_loss"},
)
LIGHTNING = Framework(
    "lightning",
    {"loss": ("train_loss", "train_loss_step", "loss"), "grad_norm": ("grad_2.0_norm_total",)},
    # LearningRateMonitor: lr-<Optimizer>[-<k>][/pg<N> | /<group name>]; not its -momentum/-weight_decay series.
    lr_groups=re.compile(r"^lr-[A-Za-z_][\w.]*(?:-\d+)?(?:/[^/]+)?$(?<!-momentum)(?<!-weight_decay)"),
    extras={"val_loss": "val_loss"},
    param_norm_prefix="grad_2.0_norm/",
    weak=frozenset({"loss"}),
    weak_with="epoch",
)
MEGATRON = Framework(
    "megatron",
    {"loss": ("lm loss",), "lr": ("learning-rate",), "grad_norm": ("grad-norm",), "loss_scale": ("loss-scale",),
     "step_time": ("iteration-time",)},
    extras={"lm loss validation": "val_loss", "params-norm": "params_norm", "num-zeros": "num_zeros",
            "batch-size": "batch_size"},
)
# Order is the tie-break of detection: the more specific tag scheme first.
FRAMEWORKS: tuple[Framework, ...] = (MEGATRON, HUGGINGFACE, LIGHTNING)
BY_NAME = {f.name: f for f in FRAMEWORKS}


def detect(tags: Iterable[str]) -> Framework | None:
    """The framework whose tags the seen tags resolve best (see the module docstring), or None."""
    tags = set(tags)
    best, best_score = None, 0
    for fw in FRAMEWORKS:
        s = fw.score(tags)
        if s > best_score:
            best, best_score = fw, s
    return best


def _is_pattern(tag: str) -> bool:
    return any(c in tag for c in "*?[")


class TagMap:
    """Turns one step's {tag: value} into a StepRecord for a framework, with a mapping on top."""

    def __init__(self, framework: Framework | None, mapping: dict[str, str] | None = None) -> None:
        self.framework = framework
        self.mapping = validate_mapping(mapping)
        fw = framework
        self.tags: dict[str, tuple[str, ...]] = dict(fw.tags) if fw else {}
        self.lr_pattern: str | None = None
        self.extras: dict[str, str] = dict(fw.extras) if fw else {}
        self.extra_patterns: dict[str, str] = {}
        for key, tag in self.mapping.items():
            if key.startswith(SCALAR_PREFIX):
                name = key[len(SCALAR_PREFIX):]
                if _is_pattern(tag):
                    self.extra_patterns[tag] = name
                else:
                    self.extras[tag] = name
            elif key == "lr" and _is_pattern(tag):
                self.lr_pattern = tag
                self.tags.pop("lr", None)
            else:
                self.tags[key] = (tag,)
        self.lr_groups = fw.lr_groups if fw is not None and "lr" not in self.mapping else None
        self.param_prefix = fw.param_norm_prefix if fw else None
        self._exact = {t for ts in self.tags.values() for t in ts} | set(self.extras)
        self._patterns = [p for ts in self.tags.values() for p in ts if _is_pattern(p)] + list(self.extra_patterns)
        if self.lr_pattern:
            self._patterns.append(self.lr_pattern)
        self._pattern_set = frozenset(self._patterns)
        self._relevant: dict[str, bool] = {}

    @property
    def source(self) -> str:
        return self.framework.name if self.framework is not None else "tensorboard"

    def relevant(self, tag: str) -> bool:
        """Whether a tag feeds a record (others are not kept)."""
        hit = self._relevant.get(tag)
        if hit is None:
            hit = (tag in self._exact
                   or (self.lr_groups is not None and self.lr_groups.match(tag) is not None)
                   or (self.param_prefix is not None and tag.startswith(self.param_prefix))
                   or any(fnmatch.fnmatchcase(tag, p) for p in self._patterns))
            if len(self._relevant) < 100_000:
                self._relevant[tag] = hit
        return hit

    def _first(self, candidates: tuple[str, ...], values: dict[str, float]) -> float | None:
        for c in candidates:
            if c in values:
                return values[c]
            if c in self._pattern_set:
                hits = sorted((t for t in values if fnmatch.fnmatchcase(t, c)), key=natural_key)
                if hits:
                    return values[hits[0]]
        return None

    def record(self, step: int, wall_time: float, values: dict[str, float], rank: int = 0) -> StepRecord | None:
        fields: dict[str, Any] = {}
        for signal, candidates in self.tags.items():
            v = self._first(candidates, values)
            if v is None:
                continue
            if signal == "lr":
                fields["lr"] = [f32_exact(v)]
            elif signal == "skipped":
                fields["skipped"] = v != 0.0
            elif signal == "tokens":
                if math.isfinite(v):
                    fields["tokens"] = int(v)
            else:
                fields[signal] = v
        if "lr" not in fields:
            if self.lr_groups is not None:
                groups = sorted((t for t in values if self.lr_groups.match(t)), key=natural_key)
            elif self.lr_pattern is not None:
                groups = sorted((t for t in values if fnmatch.fnmatchcase(t, self.lr_pattern)), key=natural_key)
            else:
                groups = []
            if groups:
                fields["lr"] = [f32_exact(values[t]) for t in groups]
        params = None
        if self.param_prefix is not None:
            n = len(self.param_prefix)
            params = {t[n:]: v for t, v in values.items() if t.startswith(self.param_prefix)} or None
        if not fields and not params:
            return None  # only eval or extra scalars: not an optimizer step's record
        scalars = {name: values[t] for t, name in self.extras.items() if t in values}
        for pattern, name in self.extra_patterns.items():
            hits = sorted((t for t in values if fnmatch.fnmatchcase(t, pattern)), key=natural_key)
            if hits:
                scalars[name] = values[hits[0]]
        return StepRecord(step=step, rank=rank, time=wall_time, param_norms=params, scalars=scalars, **fields)


@dataclass
class PendingStep:
    step: int
    wall_time: float
    values: dict[str, float]


class StepBuffer:
    """Gathers the points of the step being written; a point of another step releases it."""

    def __init__(self) -> None:
        self.pending: PendingStep | None = None

    def add(self, step: int, wall_time: float, tag: str, value: float) -> PendingStep | None:
        p = self.pending
        if p is not None and p.step == step:
            p.values[tag] = value
            if wall_time > p.wall_time:
                p.wall_time = wall_time
            return None
        self.pending = PendingStep(step, wall_time, {tag: value})
        return p

    def release(self) -> PendingStep | None:
        p, self.pending = self.pending, None
        return p

    def state(self) -> dict[str, Any] | None:
        p = self.pending
        if p is None:
            return None
        return {"step": p.step, "wall_time": p.wall_time, "values": {k: json_float(v) for k, v in p.values.items()}}

    def restore(self, state: dict[str, Any] | None) -> None:
        if not state:
            self.pending = None
            return
        self.pending = PendingStep(int(state["step"]), float(state["wall_time"]),
                                   {str(k): float(v) for k, v in state["values"].items()})


def json_float(x: float) -> float | str:
    """A float for strict JSON: non-finite values as the strings float() reads back."""
    return x if math.isfinite(x) else repr(x)
