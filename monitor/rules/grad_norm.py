"""Gradient-norm rules, judged relative to the LR schedule."""

from __future__ import annotations

import math
from statistics import median

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.rules.stats import RobustWindow
from monitor.rules.trackers import ParamBaseline, Recurrence, describe_movers, top_movers
from monitor.schema import Severity, StepRecord

_INF, _log = math.inf, math.log


class GradNormGrowthConfig(RuleConfig):
    block: int = Field(20, ge=2, description="Optimizer steps per block; the trend is judged on block medians.")
    factor: float = Field(
        2.0, gt=1, description="Rise of the schedule-normalised grad norm over its post-warmup floor that counts as growth.",
    )
    rising_blocks: int = Field(3, ge=1, description="Consecutive rising block medians required (a sustained trend).")
    normalize_lr: bool = Field(
        True, description="Judge grad_norm * sqrt(lr / peak_lr): grad norms rise near the end of a decaying "
        "schedule by design.",
    )


@register
class GradNormGrowth(Rule):
    """The gradient norm keeps growing after warmup.

    Symptom: the median of grad_norm * sqrt(lr / peak_lr) over blocks of `block` steps has risen for
    `rising_blocks` blocks in a row and is `factor` times its post-warmup floor.
    Why: gradient norms of a healthy run fall during warmup and then stay flat (or rise only as the LR
    decays, which the sqrt(lr) normalisation removes). Sustained growth means the updates are
    outgrowing the loss landscape's curvature: the usual prelude to loss spikes and divergence.
    Fix: lower the peak LR (or lengthen warmup), keep clipping at max_norm 1.0, and check the
    parameters named in the evidence: their gradients grew the most.
    """

    id = "grad_norm.growth"
    family = "grad_norm"
    severity = Severity.warning
    Config = GradNormGrowthConfig

    def __init__(self, config: GradNormGrowthConfig, run) -> None:
        super().__init__(config, run)
        self.peak_lr = 0.0
        self.prev_lr: float | None = None
        self.in_warmup = True
        self.buf: list[float] = []
        self.buf_first: int | None = None
        self.last_norms: dict[str, float] | None = None
        self.medians: list[tuple[int, float]] = []  # (first step of block, median), last rising_blocks+1 kept
        self.floor: float | None = None
        self.floor_step: int | None = None
        self.floor_norms: dict[str, float] | None = None
        self.left_band_at: int | None = None
        # read on every record (see Rule.observe)
        self.block, self.normalize_lr = config.block, config.normalize_lr

    def observe(self, r: StepRecord) -> Finding | None:
        lr = max(r.lr) if r.lr else None  # r.max_lr, without the property's call (read on every record)
        peak = self.peak_lr
        if lr is not None:
            # Warmup lasts while the LR still rises (once over, it stays over); grad norms are meant to move then.
            if self.in_warmup and self.prev_lr is not None and lr <= self.prev_lr and lr > 0:
                self.in_warmup = False
            self.prev_lr = lr
            if lr > peak:
                self.peak_lr = peak = lr
            if self.in_warmup:
                return None
        # The signal: log grad norm, LR-normalised.
        g = r.grad_norm
        if r.skipped or g is None or not 0.0 < g < _INF:
            return None
        s = _log(g)
        if self.normalize_lr and lr is not None and lr > 0 and peak > 0:
            s += 0.5 * _log(lr / peak)
        norms = r.param_norms
        if norms:
            self.last_norms = norms
        buf = self.buf
        if not buf:
            self.buf_first = r.step
        buf.append(s)
        if len(buf) < self.block:
            return None
        m = median(buf)
        first = self.buf_first
        self.buf = []
        return self._on_block(first, m, r)

    def _on_block(self, first: int, m: float, r: StepRecord) -> Finding | None:
        c = self.config
        self.medians.append((first, m))
        del self.medians[: -(c.rising_blocks + 1)]
        if self.floor is None or m < self.floor:
            self.floor, self.floor_step, self.floor_norms = m, first, self.last_norms
            self.left_band_at = None
            return None
        band = self.floor + 0.5 * math.log(c.factor)
        if m > band and self.left_band_at is None:
            self.left_band_at = first
        elif m <= band:
            self.left_band_at = None
        rising = len(self.medians) == c.rising_blocks + 1 and all(
            b[1] > a[1] for a, b in zip(self.medians, self.medians[1:])
        )
        growth = math.exp(m - self.floor)
        if not (rising and growth >= c.factor):
            return None
        movers = top_movers(self.floor_norms, self.last_norms)
        named = describe_movers(movers)
        return Finding(
            message=f"the LR-normalised gradient norm has grown {growth:.1f}x over its floor at step "
            f"{self.floor_step} and rose for {c.rising_blocks} blocks of {c.block} steps"
            + (f"; grew most: {named}." if named else "."),
            hint="Lower the peak LR or lengthen warmup, keep clipping at max_norm 1.0, and check the parameters "
            "whose gradients grew most.",
            evidence={"grad_norm": r.grad_norm, "growth": round(growth, 3), "floor_step": self.floor_step,
                      "first_step": self.left_band_at, "lr": r.max_lr, "top_params": movers},
        )


