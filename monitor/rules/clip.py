"""Gradient-clipping rules."""

from __future__ import annotations

import math
from collections import deque
from statistics import median

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig, ongoing
from monitor.rules.registry import register
from monitor.rules.stats import SortedWindow
from monitor.rules.trackers import LrTrace
from monitor.schema import Severity, StepRecord

_isfinite = math.isfinite


class ClipSaturatedConfig(RuleConfig):
    window: int = Field(50, ge=5, description="Optimizer steps over which the clipping rate is measured.")
    fraction: float = Field(0.8, gt=0, le=1, description="Clipping active on more than this fraction of the window.")
    deep_coef: float = Field(
        0.5, gt=0, le=1, description="Warning when the window's median clip coefficient is below this (clipping "
        "removes most of the update); frequent but shallow clipping is info.",
    )
    improving: float = Field(
        0.1, ge=0, lt=1, description="Info only while the loss still falls fast: the median of the window's last tenth "
        "at least this fraction below its first tenth's (clipping at the start of a run, warmup or not, is normal).",
    )


@register
class ClipSaturated(Rule):
    """Gradient clipping is active on most optimizer steps after warmup.

    Symptom: clip_grad_norm_ scaled the gradients down (clip coefficient < 1) on more than
    `fraction` of a window of `window` steps, counted from the end of warmup (clipping while the
    loss falls fast at the very start is normal). A warning when the median coefficient is below
    `deep_coef` (the gradient is typically several times max_norm), info when clipping is shallow or
    the loss still falls fast over the window (by `improving`: the first steps of a run without
    warmup, or a fine-tune's first epoch).
    Why: clipping is a guard against rare outliers; when it binds on nearly every step, the update
    size is set by max_norm instead of the LR, the schedule stops meaning what it says, and the
    gradient norm it hides is usually growing because the LR is too high.
    Fix: lower the peak LR (the usual cause), or raise max_norm if the unclipped norms are stable
    and simply above it.

    When the monitor could not measure the pre-clip norm (`grad_norm_unknown`: clipping on every
    micro-batch, or sharded parameters no clip call reported), the rule says, as info, that it
    cannot judge those steps instead of judging a norm measured after clipping.
    """

    id = "clip.saturated"
    family = "clip"
    severity = Severity.warning
    Config = ClipSaturatedConfig

    def __init__(self, config: ClipSaturatedConfig, run) -> None:
        super().__init__(config, run)
        self.trace = LrTrace()
        self.recent: deque[bool] = deque(maxlen=config.window)
        self.coefs = SortedWindow(config.window)
        self.losses: deque[float] = deque(maxlen=config.window)
        self.clipped = 0
        # read on every record (see Rule.observe)
        self.window_steps, self.max_clipped = config.window, config.fraction * config.window

    def observe(self, r: StepRecord) -> Finding | None:
        trace = self.trace
        if not trace.warmup_done:  # only whether warmup is over is read here, and it never starts again
            trace.push(r.step, r.max_lr)
        if r.grad_norm_unknown:
            if self.firing is not None:  # already said (info is this finding's severity, the least there is)
                return ongoing(Severity.info)
            return Finding(
                message="cannot judge clipping: the pre-clip gradient norm of this step is unknown (clip_grad_norm_ "
                "ran on each micro-batch, or the parameters are sharded and no clip call reported the global norm).",
                hint="Clip once per optimizer step, after the last backward (FSDP1: the model's own clip_grad_norm_).",
                evidence={"grad_norm_clipped": r.grad_norm_clipped, "max_norm": r.max_norm},
                severity=Severity.info,
            )
        coef = r.clip_coef
        if coef is None or r.skipped or (r.lr and not trace.warmup_done):
            return None
        hit = coef < 1.0
        self.coefs.push(coef)
        loss = r.loss
        if loss is not None and _isfinite(loss):
            self.losses.append(loss)
        recent = self.recent
        if len(recent) == self.window_steps:
            self.clipped -= recent[0]
        recent.append(hit)
        self.clipped += hit
        if self.clipped <= self.max_clipped or len(recent) < self.window_steps:
            return None
        firing = self.firing
        if firing is not None and firing is not Severity.info:  # nothing below could be worse than its alert
            return ongoing(Severity.warning)
        c = self.config
        coef = self.coefs.median() if self.coefs else math.nan
        losses = list(self.losses)
        tenth = max(1, len(losses) // 10)
        early = median(losses[:tenth]) if losses else None
        late = median(losses[-tenth:]) if losses else None
        falling = early is not None and late is not None and late <= (1 - c.improving) * early
        severity = Severity.warning if coef < c.deep_coef and not falling else Severity.info
        if firing is not None and severity is Severity.info:
            return ongoing(severity)
        return Finding(
            message=f"gradient clipping was active on {self.clipped} of the last {c.window} steps, median "
            f"coefficient {coef:.2f} (pre-clip norm now {r.grad_norm:.3g}, max_norm {r.max_norm})"
            + (f"; the loss is still falling fast ({early:.3g} -> {late:.3g} over the window), as early in a run."
               if falling else "."),
            hint="Lower the peak LR; raise max_norm only if the unclipped gradient norm is stable.",
            evidence={"clipped_steps": self.clipped, "window": c.window, "grad_norm": r.grad_norm,
                      "max_norm": r.max_norm, "clip_coef": r.clip_coef, "median_clip_coef": coef, "lr": r.max_lr,
                      "first_step": r.step - c.window + 1, "loss_window_start": early, "loss_window_end": late},
            severity=severity,
        )
