"""Attention-sharpness rules, on per-layer statistics in StepRecord.attention.

Each layer's entry holds `entropy_ratio` (attention entropy / log(visible keys), mean over heads),
`entropy_min` (the lowest head), `max_logit` and `max_prob`; the attention probe (or
mon.observe_attention) fills them on sampled steps, so these rules act on the records that
carry them and skip the rest.
"""

from __future__ import annotations

from collections import deque
from math import isfinite

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.rules.stats import Ema
from monitor.rules.trackers import LrTrace
from monitor.schema import Severity, StepRecord


class EntropyCollapseConfig(RuleConfig):
    drop: float = Field(0.5, gt=0, lt=1, description="Mean entropy ratio below (1 - drop) x the layer's baseline EMA.")
    floor: float = Field(0.05, ge=0, lt=1, description="Or a layer's mean entropy ratio below this absolute floor.")
    head_floor: float = Field(
        0.01, ge=0, lt=1, description="Or a layer's lowest head below this (one-hot) when its baseline was over "
        "5x higher: a head that collapsed during the run, not one that was always sharp (an attention sink).",
    )
    span: int = Field(10, ge=1, description="Span (in sampled steps) of each layer's baseline EMA.")
    min_samples: int = Field(3, ge=1, description="Samples of a layer's baseline before its drop is judged.")


@register
class AttentionEntropyCollapse(Rule):
    """Attention in some layer is collapsing towards one-hot.

    Symptom: a layer's normalised attention entropy (entropy / log of the visible keys) falls more
    than `drop` below its own baseline (an EMA started after warmup), or below `floor`, or its
    lowest head falls below `head_floor` from a baseline well above it.
    Why: entropy collapse (Zhai et al. 2023) comes with, and usually before, loss spikes and
    divergence in transformers: attention logits grow until softmax saturates, gradients through
    attention vanish and training destabilises.
    Fix: lower the LR, add or lengthen warmup, and bound the attention logits: QK-LayerNorm,
    logit soft-capping or sigma-reparametrisation of the query/key projections.
    """

    id = "attention.entropy_collapse"
    family = "attention"
    severity = Severity.critical
    Config = EntropyCollapseConfig

    def __init__(self, config: EntropyCollapseConfig, run) -> None:
        super().__init__(config, run)
        self.trace = LrTrace()
        self.base: dict[str, Ema] = {}  # per layer: mean entropy ratio
        self.base_min: dict[str, Ema] = {}  # per layer: its lowest head

    def observe(self, r: StepRecord) -> Finding | None:
        trace = self.trace
        if not trace.warmup_done:  # only whether warmup is over is read here, and it never starts again
            trace.push(r.step, r.max_lr)
        if not r.attention:
            return None
        c = self.config
        floor, head_floor, keep, min_samples = c.floor, c.head_floor, 1 - c.drop, c.min_samples
        warming = bool(r.lr) and not trace.warmup_done  # the baseline starts after warmup
        base, base_min = self.base, self.base_min
        bad = []
        for layer, st in r.attention.items():
            ent = st.get("entropy_ratio")
            if ent is None or not isfinite(ent):
                continue
            low = st.get("entropy_min")
            ema, ema_min = base.get(layer), base_min.get(layer)
            settled = ema is not None and ema.count >= min_samples
            # A cheap test that every reason below needs (the usual layer has none).
            if ent < floor or (settled and (ent < keep * ema.value or (low is not None and low < head_floor))):
                reasons = []
                if ent < floor:
                    reasons.append(f"below the floor {floor:g}")
                if settled and ent < keep * ema.value:
                    reasons.append(f"{1 - ent / ema.value:.0%} below its baseline {ema.value:.3f}")
                if (settled and low is not None and isfinite(low) and low < head_floor
                        and ema_min.value > 5 * head_floor):
                    reasons.append(f"a head at {low:.3f} from {ema_min.value:.3f}")
                if reasons:
                    bad.append({"layer": layer, "entropy_ratio": ent, "entropy_min": low,
                                "baseline": ema.value if ema else None, "why": "; ".join(reasons)})
                    continue
            if warming:
                continue
            if ema is None:
                ema = base[layer] = Ema(c.span)
            if ema_min is None:
                ema_min = base_min[layer] = Ema(c.span)
            ema.push(ent)
            ema_min.push(low if low is not None and isfinite(low) else ent)
        if not bad:
            return None
        bad.sort(key=lambda b: b["entropy_ratio"])
        worst = bad[0]
        return Finding(
            message=f"attention entropy collapsing in {len(bad)} layer(s); worst {worst['layer']}: ratio "
            f"{worst['entropy_ratio']:.3f} ({worst['why']}).",
            hint="Lower the LR or lengthen warmup, and bound attention logits (QK-LayerNorm or logit soft-capping).",
            evidence={"layers": bad[:8], "first_step": r.step, "lr": r.max_lr, "loss": r.loss},
        )


