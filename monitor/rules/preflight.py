"""Preflight checks: the training checklist, judged at attach and in the first steps.

Facts about the optimizer and the scaler come from RunInfo (what attach saw; run.json keeps it,
so `monitor check` reaches the same verdicts); autocast and clipping come from the first
StepRecords. Each check is one rule, `preflight.<name>`, configurable like any other.
"""

from __future__ import annotations

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.schema import RunInfo, Severity, StepRecord


class PreflightRule(Rule):
    """Base of the preflight checks: at most one alert per run.

    A check of the run's facts decides in `check()`, at start; a check of the first steps looks at
    `first_steps` records in `look()` and then retires.
    """

    family = "preflight"
    once = True
    first_steps = 50

    def __init__(self, config: RuleConfig, run: RunInfo) -> None:
        super().__init__(config, run)
        self.seen = 0

    def check(self) -> Finding | None:
        return None

    def look(self, record: StepRecord) -> Finding | None:
        return None

    def on_start(self) -> Finding | None:
        finding = self.check()
        if type(self).look is PreflightRule.look:
            self.retired = True  # facts only: nothing to see in the records
        return finding

    def observe(self, record: StepRecord) -> Finding | None:
        self.seen += 1
        if self.seen >= self.first_steps:
            self.retired = True
        finding = self.look(record)
        if finding is not None:
            self.retired = True
        return finding


def _adam(run: RunInfo) -> bool:
    return run.optimizer.adam_family


def _peak_lr(run: RunInfo) -> float | None:
    lrs = [g.initial_lr if g.initial_lr is not None else g.lr for g in run.optimizer.groups]
    lrs = [x for x in lrs if x is not None]
    return max(lrs) if lrs else None


@register
class CoupledAdamWeightDecay(PreflightRule):
    """torch.optim.Adam with weight_decay > 0: L2 regularisation, not weight decay.

    Symptom: the optimizer is torch.optim.Adam and a param group has weight_decay > 0.
    Why: Adam adds weight_decay * w to the gradient, so the decay is divided by the adaptive
    denominator sqrt(v): parameters with large gradients are barely regularised and the effective
    decay varies per parameter. AdamW decouples it (Loshchilov & Hutter), which is what
    transformer recipes assume.
    Fix: use torch.optim.AdamW with the same weight_decay (typically 0.01-0.1).
    """

    id = "preflight.adam_coupled_weight_decay"
    severity = Severity.warning

    def check(self) -> Finding | None:
        wds = [g.weight_decay for g in self.run.optimizer.groups if g.weight_decay]
        if self.run.optimizer.name != "Adam" or not wds:
            return None
        return Finding(
            message=f"torch.optim.Adam with weight_decay={max(wds):g} applies coupled L2 through the adaptive "
            "learning rate, not decoupled weight decay.",
            hint="Use torch.optim.AdamW with the same weight_decay.",
            evidence={"optimizer": self.run.optimizer.name, "weight_decay": max(wds)},
        )


@register
class DecayOnNormsAndBiases(PreflightRule):
    """Weight decay is applied to biases and normalisation weights.

    Symptom: a param group with weight_decay > 0 holds 1-D parameters (biases, LayerNorm/RMSNorm
    gains).
    Why: decaying a LayerNorm gain or a bias towards zero fights the normalisation instead of
    regularising capacity; transformer recipes (GPT-2, nanoGPT, LLaMA) exempt them.
    Fix: build two param groups: weight_decay on >= 2-D weights, 0.0 on biases and norm weights.
    """

    id = "preflight.decay_on_norm_bias"
    severity = Severity.info

    def check(self) -> Finding | None:
        groups = [g for g in self.run.optimizer.groups if g.weight_decay and g.decay_1d]
        if not groups:
            return None
        names = [n for g in groups for n in g.decay_1d_names][:5]
        count = sum(g.decay_1d for g in groups)
        return Finding(
            message=f"weight decay applies to {count} bias/norm parameter(s), e.g. {', '.join(names)}.",
            hint="Put biases and norm weights in a param group with weight_decay=0.0.",
            evidence={"count": count, "examples": names},
        )


class LrRangeConfig(RuleConfig):
    low: float = Field(1e-5, gt=0, description="Peak LRs below this are unusual for Adam-family optimizers (info).")
    high: float = Field(3e-3, gt=0, description="Peak LRs above this are unusual (info) ...")
    far: float = Field(1e-2, gt=0, description="... and above this almost always unstable for transformers (warning).")


@register
class LrRange(PreflightRule):
    """The peak learning rate is outside the usual range for transformers with Adam.

    Symptom: the optimizer's (initial) LR is below `low` or above `high` (info), or above `far`
    (warning), for an Adam-family optimizer.
    Why: transformer pre-training typically uses 1e-4 to 6e-4 (smaller models tolerate up to a few
    1e-3, fine-tuning 1e-5 to 5e-5); far above that, Adam's normalised updates are large enough to
    blow up attention logits and the loss within the first few hundred steps.
    Fix: check the LR (a misplaced exponent, an SGD recipe's LR given to Adam); start from 3e-4 and
    tune by factors of 2-3.
    """

    id = "preflight.lr_range"
    severity = Severity.info
    Config = LrRangeConfig

    def check(self) -> Finding | None:
        c = self.config
        lr = _peak_lr(self.run)
        if lr is None or lr <= 0 or not _adam(self.run) or c.low <= lr <= c.high:
            return None
        far = lr > c.far
        return Finding(
            message=f"peak LR {lr:g} is {'far ' if far else ''}outside the usual {c.low:g}-{c.high:g} for "
            f"{self.run.optimizer.name} on transformers.",
            hint="Check the LR (exponent, an SGD recipe's LR); start near 3e-4 and tune by factors of 2-3.",
            evidence={"lr": lr, "low": c.low, "high": c.high},
            severity=Severity.warning if far else None,
        )


