"""Warmup rules: judged from the LR trace the optimizer actually used."""

from __future__ import annotations

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.rules.trackers import EarlyInstability, LrTrace
from monitor.schema import Severity, StepRecord


def _fine_tuning(run) -> bool:
    """Only a small part of the model trains (adapters, a head): a PEFT/LoRA-style fine-tune."""
    m = run.model
    return bool(m.parameters) and 0 < m.trainable < 0.5 * m.parameters


def _base_lr(run) -> float | None:
    lrs = [g.initial_lr if g.initial_lr is not None else g.lr for g in run.optimizer.groups]
    lrs = [x for x in lrs if x is not None]
    return max(lrs) if lrs else None


class WarmupMissingConfig(RuleConfig):
    ratio: float = Field(
        0.5, gt=0, le=1, description="The first step's LR at or above this fraction of the peak seen counts as no warmup.",
    )
    window: int = Field(20, ge=2, description="Optimizer steps over which the peak is taken before deciding.")
    patience: int = Field(
        5, ge=1, description="Decide early when the LR has not risen above the first step's within this many steps.",
    )
    drop_ratio: float = Field(
        0.1, gt=0, lt=1,
        description="An LR that falls below this fraction of step 0's right after it means the scheduler's first "
        "update came after the first optimizer step (optimizer built at the peak LR).",
    )
    scratch_lr: float = Field(
        1e-4, gt=0, description="A peak LR at or above this (training from scratch, not fine-tuning) makes no warmup "
        "a warning; below it, or when only a small part of the model trains (adapters), it is info.",
    )
    after_steps: int = Field(
        100, ge=0, description="Steps after the start watched for instability (a non-finite value, or the loss far "
        "above its best), which makes an info a warning.",
    )
    spike_ratio: float = Field(1.5, gt=1, description="A loss this many times its lowest so far counts as instability.")


@register
class WarmupMissing(Rule):
    """The first optimizer steps run at (or near) the peak learning rate.

    Symptom: the LR of the first optimizer step is at least `ratio` of the peak LR seen in the first
    `window` steps, or it drops sharply right after step 0 (the scheduler's first update came after
    the first step, so step 0 ran at the optimizer's base LR). A warning at a from-scratch peak LR
    (at least `scratch_lr`), or when the first `after_steps` steps turn unstable (a non-finite loss
    or gradient norm, a loss `spike_ratio` times its best); info otherwise: fine-tuning at a small LR
    (Hugging Face Trainer's defaults: lr 5e-5, no warmup) or only adapters training usually works.
    Why: Adam's second-moment estimate is poor in the first ~2/(1-beta2) steps; full-size updates then
    push a transformer into instability (loss spikes, attention entropy collapse) that it may never
    leave.
    Fix: warm the LR up linearly from ~0 over at least 2/(1-beta2) steps (1-5% of training); set the
    warmup-start LR on the optimizer before the first step, e.g. with LambdaLR, which applies the
    schedule at construction.
    """

    id = "warmup.missing"
    family = "warmup"
    severity = Severity.warning
    Config = WarmupMissingConfig
    once = True

    def __init__(self, config: WarmupMissingConfig, run) -> None:
        super().__init__(config, run)
        self.lr0: float | None = None
        self.first_step: int | None = None
        self.peak = 0.0
        self.seen = 0
        self.missing: dict | None = None  # the finding's evidence once no warmup was seen, while watching
        self.unstable = EarlyInstability(config.spike_ratio)
        self.retired = run.start_step > 0 or (bool(run.optimizer.name) and not run.optimizer.adam_family)

    def _finding(self, message: str, hint: str, evidence: dict, peak_lr: float | None, step: int | None) -> Finding:
        """Info or warning by the peak LR's scale; keeps watching the first steps for instability."""
        c = self.config
        scratch = peak_lr is not None and peak_lr >= c.scratch_lr and not _fine_tuning(self.run)
        evidence = {**evidence, "peak_lr": peak_lr, "scratch_lr": c.scratch_lr,
                    "fine_tuning": _fine_tuning(self.run)}
        self.missing = {"message": message, "hint": hint, "evidence": evidence, "step": step}
        if scratch or c.after_steps == 0:
            self.retired = True
            return Finding(message=message, hint=hint, evidence=evidence, step=step)
        return Finding(message=message + " At this LR scale that is usually tolerated; watching the first "
                       f"{c.after_steps} steps for instability.", hint=hint, evidence=evidence,
                       severity=Severity.info, step=step)

    def on_start(self) -> Finding | None:
        sched = self.run.schedule
        if self.retired or not sched or not sched.get("peak_multiplier"):
            return None
        first, peak = sched["first_multiplier"], sched["peak_multiplier"]
        if first < self.config.ratio * peak:
            return None
        base = _base_lr(self.run)
        self.lr0 = -1.0  # decided: the trace is only watched for instability now
        return self._finding(
            f"the {sched['source']} schedule starts at {first / peak:.0%} of its peak multiplier: the first "
            "optimizer steps will run at (near) the peak LR, with no warmup.",
            "Add a linear warmup from ~0 over at least 2/(1-beta2) steps (1-5% of training).",
            {"first_multiplier": first, "peak_multiplier": peak, "source": sched["source"]},
            base * peak if base is not None else None, self.run.start_step)

    def _watch(self, r: StepRecord) -> Finding | None:
        """After an info: a sign of instability within `after_steps` of the start makes it a warning."""
        m = self.missing
        if self.unstable.push(r):
            self.retired = True
            return Finding(message=m["message"] + f" The run is unstable since: {self.unstable.events[0]['what']} "
                           f"at step {self.unstable.events[0]['step']}.", hint=m["hint"],
                           evidence={**m["evidence"], "instability": self.unstable.events}, step=m["step"])
        if r.step - (m["step"] or 0) >= self.config.after_steps:
            self.retired = True
        return None

    def observe(self, r: StepRecord) -> Finding | None:
        if self.retired:
            return None
        if self.missing is not None:
            return self._watch(r)
        lr = r.max_lr
        if lr is None:
            return None
        if self.lr0 is None:
            if r.step > 1:  # the run was resumed or joined late: we never saw its start
                self.retired = True
                return None
            self.lr0, self.first_step, self.peak = lr, r.step, lr
            self.seen = 1
            self.unstable.push(r)
            return None
        self.unstable.push(r)
        self.seen += 1
        self.peak = max(self.peak, lr)
        c = self.config
        lr0 = self.lr0
        ev = {"first_lr": lr0, "peak_lr_seen": self.peak, "lr_now": lr, "steps_seen": self.seen}
        if lr0 > 0 and self.seen <= 3 and lr < c.drop_ratio * lr0:
            return self._finding(
                f"step {self.first_step} ran at LR {lr0:.3g}, then the LR fell to {lr:.3g}: the scheduler's "
                "first update came after the first optimizer step, so the first update used the peak LR.",
                "Create the optimizer at the warmup-start LR (or step the scheduler once before training, "
                "or use LambdaLR, which applies the schedule at construction).",
                ev, lr0, self.first_step)
        no_rise = self.seen > c.patience and self.peak <= lr0
        if no_rise or self.seen >= c.window:
            if lr0 > 0 and lr0 >= c.ratio * self.peak:
                return self._finding(
                    f"the first optimizer step ran at LR {lr0:.3g}, {lr0 / self.peak:.0%} of the peak "
                    f"{self.peak:.3g} seen in {self.seen} steps: no warmup.",
                    "Add a linear warmup from ~0 over at least 2/(1-beta2) steps (1-5% of training).",
                    ev, self.peak, self.first_step)
            self.retired = True
        return None