class LogitGrowthConfig(RuleConfig):
    warning: float = Field(100.0, gt=0, description="Max attention logit above this is a warning (~100 is a healthy ceiling).")
    critical: float = Field(1000.0, gt=0, description="Max attention logit above this is critical (>1e4: diverged).")
    growth_factor: float = Field(4.0, gt=1, description="Or the max logit grew this many times ...")
    growth_samples: int = Field(5, ge=2, description="... within this many sampled steps ...")
    growth_min: float = Field(30.0, ge=0, description="... and is above this value (fast growth, early warning).")


@register
class AttentionLogitGrowth(Rule):
    """Attention logits are large or growing fast.

    Symptom: a layer's largest pre-softmax attention logit exceeds `warning` (`critical`), or has
    grown `growth_factor` times within `growth_samples` samples while above `growth_min`.
    Why: unbounded growth of attention logits (Dehghani et al. 2023; Wortsman et al. 2023) saturates
    softmax into one-hot attention and is a leading cause of loss divergence in large transformers;
    healthy runs stay below about 100.
    Fix: add QK-LayerNorm (normalise queries and keys), clip or soft-cap the logits (Megatron's
    qk-clip), lower the LR, or use z-loss on attention logits.
    """

    id = "attention.logit_growth"
    needs = "attention"
    family = "attention"
    severity = Severity.warning
    Config = LogitGrowthConfig

    def __init__(self, config: LogitGrowthConfig, run) -> None:
        super().__init__(config, run)
        self.history: dict[str, deque[float]] = {}

    def observe(self, r: StepRecord) -> Finding | None:
        if not r.attention:
            return None
        c = self.config
        critical, warning, growth_min, growth_factor = c.critical, c.warning, c.growth_min, c.growth_factor
        history = self.history
        worst = None
        for layer, st in r.attention.items():
            m = st.get("max_logit")
            if m is None or not isfinite(m):
                continue
            hist = history.get(layer)
            if hist is None:
                hist = history[layer] = deque(maxlen=c.growth_samples)
            oldest = hist[0] if hist else None
            hist.append(m)
            if m > critical:
                sev, why = Severity.critical, f"above {critical:g}"
            elif m > warning:
                sev, why = Severity.warning, f"above {warning:g}"
            elif oldest is not None and oldest > 0 and m > growth_min and m >= growth_factor * oldest:
                sev, why = Severity.warning, f"{m / oldest:.1f}x in {len(hist) - 1} samples"
            else:
                continue
            if worst is None or m > worst[1]:
                worst = (layer, m, sev, why)
        if worst is None:
            return None
        layer, m, sev, why = worst
        return Finding(
            message=f"max attention logit {m:.4g} in {layer} ({why}).",
            hint="Add QK-LayerNorm or soft-cap attention logits, and lower the LR.",
            evidence={"layer": layer, "max_logit": m, "first_step": r.step, "lr": r.max_lr, "loss": r.loss},
            severity=sev,
        )