class GradNormSpikeConfig(RuleConfig):
    window: int = Field(100, ge=10, description="Trailing optimizer steps forming the baseline (median/MAD of log grad norm).")
    z_threshold: float = Field(6.0, gt=0, description="Robust z-score of log grad norm that counts as a spike.")
    min_ratio: float = Field(
        2.0, gt=1, description="A spike must also be at least this multiple of the baseline median (info below "
        "warning_ratio: single clipped outliers of a few x are common on real text).",
    )
    warning_ratio: float = Field(
        5.0, gt=1, description="Spikes of at least this multiple of the median that clipping did not absorb are warnings.",
    )
    recur_count: int = Field(
        3, ge=2, description="This many spikes of at least warning_ratio within recur_window steps make the ones "
        "clipping absorbed a warning too.",
    )
    recur_window: int = Field(400, ge=10, description="Optimizer steps over which spikes count as recurring.")
    resolve_after: int = Field(20, ge=1, description="Steps without a spike before the alert resolves.")
    cooldown_steps: int = Field(50, ge=0, description="After an alert resolves, steps during which the rule stays quiet.")


@register
class GradNormSpike(Rule):
    """A gradient norm far above the recent baseline.

    Symptom: log(grad_norm) is more than z_threshold robust standard deviations above the median of
    the trailing window and at least min_ratio times that median: a warning when it is warning_ratio
    times the median and clipping did not bound the update, or when such large spikes recur
    (`recur_count` within `recur_window` steps, clipped or not); info otherwise.
    Why: a sudden gradient spike means one batch or one layer produced an outsized update; clipping
    bounds what reaches the weights (hard batches of real text do this now and then), but an
    unclipped spike goes straight into them and into Adam's moment estimates, and spikes that
    recur often precede loss spikes and divergence.
    Fix: look at the parameters named in the evidence and at this step's batch; if spikes recur,
    lower the LR, keep clipping at max_norm 1.0, or lower Adam's beta2 (0.95) so it adapts faster.
    """

    id = "grad_norm.spike"
    family = "grad_norm"
    severity = Severity.warning
    Config = GradNormSpikeConfig

    def __init__(self, config: GradNormSpikeConfig, run) -> None:
        super().__init__(config, run)
        # quiet_below: a log norm below it cannot be a spike (the test in `observe`)
        self.window = RobustWindow(config.window, alarm=(config.z_threshold, 1e-3, math.log(config.min_ratio)))
        self.params = ParamBaseline()
        self.recur = Recurrence(config.recur_count, config.recur_window)

    def observe(self, r: StepRecord) -> Finding | None:
        g = r.grad_norm
        if r.skipped or g is None or not 0.0 < g < _INF:  # finite and positive
            return None
        x = _log(g)
        w = self.window
        if x < w.quiet_below:  # the usual case: clearly below the alarm level, only the baselines move
            norms = r.param_norms
            if norms:  # sampled steps only (update() ignores the others)
                self.params.update(norms)
            w.push(x)
            return None
        c = self.config
        finding = None
        if w.full:
            med = w.med
            z = w.zscore(x, min_sigma=1e-3)
            if z >= c.z_threshold and x - med >= math.log(c.min_ratio):
                base = math.exp(med)
                absorbed = r.clip_coef is not None and r.clip_coef < 1.0
                large = g >= c.warning_ratio * base
                sev = Severity.warning if large and not absorbed else Severity.info
                recurring = self.recur.add(r.step) if large else None
                why = ""
                if recurring and sev is Severity.info:
                    sev = Severity.warning
                    why = (f"; {len(recurring)} spikes of at least {c.warning_ratio:g}x within {c.recur_window} "
                           f"steps (steps {', '.join(map(str, recurring))}): clipping bounds each, but they recur")
                movers = self.params.movers(r.param_norms)
                finding = Finding(
                    message=f"gradient norm {g:.4g} is {g / base:.1f}x the median {base:.4g} of the last {c.window} "
                    f"steps (robust z {z:.1f}){why}" + (f"; grew most: {describe_movers(movers)}." if movers else "."),
                    hint="Check this step's batch and the parameters named; if spikes recur, lower the LR or beta2 and "
                    "keep clipping on.",
                    evidence={"grad_norm": g, "baseline_median": base, "z": round(z, 2), "loss": r.loss,
                              "clip_coef": r.clip_coef,
                              "lr": r.max_lr, "first_step": r.step, "top_params": movers,
                              **({"spike_steps": recurring} if recurring else {})},
                    severity=sev,
                )
        if finding is None:
            self.params.update(r.param_norms)
        w.push(x)
        return finding