def _beta2(run) -> float | None:
    for g in run.optimizer.groups:
        if g.betas and len(g.betas) == 2 and g.betas[1] is not None:
            return g.betas[1]
    return None


class WarmupTooShortConfig(RuleConfig):
    beta2_factor: float = Field(
        2.0, gt=0, description="Warmup shorter than beta2_factor / (1 - beta2) steps is short (RAdam: Adam's "
        "second-moment estimate needs about 2/(1-beta2) steps).",
    )
    min_fraction: float = Field(0.01, ge=0, lt=1, description="Warmup shorter than this fraction of max_steps (when known).")
    max_fraction: float = Field(
        0.1, gt=0, le=1, description="Never ask for more warmup than this fraction of max_steps (when known): a short "
        "run cannot spend most of itself warming up.",
    )
    severe_ratio: float = Field(
        0.1, gt=0, lt=1, description="A warmup shorter than this fraction of what is asked for, at a from-scratch "
        "peak LR, is a warning without further evidence: no known-good configuration is that short.",
    )
    scratch_lr: float = Field(1e-4, gt=0, description="Peak LR from which a run counts as trained from scratch.")
    after_steps: int = Field(
        100, ge=0, description="Steps after the warmup watched for instability (a non-finite value, or the loss far "
        "above its best), which makes the info a warning.",
    )
    spike_ratio: float = Field(1.5, gt=1, description="A loss this many times its lowest so far counts as instability.")


