"""Distributed rules, on rank 0's comparison of the ranks (StepRecord.ddp, every few steps)."""

from __future__ import annotations

from statistics import median

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.schema import Severity, StepRecord


@register
class DdpDesync(Rule):
    """Ranks hold different parameters.

    Symptom: the parameter fingerprints (per-tensor norms of parameters and floating-point buffers)
    that the ranks post every few steps are not bitwise equal to rank 0's.
    Why: DDP keeps replicas identical only if every rank applies the same all-reduced update. A
    rank that mutated a weight on its own, a buffer that is not synchronised, or a rank that
    skipped a step (its own GradScaler decision, an exception swallowed) silently trains a
    different model on each rank: the loss looks fine while checkpoints from rank 0 are not what
    the other ranks compute.
    Fix: look at the named parameters on the named rank: code that writes to parameters outside
    optimizer.step() (on one rank only), buffers needing broadcast_buffers=True or SyncBatchNorm,
    and per-rank conditions around scaler.step(); restore from a checkpoint saved before the step.
    """

    id = "ddp.desync"
    needs = "ddp"
    family = "ddp"
    severity = Severity.critical

    def observe(self, r: StepRecord) -> Finding | None:
        ex = r.ddp
        if not ex or not ex.get("desync"):
            return None
        names = self.run.model.param_names
        bad = ex["desync"]
        ranks = [d["rank"] for d in bad]

        def name(i: int) -> str:
            return names[i] if 0 <= i < len(names) else f"tensor {i} (a buffer)"

        first = bad[0]
        params = [name(i) for i in first["params"]]
        return Finding(
            message=f"rank(s) {', '.join(map(str, ranks))} hold parameters that differ from rank 0's at step "
            f"{ex.get('step', r.step)}: {first['count']} tensor(s) on rank {first['rank']}, e.g. {', '.join(params[:3])}.",
            hint="Find what changes these parameters on that rank outside optimizer.step() (or an unsynchronised "
            "buffer, or a step skipped on one rank) and restore from a checkpoint taken before it.",
            evidence={"ranks": ranks, "params": params, "mismatches": [d["count"] for d in bad],
                      "compared_step": ex.get("step"), "reported": ex.get("reported")},
            step=ex.get("step", r.step),
        )


class StragglerConfig(RuleConfig):
    factor: float = Field(1.5, gt=1, description="A rank busy more than this multiple of the other ranks' median ...")
    min_seconds: float = Field(0.01, ge=0, description="... and by more than this many seconds per step ...")
    exchanges: int = Field(3, ge=1, description="... in this many exchanges in a row (each covers a few steps).")


@register
class DdpStraggler(Rule):
    """One rank is persistently slower than the others.

    Symptom: a rank's busy time per step (data loading and forwards: the part of a step that
    collectives do not wait on) is above `factor` x the median of the other ranks, by more than `min_seconds`,
    in `exchanges` comparisons in a row. Step times alone cannot show it: DDP's all-reduce makes
    every rank wait for the slowest.
    Why: the whole job runs at the speed of its slowest rank: one slow data loader, a throttled or
    shared GPU, or a noisy neighbour costs every rank the same time.
    Fix: on the named rank look at the input pipeline first (num_workers, storage, decoding), then
    the device (clocks, temperature, other processes on it); check that the data is split evenly.
    """

    id = "ddp.straggler"
    needs = "ddp"
    family = "ddp"
    severity = Severity.warning
    Config = StragglerConfig

    def __init__(self, config: StragglerConfig, run) -> None:
        super().__init__(config, run)
        self.streak: dict[str, int] = {}
        self.since: dict[str, int] = {}

    def observe(self, r: StepRecord) -> Finding | None:
        ex = r.ddp
        if not ex or not ex.get("busy") or len(ex["busy"]) < 2:
            return None
        c = self.config
        busy = {k: v for k, v in ex["busy"].items() if v is not None}
        if len(busy) < 2:
            return None
        # Against the median of the OTHER ranks: with two ranks the plain median would be their mean.
        others = {k: median([v for j, v in busy.items() if j != k]) for k in busy}
        step = ex.get("step", r.step)
        slow = {k for k, v in busy.items() if v > c.factor * others[k] and v - others[k] > c.min_seconds}
        for k in list(self.streak):
            if k not in slow:
                del self.streak[k]
                self.since.pop(k, None)
        for k in slow:
            self.streak[k] = self.streak.get(k, 0) + 1
            self.since.setdefault(k, step)
        worst = max((k for k in slow if self.streak[k] >= c.exchanges), key=lambda k: busy[k], default=None)
        if worst is None:
            return None
        med = others[worst]
        return Finding(
            message=f"rank {worst} is busy {busy[worst]:.3g} s per step outside collectives, {busy[worst] / med:.1f}x "
            f"the other ranks' median ({med:.3g} s), for {self.streak[worst]} comparisons since step {self.since[worst]}.",
            hint=f"Check rank {worst}'s input pipeline (num_workers, storage) and device; the other ranks wait for it "
            "at every all-reduce.",
            evidence={"rank": int(worst), "busy_seconds": busy, "median_seconds": med, "first_step": self.since[worst]},
            step=self.since[worst],
        )
