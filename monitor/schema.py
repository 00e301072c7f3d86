"""On-disk and on-wire shapes: StepRecord, Alert, RunInfo.

No torch: the daemon and `monitor check` read these without a
training environment. Field names here are what run.json and alerts.jsonl hold.
"""

from __future__ import annotations

import time
import time as _time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from dataclasses import field as dc_field
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Severity(str, Enum):
    info = "info"
    warning = "warning"
    critical = "critical"

    @property
    def rank(self) -> int:
        """Order for comparisons: info < warning < critical."""
        return _SEVERITY_RANK[self]

    def at_least(self, other: Severity | str) -> bool:
        return self.rank >= Severity(other).rank


_SEVERITY_RANK = {Severity.info: 0, Severity.warning: 1, Severity.critical: 2}


def _doc(default: Any = None, doc: str = "", factory: Any = None) -> Any:
    """A StepRecord field with its description (read by `monitor.schema.step_fields()` for the docs)."""
    if factory is not None:
        return dc_field(default_factory=factory, metadata={"doc": doc})
    return dc_field(default=default, metadata={"doc": doc})


def _number(x: Any) -> bool:
    return type(x) in (int, float)  # NaN or inf too: a user's lambda may return them, and the rules compare


def _count(x: Any) -> bool:
    return type(x) is int and x >= 0


_SCHEDULE_TYPES = {"source": lambda x: isinstance(x, str), "steps_previewed": _count, "warmup_steps": _count,
                   "first_multiplier": _number, "peak_multiplier": _number}

def no_bool_for_a_number(cls: type[BaseModel], v: Any, info: Any) -> Any:
    """A `field_validator("*", mode="before")` for settings: true/false where a number is wanted is a mistake
    (pydantic would take True as 1: a port, a window of one step), not a value."""
    if isinstance(v, bool):
        ann = cls.model_fields[info.field_name].annotation
        kinds = typing.get_args(ann) or (ann,)
        if bool not in kinds and any(k in (int, float) for k in kinds):
            raise ValueError("must be a number, not true/false")
    return v


# The largest step a record can have: TensorBoard stores steps as int64, and readers reject more.
MAX_STEP = 2**63 - 1


