"""Loss rules: non-finite values and robust spikes."""

from __future__ import annotations

import math

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.rules.stats import RobustWindow, finite
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
                finding = Finding(
                    message=f"loss {r.loss:.4g} is {r.loss / base:.2f}x the median {base:.4g} of the last "
                    f"{c.window} steps (robust z {z:.1f}).",
                    hint="Inspect this step's batch; if spikes recur, lower the peak LR, lengthen warmup or "
                    "tighten gradient clipping.",
                    evidence={"loss": r.loss, "baseline_median": base, "z": round(z, 2), "grad_norm": r.grad_norm,
                              "lr": r.max_lr, "first_step": r.step},
                    severity=sev,
                )
        self.window.push(x)
        return finding
