"""Loss rules: non-finite values and robust spikes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.rules.stats import Ema, LazyLogMedian, RobustWindow
from monitor.rules.trackers import ParamBaseline, Recurrence, describe_movers
from monitor.schema import Severity, StepRecord

_INF, _log, _isfinite = math.inf, math.log, math.isfinite


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
    scope = "rank"

    def observe(self, r: StepRecord) -> Finding | None:
        loss, g = r.loss, r.grad_norm
        if (loss is None or _isfinite(loss)) and (g is None or _isfinite(g) or r.skipped):
            return None  # the usual case: finite values
        bad_loss = r.loss is not None and not math.isfinite(r.loss)
        # On a step GradScaler skipped, inf gradients are expected: that is amp.overflow's business.
        bad_grad = r.grad_norm is not None and not math.isfinite(r.grad_norm) and not r.skipped
        if not (bad_loss or bad_grad):
            return None
        what = "loss" if bad_loss else "gradient norm"
        value = r.loss if bad_loss else r.grad_norm
        severity = None
        message = f"the {what} is {value} at step {r.step}."
        if not bad_loss and self.run.source != "trainmon" and r.loss_scale is None:
            # Another framework's log that does not say whether GradScaler skipped this step (Hugging
            # Face logs an inf grad norm for an fp16 overflow step): a finite loss makes that likely.
            severity = Severity.warning
            message += " The log does not say whether the step was skipped; with fp16 and a GradScaler this is " \
                       "an overflow step (harmless unless it repeats)."
        return Finding(
            message=message,
            hint="Restart from the last good checkpoint with a lower peak LR or longer warmup, keep clipping on, "
            "prefer bf16 to fp16, and inspect this step's batch.",
            evidence={"loss": r.loss, "grad_norm": r.grad_norm, "lr": r.max_lr, "skipped": r.skipped},
            severity=severity,
        )


class LossSpikeConfig(RuleConfig):
    window: int = Field(100, ge=10, description="Trailing optimizer steps forming the baseline (median/MAD of log loss).")
    z_warning: float = Field(6.0, gt=0, description="Robust z-score of log loss that raises a warning.")
    z_critical: float = Field(8.0, gt=0, description="Robust z-score of log loss that raises a critical alert.")
    min_jump: float = Field(
        0.05, ge=0, description="Minimum relative rise over the baseline median (0.05 = 5%), so a near-constant loss "
        "with a tiny MAD does not alarm on noise.",
    )
    grad_ratio: float = Field(
        2.0, gt=1, description="A spike confirmed at once: the gradient norm is at least this multiple of its own median.",
    )
    confirm_steps: int = Field(
        2, ge=0, description="Otherwise confirmed if the loss stays elevated (half the z threshold) this many more "
        "steps; a single-step outlier that returns at once is only info (a hard batch).",
    )
    recur_count: int = Field(
        3, ge=2, description="This many spikes of at least recur_ratio within recur_window steps make transient ones "
        "a warning: recurring spikes are an early sign of instability.",
    )
    recur_window: int = Field(400, ge=10, description="Optimizer steps over which spikes count as recurring.")
    recur_ratio: float = Field(
        1.5, gt=1, description="Only spikes at least this multiple of the baseline median count towards recurrence "
        "(hard batches of web text reach about 1.4x in healthy runs: the modded-nanogpt Muon record).",
    )
    resolve_after: int = Field(20, ge=1, description="Steps without a spike before the alert resolves.")
    cooldown_steps: int = Field(50, ge=0, description="After an alert resolves, steps during which the rule stays quiet.")


@dataclass
class _Pending:
    step: int
    loss: float
    z: float
    base: float
    grad_norm: float | None
    movers: list
    confirmed: int = 0


@register
class LossSpike(Rule):
    """A loss value far above the recent baseline.

    Symptom: the log loss jumps more than z_warning (z_critical) robust standard deviations above the
    median of the trailing window, and the jump is corroborated: the gradient norm spikes with it
    (grad_ratio) or the loss stays elevated for confirm_steps more steps. A one-step outlier the run
    shrugs off at once is reported as info, unless it recurs: `recur_count` spikes of at least
    `recur_ratio` x the median within `recur_window` steps are a warning that lists their steps.
    Why: spikes are the first visible sign of an unstable run (attention logit growth, Adam's second
    moment lagging a sudden gradient, a bad batch); left alone they recur and may diverge. Real text
    also has hard batches whose loss is briefly high while the gradients stay normal: those are not
    instability.
    Fix: inspect the batch at this step; if spikes recur, lower the peak LR, lengthen warmup, tighten
    clipping (max_norm 1.0) or lower Adam's beta2 to 0.95.
    """

    id = "loss.spike"
    family = "loss"
    severity = Severity.warning
    scope = "rank"
    Config = LossSpikeConfig

    def __init__(self, config: LossSpikeConfig, run) -> None:
        super().__init__(config, run)
        # quiet_below: a log loss below it cannot start a spike (the test in `observe`)
        self.window = RobustWindow(config.window, alarm=(config.z_warning, 1e-4, math.log1p(config.min_jump)))
        self.grads = LazyLogMedian(config.window)  # its median is read only when a spike is judged
        self.params = ParamBaseline()
        self.pending: _Pending | None = None
        self.recur = Recurrence(config.recur_count, config.recur_window)

    def _finding(self, p: _Pending, severity: Severity, why: str) -> Finding:
        c = self.config
        recurring = self.recur.add(p.step) if p.loss >= c.recur_ratio * p.base else None
        extra = {}
        if recurring and severity is Severity.info:
            severity = Severity.warning
            why += (f"; {len(recurring)} spikes of at least {c.recur_ratio:g}x within {c.recur_window} steps (steps "
                    f"{', '.join(map(str, recurring))}): recurring spikes are an early sign of instability")
            extra = {"spike_steps": recurring}
        return Finding(
            message=f"loss {p.loss:.4g} at step {p.step} is {p.loss / p.base:.2f}x the median {p.base:.4g} of the last "
            f"{c.window} steps (robust z {p.z:.1f}); {why}"
            + (f"; gradients grew most in {describe_movers(p.movers)}." if p.movers else "."),
            hint="Inspect this step's batch; if spikes recur, lower the peak LR, lengthen warmup or "
            "tighten gradient clipping.",
            evidence={"loss": p.loss, "baseline_median": p.base, "z": round(p.z, 2), "grad_norm": p.grad_norm,
                      "first_step": p.step, "top_params": p.movers, **extra},
            severity=severity,
            step=p.step,
        )

    def _severity(self, z: float) -> Severity:
        return Severity.critical if z >= self.config.z_critical else Severity.warning

    def observe(self, r: StepRecord) -> Finding | None:
        loss = r.loss
        if loss is None or not 0.0 < loss < _INF:  # finite and positive
            return None
        x = _log(loss)
        g = r.grad_norm
        if g is not None and not 0.0 < g < _INF:
            g = None
        w = self.window
        if x < w.quiet_below and self.pending is None:
            # The usual case: no spike pending and the loss clearly below the alarm level, so the tests
            # below would find nothing: only the windows and the baseline move.
            norms = r.param_norms
            if norms:  # sampled steps only (update() ignores the others)
                self.params.update(norms)
            w.push(x)
            if g is not None:
                self.grads.push(g)
            return None
        c = self.config
        finding = None
        # The first window is the early transient: no baseline yet.
        if w.full:
            med = w.med
            z = w.zscore(x, min_sigma=1e-4)
            p = self.pending
            if p is not None:
                if z >= c.z_warning / 2 and x - med >= math.log1p(c.min_jump) / 2:
                    p.confirmed += 1
                    if p.confirmed >= c.confirm_steps:
                        self.pending = None
                        finding = self._finding(p, self._severity(p.z), f"still elevated {p.confirmed} steps later")
                else:
                    self.pending = None
                    finding = self._finding(p, Severity.info, "back to normal the next step with normal gradients "
                                                              "(a hard batch?)")
            elif z >= c.z_warning and x - med >= math.log1p(c.min_jump):
                grad_med = math.exp(self.grads.median()) if self.grads.full else None
                p = _Pending(r.step, r.loss, z, math.exp(med), r.grad_norm, self.params.movers(r.param_norms))
                if grad_med is not None and g is not None and g >= c.grad_ratio * grad_med:
                    finding = self._finding(p, self._severity(z), f"the gradient norm jumped with it "
                                                                  f"({g / grad_med:.1f}x its median)")
                elif c.confirm_steps == 0:
                    finding = self._finding(p, self._severity(z), "no confirmation required")
                else:
                    self.pending = p
        if finding is None and self.pending is None:
            self.params.update(r.param_norms)
        w.push(x)
        if g is not None:
            self.grads.push(g)
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
    scope = "rank"
    Config = LossDivergenceConfig

    def __init__(self, config: LossDivergenceConfig, run) -> None:
        super().__init__(config, run)
        self.ema = Ema(config.span)
        self.best: float | None = None
        self.best_step: int | None = None
        self.above = 0
        self.since: int | None = None
        self.params = ParamBaseline()
        self.ratio = config.ratio  # read on every record (see Rule.observe)

    def observe(self, r: StepRecord) -> Finding | None:
        loss = r.loss
        if loss is None or not 0.0 < loss < _INF:  # finite and positive
            return None
        ema = self.ema.push(loss)
        if self.best is None or ema < self.best:
            self.best, self.best_step = ema, r.step
        limit = self.ratio * self.best
        # The first raw loss above the limit dates the problem; the EMA (which lags) confirms it.
        if loss > limit and self.since is None:
            self.since = r.step
        if ema <= limit:
            self.above = 0
            if loss <= limit:
                self.since = None
            norms = r.param_norms
            if norms:  # sampled steps only (update() ignores the others)
                self.params.update(norms)
            return None
        self.above += 1
        c = self.config
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