@dataclass(slots=True)
class StepRecord:
    """Everything the monitor knows about one optimizer step of one rank.

    A step that GradScaler skipped is a record with ``skipped=True``. Nothing is
    filtered: a NaN loss is NaN here. Fields a source cannot know are None.

    A plain slotted dataclass, not validated: records are built by the monitor itself and by the
    log readers from values they have already parsed into numbers (tens of thousands a second in
    the daemon). The JSON that comes in (run.json, alerts.jsonl, configs) is validated by pydantic.
    A record is not changed once built (rules cache what they derive from its mappings).
    """

    step: int = _doc(doc="Optimizer step index (0-based; continues after a resume).")
    rank: int = 0
    attempt: int = _doc(1, "The attempt of the run that wrote the record (run.json `attempts`; 1 in a directory "
                        "written once).")
    time: float = _doc(factory=_time.time, doc="Unix time the step ended.")
    loss: float | None = _doc(doc="Mean of the step's micro-batch losses.")
    lr: list[float] = _doc(factory=list, doc="Learning rate per param group, as used by the step.")
    grad_norm: float | None = _doc(doc="Global L2 norm of unscaled gradients before clipping.")
    grad_norm_clipped: float | None = _doc(doc="Global norm after clipping.")
    clip_coef: float | None = _doc(doc="Factor clipping applied (1.0 when it did not clip).")
    grad_norm_unknown: bool = _doc(
        False, "The pre-clip gradient norm could not be measured truthfully, so grad_norm is None: "
        "clip_grad_norm_ ran on each micro-batch (the step's whole gradient was never seen before clipping), or the "
        "parameters are sharded (FSDP) and no clip call reported the global norm. grad_norm_clipped then holds the "
        "norm the optimizer applied, when it could be measured.",
    )
    max_norm: float | None = _doc(doc="Clip threshold passed to clip_grad_norm_, when the loop clips.")
    loss_scale: float | None = _doc(doc="GradScaler scale used for this step's backward.")
    skipped: bool = _doc(False, "GradScaler skipped the update (inf/NaN gradients).")
    step_time: float | None = _doc(doc="Seconds since the previous optimizer step ended.")
    tokens: int | None = _doc(doc="Tokens (input elements) seen in this step, when known.")
    micro_batches: int | None = _doc(doc="Forward passes that contributed to this step.")
    autocast: str | None = _doc(doc="Autocast dtype of the step's forward passes ('float16', 'bfloat16').")
    scheduler_steps: int | None = _doc(doc="scheduler.step() calls since the previous optimizer step.")
    param_norms: Mapping[str, float] | None = _doc(doc="Per-parameter gradient norms (sampled steps).")
    busy_time: float | None = _doc(
        doc="Seconds of the step before its last backward (data loading, forwards): what a rank spends "
        "outside the gradient all-reduce. DDP equalises step times; this tells a straggler apart.",
    )
    local_grad_norm: float | None = _doc(doc="This rank's own gradient norm, before the DDP all-reduce.")
    memory: float | None = _doc(doc="Peak device memory allocated during the step (bytes).")
    ddp: dict[str, Any] | None = _doc(
        doc="Rank 0's comparison of the ranks (every few steps): who reported, their busy times, "
        "parameters that differ.",
    )
    attention: dict[str, dict[str, float]] | None = _doc(
        doc="Per-layer attention statistics: entropy_ratio (mean over heads), entropy_min, max_logit, max_prob.",
    )
    scalars: dict[str, float] = _doc(factory=dict, doc="Extra scalars passed to mon.log().")
    input_time: float | None = _doc(
        doc="Seconds of the step's input phases: from the previous optimizer step's end (first "
        "micro-batch) or the previous micro-batch's backward end to the forward of the model the loop calls (data "
        "loading, the loop's own work), summed over micro-batches. Holds no collective.",
    )
    compute_time: float | None = _doc(
        doc="Seconds of the step's forwards of the module inside the DDP wrapper (after DDP's "
        "pre-forward buffer broadcast), summed over micro-batches; device time (CUDA events) on CUDA. Holds no "
        "collective (not measured for sharded models, whose forwards all-gather).",
    )
    collective_wait_time: float | None = _doc(
        doc="Seconds the step waited in DDP's collectives: its pre-forward work (the buffer "
        "broadcast) plus the gradient all-reduce left after the backward (last bucket done minus last bucket ready, "
        "from the monitor's communication hook). A slow rank's wait is short; the others wait for it.",
    )

    @property
    def max_lr(self) -> float | None:
        """The largest LR over param groups (what most rules judge)."""
        lr = self.lr
        return max(lr) if lr else None


def step_fields() -> dict[str, str]:
    """StepRecord's field names and their descriptions, in order."""
    return {f.name: f.metadata.get("doc", "") for f in fields(StepRecord)}


# Step phase -> StepRecord field: the names the rank exchange, ddp.straggler and the
# trainmon_step_phase_seconds{phase=...} gauge use.
PHASES = {"input": "input_time", "compute": "compute_time", "collective_wait": "collective_wait_time"}


# C0 and C1 control characters and DEL, as the \n, \x1b ... a Python literal would show.
_ESCAPED = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """`text` for a terminal or a log line: control characters escaped (a line break, a colour code in a
    name read from a file cannot make a line that looks like another)."""
    return text.translate(_ESCAPED)


class Alert(BaseModel):
    """One finding of a rule. ``hint`` is the fix, in one sentence."""

    # NaN/Inf evidence is the point of some alerts: keep it as "NaN"/"Infinity" strings (strict JSON).
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    rule: str
    severity: Severity
    step: int
    rank: int = 0
    message: str
    hint: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    time: float = Field(default_factory=time.time)
    run: str = ""
    status: Literal["firing", "resolved"] = "firing"
    attempt: int | None = None  # the run's attempt whose records raised it (run.json `attempts`)

    def line(self) -> str:
        """The one-line console form. Control characters (a line break in a layer or run name the message
        quotes) are escaped: one alert, one line, none that looks like another."""
        head = f"[trainmon] {self.severity.value.upper()} {self.rule}"
        where = f"step {self.step}" + (f" rank {self.rank}" if self.rank else "")
        if self.status == "resolved":
            return f"{head} resolved at {where}"
        return printable(f"{head} at {where}: {self.message} Fix: {self.hint}")