@register
class WarmupTooShort(Rule):
    """The LR warmup is shorter than Adam needs, and the run shows it.

    Symptom: the LR rises to its peak in fewer than beta2_factor/(1-beta2) optimizer steps (beta2
    from the optimizer; never more than `max_fraction` of max_steps), or in less than `min_fraction`
    of max_steps. That alone is advice (info): well-known configurations train fine with less
    (nanoGPT's shakespeare_char warms up 100 steps with beta2 0.99). It is a warning when the run is
    unstable during the warmup or in the `after_steps` steps after it (a non-finite loss or gradient
    norm, a loss `spike_ratio` times its best), or when the warmup is below `severe_ratio` of what is
    asked for at a from-scratch peak LR (`scratch_lr`).
    Why: Adam's second-moment estimate averages about 1/(1-beta2) steps of squared gradients; until
    it has, the effective step size is too large, which is what warmup exists to absorb. A warmup
    far shorter than that only looks like one.
    Fix: lengthen the warmup towards 2/(1-beta2) steps (40 for beta2=0.95, 2000 for 0.999) and about
    1-5% of training, or lower beta2; if the run is unstable right after warmup, also lower the peak LR.
    """

    id = "warmup.too_short"
    family = "warmup"
    severity = Severity.warning
    Config = WarmupTooShortConfig
    once = True

    def __init__(self, config: WarmupTooShortConfig, run) -> None:
        super().__init__(config, run)
        self.trace = LrTrace()
        self.beta2 = _beta2(run)
        self.unstable = EarlyInstability(config.spike_ratio)
        self.short: dict | None = None  # the advice given, while watching for instability
        self.until: int | None = None  # the last step watched
        self.retired = run.start_step > 0 or (bool(run.optimizer.name) and not run.optimizer.adam_family)

    def on_start(self) -> Finding | None:
        sched = self.run.schedule
        if self.retired or not sched or not sched.get("warmup_steps"):
            return None
        base = _base_lr(self.run)
        peak = base * sched["peak_multiplier"] if base is not None else None
        return self._judge(sched["warmup_steps"], f"the {sched['source']} schedule", {"source": sched["source"]},
                           self.run.start_step, peak)

    def observe(self, r: StepRecord) -> Finding | None:
        if self.retired:
            return None
        if self.trace.first_step is None and r.step > 1 and self.short is None:
            self.retired = True  # joined late: the warmup was never seen
            return None
        self.trace.push(r.step, r.max_lr)
        if self.unstable.push(r) and self.short is not None:
            return self._escalate()
        if self.short is not None:
            if self.until is None and self.trace.warmup_done:
                self.until = r.step + self.config.after_steps
            if self.until is not None and r.step >= self.until:
                self.retired = True
            return None
        t = self.trace
        if not t.warmup_done:
            return None
        steps = t.warmup_steps or 0
        if steps == 0 or not t.first_lr or t.first_lr >= 0.5 * t.peak:
            self.retired = True
            return None  # no warmup at all is warmup.missing's finding
        return self._judge(steps, f"the LR (peak {t.peak:.3g} at step {t.peak_step})",
                           {"peak_lr": t.peak, "peak_step": t.peak_step, "first_step": t.first_step}, t.peak_step,
                           t.peak)

    def _escalate(self) -> Finding:
        self.retired = True
        s, first = self.short, self.unstable.events[0]
        return Finding(message=s["message"] + f" The run is unstable in or right after it: {first['what']} at step "
                       f"{first['step']}.", hint=s["hint"] + " If it stays unstable, lower the peak LR.",
                       evidence={**s["evidence"], "instability": self.unstable.events}, step=s["step"])

    def _judge(self, steps: int, what: str, evidence: dict, step: int | None, peak_lr: float | None) -> Finding | None:
        c = self.config
        needs = []
        if self.beta2 is not None and self.beta2 < 1:
            needs.append((c.beta2_factor / (1 - self.beta2), f"{c.beta2_factor:g}/(1-beta2) with beta2={self.beta2:g}"))
        if self.run.max_steps:
            needs.append((c.min_fraction * self.run.max_steps, f"{c.min_fraction:.0%} of max_steps={self.run.max_steps}"))
            cap = c.max_fraction * self.run.max_steps
            needs = [(min(n, cap), why) for n, why in needs]
        short = [(n, why) for n, why in needs if steps < n]
        if not short:
            # A schedule that looks long enough at the start may still run faster than written (stepped
            # per micro-batch): the trace has the last word.
            self.retired = self.trace.warmup_done
            return None
        need, why = max(short)
        message = f"{what} warms up in {steps} optimizer steps; {why} asks for at least {need:.0f}."
        hint = f"Lengthen the warmup towards {need:.0f} steps (about 1-5% of training)."
        evidence = {"warmup_steps": steps, "needed": round(need, 1), "beta2": self.beta2, "max_steps": self.run.max_steps,
                    "peak_lr": peak_lr, **evidence}
        severe = steps < c.severe_ratio * need and peak_lr is not None and peak_lr >= c.scratch_lr \
            and not _fine_tuning(self.run)
        if severe or c.after_steps == 0:
            self.retired = True
            if severe:
                message += f" That is under {c.severe_ratio:.0%} of it at a from-scratch peak LR ({peak_lr:.3g})."
            return Finding(message=message, hint=hint, evidence=evidence, step=step)
        self.short = {"message": message, "hint": hint, "evidence": evidence, "step": step}
        if self.unstable.events:  # already unstable during the warmup
            return self._escalate()
        return Finding(message=message + f" Advice only while the run stays stable (watching {c.after_steps} steps "
                       "after the warmup).", hint=hint, evidence=evidence, severity=Severity.info, step=step)
