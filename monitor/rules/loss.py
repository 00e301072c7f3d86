"""Loss rules: non-finite values and robust spikes."""

from __future__ import annotations

import math

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.rules.stats import Ema, ParamBaseline, RobustWindow, describe_movers, finite
from monitor.schema import Severity, StepRecord


@register
class LossNonFinite(Rule):
    """The loss or the gradient norm is NaN or infinite.

    Symptom: the loss (or the global gradient norm on a step the optimizer applied) is NaN or Inf.
    Why: one non-finite update poisons the weights; every later step is wasted compute. Typical causes
    are a learning rate too high for the model's depth, no warmup, fp16 overflow in the forward pass,
    or a bad batch.
    Fix: restart from the last checkpoint before this step with a lower peak LR or a longer warmup,
    keep gradient clipping on, prefer bf16 over fp16, and check this step's batch for NaN inputs.
    """

    id = "loss.nonfinite"
    family = "loss"
    severity = Severity.critical

    def observe(self, r: StepRecord) -> Finding | None:
        bad_loss = r.loss is not None and not math.isfinite(r.loss)
        # On a step GradScaler skipped, inf gradients are expected: that is amp.overflow's business.
        bad_grad = r.grad_norm is not None and not math.isfinite(r.grad_norm) and not r.skipped
        if not (bad_loss or bad_grad):
            return None
        what = "loss" if bad_loss else "gradient norm"
        value = r.loss if bad_loss else r.grad_norm
        return Finding(
            message=f"the {what} is {value} at step {r.step}.",
            hint="Restart from the last good checkpoint with a lower peak LR or longer warmup, keep clipping on, "
            "prefer bf16 to fp16, and inspect this step's batch.",
            evidence={"loss": r.loss, "grad_norm": r.grad_norm, "lr": r.max_lr, "skipped": r.skipped},
        )


class LossSpikeConfig(RuleConfig):
    window: int = Field(100, ge=10, description="Trailing optimizer steps forming the baseline (median/MAD of log loss).")
    z_warning: float = Field(6.0, gt=0, description="Robust z-score of log loss that raises a warning.")
    z_critical: float = Field(8.0, gt=0, description="Robust z-score of log loss that raises a critical alert.")
    min_jump: float = Field(
        0.05, ge=0, description="Minimum relative rise over the baseline median (0.05 = 5%), so a near-constant loss "
        "with a tiny MAD does not alarm on noise.",
    )
    resolve_after: int = Field(20, ge=1, description="Steps without a spike before the alert resolves.")
    cooldown_steps: int = Field(50, ge=0, description="After an alert resolves, steps during which the rule stays quiet.")


@register
class LossSpike(Rule):
    """A loss value far above the recent baseline.

    Symptom: the log loss jumps more than z_warning (z_critical) robust standard deviations above the
    median of the trailing window.
    Why: spikes are the first visible sign of an unstable run (attention logit growth, Adam's second
    moment lagging a sudden gradient, a bad batch); left alone they recur and may diverge.
    Fix: inspect the batch at this step; if spikes recur, lower the peak LR, lengthen warmup, tighten
    clipping (max_norm 1.0) or lower Adam's beta2 to 0.95.
    """

    id = "loss.spike"
    family = "loss"
    severity = Severity.warning
    Config = LossSpikeConfig

    def __init__(self, config: LossSpikeConfig, run) -> None:
        super().__init__(config, run)
        self.window = RobustWindow(config.window)
        self.params = ParamBaseline()

    def observe(self, r: StepRecord) -> Finding | None:
        c = self.config
        if not finite(r.loss) or r.loss <= 0:
            return None
        x = math.log(r.loss)
        finding = None
        # The first window is the early transient: no baseline yet.
        if self.window.full:
            med = self.window.median
            z = self.window.zscore(x, min_sigma=1e-4)
            if z >= c.z_warning and x - med >= math.log1p(c.min_jump):
                sev = Severity.critical if z >= c.z_critical else Severity.warning
                base = math.exp(med)
                movers = self.params.movers(r.param_norms)
                finding = Finding(
                    message=f"loss {r.loss:.4g} is {r.loss / base:.2f}x the median {base:.4g} of the last "
                    f"{c.window} steps (robust z {z:.1f})"
                    + (f"; gradients grew most in {describe_movers(movers)}." if movers else "."),
                    hint="Inspect this step's batch; if spikes recur, lower the peak LR, lengthen warmup or "
                    "tighten gradient clipping.",
                    evidence={"loss": r.loss, "baseline_median": base, "z": round(z, 2), "grad_norm": r.grad_norm,
                              "lr": r.max_lr, "first_step": r.step, "top_params": movers},
                    severity=sev,
                )
        if finding is None:
            self.params.update(r.param_norms)
        self.window.push(x)
        return finding


class LossDivergenceConfig(RuleConfig):
    span: int = Field(20, ge=1, description="Span (steps) of the loss EMA that smooths step-to-step noise.")
    ratio: float = Field(1.5, gt=1, description="EMA of the loss above this multiple of its running minimum counts as diverging.")
    patience: int = Field(20, ge=1, description="Consecutive optimizer steps above the ratio before alerting.")
    resolve_after: int = Field(50, ge=1, description="Steps back below the ratio before the alert resolves.")


@register
class LossDivergence(Rule):
    """The loss has climbed well above the best it reached and stays there.

    Symptom: the loss EMA stays above `ratio` times its running minimum for `patience` optimizer
    steps.
    Why: a loss that rises and stays up means the optimizer has left the basin it was in: the LR
    is too high for the current curvature, or a spike has damaged the weights. Training on usually
    wastes everything after the minimum.
    Fix: roll back to a checkpoint from before the rise, then lower the peak LR (often 2-10x), keep
    warmup and clipping, and consider a lower beta2 (0.95) so Adam reacts faster.
    """

    id = "loss.divergence"
    family = "loss"
    severity = Severity.critical
    Config = LossDivergenceConfig

    def __init__(self, config: LossDivergenceConfig, run) -> None:
        super().__init__(config, run)
        self.ema = Ema(config.span)
        self.best: float | None = None
        self.best_step: int | None = None
        self.above = 0
        self.since: int | None = None
        self.params = ParamBaseline()

    def observe(self, r: StepRecord) -> Finding | None:
        c = self.config
        if not finite(r.loss) or r.loss <= 0:
            return None
        ema = self.ema.push(r.loss)
        if self.best is None or ema < self.best:
            self.best, self.best_step = ema, r.step
        limit = c.ratio * self.best
        # The first raw loss above the limit dates the problem; the EMA (which lags) confirms it.
        if r.loss > limit and self.since is None:
            self.since = r.step
        if ema <= limit:
            self.above = 0
            if r.loss <= limit:
                self.since = None
            self.params.update(r.param_norms)
            return None
        self.above += 1
        if self.above < c.patience:
            return None
        movers = self.params.movers(r.param_norms)
        return Finding(
            message=f"the loss (EMA {ema:.4g}) has stayed above {c.ratio}x its minimum {self.best:.4g} (step "
            f"{self.best_step}) for {self.above} steps since step {self.since}"
            + (f"; gradients grew most in {describe_movers(movers)}." if movers else "."),
            hint="Roll back to a checkpoint from before the rise and lower the peak LR; keep warmup and clipping.",
            evidence={"loss_ema": ema, "min_loss_ema": self.best, "min_step": self.best_step,
                      "first_step": self.since, "lr": r.max_lr, "grad_norm": r.grad_norm, "top_params": movers},
            step=self.since,
        )