class ParamGroupInfo(BaseModel):
    lr: float | None = None
    initial_lr: float | None = None  # set by torch LR schedulers: the base (peak) LR
    betas: list[float] | None = None
    eps: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    params: int = 0
    numel: int = 0
    decay_1d: int = 0  # 1-D parameters (biases, norm gains) in this group, decayed when weight_decay > 0
    decay_1d_names: list[str] = Field(default_factory=list)


class OptimizerInfo(BaseModel):
    name: str = ""
    groups: list[ParamGroupInfo] = Field(default_factory=list)

    @property
    def adam_family(self) -> bool:
        return any(k in self.name.lower() for k in ("adam", "lamb", "lion", "adafactor"))


class ModelInfo(BaseModel):
    name: str = ""
    parameters: int = 0
    trainable: int = 0
    param_names: list[str] = Field(default_factory=list)


class Endpoint(BaseModel):
    rank: int
    local_rank: int = 0
    host: str
    port: int
    url: str


AttemptKind = Literal["fresh", "resumed", "restarted"]


class Attempt(BaseModel):
    """One process (one job, for DDP) writing into a run directory: run.json keeps them all, in order.

    `kind` says how it started: "fresh" (the directory's first), "resumed" (from a checkpoint at
    `start_step`: the earlier attempts' records from that step on are superseded) or "restarted"
    (from scratch into a used directory: new windows, nothing of the earlier attempts kept).
    `lineage_start` is the step the records this attempt builds on begin at: its own start unless it
    resumed, else the start of the attempt it resumed.
    """

    model_config = ConfigDict(extra="allow")

    id: int
    kind: AttemptKind = "fresh"
    start_step: int = 0
    lineage_start: int = 0
    how: str = ""  # how the start step was found: "resume_step", "scheduler", "optimizer", "none"
    started: float = Field(default_factory=time.time)
    host: str = ""
    pid: int | None = None
    pid_start: int | None = None  # the process's start time (Linux clock ticks): a reused pid is not it
    job: str | None = None  # the distributed job (torchrun's run id) whose ranks share this attempt
    heartbeat: float | None = None  # rank 0 refreshes it while alive (for processes on other hosts)
    ended: float | None = None
    steps: int | None = None  # the step index after its last step, at close


class RunInfo(BaseModel):
    """run.json: what a reader needs to interpret the run's records."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    created: float = Field(default_factory=time.time)
    hostname: str = ""
    world_size: int = 1
    max_steps: int | None = None
    start_step: int = 0
    torch_version: str | None = None
    cuda_version: str | None = None
    trainmon_version: str | None = None  # the trainmon that wrote run.json (None: one older than this field)
    device: str | None = None
    model: ModelInfo = Field(default_factory=ModelInfo)
    optimizer: OptimizerInfo = Field(default_factory=OptimizerInfo)
    scaler: dict[str, Any] | None = None
    scheduler: str | None = None
    schedule: dict[str, Any] | None = None  # warmup read from the scheduler at attach (LambdaLR), when possible
    config: dict[str, Any] = Field(default_factory=dict)
    preflight: list[Alert] = Field(default_factory=list)
    endpoints: list[Endpoint] = Field(default_factory=list)
    source: str = "trainmon"
    # The attention probe at attach (enabled, interval, why it is off) and, at close, its measured cost.
    attention_probe: dict[str, Any] | None = None
    attempts: list[Attempt] = Field(default_factory=list)  # oldest first; empty in directories from before attempts

    @field_validator("schedule")
    @classmethod
    def _schedule_types(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        """The warmup facts the rules compute with (introspect.schedule_preview writes them) have their types."""
        if v is None:
            return v
        for key, ok in _SCHEDULE_TYPES.items():
            if key in v and not ok(v[key]):
                raise ValueError(f"schedule.{key} is {v[key]!r}: not what trainmon writes there")
        return v

    def attempt(self, attempt_id: int) -> Attempt | None:
        """The attempt with this id, None when run.json does not (yet) list it; a directory written
        before attempts has one: attempt 1, fresh."""
        for a in self.attempts:
            if a.id == attempt_id:
                return a
        if not self.attempts and attempt_id == 1:
            return Attempt(id=1, start_step=self.start_step, lineage_start=self.start_step, started=self.created)
        return None
