"""Per-parameter gradient rules."""

from __future__ import annotations

from math import isfinite
from statistics import median

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.rules.stats import finite
from monitor.schema import Severity, StepRecord


class GradVanishingConfig(RuleConfig):
    samples: int = Field(
        20, ge=1, description="Consecutive examined records in which a parameter must stay ~0.",
    )
    stride: int = Field(
        10, ge=1, description="Examine records whose step is a multiple of this (per-parameter work is O(parameters)).",
    )
    abs_floor: float = Field(0.0, ge=0, description="A gradient norm at or below this is zero.")
    rel_floor: float = Field(
        1e-7, ge=0, description="Or below this fraction of the median parameter gradient norm of the same step.",
    )


@register
class GradVanishing(Rule):
    """Some parameters get no gradient at all.

    Symptom: a parameter the optimizer updates has a gradient norm of zero (or ~0 next to the
    others, or no gradient at all) in `samples` consecutive examined records (every `stride`-th step
    that has per-parameter norms).
    Why: a dead or detached layer: its output does not reach the loss (a .detach(), a branch never
    used, a ReLU that died, a mask that zeroes it) so it never learns, and the model is effectively
    smaller than you think.
    Fix: check the named parameters' path to the loss (no .detach()/no_grad around them, the module
    is actually called); if they are frozen on purpose, leave them out of the optimizer.
    """

    id = "grad.vanishing"
    family = "grad"
    severity = Severity.warning
    Config = GradVanishingConfig
    once = True

    def __init__(self, config: GradVanishingConfig, run) -> None:
        super().__init__(config, run)
        self.names = list(run.model.param_names)
        self._names_set = frozenset(self.names)
        self.streak: dict[str, int] = {}
        self.since: dict[str, int] = {}
        self.stride = config.stride  # read on every record (see Rule.observe)

    def observe(self, r: StepRecord) -> Finding | None:
        if r.step % self.stride or r.skipped:  # the usual case: a step not examined
            return None
        norms = r.param_norms
        if not norms:
            return None
        c = self.config
        values = list(norms.values())
        if values and not self.streak and min(values) > max(c.abs_floor, c.rel_floor * max(values)) and isfinite(sum(values)) \
                and (not self.names or norms.keys() >= self._names_set):
            # Every parameter is present and above any floor the median could set (the median is at
            # most the largest): nothing is dead and no streak is running, so nothing changes.
            return None
        finite_norms = [v for v in values if finite(v)]
        if not finite_norms:
            return None
        floor = max(c.abs_floor, c.rel_floor * median(finite_norms))
        # Parameters that have no gradient at all are missing from the norms.
        names = self.names or list(norms)
        for name in names:
            v = norms.get(name)
            dead = v is None or (finite(v) and v <= floor)
            if dead:
                if name not in self.streak:
                    self.since[name] = r.step
                self.streak[name] = self.streak.get(name, 0) + 1
            else:
                self.streak.pop(name, None)
                self.since.pop(name, None)
        dead = sorted(n for n, k in self.streak.items() if k >= c.samples)
        if not dead:
            return None
        first = min(self.since[n] for n in dead)
        missing = [n for n in dead if n not in norms]
        return Finding(
            message=f"{len(dead)} parameter(s) have had no gradient for {c.samples} sampled steps: "
            f"{', '.join(dead[:5])}{' ...' if len(dead) > 5 else ''}"
            + (f" ({len(missing)} with grad None)" if missing else "") + ".",
            hint="Check that these parameters reach the loss (no detach/no_grad, the module is called); "
            "leave frozen ones out of the optimizer.",
            evidence={"params": dead[:20], "count": len(dead), "grad_none": missing[:20], "first_step": first},
            step=first,
        )