class BetasConfig(RuleConfig):
    beta1: tuple[float, float] = Field((0.8, 0.99), description="Usual range of Adam's beta1.")
    beta2: tuple[float, float] = Field((0.9, 0.9999), description="Usual range of Adam's beta2.")
    eps: tuple[float, float] = Field((1e-12, 1e-5), description="Usual range of Adam's eps.")


@register
class AdamHyperparameters(PreflightRule):
    """Adam's betas or eps are outside their usual ranges.

    Symptom: beta1 outside 0.8-0.99, beta2 outside 0.9-0.9999, or eps outside 1e-12-1e-5 in some
    param group of an Adam-family optimizer.
    Why: beta1 sets the momentum horizon and beta2 how fast the per-parameter step size adapts
    (0.95 is the common choice for large transformers, 0.999 is PyTorch's default); eps bounds the
    step of parameters with tiny gradients, and a large eps silently turns Adam into SGD.
    Fix: use betas=(0.9, 0.95) and eps=1e-8 unless you have a reason not to.
    """

    id = "preflight.adam_hyperparameters"
    severity = Severity.info
    Config = BetasConfig

    def check(self) -> Finding | None:
        if not _adam(self.run):
            return None
        c = self.config
        odd = []
        for i, g in enumerate(self.run.optimizer.groups):
            b = g.betas or []
            for name, v, (lo, hi) in (("beta1", b[0] if len(b) > 0 else None, c.beta1),
                                      ("beta2", b[1] if len(b) > 1 else None, c.beta2), ("eps", g.eps, c.eps)):
                if v is not None and not lo <= v <= hi:
                    odd.append(f"group {i} {name}={v:g} (usual {lo:g}-{hi:g})")
        if not odd:
            return None
        return Finding(
            message="unusual Adam hyperparameters: " + "; ".join(odd[:4]) + ".",
            hint="Use betas=(0.9, 0.95) and eps=1e-8 unless you have a reason not to.",
            evidence={"findings": odd},
        )


def _scaler_enabled(run: RunInfo) -> bool:
    return bool(run.scaler and run.scaler.get("enabled"))


@register
class Fp16WithoutScaler(PreflightRule):
    """fp16 autocast without a GradScaler.

    Symptom: the forward pass runs under torch.autocast with dtype float16 and no enabled GradScaler
    was passed to monitor.attach.
    Why: fp16's smallest normal value is about 6e-5; without loss scaling most gradients of a
    transformer underflow to zero in the backward pass and the model learns little or nothing
    (bf16 has fp32's range and does not need it).
    Fix: create torch.amp.GradScaler() and use scaler.scale(loss).backward(), scaler.step(optimizer),
    scaler.update() (and pass scaler= to monitor.attach), or switch autocast to bfloat16.
    """

    id = "preflight.fp16_without_scaler"
    severity = Severity.critical

    def look(self, r: StepRecord) -> Finding | None:
        if r.autocast != "float16" or _scaler_enabled(self.run):
            return None
        return Finding(
            message="the forward pass runs under fp16 autocast but no enabled GradScaler was given to the monitor.",
            hint="Use torch.amp.GradScaler (scaler.scale(loss).backward(), scaler.step, scaler.update) or bfloat16.",
            evidence={"autocast": r.autocast, "scaler": self.run.scaler},
        )


@register
class ScalerWithBf16(PreflightRule):
    """A GradScaler is used with bf16 autocast.

    Symptom: the forward pass runs under bfloat16 autocast and an enabled GradScaler is in the loop.
    Why: bf16 has fp32's exponent range, so gradients do not underflow and loss scaling only adds
    work (and occasional skipped steps when the scale grows).
    Fix: drop the GradScaler for bf16 runs (or create it with enabled=False).
    """

    id = "preflight.scaler_with_bf16"
    severity = Severity.info

    def look(self, r: StepRecord) -> Finding | None:
        if r.autocast != "bfloat16" or not _scaler_enabled(self.run):
            return None
        return Finding(
            message="a GradScaler is enabled although autocast runs in bfloat16, which needs no loss scaling.",
            hint="Create the GradScaler with enabled=False for bf16 (or drop it).",
            evidence={"autocast": r.autocast, "scaler": self.run.scaler},
        )


class NoClippingConfig(RuleConfig):
    steps: int = Field(10, ge=1, description="Optimizer steps without a clip_grad_norm_ call before reporting.")


@register
class NoClipping(PreflightRule):
    """No gradient clipping in the loop.

    Symptom: the first `steps` optimizer steps ran without a call to clip_grad_norm_ on the
    monitored parameters.
    Why: transformers occasionally produce gradient spikes far above their typical norm; without
    clipping a single one can undo many steps of training or push the run into divergence.
    Fix: call torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) after backward (after
    scaler.unscale_(optimizer) with AMP) and before the optimizer step.
    """

    id = "preflight.no_clipping"
    severity = Severity.info
    Config = NoClippingConfig

    def __init__(self, config: NoClippingConfig, run: RunInfo) -> None:
        super().__init__(config, run)
        self.unclipped = 0
        self.retired = run.source != "trainmon"  # foreign logs do not say whether the loop clips

    def look(self, r: StepRecord) -> Finding | None:
        if r.max_norm is not None:
            self.retired = True
            return None
        self.unclipped += 1
        if self.unclipped < self.config.steps:
            return None
        self.retired = True
        return Finding(
            message=f"no clip_grad_norm_ call in the first {self.unclipped} optimizer steps.",
            hint="Clip with torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) before the optimizer step.",
            evidence={"steps": self.unclipped},
            step=r.step,
        )
