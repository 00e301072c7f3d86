"""Mixed-precision rules: GradScaler skips beyond its calibration."""

from __future__ import annotations

from collections import deque

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.schema import Severity, StepRecord


class AmpOverflowConfig(RuleConfig):
    consecutive_critical: int = Field(3, ge=2, description="Skipped steps in a row (after calibration) that are critical.")
    window: int = Field(200, ge=10, description="Optimizer steps over which the skip rate is measured.")
    max_rate: float = Field(
        0.01, gt=0, lt=1, description="Skip rate in the window above which a warning is raised (GradScaler's normal "
        "rate is about one per growth_interval, 1/2000 by default).",
    )
    calibration_steps: int = Field(
        40, ge=0, description="At the start, GradScaler skips while its scale falls from init_scale to a working "
        "value: skips before the first applied step, up to this many, are calibration.",
    )


@register
class AmpOverflow(Rule):
    """GradScaler skips optimizer steps beyond its normal calibration.

    Symptom: after the scale has calibrated, `consecutive_critical` steps in a row are skipped for
    inf/NaN gradients, or more than `max_rate` of the last `window` steps are. Skips while the
    scale calibrates down at the start, and the skip right after each growth of the scale (one per
    growth_interval), are not counted.
    Why: a skipped step is lost work, and steady overflow halves the loss scale again and again until
    small gradients underflow to zero: the run silently stops learning. Occasional skips (the first
    steps, then about one per growth interval) are GradScaler working as designed.
    Fix: find the layer whose activations or gradients overflow fp16 (logits, attention scores,
    large residual streams), lower the LR, or train in bf16, which needs no loss scaling.
    """

    id = "amp.overflow"
    family = "amp"
    severity = Severity.warning
    Config = AmpOverflowConfig

    def __init__(self, config: AmpOverflowConfig, run) -> None:
        super().__init__(config, run)
        self.calibrating = True
        self.steps = 0
        self.run_len = 0
        self.run_start: int | None = None
        self.recent: deque[bool] = deque(maxlen=config.window)
        self.skips_in_window = 0
        self.prev_scale: float | None = None

    def observe(self, r: StepRecord) -> Finding | None:
        skipped = r.skipped
        if not (skipped or self.calibrating or self.skips_in_window):
            # The usual case: an applied step and no skip in the window, which only drops a False.
            self.steps += 1
            self.prev_scale = r.loss_scale
            self.recent.append(False)
            self.run_len = 0
            return None
        c = self.config
        self.steps += 1
        # Expected skips: calibration at the start, or the probe right after GradScaler grew its scale.
        scale, prev = r.loss_scale, self.prev_scale
        self.prev_scale = scale
        if self.calibrating:
            if not skipped or self.steps > c.calibration_steps:
                self.calibrating = False
            else:
                return None
        if skipped and scale is not None and prev is not None and scale > prev:
            return None
        recent = self.recent
        if len(recent) == recent.maxlen:
            self.skips_in_window -= recent[0]
        recent.append(skipped)
        if skipped:
            self.skips_in_window += 1
            if self.run_len == 0:
                self.run_start = r.step
            self.run_len += 1
        else:
            self.run_len = 0
            if not self.skips_in_window:
                return None  # the common case: nothing skipped in the window
        ev = {"consecutive_skips": self.run_len, "skips_in_window": self.skips_in_window, "window": len(recent),
              "loss_scale": scale, "first_step": self.run_start}
        if self.run_len >= c.consecutive_critical:
            return Finding(
                message=f"GradScaler skipped {self.run_len} optimizer steps in a row (since step {self.run_start}); "
                f"loss scale now {r.loss_scale}.",
                hint="Find the layer overflowing fp16 (logits, attention scores), lower the LR, or train in bf16.",
                evidence=ev,
                severity=Severity.critical,
            )
        # Rate over a full window; before that, over what exists but never below the absolute count
        # the full window would need, so two early skips are not "100%".
        if self.skips_in_window > c.max_rate * c.window:
            return Finding(
                message=f"GradScaler skipped {self.skips_in_window} of the last {len(self.recent)} steps "
                f"(more than {c.max_rate:.0%}).",
                hint="Find the layer overflowing fp16 (logits, attention scores), lower the LR, or train in bf16.",
                evidence=ev,
            )
        return None


class AmpScaleCollapseConfig(RuleConfig):
    floor: float = Field(1.0, gt=0, description="A GradScaler loss scale below this is a collapse.")


@register
class AmpScaleCollapse(Rule):
    """GradScaler's loss scale has collapsed.

    Symptom: the loss scale used by a step is below `floor` (1.0 by default): GradScaler has halved
    it again and again because every step overflowed.
    Why: the scale exists to lift small fp16 gradients above fp16's underflow limit; below 1 it
    pushes them further down, so most gradients flush to zero and the model stops learning, even
    if steps stop being skipped.
    Fix: find what overflows fp16 on every step (a layer's activations or logits, an attention
    score, a loss computed in fp16), fix or upcast it, or train in bf16.
    """

    id = "amp.scale_collapse"
    family = "amp"
    severity = Severity.critical
    Config = AmpScaleCollapseConfig

    def __init__(self, config: AmpScaleCollapseConfig, run) -> None:
        super().__init__(config, run)
        self.since: int | None = None
        self.floor = config.floor  # read on every record (see Rule.observe)

    def observe(self, r: StepRecord) -> Finding | None:
        s = r.loss_scale
        if s is None or s >= self.floor:
            self.since = None
            return None
        if self.since is None:
            self.since = r.step
        return Finding(
            message=f"the GradScaler loss scale is {s:.3g} (below {self.config.floor:g}) since step {self.since}: "
            "fp16 gradients now underflow to zero.",
            hint="Find and fix (or upcast) what overflows fp16 every step, or train in bf16.",
            evidence={"loss_scale": s, "floor": self.config.floor, "first_step": self.since, "skipped": r.skipped},
            step=self.since,
        )
